"""Benchmarks of the page map and the estimate (root, real ksmd; a few minutes).

* The page-map walk: GiB of present guest RAM walked per CPU-second (target >= 2), and its
  memory: peak bytes allocated per guest page while walking (target <= 16), on 8 guest-like
  processes of 512 MiB (60 % image, 10 % zero, 30 % unique) merged by ksmd.
* The estimate: bytes read and hashed per CPU-second (target >= 1 GB/s) on the same guests.
* `ksmpolicy status --sample 0` with exact accounting, as a user runs it (a fresh process),
  for 200 VMs with 1 GiB of RAM each of which 32 MiB is touched, as in an idle guest
  (target <= 2 s), against the same command without the page map (target <= 0.5 s).

Writes bench/results/pagemap.{json,md}.
"""

from __future__ import annotations

import fcntl
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from bench.ksm_bench import machine_name, stop_all, write
from ksmpolicy.kernel.ksm import read_ksm
from ksmpolicy.kernel.pagemap import PageMapReader
from ksmpolicy.paths import PAGE_SIZE, HostPaths
from ksmpolicy.report.estimate import Guest, estimate
from lab.simguest import spawn
from tests.conftest import KSM_LOCK, restore_knobs, saved_knobs

RESULTS = Path(__file__).resolve().parent / "results"
WALK_GUESTS, WALK_MIB = 8, 512
STATUS_VMS, STATUS_RAM_MIB, STATUS_TOUCHED_MIB = 200, 1024, 32


def converge(timeout: float = 180) -> None:
    write("sleep_millisecs", 10)
    write("pages_to_scan", 8000)
    write("run", 1)
    last, steady, deadline = -1, 0, time.monotonic() + timeout
    while time.monotonic() < deadline and steady < 3:
        time.sleep(1)
        state = read_ksm(HostPaths())
        now = state.saved_pages if state else 0
        steady = steady + 1 if now == last and now else 0
        last = now
    write("run", 0)


def bench_walk() -> dict[str, float]:
    guests = [spawn(f"walk-{i}", mib=WALK_MIB, image="walk") for i in range(WALK_GUESTS)]
    try:
        converge()
        pids = [g.pid for g in guests]
        cpu, wall = [], []
        for _ in range(3):
            wall0, cpu0 = time.perf_counter(), time.process_time()
            with PageMapReader(HostPaths()) as reader:
                pagemap = reader.walk(pids)
            cpu.append(time.process_time() - cpu0)
            wall.append(time.perf_counter() - wall0)
        present = sum(p.present_pages for p in pagemap.processes.values())
        tracemalloc.start()
        with PageMapReader(HostPaths()) as reader:
            reader.walk(pids)
        _now, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        guests_for_estimate = [
            Guest(g.pid, f"walk-{i}", "walk", True) for i, g in enumerate(guests)
        ]
        cpu0 = time.process_time()
        found = estimate(HostPaths(), guests_for_estimate, interval=0)
        estimate_cpu = time.process_time() - cpu0
    finally:
        stop_all(guests)
    gib = present * PAGE_SIZE / 2**30
    return {
        "present_gib": round(gib, 2),
        "walk_wall_seconds": round(statistics.median(wall), 3),
        "walk_cpu_seconds": round(statistics.median(cpu), 3),
        "walk_gib_per_cpu_second": round(gib / statistics.median(cpu), 2),
        "walk_peak_bytes_per_page": round(peak / present, 2),
        "ksm_pages": int(pagemap.ksm_pfns.size),
        "estimate_bytes_read": found.read_bytes,
        "estimate_cpu_seconds": round(estimate_cpu, 3),
        "estimate_gb_per_cpu_second": round(found.read_bytes / estimate_cpu / 1e9, 2),
    }


def bench_status() -> dict[str, float]:
    exe = str(Path(sys.executable).with_name("ksmpolicy"))
    policy = str(Path(__file__).resolve().parent.parent / "policies/homelab.yaml")
    guests = [
        spawn(
            f"status-{i}",
            mib=STATUS_RAM_MIB,
            touch_mib=STATUS_TOUCHED_MIB,
            image="status",
        )
        for i in range(STATUS_VMS)
    ]
    try:
        converge()

        def timed(*extra: str) -> float:
            times = []
            for _ in range(5):
                start = time.perf_counter()
                result = subprocess.run(
                    [exe, "-p", policy, "status", "--sample", "0", *extra],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                times.append(time.perf_counter() - start)
            assert "SAVED: exact" in result.stdout or extra, result.stdout[-500:]
            return statistics.median(times)

        exact = timed()
        plain = timed("--no-pagemap")
    finally:
        stop_all(guests)
    return {"status_exact_seconds": round(exact, 3), "status_plain_seconds": round(plain, 3)}


def main() -> int:
    if os.geteuid() != 0:
        print("needs root (the page map and the real ksmd)", file=sys.stderr)
        return 1
    with KSM_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        knobs = saved_knobs()
        try:
            results = {**bench_walk(), **bench_status()}
        finally:
            write("run", 0)
            restore_knobs(knobs)
    machine = machine_name()
    results["machine"] = machine  # type: ignore[assignment]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pagemap.json").write_text(json.dumps(results, indent=2) + "\n")
    r = results
    lines = [
        "# Page map and estimate benchmarks",
        "",
        "| measure | result | target |",
        "|---|---|---|",
        f"| page-map walk, GiB of present guest RAM per CPU-second ({WALK_GUESTS} x {WALK_MIB} "
        f"MiB merged, {r['ksm_pages']} KSM pages) | {r['walk_gib_per_cpu_second']} | >= 2 |",
        f"| page-map walk, peak bytes allocated per guest page | {r['walk_peak_bytes_per_page']} "
        "| <= 16 |",
        f"| page-map walk, wall seconds for {r['present_gib']} GiB | {r['walk_wall_seconds']} | |",
        f"| estimate, GB read and hashed per CPU-second | {r['estimate_gb_per_cpu_second']} "
        "| >= 1 |",
        f"| `status` with exact accounting, {STATUS_VMS} VMs x {STATUS_RAM_MIB} MiB "
        f"({STATUS_TOUCHED_MIB} MiB touched each), seconds | {r['status_exact_seconds']} | <= 2 |",
        f"| `status --no-pagemap`, the same VMs, seconds | {r['status_plain_seconds']} | <= 0.5 |",
        "",
        f"Medians of 3 (walk) and 5 (status) runs. Machine: {machine}. "
        "Reproduce: `make bench-pagemap` (root).",
    ]
    (RESULTS / "pagemap.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
