"""Plain processes: QEMU started by hand or by another tool, other VMMs (Firecracker, Cloud
Hypervisor, crosvm, kata), services and any process that made its memory mergeable. Their
facts are their command line's; their only definition is how they are started."""

from __future__ import annotations

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.kernel.scan import VmProcess
from ksmpolicy.paths import HostPaths
from ksmpolicy.platforms.base import VmRef
from ksmpolicy.policy.decide import VmFacts

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence


class Process:
    name = "process"

    def facts(self, _paths: HostPaths, process: VmProcess) -> VmFacts:
        return VmFacts(
            name=process.name,
            uuid=process.uuid,
            vmid=process.vmid,
            kind=process.kind,
            unit=process.unit,
        )

    def redefine(self, vm: VmRef) -> str:
        if vm.merge is None:
            return "start it as the policy says (QEMU: -machine mem-merge=on|off)"
        setting = "on" if vm.merge else "off"
        return f"start it with -machine mem-merge={setting} (QEMU), or under `ksmpolicy exec`"

    def restart(self, _vm: VmRef) -> tuple[str, tuple[str, ...]]:
        return "restart it the way it was started", ()

    def switch_now(self, vm: VmRef) -> tuple[str, tuple[str, ...]]:
        return f"{self.redefine(vm)}, then {self.restart(vm)[0]}", ()

    def set_merge(self, paths: HostPaths, vm: VmRef, merge: bool) -> list[str]:
        """Over the QMP socket its command line names, checked to be served by that very
        process (SO_PEERCRED): anyone could name another's socket."""
        return qmp_switch(paths, vm, merge, None)


def qmp_switch(paths: HostPaths, vm: VmRef, merge: bool, fallback: str | None) -> list[str]:
    """The live switch over the QMP socket on the process's command line, else `fallback`."""
    from ksmpolicy.kernel.qmp import set_merge_on_socket, socket_of  # noqa: PLC0415

    try:
        raw = (paths.proc / str(vm.pid) / "cmdline").read_bytes()
    except OSError as exc:
        raise KsmPolicyError(f"gone ({exc.strerror})") from None
    argv = [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]
    path = socket_of(argv) or fallback
    if path is None:
        raise KsmPolicyError("no QMP socket on its command line")
    return set_merge_on_socket(path, merge, timeout=5.0, expect_pid=vm.pid)


def command_facts(
    argv: Sequence[str],
    executable: str,
    *,
    unit: str | None,
    name: str | None = None,
    tags: frozenset[str] = frozenset(),
) -> VmFacts:
    """The facts of a command about to be exec'd as `executable` in `unit` (the caller's: exec
    keeps the cgroup and the PID), as the process scan will see it once it runs: its kind from
    the one classification (kernel/vmm.py), so `kinds:` and `units:` rules apply. A VM names
    itself on its command line (Firecracker's `--id`, QEMU's `-name`): `name` may only repeat
    that name, since the scan, status and the daemon will know it by it. A command without a
    name of its own is known by `name`, else by the unit (a service), else by its program."""
    import os  # noqa: PLC0415

    from ksmpolicy.kernel.vmm import classify  # noqa: PLC0415

    comm = os.path.basename(executable)[:15]  # noqa: PTH119 (the kernel's comm after exec)
    found = classify(argv, comm, unit)
    own = found.name if found.kind not in ("service", "process") else None
    if own is not None and name is not None and name != own:
        raise KsmPolicyError(
            f"{argv[0]} names itself {own!r} ({found.kind}), and status and the daemon will know "
            f"it by that name: drop --name {name!r}, or give --name {own!r}"
        )
    chosen = own or name or found.name or os.path.basename(argv[0])  # noqa: PTH119
    return VmFacts(
        name=chosen,
        uuid=found.uuid,
        vmid=found.vmid,
        tags=tags,
        kind=found.kind,
        unit=unit,
    )


def service_facts(unit: str, tags: frozenset[str] = frozenset()) -> VmFacts:
    """The facts of the processes of a system service, as the process scan sees them: kind
    `service`, known by the unit's name without `.service`, in `unit`."""
    return VmFacts(name=unit.removesuffix(".service"), tags=tags, kind="service", unit=unit)
