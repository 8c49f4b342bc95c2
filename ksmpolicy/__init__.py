"""ksmpolicy: per-VM Kernel Same-page Merging policy for libvirt/KVM and Proxmox VE hosts."""

from __future__ import annotations

__version__ = "0.1.0"
