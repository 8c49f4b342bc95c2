"""The platform interface, and the facts every platform starts from: the process.

Each platform is an adapter (`libvirt/platform.py`, `proxmox/platform.py`, and
`platforms/process.py` for VMMs and services started any other way). The inventory asks them,
in order, for a process's facts; the first that knows the process runs it, and gives the
commands of its fixes and its live switch.
Nothing above the adapters branches on the platform: status, doctor, the keeper and the
metrics call these methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ksmpolicy.kernel.scan import VmProcess
from ksmpolicy.paths import HostPaths
from ksmpolicy.policy.decide import VmFacts


@dataclass(frozen=True)
class VmRef:
    """A running VM as the commands of a fix name it."""

    pid: int
    name: str
    uuid: str | None = None
    vmid: str | None = None
    merge: bool | None = None  # whether the policy lets its guest RAM merge (None: no policy)


class Platform(Protocol):
    """One way of running VMs on this host."""

    name: str  # "libvirt", "proxmox", "process": the `source` of a VM in status

    def facts(self, paths: HostPaths, process: VmProcess) -> VmFacts | None:
        """The VM's facts from the platform's own records, or None when this platform does not
        run the process (the inventory then asks the next one)."""

    def redefine(self, vm: VmRef) -> str:
        """The command that rewrites the VM's definition for the policy."""

    def restart(self, vm: VmRef) -> tuple[str, tuple[str, ...]]:
        """(fix, steps) that restart the VM so that QEMU starts again from its definition."""

    def switch_now(self, vm: VmRef) -> tuple[str, tuple[str, ...]]:
        """(fix, steps) that bring the running VM's guest RAM in line now, and its definition
        for the next start."""

    def set_merge(self, paths: HostPaths, vm: VmRef, merge: bool) -> list[str]:
        """Switch the running VM's guest RAM to mergeable or not (QMP); the memory backends it
        changed. Raises KsmPolicyError when it cannot."""
