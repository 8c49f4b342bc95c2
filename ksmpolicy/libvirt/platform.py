"""libvirt as a platform: a QEMU libvirt runs has a status file (/run/libvirt/qemu/NAME.xml)
whose definition gives its facts; its fixes are `ksmpolicy apply`/`enforce` and `virsh`
commands, and its live switch goes through libvirt's monitor (libvirt owns QEMU's)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.files import read_regular
from ksmpolicy.kernel.scan import VmProcess
from ksmpolicy.libvirt import commands
from ksmpolicy.paths import HostPaths
from ksmpolicy.platforms.base import VmRef
from ksmpolicy.policy.decide import VmFacts


class Libvirt:
    name = "libvirt"

    def __init__(self, connect: Callable[[], Any] | None = None) -> None:
        self.connect = connect  # a libvirt connection, for the live switch (the daemon's)

    def facts(self, paths: HostPaths, process: VmProcess) -> VmFacts | None:
        """From libvirt's status file of the domain the process names, when its UUID is the
        process's own (a stale file, or another domain's, is not this VM)."""
        if process.kind != "qemu" or not process.name or "/" in process.name:
            return None
        from ksmpolicy.libvirt.domain import MAX_XML_BYTES, facts_of, parse  # noqa: PLC0415

        try:
            root, _raw = parse(
                read_regular(paths.libvirt_run / f"{process.name}.xml", MAX_XML_BYTES)
            )
            domain = root if root.tag == "domain" else root.child("domain")
            found = facts_of(domain).vm if domain is not None else None
        except (OSError, KsmPolicyError):
            return None
        if found is None or (process.uuid and found.uuid and process.uuid != found.uuid.lower()):
            return None
        return found

    def redefine(self, vm: VmRef) -> str:
        return commands.redefine(vm.name, vm.uuid)

    def restart(self, vm: VmRef) -> tuple[str, tuple[str, ...]]:
        return commands.restart(vm.name, vm.uuid)

    def switch_now(self, vm: VmRef) -> tuple[str, tuple[str, ...]]:
        live = commands.switch_live(vm.name, vm.uuid)
        redefine = self.redefine(vm)
        return f"{live}; and for its next start: {redefine}", (live, redefine)

    def set_merge(self, _paths: HostPaths, vm: VmRef, merge: bool) -> list[str]:
        conn = self.connect() if self.connect is not None else None
        if conn is None or not vm.uuid:
            raise KsmPolicyError("no libvirt connection to reach its monitor")
        from ksmpolicy.kernel.qmp import set_merge  # noqa: PLC0415
        from ksmpolicy.libvirt.host import libvirt_module, monitor  # noqa: PLC0415

        libvirt = libvirt_module()
        try:
            domain = conn.lookupByUUIDString(vm.uuid)
        except libvirt.libvirtError as exc:
            raise KsmPolicyError(f"libvirt does not know it: {exc}") from None
        return set_merge(monitor(domain), merge)
