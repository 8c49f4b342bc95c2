"""The reconciler at work on this host's real ksmd, with guest-like processes.

KSM stopped with no guests; a sprint when three guests from one image start (a fourth, a
database the policy excludes, is never mergeable); calm once merged; stopped again when they
exit. The daemon restores the KSM knobs it found when it stops. Run by `make demo` as root.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ksmpolicy.kernel.ksm import read_ksm
from ksmpolicy.kernel.procfs import ksmd_pid, process_cpu_seconds, processes_named
from ksmpolicy.kernel.scan import ProcessScanner
from ksmpolicy.paths import HostPaths
from ksmpolicy.policy.decide import Decider, VmFacts
from ksmpolicy.policy.load import load_policy
from ksmpolicy.runtime import notify
from lab.simguest import spawn

KSMPOLICY = str(Path(sys.executable).parent / "ksmpolicy")
POLICY_TEXT = """\
version: 1
default: merge
rules:
  - name: database names
    match: {names: ["db-*"]}
    action: exclude
reconciler: {interval_seconds: 2, target_scan_seconds: 30, max_ksmd_cpu_percent: 30}
"""
GUESTS = [("web-1", False), ("web-2", False), ("build-1", False), ("db-orders", True)]
GUEST_MIB = 96


def main() -> int:
    host = HostPaths()
    if os.geteuid() != 0:
        print("demo: the daemon part needs root (it writes /sys/kernel/mm/ksm); skipped")
        return 0
    if read_ksm(host) is None:
        print("demo: this kernel has no KSM; skipped")
        return 0
    rivals = processes_named(host, ["ksmtuned"])
    if rivals or _other_daemon_running():
        print("demo: ksmtuned or a ksmpolicy daemon already runs here; not disturbing it")
        return 0
    with tempfile.TemporaryDirectory(prefix="ksmpolicy-demo-") as tmp:
        policy_path = Path(tmp) / "policy.yaml"
        policy_path.write_text(POLICY_TEXT)
        policy_path.chmod(0o644)
        run_dir = Path(tmp) / "run"
        log_path = Path(tmp) / "daemon.log"
        with log_path.open("w") as log:
            daemon = subprocess.Popen(
                [
                    KSMPOLICY,
                    "-p",
                    str(policy_path),
                    "daemon",
                    "--no-libvirt",
                    "--restore-on-exit",
                    "--run-dir",
                    str(run_dir),
                ],
                stderr=log,
            )
        guests: list[subprocess.Popen[str]] = []
        try:
            _wait((run_dir / "notify.sock").exists, 15)
            time.sleep(1)
            print(f"no guests: KSM run={_knob('run')}  (nothing mergeable: ksmd stopped)\n")
            start = time.monotonic()
            for name, excluded in GUESTS:
                guests.append(
                    spawn(
                        name,
                        mib=GUEST_MIB,
                        image="debian-12",
                        image_percent=60,
                        zero_percent=10,
                        no_merge=excluded,
                    )
                )
                notify.send(HostPaths(run_override=run_dir), "started", name)
            _decisions(policy_path, guests)
            print(
                f"\n{len(GUESTS)} guests of {GUEST_MIB} MiB started "
                f"({time.monotonic() - start:.1f} s); the hook's note woke the daemon:\n"
            )
            _timeline(start, 16)
            _merged_per_guest(guests)
            for guest in guests:
                guest.terminate()
                guest.wait()
            guests.clear()
            notify.send(HostPaths(run_override=run_dir), "stopped", "all")
            print("\nguests stopped:\n")
            _timeline(time.monotonic(), 3)
        finally:
            for guest in guests:
                guest.kill()
                guest.wait()
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=15)
        print("\ndaemon log (journald format):")
        print(log_path.read_text().rstrip())
    print(
        f"\nKSM knobs restored: run={_knob('run')} pages_to_scan={_knob('pages_to_scan')} "
        f"sleep_millisecs={_knob('sleep_millisecs')}"
    )
    return 0


def _other_daemon_running() -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"ksmpolicy" in b" ".join(argv[:2]) and b"daemon" in argv:
            return True
    return False


def _decisions(policy_path: Path, guests: list[subprocess.Popen[str]]) -> None:
    decider = Decider(load_policy(policy_path))
    pids = {g.pid for g in guests}
    print(f"{'VM':10} {'DECISION':9} {'RULE':16} {'MERGEABLE MiB':>13}")
    for vm in sorted(ProcessScanner(HostPaths()).scan(), key=lambda p: p.name):
        if vm.pid in pids:
            d = decider.decide(VmFacts(vm.name))
            verdict = "merge" if d.merge else "exclude"
            print(
                f"{vm.name:10} {verdict:9} {d.rule or '(default)':16} "
                f"{vm.mergeable_bytes / 2**20:13.0f}"
            )


def _timeline(start: float, seconds: int) -> None:
    host = HostPaths()
    ksmd = ksmd_pid(host)
    last_cpu = process_cpu_seconds(host, ksmd) if ksmd else None
    print("   t  run  pages_to_scan  sleep_ms  full_scans  saved MiB  ksmd CPU")
    for _ in range(seconds):
        time.sleep(1)
        state = read_ksm(host)
        assert state is not None
        cpu = process_cpu_seconds(host, ksmd) if ksmd else None
        share = "" if cpu is None or last_cpu is None else f"{100 * (cpu - last_cpu):6.1f} %"
        last_cpu = cpu
        print(
            f"{time.monotonic() - start:4.0f}  {state.get('run')!s:>3}  "
            f"{state.get('pages_to_scan')!s:>13}  {state.get('sleep_millisecs')!s:>8}  "
            f"{state.get('full_scans')!s:>10}  {state.saved_bytes / 2**20:9.1f}  {share}"
        )


def _merged_per_guest(guests: list[subprocess.Popen[str]]) -> None:
    print("\nmerged per guest (/proc/PID/ksm_stat):")
    for vm in sorted(ProcessScanner(HostPaths()).scan(), key=lambda p: p.name):
        if vm.pid in {g.pid for g in guests} and vm.ksm is not None:
            print(
                f"  {vm.name:10} ksm_merging_pages={vm.ksm.merging_pages:<7} "
                f"mergeable={'yes' if vm.ksm.mergeable else 'no'}"
            )


def _knob(name: str) -> int | str:
    state = read_ksm(HostPaths())
    return "?" if state is None else state.values.get(name, "?")


def _wait(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise SystemExit("demo: the daemon did not start")


if __name__ == "__main__":
    sys.exit(main())
