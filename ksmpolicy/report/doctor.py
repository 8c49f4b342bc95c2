"""`ksmpolicy doctor`: is this host set up right, and why is each VM merging or not?

Every check is one line with a level (ok, info, warn, fail) and, unless it is fine, the fix.
Read-only: it reads sysfs, /proc, /etc and the run directory, never a knob or a definition.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ksmpolicy.control.alive import read_alive
from ksmpolicy.files import read_regular, untrusted_reason
from ksmpolicy.hookcore import HOOK_CALLED
from ksmpolicy.hookshim import import_paths_of
from ksmpolicy.kernel.controllers import daemon_pids, other_controllers
from ksmpolicy.kernel.ksm import read_ksm
from ksmpolicy.kernel.procfs import CLOCK_TICKS, stat_fields
from ksmpolicy.kernel.smaps import Smaps, parse
from ksmpolicy.paths import HostPaths
from ksmpolicy.policy.load import BUILTIN_NAME
from ksmpolicy.policy.model import Policy
from ksmpolicy.quoting import fix_command, run_hint, shell_word
from ksmpolicy.report.model import VmStatus
from ksmpolicy.report.status import collect, impostor

LEVELS = ("ok", "info", "warn", "fail")
SPARSE_RATIO, SPARSE_MIN_BYTES = 16, 4 << 30  # mergeable VMAs far larger than what is resident
# Guest memory that no one but the guest can read: KVM's guest_memfd, SEV/TDX guests.
CONFIDENTIAL_PATHS = (b"kvm-gmem", b"guest_memfd")
CONFIDENTIAL_ARGS = (b"confidential-guest-support", b"sev-guest", b"sev-snp-guest", b"tdx-guest")


@dataclass(frozen=True)
class Check:
    level: str  # ok | info | warn | fail
    subject: str  # "host", or a VM's name
    what: str
    fix: str | None = None


@dataclass(frozen=True)
class Diagnosis:
    checks: tuple[Check, ...]

    @property
    def failed(self) -> bool:
        return any(c.level == "fail" for c in self.checks)


def diagnose(
    paths: HostPaths, policy: Policy | None, policy_path: str, policy_error: str | None
) -> Diagnosis:
    checks = list(_kernel(paths))
    checks += _controllers(paths, policy)
    checks += _policy(policy, policy_path, policy_error)
    checks += _libvirt_hook(paths)
    checks += _proxmox_hookscripts(paths)
    checks += _daemon(paths)
    checks += _thp(paths)
    status = collect(paths, policy, sample_seconds=0, pagemap=False, policy_error=policy_error)
    ksm = read_ksm(paths)
    running = ksm is not None and ksm.get("run") == 1
    for vm in status.vms:
        checks.append(_vm(paths, vm, running=running))
    return Diagnosis(tuple(checks))


# --- the host ----------------------------------------------------------------------------


def _kernel(paths: HostPaths) -> Iterator[Check]:
    ksm = paths.ksm_dir
    release = _text(paths.proc / "sys/kernel/osrelease") or "?"
    if not (ksm / "run").exists():
        yield Check(
            "fail",
            "host",
            f"kernel {release} has no KSM ({ksm} is missing)",
            "use a kernel built with CONFIG_KSM=y (every distribution kernel is)",
        )
        return
    features = {
        "ksm_stat (6.1)": (paths.proc / "self/ksm_stat").exists(),
        # general_profit came with PR_SET_MEMORY_MERGE in 6.4
        "prctl PR_SET_MEMORY_MERGE (6.4)": (ksm / "general_profit").exists(),
        "smart_scan (6.7)": (ksm / "smart_scan").exists(),
        "advisor (6.9)": (ksm / "advisor_mode").exists(),
        "use_zero_pages (4.x)": (ksm / "use_zero_pages").exists(),
        "ksm_zero_pages (6.10)": (ksm / "ksm_zero_pages").exists(),
    }
    have = [name for name, found in features.items() if found]
    missing = [name for name, found in features.items() if not found]
    yield Check("ok", "host", f"KSM in kernel {release}; has {', '.join(have) or 'no extras'}")
    if missing:
        yield Check(
            "info",
            "host",
            f"this kernel lacks {', '.join(missing)}: per-VM savings and the features named "
            "come from what it has",
            "a newer kernel (the version each came with is in brackets)",
        )


def _controllers(paths: HostPaths, policy: Policy | None) -> Iterator[Check]:
    daemons = daemon_pids(paths)
    wanted = bool(daemons) or (policy is not None and policy.reconciler.kernel_advisor)
    others = other_controllers(
        paths, own_pids=tuple(daemons[:1]), advisor_wanted=wanted, daemons=daemons
    )
    for other in others:
        if other.running:
            yield Check(
                "fail",
                "host",
                f"{other.name} ({other.detail}) also sets the KSM knobs: the daemon stays "
                "passive while it runs",
                other.fix,
            )
        else:
            yield Check(
                "warn",
                "host",
                f"{other.name}: {other.detail}; it acts whenever ksmpolicy does not run",
                other.fix,
            )
    if not others:
        yield Check("ok", "host", "no other controller of the KSM knobs")


def _policy(policy: Policy | None, path: str, error: str | None) -> Iterator[Check]:
    if policy is None:
        yield Check(
            "fail", "host", f"policy {path}: {error}", "ksmpolicy check shows every problem"
        )
        return
    if policy.source.startswith(BUILTIN_NAME):
        yield Check(
            "warn",
            "host",
            f"policy: {policy.source}: the hooks enforce nothing and nothing is live-switched",
            f"ksmpolicy check --print-default > {shell_word(path) or 'FILE'}, edit it, "
            "then ksmpolicy apply",
        )
        return
    reason = untrusted_reason(path)
    if reason:
        yield Check(
            "fail",
            "host",
            f"policy {path} can be changed by others: {reason}",
            "make every directory on its path root-owned and not group- or world-writable",
        )
    else:
        yield Check(
            "ok",
            "host",
            f"policy {path}: valid, trusted along its whole path, enforcement "
            f"{policy.enforcement.value}",
        )


def _libvirt_hook(paths: HostPaths) -> Iterator[Check]:
    from ksmpolicy.libvirt.install import MARKER, libvirtd_pids, reload_command  # noqa: PLC0415

    pids = libvirtd_pids(paths)
    hooks = paths.libvirt_hooks
    if not pids and not (paths.root / "etc/libvirt").exists():
        return  # no libvirt on this host (Proxmox VE)
    ours = [
        p for p in (hooks / "qemu", *sorted((hooks / "qemu.d").glob("*"))) if _carries(p, MARKER)
    ]
    if not ours:
        yield Check(
            "fail",
            "host",
            f"no ksmpolicy hook in {hooks}/qemu.d: VM starts are not checked",
            "ksmpolicy install libvirt (after ksmpolicy apply)",
        )
        return
    hook = ours[0]
    interpreter = _shebang(hook)
    if not os.access(hook, os.X_OK):
        yield Check(
            "fail", "host", f"{hook} is not executable", run_hint("chmod", "755", str(hook))
        )
        return
    if interpreter is None or not os.access(paths.under_root(interpreter), os.X_OK):
        yield Check(
            "fail",
            "host",
            f"{hook} runs {interpreter or 'no interpreter'}, which does not exist",
            "ksmpolicy install libvirt (writes the interpreter of this installation)",
        )
        return
    directories = import_paths_of(_text(hook) or "")
    package = _package_in(paths, directories)
    if directories is not None and package is None:
        yield Check(
            "fail",
            "host",
            f"{hook} looks for ksmpolicy in {', '.join(directories) or 'no directory'}, "
            "where it is not installed",
            "ksmpolicy install libvirt (writes where this installation is)",
        )
        return
    for code in (interpreter, package):
        reason = untrusted_reason(paths.under_root(code)) if code is not None else None
        if reason is not None:
            yield Check(
                "fail",
                "host",
                f"{hook} runs code others could change (libvirt runs it as root): {reason}",
                "install ksmpolicy where only root can write (the Debian package, or a "
                "root-owned virtualenv), then ksmpolicy install libvirt",
            )
            return
    installed = hook.stat().st_mtime
    called = _mtime(paths.run_dir / HOOK_CALLED)
    stale = [
        pid
        for pid in pids
        if (started := _started(paths, pid)) is not None
        and started < installed
        and (called is None or called < installed)
    ]
    if stale:
        yield Check(
            "fail",
            "host",
            f"{hook} was installed after libvirt (pid {', '.join(map(str, stale))}) started, "
            "and has not been called since: libvirt reads hooks when it starts or reloads",
            (reload_command(paths) or ([], "start libvirtd"))[1],
        )
    elif pids:
        yield Check("ok", "host", f"libvirt hook {hook} installed and seen by libvirt")
    else:
        yield Check("ok", "host", f"libvirt hook {hook} installed (libvirt is not running)")


def _proxmox_hookscripts(paths: HostPaths) -> Iterator[Check]:
    configs = paths.pve / "qemu-server"
    if not configs.is_dir():
        return
    from ksmpolicy.errors import KsmPolicyError  # noqa: PLC0415
    from ksmpolicy.proxmox.conf import parse as parse_conf  # noqa: PLC0415
    from ksmpolicy.proxmox.hookscript import (  # noqa: PLC0415
        HOOKSCRIPT_RISK,
        installed_volume,
        is_our_volume,
        volume_path,
    )
    from ksmpolicy.proxmox.node import read_config, vmids  # noqa: PLC0415

    installed = installed_volume(paths, None)
    try:
        script = volume_path(paths, installed)
    except KsmPolicyError:
        script = None
    reason = untrusted_reason(script) if script is not None and script.exists() else None
    if reason is not None:
        yield Check("fail", "host", f"hookscript {installed}: {reason}", HOOKSCRIPT_RISK)
    missing = []
    for vmid in vmids(paths):
        try:
            values = parse_conf(read_config(paths, vmid)).main.values
        except (OSError, ValueError) as exc:
            yield Check("warn", f"VM {vmid}", f"config unreadable: {exc}")
            continue
        if values.get("template", "0").strip() == "1":
            continue
        volume = values.get("hookscript")
        if not volume or not is_our_volume(paths, volume):
            missing.append(vmid)
    if missing:
        yield Check(
            "fail",
            "host",
            f"{len(missing)} VM(s) without ksmpolicy's hookscript: {', '.join(missing)}",
            f"ksmpolicy proxmox attach {' '.join(missing)}",
        )
    else:
        yield Check("ok", "host", "ksmpolicy's hookscript is attached to every VM")


def _daemon(paths: HostPaths) -> Iterator[Check]:
    pids = daemon_pids(paths)
    alive = read_alive(paths)
    if not pids:
        yield Check(
            "fail",
            "host",
            "the ksmpolicy daemon is not running: nobody paces ksmd or switches VMs live",
            "systemctl enable --now ksmpolicy",
        )
        return
    if alive is None or alive.pid not in pids or not alive.fresh():
        age = "never" if alive is None else f"{time.time() - alive.time:.0f} s ago"
        yield Check(
            "fail",
            "host",
            f"the daemon (pid {', '.join(map(str, pids))}) runs but its loop last turned {age}",
            "systemctl restart ksmpolicy; journalctl -u ksmpolicy says why",
        )
        return
    if not _reachable(paths.notify_socket):
        yield Check(
            "fail",
            "host",
            f"the daemon's notify socket {paths.notify_socket} does not answer: hooks cannot "
            "tell it about VM starts",
            "systemctl restart ksmpolicy",
        )
        return
    yield Check(
        "ok",
        "host",
        f"daemon pid {alive.pid} alive ({time.time() - alive.time:.0f} s ago), policy "
        f"{alive.policy}, notify socket reachable",
    )


def _thp(paths: HostPaths) -> Iterator[Check]:
    text = _text(paths.root / "sys/kernel/mm/transparent_hugepage/enabled")
    if text is not None and "[always]" in text:
        yield Check(
            "warn",
            "host",
            "transparent hugepages: enabled=always. KSM merges only 4 KiB pages: it splits "
            "the guests' huge pages first, and zero-filled subpages of split ones are remapped "
            "to the zero page unseen by KSM's counters",
            "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled",
        )


# --- each VM -----------------------------------------------------------------------------


def _vm(paths: HostPaths, vm: VmStatus, *, running: bool) -> Check:
    name = vm.name
    if vm.kind == "qemu" and not vm.trusted:
        return Check("warn", name, *impostor(vm))
    if vm.decision == "exclude":
        if vm.merging_now or vm.merged_bytes:
            return Check(
                "fail",
                name,
                f"excluded by the policy ({vm.rule or 'default'}) but merging",
                f"{_apply(vm)}; ksmpolicy enforce --live",
            )
        return Check("ok", name, f"not merging: excluded by the policy ({vm.rule or 'default'})")
    smaps = _smaps(paths, vm.pid)
    cmdline = _cmdline(paths, vm.pid)
    ram = [v for v in smaps.vmas if vm.ram_bytes and v.size >= vm.ram_bytes // 2] if smaps else []
    why = _cannot_merge(ram, cmdline, smaps)
    if why is not None:
        level = "info" if vm.decision == "never" else "fail"
        return Check(level, name, f"cannot merge: {why[0]}", why[1])
    if vm.kind == "qemu" and _mem_merge_off(cmdline) and vm.decision == "merge":
        return Check(
            "fail",
            name,
            "started with mem-merge=off (<nosharepages/>, allow-ksm: 0) although the policy "
            "says merge",
            f"{_apply(vm)}, then restart it (or ksmpolicy enforce --live)",
        )
    if ram and not any(v.mergeable for v in ram) and vm.decision == "merge":
        return Check(
            "fail",
            name,
            "its guest RAM is not marked mergeable (no `mg` in smaps)",
            "ksmpolicy enforce --live (or restart it)",
        )
    if vm.compliant is False:
        return Check(
            "fail",
            name,
            f"its definition disagrees with the policy ({vm.decision})",
            _apply(vm),
        )
    if smaps is not None:
        size = sum(v.size for v in smaps.vmas if v.mergeable)
        resident = sum(v.rss_bytes for v in smaps.vmas if v.mergeable)
        if size >= SPARSE_MIN_BYTES and size > SPARSE_RATIO * max(resident, 1):
            return Check(
                "warn",
                name,
                f"mergeable areas of {size >> 30} GiB with {resident >> 20} MiB resident: "
                "kernels before the late-2025 fix walk every empty page-table entry of them "
                "and ksmd can sit at 100 % CPU",
                "a kernel with the fix (6.18, or a stable kernel from late 2025), or less "
                "memory given to the VM",
            )
    if not running:
        return Check("fail", name, "mergeable, but ksmd is stopped (run=0)", "start the daemon")
    if vm.merged_bytes or vm.zero_bytes:
        merged = (vm.merged_bytes + vm.zero_bytes) >> 20
        return Check("ok", name, f"merging: {merged} MiB of its pages merged")
    return Check("ok", name, "mergeable; nothing merged yet (ksmd has not reached it)")


def _apply(vm: VmStatus) -> str:
    """The command that rewrites this VM's definition, its name quoted for a shell."""
    if vm.vmid:
        return f"ksmpolicy apply --proxmox --vmid {vm.vmid}"
    return fix_command("ksmpolicy apply", vm.name, vm.uuid)


