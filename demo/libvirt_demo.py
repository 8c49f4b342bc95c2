"""The real thing: a throwaway libvirtd, three TCG guests, the hook, the daemon, real ksmd.

Two guests boot the same image, one is tagged `database`. The policy excludes databases:
`ksmpolicy apply` gives that one <nosharepages/>, the hook checks every start. With KSM
stopped, `ksmpolicy estimate` predicts what merging will save (and what merging the database
would add); then the daemon paces ksmd (a sprint for the running guests, calm after) and
`ksmpolicy pages` shows who shares what with whom, with a heatmap (written where
$KSMPOLICY_DEMO_PLOT says, else in the demo's temporary directory). At the end every guest,
the hook, the daemon and libvirtd are gone and the KSM knobs are as they were.
Run by `make demo` as root; refuses when a libvirtd already runs (it would disturb it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ksmpolicy.kernel.ksm import read_ksm
from ksmpolicy.kernel.procfs import ksmd_pid, process_cpu_seconds
from ksmpolicy.libvirt.domain import domain_facts
from ksmpolicy.paths import PAGE_SIZE, HostPaths
from ksmpolicy.policy.decide import Decider
from ksmpolicy.policy.load import load_policy
from lab.libvirtd import GUEST, Lab, Libvirtd, wait_for

KSMPOLICY = str(Path(sys.executable).parent / "ksmpolicy")
PREFIX = "ksmpolicy-demo-"
POLICY = """\
version: 1
enforcement: block
live: true
default: merge
groups:
  busybox-image:
    names: ["ksmpolicy-demo-web-*"]
rules:
  - name: databases
    match: {tags: [database]}
    action: exclude
