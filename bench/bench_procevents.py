"""Instant discovery: from a VMM's exec to ksmd running for it, with no hook note (root).

The real daemon runs with `interval_seconds: 60` and KSM stopped; a guest-like process (16 MiB,
/proc shows it as qemu-system-x86_64) is started 20 times. The clock starts just before the
exec and stops when ksmd's `run` knob turns 1 (the daemon's first plan for the new memory:
settle while it fills, then sprint), read every
millisecond; so it includes the process's own time to make its memory mergeable. Without the
kernel's process events the same start waits for the next interval (up to 60 s here, 10 s by
default), which the second half measures with `--no-process-events` (3 starts, capped).

Writes bench/results/procevents.{json,md}.
"""

from __future__ import annotations

import fcntl
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.ksm_bench import machine_name, write
from lab.simguest import spawn
from tests.conftest import KSM_LOCK, restore_knobs, saved_knobs
from tests.control.test_daemon import DaemonProcess

RESULTS = Path(__file__).resolve().parent / "results"
RUN = Path("/sys/kernel/mm/ksm/run")
STARTS, POLLING_STARTS, INTERVAL = 20, 3, 10
POLICY = f"version: 1\nreconciler: {{interval_seconds: {INTERVAL}, max_ksmd_cpu_percent: 50}}\n"


def run_knob() -> int:
    return int(RUN.read_text())


def one_start(name: str, limit: float) -> float | None:
    """Seconds from just before the exec to run=1, or None past `limit`."""
    found: list[float] = []

    def watch(started: float) -> None:
        while time.monotonic() - started < limit:
            if run_knob() == 1:
                found.append(time.monotonic() - started)
                return
            time.sleep(0.001)

    started = time.monotonic()
    watcher = threading.Thread(target=watch, args=(started,))
    watcher.start()
    guest = spawn(name, mib=16)
    watcher.join()
    guest.terminate()
    guest.wait()
    deadline = time.monotonic() + limit
    while run_knob() != 0 and time.monotonic() < deadline:  # the daemon stops ksmd again
        time.sleep(0.01)
    return found[0] if found else None


def series(starts: int, *extra: str) -> list[float | None]:
    work = Path(tempfile.mkdtemp(prefix="bench-procevents-"))
    policy = work / "policy.yaml"
    policy.write_text(POLICY)
    policy.chmod(0o644)
    write("run", 0)
    daemon = DaemonProcess(policy, work / "run", *extra)
    try:
        time.sleep(1)
        return [one_start(f"pe-{i}", 3 * INTERVAL) for i in range(starts)]
    finally:
        daemon.stop()
        write("run", 0)


def main() -> int:
    if os.geteuid() != 0:
        print("needs root (the real ksmd, the proc connector)", file=sys.stderr)
        return 1
    with KSM_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        knobs = saved_knobs()
        try:
            events = series(STARTS)
            polling = series(POLLING_STARTS, "--no-process-events")
        finally:
            write("run", 0)
            restore_knobs(knobs)
    seen = [t for t in events if t is not None]
    polled = [t for t in polling if t is not None]
    result = {
        "starts": STARTS,
        "missed": STARTS - len(seen),
        "median_ms": round(1000 * statistics.median(seen), 1) if seen else None,
        "p90_ms": round(1000 * sorted(seen)[int(0.9 * (len(seen) - 1))], 1) if seen else None,
        "max_ms": round(1000 * max(seen), 1) if seen else None,
        "polling_starts": POLLING_STARTS,
        "polling_median_ms": round(1000 * statistics.median(polled), 1) if polled else None,
        "interval_seconds": INTERVAL,
        "machine": machine_name(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "procevents.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Instant discovery: a VMM's exec to ksmd running for it, no hook note",
        "",
        "| measure | result | target |",
        "|---|---|---|",
        f"| median of {STARTS} starts, exec to `run=1`, ms | {result['median_ms']} | <= 100 |",
        f"| 90th percentile / max, ms | {result['p90_ms']} / {result['max_ms']} | |",
        f"| starts not seen within {3 * INTERVAL} s | {result['missed']} | 0 |",
        f"| polling only (`--no-process-events`), median of {POLLING_STARTS}, ms | "
        f"{result['polling_median_ms']} | (up to the interval, {INTERVAL} s) |",
        "",
        "The time includes the guest-like process's own start (a Python interpreter that fills "
        "16 MiB and madvises it), since the law paces only memory that is mergeable. "
        f"Machine: {result['machine']}. Reproduce: `make bench-procevents` (root).",
    ]
    (RESULTS / "procevents.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