def _cannot_merge(ram: list, cmdline: bytes, smaps: Smaps | None) -> tuple[str, str] | None:  # type: ignore[type-arg]
    """Why this VM's memory can never merge, with the fix; None when it can. Guest RAM is
    judged region by region, as the decision judges the definition (VmFacts.ram_can_merge):
    it can never merge only when no RAM mapping can (hugepages or shared memory for some
    guest NUMA nodes leave the others mergeable)."""
    if ram and all(v.hugetlb for v in ram):
        return (
            "hugepage-backed guest RAM (the kernel never merges hugetlbfs pages)",
            "drop <hugepages/> (libvirt) or `hugepages:` (Proxmox) if merging matters more",
        )
    if any(arg in cmdline for arg in CONFIDENTIAL_ARGS) or (
        smaps is not None and any(p in v.path for v in smaps.vmas for p in CONFIDENTIAL_PATHS)
    ):
        return (
            "confidential-computing guest (guest_memfd or SEV/TDX memory is private to it)",
            "nothing: this memory is not the host's to merge",
        )
    if ram and all(v.hugetlb or v.shared for v in ram):
        return (
            "guest RAM is shared memory (memfd or file with access=shared: virtiofs, or "
            "virt-manager's 'Enable shared memory'); KSM merges private memory only",
            "drop <memoryBacking><access mode='shared'/> (and the memfd source) unless "
            "virtiofs or vhost-user needs it",
        )
    return None


