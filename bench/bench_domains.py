"""Trust domains: what the audit costs and how long a hand-over takes (root, real ksmd).

1. The audit (`ksmpolicy audit`'s walk, in process): CPU seconds for 200 guest-like VMs of
   1 GiB each (32 MiB touched, as an idle guest), in two domains, merged. Target <= 2 CPU-s;
   run continuously the daemon spaces audits at least 100 times their cost apart (<= 1 % of a
   core), and this reports the average share that gives at the default interval.
2. A hand-over on the benchmark workload: two domains of 4 x 512 MiB guest-like processes
   (60 % image, 10 % zero, 30 % unique; the same image in both domains), started unmergeable
   as under trust domains, and the real daemon. Clocks start when the VMs are started (the
   cold start of domain alpha) and when beta is given the higher priority (the hand-over);
   the hand-over ends when alpha is unmerged and beta has 90 % of its savings. Also the peak
   extra memory during the hand-over (the drop of MemAvailable below its value before), the
   guard's estimate of it, and whether any audit during it found a page across the boundary.
   Target: the hand-over takes <= 2 x the cold start.
3. Zero pages across domains: two domains' guests, 45 % zero pages, both mergeable (what the
   keeper never allows in one scope), with use_zero_pages 1 and 0: the KSM pages both map.

Writes bench/results/domains.{json,md}.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_pagemap import converge
from bench.ksm_bench import machine_name, stop_all, write
from ksmpolicy.kernel.ksm import read_ksm
from ksmpolicy.kernel.pagemap import PageMapReader
from ksmpolicy.kernel.procfs import read_meminfo
from ksmpolicy.kernel.scan import read_ksm_stat
from ksmpolicy.paths import PAGE_SIZE, HostPaths
from ksmpolicy.policy.load import parse_policy
from ksmpolicy.report.audit import audit
from lab.simguest import page_plan, spawn
from tests.conftest import KSM_LOCK, restore_knobs, saved_knobs
from tests.control.test_daemon import DaemonProcess

RESULTS = Path(__file__).resolve().parent / "results"
AUDIT_VMS, AUDIT_MIB, AUDIT_TOUCHED = 200, 1024, 32
SWITCH_GUESTS, SWITCH_MIB = 4, 512
DEFAULT_AUDIT_INTERVAL = 300.0
POLICY = """version: 1
domains:
  alpha: {{priority: 0}}
  beta: {{priority: {beta}}}
groups:
  ga: {{names: ["bd-a-*"], domain: alpha}}
  gb: {{names: ["bd-b-*"], domain: beta}}
