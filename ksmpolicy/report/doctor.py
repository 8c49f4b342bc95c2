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

from ksmpolicy.files import read_regular, untrusted_reason
from ksmpolicy.hookcore import HOOK_CALLED
from ksmpolicy.hookshim import import_paths_of
from ksmpolicy.inventory.model import VmStatus
from ksmpolicy.kernel.controllers import daemon_pids, other_controllers
from ksmpolicy.kernel.procfs import started_at
from ksmpolicy.paths import HostPaths
from ksmpolicy.policy.load import BUILTIN_NAME
from ksmpolicy.policy.model import Policy
from ksmpolicy.quoting import run_hint, shell_word
from ksmpolicy.report.model import Status
from ksmpolicy.report.status import collect
from ksmpolicy.runtime.alive import read_alive

LEVELS = ("ok", "info", "warn", "fail")


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
    checks += _status_checks(status)
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
        "advisor (6.8)": (ksm / "advisor_mode").exists(),
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
        if (started := started_at(paths, pid)) is not None
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
    from ksmpolicy.proxmox.conf import pve_bool  # noqa: PLC0415
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
        except (KsmPolicyError, OSError, ValueError) as exc:
            yield Check("warn", f"VM {vmid}", f"config unreadable: {exc}")
            continue
        if pve_bool(values.get("template")):
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

# A finding's severity as a doctor level: doctor fails on errors only.
LEVEL_OF = {"error": "fail", "warning": "warn", "info": "info"}
# Host findings doctor checks itself, in its own words (the daemon's state).
_OWN_HOST_CHECKS = frozenset({"passive"})


def _status_checks(status: Status) -> Iterator[Check]:
    """The findings `status` shows, one line each (report/findings.py computes them once), and
    an ok line for every VM without one."""
    concerned = set()
    for finding in status.findings:
        if finding.vm is None and finding.code in _OWN_HOST_CHECKS:
            continue
        concerned.add(finding.vm)
        yield Check(LEVEL_OF[finding.severity], finding.vm or "host", finding.message, finding.fix)
    for vm in status.vms:
        if vm.name not in concerned:
            yield Check("ok", vm.name, _fine(vm))


def _fine(vm: VmStatus) -> str:
    """What a VM with no finding is doing."""
    if vm.decision == "exclude":
        return f"not merging: excluded by the policy ({vm.rule or 'default'})"
    if vm.decision is None:
        return "no policy decides for it"
    if vm.merged_bytes or vm.zero_bytes:
        return f"merging: {(vm.merged_bytes + vm.zero_bytes) >> 20} MiB of its pages merged"
    if vm.decision == "merge":
        return "mergeable; nothing merged yet (ksmd has not reached it)"
    return f"not merging now ({vm.decision})"


# --- helpers -----------------------------------------------------------------------------


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
