"""How close `ksmpolicy estimate` comes to what ksmd then saves (root, real ksmd and libvirtd).

1. Guest-like processes (lab/simguest.py): two groups of two images (3 + 2 VMs) and a VM of a
   third image in no group, 32 MiB each, 10 % zero pages; with use_zero_pages 0 and 1.
2. Two real TCG guests booted from the same image (the test guest, 256 MiB each).

Each time: the estimate first (KSM stopped), then ksmd at a fast fixed pace until its savings
hold still, then the exact per-VM savings from the page map. Targets: within 5 % per VM and
host-wide for (1), within 10 % for (2). Writes bench/results/estimate.{json,md}.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path

from bench.ksm_bench import machine_name
from ksmpolicy.kernel.ksm import read_ksm
from ksmpolicy.paths import HostPaths
from ksmpolicy.report.estimate import Guest, estimate
from ksmpolicy.report.sharing import Party, measure
from lab.libvirtd import GUEST, temporary_lab
from tests.conftest import KSM_LOCK, RealKsm, restore_knobs, saved_knobs
from tests.report.test_sharing import GROUP, WORKLOAD, converge, parties, start, zero_pages_of

RESULTS = Path(__file__).resolve().parent / "results"


def rows(predicted: dict[str, int], measured: dict[str, int]) -> list[dict[str, object]]:
    found = []
    for name in sorted(predicted):
        real = measured[name]
        found.append(
            {
                "vm": name,
                "predicted_bytes": predicted[name],
                "measured_bytes": real,
                "error_percent": round(100 * (predicted[name] - real) / real, 2) if real else None,
            }
        )
    found.append(
        {
            "vm": "(host)",
            "predicted_bytes": sum(predicted.values()),
            "measured_bytes": sum(measured.values()),
            "error_percent": round(
                100 * (sum(predicted.values()) - sum(measured.values())) / sum(measured.values()), 2
            ),
        }
    )
    return found


def guest_like(zero: int) -> list[dict[str, object]]:
    ksm = RealKsm()
    try:
        ksm.write("run", 0)
        ksm.write("use_zero_pages", zero)
        pids = start(ksm, WORKLOAD)
        guests = [Guest(pid, name, GROUP[WORKLOAD[name]], True) for name, pid in pids.items()]
        found = estimate(HostPaths(), guests, interval=1.0, use_zero_pages=bool(zero))
        converge(ksm)
        state = read_ksm(HostPaths())
        real = measure(
            HostPaths(),
            parties(pids, WORKLOAD),
            zero_pages=zero_pages_of(pids),
            ksm_zero_pages=state.get("ksm_zero_pages") if state else None,
        )
        return rows(
            {v.name: v.predicted_saved_bytes for v in found.vms},
            {v.name: v.saved_bytes for v in real.vms},
        )
    finally:
        for process in ksm.processes:
            ksm.stop(process)


def tcg() -> list[dict[str, object]]:
    ksm = RealKsm()
    with temporary_lab() as lab:
        ksm.write("run", 0)
        names = ("est-1", "est-2")
        for name in names:
            lab.define(name)
            lab.start(name)
        for name in names:
            lab.wait_ready(name)
        time.sleep(3)
        guests = [Guest(lab.pid(n), n, "est", True, 256 * 2**20) for n in names]
        found = estimate(
            HostPaths(),
            guests,
            interval=3.0,
            max_page_sharing=int(ksm.read("max_page_sharing")),
            use_zero_pages=bool(ksm.read("use_zero_pages")),
        )
        converge(ksm, timeout=120)
        zeros = {g.pid: int(lab.ksm_stat(g.name)["ksm_zero_pages"]) for g in guests}
        real = measure(HostPaths(), [Party(g.pid, g.name, "est") for g in guests], zero_pages=zeros)
        result = rows(
            {v.name: v.predicted_saved_bytes for v in found.vms},
            {v.name: v.saved_bytes for v in real.vms},
        )
        result.append({"vm": "(split huge pages)", "predicted_bytes": found.split_zero_bytes})
        return result


def main() -> int:
    if os.geteuid() != 0:
        print("needs root (the page map, ksmd, libvirtd)", file=sys.stderr)
        return 1
    results: dict[str, list[dict[str, object]]] = {}
    with KSM_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        knobs = saved_knobs()
        try:
            for zero in (0, 1):
                results[f"guest-like processes, use_zero_pages={zero}"] = guest_like(zero)
            if (GUEST / "initrd.img").exists():
                results["two TCG guests from one image"] = tcg()
        finally:
            (Path("/sys/kernel/mm/ksm") / "run").write_text("0\n")
            restore_knobs(knobs)
    machine = machine_name()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "estimate.json").write_text(
        json.dumps({"machine": machine, "results": results}, indent=2) + "\n"
    )
    lines = [
        "# Estimate accuracy: predicted before ksmd runs, measured after it converged",
        "",
        f"Machine: {machine}. Reproduce: `make bench-estimate` (root). Targets: within 5 % per "
        "VM and host-wide on guest-like processes, within 10 % on the TCG guests.",
    ]
    for case, entries in results.items():
        lines += [
            "",
            f"## {case}",
            "",
            "| VM | predicted MiB | measured MiB | error |",
            "|---|---|---|---|",
        ]
        for entry in entries:
            measured = entry.get("measured_bytes")
            error = entry.get("error_percent")
            lines.append(
                f"| {entry['vm']} | {int(entry['predicted_bytes']) / 2**20:.1f} | "  # type: ignore[call-overload]
                + (f"{int(measured) / 2**20:.1f}" if measured is not None else "-")  # type: ignore[call-overload]
                + f" | {'-' if error is None else f'{error:+.2f} %'} |"
            )
    (RESULTS / "estimate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