reconciler: {{interval_seconds: 1, target_scan_seconds: 30, max_ksmd_cpu_percent: 70}}
isolation: {{min_hold_seconds: 0}}
"""


def bench_audit() -> dict[str, float]:
    policy = parse_policy(POLICY.format(beta=0))
    guests = [
        spawn(
            f"bd-{'ab'[i % 2]}-{i}",
            mib=AUDIT_MIB,
            touch_mib=AUDIT_TOUCHED,
            image="audit-base",
        )
        for i in range(AUDIT_VMS)
    ]
    try:
        converge()
        runs = [audit(HostPaths(), policy) for _ in range(3)]
    finally:
        stop_all(guests)
    cpu = statistics.median(r.cpu_seconds for r in runs)
    return {
        "audit_vms": AUDIT_VMS,
        "audit_cpu_seconds": round(cpu, 3),
        "audit_wall_seconds": round(statistics.median(r.seconds for r in runs), 3),
        "audit_cross_domain_pages": runs[-1].cross_domain_pages,
        "audit_interval_seconds": max(DEFAULT_AUDIT_INTERVAL, 100 * cpu),
        "audit_core_percent": round(100 * cpu / max(DEFAULT_AUDIT_INTERVAL, 100 * cpu), 3),
    }


def merged(pid: int) -> int:
    stat = read_ksm_stat(Path(f"/proc/{pid}/ksm_stat"))
    return (stat.merging_pages or 0) + (stat.zero_pages or 0) if stat else 0


def bench_handover() -> dict[str, float | bool | None]:
    image, zero, _unique = page_plan(SWITCH_MIB * 256, 60, 10)
    want = 0.9 * (image + zero)  # 90 % of what each guest can merge
    workdir = Path(tempfile.mkdtemp(prefix="bench-domains-"))
    policy_path = workdir / "policy.yaml"
    policy_path.write_text(POLICY.format(beta=0))
    policy_path.chmod(0o644)
    write("run", 0)
    write("use_zero_pages", 1)
    guests: dict[str, int] = {}
    processes = []
    daemon = None
    try:
        cold_started = time.monotonic()  # the VMs start: the cold start's clock
        for domain in ("a", "b"):
            for i in range(SWITCH_GUESTS):
                name = f"bd-{domain}-{i}"
                process = spawn(
                    name,
                    mib=SWITCH_MIB,
                    image="switch-base",
                    no_merge=True,
                    qmp=str(workdir / f"{name}.qmp"),
                )
                processes.append(process)
                guests[name] = process.pid
        daemon = DaemonProcess(policy_path, workdir / "run")

        def done(prefix: str) -> bool:
            return all(merged(p) >= want for n, p in guests.items() if n.startswith(prefix))

        def off(prefix: str) -> bool:
            return all(merged(p) == 0 for n, p in guests.items() if n.startswith(prefix))

        while not done("bd-a") and time.monotonic() - cold_started < 600:
            time.sleep(0.2)
        cold = time.monotonic() - cold_started
        time.sleep(3)
        available_before = read_meminfo(HostPaths()).get("MemAvailable", 0)
        alpha = [p for n, p in guests.items() if n.startswith("bd-a")]
        with PageMapReader(HostPaths()) as reader:  # what the keeper's guard computes
            walked = reader.walk(alpha)
        zero = sum(
            (s.zero_pages or 0) for p in alpha if (s := read_ksm_stat(Path(f"/proc/{p}/ksm_stat")))
        )
        guard_estimate = (walked.unmerge_pages() + zero) * PAGE_SIZE
        policy_path.write_text(POLICY.format(beta=10))
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGHUP)
        lowest = available_before
        unmerged_at = None
        audits = []
        last_audit = 0.0
        while time.monotonic() - started < 600:
            lowest = min(lowest, read_meminfo(HostPaths()).get("MemAvailable", lowest))
            if unmerged_at is None and off("bd-a"):
                unmerged_at = time.monotonic() - started
            if unmerged_at is not None and done("bd-b"):
                break
            if time.monotonic() - last_audit > 2:
                found = audit(HostPaths(), parse_policy(POLICY.format(beta=10)))
                audits.append(found.cross_domain_pages + found.cross_domain_zero_pages)
                last_audit = time.monotonic()
            time.sleep(0.05)
        handover = time.monotonic() - started
        found = audit(HostPaths(), parse_policy(POLICY.format(beta=10)))
        audits.append(found.cross_domain_pages + found.cross_domain_zero_pages)
    finally:
        if daemon is not None:
            daemon.stop()
        stop_all(processes)
        write("run", 0)
    return {
        "switch_guests_per_domain": SWITCH_GUESTS,
        "switch_mib": SWITCH_MIB,
        "cold_start_seconds": round(cold, 1),
        "handover_seconds": round(handover, 1),
        "old_unmerged_after_seconds": None if unmerged_at is None else round(unmerged_at, 2),
        "ratio": round(handover / cold, 2),
        "peak_extra_mib": round((available_before - lowest) / 2**20, 1),
        "guard_estimate_mib": round(guard_estimate / 2**20, 1),
        "audits_during": len(audits),
        "max_cross_domain_pages_during": max(audits) if audits else None,
    }


def bench_zero() -> dict[str, int]:
    found = {}
    for zero in (1, 0):
        write("run", 0)
        write("use_zero_pages", zero)
        guests = [
            spawn(f"bd-{d}-z", mib=64, image=f"zero-{d}", image_percent=0, zero_percent=45)
            for d in ("a", "b")
        ]
        try:
            converge()
            result = audit(HostPaths(), parse_policy(POLICY.format(beta=0)))
            state = read_ksm(HostPaths())
            found[f"zero{zero}_cross_domain_zero_pages"] = result.cross_domain_zero_pages
            found[f"zero{zero}_cross_domain_pages"] = result.cross_domain_pages
            found[f"zero{zero}_ksm_zero_pages"] = (state.get("ksm_zero_pages") or 0) if state else 0
        finally:
            stop_all(guests)
    found["zero_pages_per_guest"] = page_plan(64 * 256, 0, 45)[1]
    return found


def main() -> int:
    if os.geteuid() != 0:
        print("needs root (the real ksmd and the page map)", file=sys.stderr)
        return 1
    with KSM_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        knobs = saved_knobs()
        try:
            results: dict[str, object] = {**bench_zero(), **bench_handover(), **bench_audit()}
        finally:
            write("run", 0)
            restore_knobs(knobs)
    results["machine"] = machine_name()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "domains.json").write_text(json.dumps(results, indent=2) + "\n")
    r = results
    lines = [
        "# Trust domains: the audit's cost, a hand-over, zero pages",
        "",
        "| measure | result | target |",
        "|---|---|---|",
        f"| audit of {r['audit_vms']} VMs x {AUDIT_MIB} MiB ({AUDIT_TOUCHED} MiB touched), "
        f"CPU seconds | {r['audit_cpu_seconds']} | <= 2 |",
        f"| ... wall seconds | {r['audit_wall_seconds']} | |",
        f"| ... share of a core, run every {r['audit_interval_seconds']:g} s | "
        f"{r['audit_core_percent']} % | <= 1 % |",
        f"| cold start: {SWITCH_GUESTS} x {SWITCH_MIB} MiB of domain alpha, to 90 % of its "
        f"savings, s | {r['cold_start_seconds']} | |",
        f"| hand-over to beta (same size): alpha unmerged after, s | "
        f"{r['old_unmerged_after_seconds']} | |",
        f"| hand-over: beta at 90 % of its savings after, s | {r['handover_seconds']} | |",
        f"| hand-over / cold start | {r['ratio']} | <= 2 |",
        f"| peak extra memory during the hand-over, MiB | {r['peak_extra_mib']} | |",
        "| the guard's estimate (page map: copies alpha's unmerge makes), MiB | "
        f"{r['guard_estimate_mib']} | |",
        f"| most KSM pages across domains in {r['audits_during']} audits during it | "
        f"{r['max_cross_domain_pages_during']} | 0 |",
        f"| zero pages, use_zero_pages=1: KSM pages both domains map | "
        f"{r['zero1_cross_domain_zero_pages']} (ksm_zero_pages {r['zero1_ksm_zero_pages']}) | |",
        f"| zero pages, use_zero_pages=0: KSM pages both domains map | "
        f"{r['zero0_cross_domain_zero_pages']} | |",
        "",
        f"Zero-page case: 2 guests of 64 MiB, {r['zero_pages_per_guest']} zero pages each, one "
        "per domain, both mergeable. Machine: "
        f"{r['machine']}. Reproduce: `make bench-domains` (root).",
    ]
    (RESULTS / "domains.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
