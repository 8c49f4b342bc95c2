"""Who else sets the KSM knobs: ksmtuned, another ksmpolicy daemon, the kernel's advisor, and
Ubuntu's qemu-kvm.service (KSM_ENABLED),
the ksmtuned package's ksm.service. Reads /proc, sysfs and /etc only.

Two kinds. A *running* controller rewrites the knobs for as long as it runs (ksmtuned's loop,
another daemon, the advisor's retuning of pages_to_scan): the daemon must not fight it and
stays passive until it is gone. A *boot-time* one writes once when the host boots (qemu-kvm's
`KSM_ENABLED=1`): the daemon starts after it (the unit's After=) and simply sets the knobs
again; `doctor` still says so, since it turns KSM on whenever ksmpolicy is not running.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ksmpolicy.kernel.procfs import processes_named, run_by_root
from ksmpolicy.paths import HostPaths

KSMTUNED_WANTS = "etc/systemd/system/multi-user.target.wants/ksmtuned.service"
KSM_SERVICE_WANTS = "etc/systemd/system/multi-user.target.wants/ksm.service"
QEMU_KVM_DEFAULTS = "etc/default/qemu-kvm"
QEMU_KVM_UNITS = ("lib/systemd/system/qemu-kvm.service", "usr/lib/systemd/system/qemu-kvm.service")


@dataclass(frozen=True)
class Controller:
    name: str  # ksmtuned | ksmpolicy daemon | kernel advisor | qemu-kvm.service
    detail: str  # what was seen: "pid 812", "advisor_mode=scan-time", a file
    fix: str  # the command or edit that leaves ksmpolicy the only controller
    running: bool  # rewrites the knobs while it runs (else: once, at boot)
    take_over: str | None = None  # what `daemon --take-over` does about it (None: nothing)


def other_controllers(
    paths: HostPaths,
    *,
    own_pids: tuple[int, ...] = (),
    advisor_wanted: bool = False,
    daemons: Sequence[int] | None = None,
) -> list[Controller]:
    """Every other controller of the KSM knobs on this host, running ones first. `daemons`:
    the `ksmpolicy daemon` PIDs when the caller has them already (else /proc is read)."""
    found = [
        Controller(
            "ksmtuned",
            f"pid {pid}",
            "systemctl disable --now ksmtuned (ksmpolicy's unit also Conflicts= with it)",
            running=True,
            take_over=f"stops it (SIGTERM to pid {pid}); disable its unit yourself",
        )
        for pid in processes_named(paths, ["ksmtuned"])
    ]
    found += [
        Controller(
            "ksmpolicy daemon",
            f"pid {pid}",
            f"run one daemon per host: stop this one or pid {pid}",
            running=True,
        )
        for pid in (daemon_pids(paths) if daemons is None else daemons)
        if pid not in own_pids
    ]
    advisor = _read(paths.ksm_dir / "advisor_mode")
    if advisor is not None and "[scan-time]" in advisor and not advisor_wanted:
        found.append(
            Controller(
                "kernel advisor",
                "advisor_mode=scan-time (it retunes pages_to_scan)",
                "echo none > /sys/kernel/mm/ksm/advisor_mode, or set "
                "reconciler.kernel_advisor: true in the policy",
                running=True,
                take_over="sets advisor_mode=none (restored on exit with --restore-on-exit)",
            )
        )
    if not any(n.name == "ksmtuned" for n in found) and os.path.lexists(
        paths.root / KSMTUNED_WANTS
    ):
        found.append(
            Controller(
                "ksmtuned",
                f"enabled (/{KSMTUNED_WANTS}), not running",
                "systemctl disable ksmtuned",
                running=False,
            )
        )
    if os.path.lexists(paths.root / KSM_SERVICE_WANTS):
        found.append(
            Controller(
                "ksm.service",
                f"enabled (/{KSM_SERVICE_WANTS}): ksmtuned's package starts KSM at boot",
                "systemctl disable ksm.service",
                running=False,
            )
        )
    defaults = _read(paths.root / QEMU_KVM_DEFAULTS)
    if (
        defaults is not None
        and _shell_value(defaults, "KSM_ENABLED") == "1"
        and any((paths.root / unit).exists() for unit in QEMU_KVM_UNITS)
    ):
        found.append(
            Controller(
                "qemu-kvm.service",
                f"KSM_ENABLED=1 in /{QEMU_KVM_DEFAULTS} (turns KSM on at boot)",
                f"set KSM_ENABLED=0 in /{QEMU_KVM_DEFAULTS}",
                running=False,
            )
        )
    return found


NOT_CONTROLLING = frozenset((b"--dry-run", b"--help", b"-h"))


def daemon_pids(paths: HostPaths) -> list[int]:
    """PIDs of running `ksmpolicy daemon` processes (argv: .../ksmpolicy ... daemon ...) that
    may write the knobs: not `--dry-run` (plans only), not `--help` (a man page being made)."""
    found = []
    try:
        entries = [e for e in os.scandir(paths.proc) if e.name.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(os.path.join(entry.path, "cmdline"), "rb") as handle:  # noqa: PTH118, PTH123
                argv = handle.read(4096).split(b"\0")
        except OSError:
            continue
        if (
            b"daemon" in argv
            and not NOT_CONTROLLING.intersection(argv)
            and any(a.endswith(b"ksmpolicy") or a == b"ksmpolicy.cli" for a in argv)
            and run_by_root(Path(entry.path))  # a daemon that can write the knobs runs as root
        ):
            found.append(int(entry.name))
    return found


def _read(path: os.PathLike[str]) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:  # noqa: PTH123
            return handle.read(65536)
    except OSError:
        return None


def _shell_value(text: str, key: str) -> str | None:
    """The last `KEY=value` of a shell defaults file, unquoted (no expansion)."""
    value = None
    for line in text.splitlines():
        name, sep, rest = line.strip().partition("=")
        if sep and name == key:
            value = rest.split("#", 1)[0].strip().strip("'\"")
    return value