reconciler: {interval_seconds: 2, target_scan_seconds: 30, max_ksmd_cpu_percent: 40}
"""


def main() -> int:
    if read_ksm(HostPaths()) is None:
        print("demo: this kernel has no KSM; skipped")
        return 0
    if not (GUEST / "initrd.img").exists():
        print("demo: the guest is not built: run scripts/build-guest (make demo does)")
        return 1
    with tempfile.TemporaryDirectory(prefix="ksmpolicy-demo-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        try:
            libvirtd = Libvirtd(workdir, own=True)
        except RuntimeError as exc:
            print(f"demo: {exc}")
            return 1
        lab = Lab(libvirtd, workdir, prefix=PREFIX, hook_name="ksmpolicy-demo")
        daemon = None
        try:
            daemon = run(lab, workdir)
        finally:
            if daemon is not None and daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(timeout=30)
            lab.cleanup()
            lab.uninstall_hook(reload=False)
            libvirtd.stop()
        log = (workdir / "daemon.log").read_text() if (workdir / "daemon.log").exists() else ""
    print("\n== The daemon's log (journald format)")
    print(log.rstrip())
    state = read_ksm(HostPaths())
    assert state is not None
    print(
        f"\nCleaned up: guests undefined, hook removed, libvirtd stopped; KSM knobs restored: "
        f"run={state.values.get('run')} pages_to_scan={state.values.get('pages_to_scan')} "
        f"sleep_millisecs={state.values.get('sleep_millisecs')}"
    )
    return 0


def run(lab: Lab, workdir: Path) -> subprocess.Popen[bytes]:
    lab.write_policy(POLICY)
    run_dir = workdir / "run"
    print(f"== A throwaway libvirtd; the hook in /etc/libvirt/hooks/qemu.d/{lab.hook_name}")
    lab.install_hook(run_dir)
    lab.define("web-1")
    lab.define("web-2")
    lab.define("db-1", tags=("database",))
    print("\n== Policy (enforcement: block) and what it decides for the three guests")
    print(POLICY.split("reconciler", maxsplit=1)[0].rstrip())
    subprocess.run(
        [
            KSMPOLICY,
            "-p",
            str(lab.policy),
            "apply",
            "--dry-run",
            "-c",
            "qemu:///system",
            "-d",
            f"{PREFIX}db-1",
            "-d",
            f"{PREFIX}web-1",
            "-d",
            f"{PREFIX}web-2",
            "--root",
            str(workdir),
        ],
        check=False,
    )
    print("\n== Starting the database guest before `apply`: the hook refuses")
    try:
        lab.start("db-1")
    except lab.libvirt.libvirtError as exc:
        print("   " + str(exc).splitlines()[-1].split("unexpected exit status 1: ")[-1])
    print("\n== ksmpolicy apply")
    subprocess.run(
        [
            KSMPOLICY,
            "-p",
            str(lab.policy),
            "apply",
            "-c",
            "qemu:///system",
            "-d",
            f"{PREFIX}db-1",
            "--root",
            str(workdir),
        ],
        check=False,
    )
    state = read_ksm(HostPaths())
    assert state is not None
    print(f"\n== Three guests start while KSM is stopped (run={state.values.get('run')})")
    start = time.monotonic()
    for name in ("web-1", "web-2", "db-1"):
        lab.start(name)
    for name in ("web-1", "web-2", "db-1"):
        lab.wait_ready(name)
    print(f"   ready after {time.monotonic() - start:.0f} s (TCG)")
    time.sleep(3)
    print("\n== ksmpolicy estimate: what KSM would save, before ksmd does any work")
    subprocess.run([KSMPOLICY, "-p", str(lab.policy), "estimate"], check=False)
    log = (workdir / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [
            KSMPOLICY,
            "-p",
            str(lab.policy),
            "daemon",
            "--restore-on-exit",
            "-c",
            "qemu:///system",
            "--run-dir",
            str(run_dir),
            "--state-dir",
            str(workdir / "state"),
        ],
        stderr=log,
    )
    wait_for((run_dir / "notify.sock").exists, 20)
    start = time.monotonic()
    print("\n== The daemon starts and finds the guests: it sprints, then calms down")
    timeline(lab, start, 30)
    table(lab)
    plot = os.environ.get("KSMPOLICY_DEMO_PLOT") or str(workdir / "pages.png")
    print("\n== ksmpolicy pages: who shares what with whom, exact")
    subprocess.run([KSMPOLICY, "-p", str(lab.policy), "pages", "--plot", plot], check=False)
    return daemon


def timeline(lab: Lab, start: float, seconds: int) -> None:
    host = HostPaths()
    ksmd = ksmd_pid(host)
    last = process_cpu_seconds(host, ksmd) if ksmd else None
    print("    t  run  pages_to_scan  sleep_ms  saved MiB  ksmd CPU  guests ready")
    for _ in range(seconds // 2):
        time.sleep(2)
        state = read_ksm(host)
        assert state is not None
        cpu = process_cpu_seconds(host, ksmd) if ksmd else None
        share = "" if cpu is None or last is None else f"{100 * (cpu - last) / 2:6.1f} %"
        last = cpu
        ready = sum(
            lab.console(PREFIX + n).exists()
            and b"ksmpolicy-guest: ready" in lab.console(PREFIX + n).read_bytes()
            for n in ("web-1", "web-2", "db-1")
        )
        print(
            f"{time.monotonic() - start:5.0f}  {state.get('run')!s:>3}  "
            f"{state.get('pages_to_scan')!s:>13}  {state.get('sleep_millisecs')!s:>8}  "
            f"{state.saved_bytes / 2**20:9.1f}  {share:>8}  {ready}/3"
        )


def table(lab: Lab) -> None:
    decider = Decider(load_policy(lab.policy))
    print("\n== The result on real ksmd (/proc/PID/ksm_stat of each QEMU)")
    print(f"{'VM':24} {'GROUP':14} {'DECISION':9} {'RULE':10} {'MERGEABLE':9} {'MERGED MiB':>10}")
    for name in ("web-1", "web-2", "db-1"):
        facts = domain_facts(lab.domain(name).XMLDesc(0))
        decision = decider.decide(facts.vm)
        stat = lab.ksm_stat(name)
        print(
            f"{PREFIX + name:24} {decision.group or '-':14} "
            f"{'merge' if decision.merge else 'exclude':9} {decision.rule or '(default)':10} "
            f"{stat['ksm_mergeable']:9} {int(stat['ksm_merging_pages']) * PAGE_SIZE / 2**20:10.1f}"
        )


if __name__ == "__main__":
    sys.exit(main())