def _mem_merge_off(cmdline: bytes) -> bool:
    return b"mem-merge=off" in cmdline


# --- helpers -----------------------------------------------------------------------------


def _smaps(paths: HostPaths, pid: int) -> Smaps | None:
    try:
        return parse(read_regular(paths.proc / str(pid) / "smaps", 64 << 20))
    except OSError:
        return None


def _cmdline(paths: HostPaths, pid: int) -> bytes:
    try:
        return read_regular(paths.proc / str(pid) / "cmdline", 1 << 20)
    except OSError:
        return b""


def _text(path: os.PathLike[str]) -> str | None:
    try:
        return read_regular(path, 65536).decode("utf-8", "replace").strip()
    except OSError:
        return None


def _mtime(path: os.PathLike[str]) -> float | None:
    try:
        return os.stat(path).st_mtime  # noqa: PTH116
    except OSError:
        return None


def _carries(path: os.PathLike[str], marker: str) -> bool:
    from ksmpolicy.files import carries_marker  # noqa: PLC0415

    try:
        return bool(carries_marker(path, marker))
    except OSError:
        return False


def _shebang(path: os.PathLike[str]) -> str | None:
    try:
        first = read_regular(path, 4096).split(b"\n", 1)[0]
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    parts = first[2:].split()
    return parts[0].decode("utf-8", "replace") if parts else None


def _package_in(paths: HostPaths, directories: list[str] | None) -> str | None:
    """The hook's entry module in the first of `directories` that holds ksmpolicy."""
    for directory in directories or ():
        module = f"{directory.rstrip('/')}/ksmpolicy/hook.py"
        if paths.under_root(module).is_file():
            return module
    return None


def _started(paths: HostPaths, pid: int) -> float | None:
    """A process's start, in wall-clock seconds: boot time + /proc/PID/stat's starttime."""
    fields = stat_fields(paths.proc / str(pid))
    if fields is None:
        return None
    try:
        since_boot = int(fields[19]) / CLOCK_TICKS
        for line in read_regular(paths.proc / "stat", 1 << 20).decode().splitlines():
            if line.startswith("btime "):
                return int(line.split()[1]) + since_boot
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reachable(path: os.PathLike[str]) -> bool:
    """A datagram socket that accepts a connection (an empty note is ignored)."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):  # noqa: PTH116
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            probe.connect(os.fspath(path))
        return True
    except OSError:
        return False
