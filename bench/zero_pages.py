"""Does `use_zero_pages=1` make merging cheaper or faster? (root, real ksmd, ~5 minutes)

Two workloads of guest-like processes (lab/simguest.py), each run with the knob off and on,
from fresh processes, KSM at one fixed pace (2000 pages per 10 ms) so that only the merging
mechanism differs:

* `bench`: the pacing benchmark's guests: 4 x 256 MiB, 60 % image, 10 % zero, 30 % unique;
* `windows`: guests that zero their free memory: 4 x 256 MiB, 30 % image, 50 % zero.

For each: the time to 90 % of the final savings (pages_sharing + ksm_zero_pages), ksmd's CPU
seconds until then and over the whole run, the final savings, and general_profit (what KSM
saves minus its own metadata). Writes bench/results/zero-pages.{json,md}.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path

from bench.ksm_bench import KSM, machine_name, stop_all, write
from ksmpolicy.kernel.ksm import read_ksm
from ksmpolicy.kernel.procfs import ksmd_pid, process_cpu_seconds
from ksmpolicy.paths import PAGE_SIZE, HostPaths
from lab.simguest import spawn
from tests.conftest import KSM_LOCK, restore_knobs, saved_knobs

RESULTS = Path(__file__).resolve().parent / "results"
WORKLOADS = {
    "bench": {"image_percent": 60.0, "zero_percent": 10.0},
    "windows": {"image_percent": 30.0, "zero_percent": 50.0},
}
GUESTS, MIB, SECONDS = 4, 256, 60.0


def saved(paths: HostPaths) -> tuple[int, int]:
    state = read_ksm(paths)
    assert state is not None
    return state.saved_pages, state.get("general_profit") or 0


def run(workload: str, zero: int) -> dict[str, float]:
    paths = HostPaths()
    write("run", 0)  # the previous run's guests have exited: nothing of theirs stays merged
    write("use_zero_pages", zero)
    write("pages_to_scan", 2000)
    write("sleep_millisecs", 10)
    guests = [
        spawn(
            f"zero-{workload}-{i}",
            mib=MIB,
            image=f"img-{workload}",
            image_percent=WORKLOADS[workload]["image_percent"],
            zero_percent=WORKLOADS[workload]["zero_percent"],
        )
        for i in range(GUESTS)
    ]
    try:
        ksmd = ksmd_pid(paths)
        assert ksmd is not None
        cpu0 = process_cpu_seconds(paths, ksmd) or 0.0
        start = time.monotonic()
        write("run", 1)
        samples = []
        while time.monotonic() - start < SECONDS:
            time.sleep(0.25)
            pages, profit = saved(paths)
            cpu = (process_cpu_seconds(paths, ksmd) or 0.0) - cpu0
            samples.append((time.monotonic() - start, pages, cpu, profit))
        final = samples[-1][1]
        first = next((s for s in samples if s[1] >= 0.9 * final), samples[-1])
        return {
            "seconds_to_90": round(first[0], 2),
            "cpu_seconds_to_90": round(first[2], 3),
            "cpu_seconds_total": round(samples[-1][2], 3),
            "saved_mib": round(final * PAGE_SIZE / 2**20, 1),
            "general_profit_mib": round(samples[-1][3] / 2**20, 1),
        }
    finally:
        write("run", 0)
        stop_all(guests)


def main() -> int:
    if os.geteuid() != 0:
        print("needs root (it drives the real ksmd)", file=sys.stderr)
        return 1
    results: dict[str, dict[str, dict[str, float]]] = {}
    with KSM_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        knobs = saved_knobs()
        original_zero = (KSM / "use_zero_pages").read_text().strip()
        try:
            for workload in WORKLOADS:
                results[workload] = {f"use_zero_pages={z}": run(workload, z) for z in (0, 1)}
                print(workload, json.dumps(results[workload]), flush=True)
        finally:
            write("run", 0)
            write("use_zero_pages", int(original_zero))
            restore_knobs(knobs)
    machine = machine_name()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "zero-pages.json").write_text(
        json.dumps({"machine": machine, "results": results}, indent=2) + "\n"
    )
    lines = [
        "# use_zero_pages: off against on",
        "",
        f"{GUESTS} x {MIB} MiB guest-like processes per workload, KSM at 2000 pages / 10 ms, "
        f"{SECONDS:g} s per run, fresh processes each run. Machine: {machine}. "
        "Reproduce: `python -m bench.zero_pages` (root).",
        "",
        "| workload | use_zero_pages | 90 % after (s) | ksmd CPU-s to 90 % | ksmd CPU-s in all "
        "| saved MiB | general_profit MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for workload, runs in results.items():
        for setting, figures in runs.items():
            lines.append(
                f"| {workload} | {setting.split('=')[1]} | {figures['seconds_to_90']} | "
                f"{figures['cpu_seconds_to_90']} | {figures['cpu_seconds_total']} | "
                f"{figures['saved_mib']} | {figures['general_profit_mib']} |"
            )
    (RESULTS / "zero-pages.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
