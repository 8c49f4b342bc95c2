"""Proxmox VE as a platform: a QEMU started with `-id VMID` is VM VMID, its facts are its
config's, its fixes are `qm` commands, and its live switch is the QMP socket qemu-server
serves (free between commands)."""

from __future__ import annotations

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.kernel.scan import VmProcess
from ksmpolicy.paths import HostPaths
from ksmpolicy.platforms.base import VmRef
from ksmpolicy.platforms.process import qmp_switch
from ksmpolicy.policy.decide import VmFacts
from ksmpolicy.proxmox import commands


class Proxmox:
    name = "proxmox"

    def facts(self, paths: HostPaths, process: VmProcess) -> VmFacts | None:
        if not process.vmid:
            return None
        from ksmpolicy.proxmox.conf import facts, parse  # noqa: PLC0415
        from ksmpolicy.proxmox.node import read_config  # noqa: PLC0415

        try:
            return facts(parse(read_config(paths, process.vmid)), process.vmid).vm
        except KsmPolicyError:
            # `-id` is Proxmox's own QEMU option: qemu-server runs it even when its config
            # cannot be read now (pmxcfs down, a config moved away); the process's facts stand.
            return VmFacts(name=process.name, vmid=process.vmid, kind=process.kind)

    def redefine(self, vm: VmRef) -> str:
        return commands.redefine(vm.vmid or "VMID")

    def restart(self, vm: VmRef) -> tuple[str, tuple[str, ...]]:
        return commands.restart(vm.vmid or "VMID")

    def switch_now(self, vm: VmRef) -> tuple[str, tuple[str, ...]]:
        """qemu-server has no live switch of its own: the config, then a restart."""
        text, steps = self.restart(vm)
        return f"{self.redefine(vm)}, then {text}", (self.redefine(vm), *steps)

    def set_merge(self, paths: HostPaths, vm: VmRef, merge: bool) -> list[str]:
        fallback = str(paths.qmp_socket(vm.vmid)) if vm.vmid else None
        return qmp_switch(paths, vm, merge, fallback)
