"""The commands an operator runs on a Proxmox VE node, as ksmpolicy prints them in its fixes."""

from __future__ import annotations


def redefine(vmid: str) -> str:
    """Rewrite the VM's config for the policy (qm set)."""
    return f"ksmpolicy apply --proxmox --vmid {vmid}"


def restart(vmid: str) -> tuple[str, tuple[str, ...]]:
    """(text, steps) that restart a VM so that QEMU starts again from its config: `qm reboot`
    shuts it down and starts a new QEMU process (a reboot inside the guest does not)."""
    return f"qm reboot {vmid}", (f"qm reboot {vmid}",)
