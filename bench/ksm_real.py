"""The pacing benchmark on guests that hold a real OS: four "web" and two "database" TCG guests
(scripts/build-guest-real, 512 MiB each) started together on a real libvirtd, for each contender
of bench/ksm_bench.py on the same timeline, on the real ksmd.

What a contender could save is not modelled here: after its window, the contender is stopped and
ksmd runs at a fixed fast pace until its savings hold still (lab/ksmd.py); 90 % of that is the
run's target. Times count from the first guest's start (what a user sees) and from the moment
the last guest said it was ready (its program answers). The synthetic bench's bound (ready, then
two scans at the cap) does not hold here: these guests boot for a minute, and what the first
ones hold merges while the others boot. A reference is measured instead: the contender
`flat-out` runs ksmd as fast as it goes from the first start (5000 pages per 10 ms). It is not
a lower bound on few cores: ksmd at full speed takes CPU from the booting guests. ksmd CPU
over the last 60 s of the window is the quiet figure. Before the first contender the guests run
once, not measured, and before each the guests' memory is written once and freed (`warm_up`,
bench/ksm_bench.py's `warm_memory`): no contender pays for running first.

Run `python -m bench.ksm_real` (root; `make bench-ksm` runs it after the synthetic timelines).
Writes bench/results/ksm-real.{json,md,png}.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.ksm_bench import (
    CONTENDERS,
    RESULTS,
    SAMPLE_SECONDS,
    Contender,
    Run,
    Workload,
    begin,
    figures,
    keep_daemon_log,
    ksm_restored,
    machine_name,
    notify,
    plot,
    reset_ksm,
    shipped_cpu_cap,
    stop_helpers,
    table,
)
from lab import realguests
from lab.ksmd import converge
from lab.libvirtd import READY, Lab, temporary_lab
from tests.conftest import KSM_LOCK, RealKsm

DEFAULT_CONTENDERS = "ksmpolicy,ksmpolicy-no-notes,kernel-defaults,ksmtuned,flat-out"
WINDOW_SECONDS = 300.0
QUIET_SECONDS = 60.0


def workload(window: float) -> Workload:
    """The synthetic bench's all-at-once timeline for the table's labels and quiet window: one
    start of every guest, nothing stops; the quiet window is the last QUIET_SECONDS."""
    web = sum(1 for _name, image in realguests.FULL if image == "web")
    return Workload(
        group_a=web,
        group_b=len(realguests.FULL) - web,
        vm_mib=realguests.MEMORY_MIB,
        excluded_mib=0,
        all_at_once=True,
        b_stop=window - QUIET_SECONDS - 10,
        churn_start=window,
        end=window,
    )


def warm_up(lab: Lab, window: float) -> None:
    """Before the first contender, the guests once (not measured): started, until each says it
    is ready, then stopped, with ksmd off. Each contender after the first starts right after
    the previous one's guests stopped, with their files in the page cache and memory the host
    has just backed; this gives the first the same."""
    reset_ksm()
    waiting = {name for name, _image in realguests.FULL}
    deadline = time.monotonic() + window
    try:
        for name, _image in realguests.FULL:
            lab.start(name)
        while waiting and time.monotonic() < deadline:
            waiting = {name for name in waiting if not lab.says(name, READY)}
            time.sleep(1.0)
    finally:
        for name, _image in realguests.FULL:
            lab.stop(name)


def run_contender(contender: Contender, lab: Lab, work: Path, window: float) -> Run:
    run, baseline, helpers = begin(
        contender, work, warm_mib=realguests.MEMORY_MIB * len(realguests.FULL)
    )
    if baseline is None:
        return run
    waiting = {name for name, _image in realguests.FULL}
    start = time.monotonic()
    try:
        run.events.append((0.0, "group A exec"))  # the first guest's start
        for name, _image in realguests.FULL:
            lab.start(name)
        if contender.notes:
            notify(work, "started")  # as the hook would
        next_sample = next_look = time.monotonic()
        while (now := time.monotonic()) - start < window:
            if waiting and now >= next_look:
                waiting = {name for name in waiting if not lab.says(name, READY)}
                if not waiting:
                    run.events.append((round(now - start, 2), "group A ready"))
                next_look += 1.0
            if now >= next_sample:
                run.samples.append(baseline.sample(start))
                next_sample += SAMPLE_SECONDS
            time.sleep(0.02)
        if waiting:
            raise RuntimeError(f"guests {sorted(waiting)} were not ready after {window:g} s")
        # What these guests can save: the contender stopped, ksmd fast until it holds still.
        stop_helpers(helpers)
        helpers = []
        converge(RealKsm())
        run.achievable_pages = baseline.saved_pages()
    finally:
        for name, _image in realguests.FULL:
            lab.stop(name)
        stop_helpers(helpers)
        reset_ksm()
    keep_daemon_log(run, work)
    run.figures = figures(run, workload(window))
    return run


def markdown(result: dict[str, object], runs: list[Run], name: str, plotted: bool) -> str:
    bound, cap = result["physical_bound_seconds"], result["cpu_cap_percent"]
    assert isinstance(cap, float) and (bound is None or isinstance(bound, (int, float)))
    window = result["window_seconds"]
    assert isinstance(window, float)
    targets = ", ".join(
        f"{run.contender} {run.figures.get('achievable_ab_gib')} GiB" for run in runs if run.figures
    )
    return (
        f"# KSM pacing on guests that hold a real OS ({name})\n\n"
        f"Workload: {result['guests']} started together on libvirtd (TCG, 512 MiB each, "
        f"scripts/build-guest-real), a {window:g} s window per contender; the target is 90 % "
        f"of what ksmd saved when run to convergence after each window ({targets}). "
        f"Machine: {result['machine']}. Reproduce: `python -m bench.ksm_real` (root).\n\n"
        + table(runs, None, cap, workload(window)).replace(
            "had filled its memory", "said it was ready"
        )
        + "\n\n"
        + bound_sentence(bound, runs)
        + (f"\n\n![savings and ksmd CPU]({name}.png)\n" if plotted else "\n")
    )


def measured_bound(runs: list[Run]) -> float | None:
    """How soon this memory merged at all: `flat-out`'s time to 90 % (None: not run)."""
    flat = next((r for r in runs if r.contender == "flat-out" and not r.skipped), None)
    return None if flat is None else flat.figures.get("seconds_to_90_a")


def bound_sentence(bound: object, runs: list[Run]) -> str:
    if not isinstance(bound, (int, float)):
        return "No reference: the contender `flat-out` did not run or never reached 90 %."
    ratios = ", ".join(
        f"{run.contender} {seconds / bound:.2f}×"
        if (seconds := run.figures.get("seconds_to_90_a")) is not None
        else f"{run.contender} never"
        for run in runs
        if not run.skipped and run.contender != "flat-out"
    )
    return (
        f"Reference: ksmd flat out from the first start (`flat-out`) reached 90 % in {bound} s. "
        "On two cores it is not a lower bound: ksmd at full speed slows the booting guests. "
        f"Each contender's time to 90 % divided by it: {ratios}."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contenders", default=DEFAULT_CONTENDERS, help="comma-separated")
    parser.add_argument("--window", type=float, default=WINDOW_SECONDS, help="seconds each")
    parser.add_argument("--name", default="ksm-real", help="results name (NAME.json, .md, .png)")
    parser.add_argument("--out", default=str(RESULTS), help="results directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("ksm_real: needs root (ksmd, libvirtd)", file=sys.stderr)
        return 2
    names = args.contenders.split(",")
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        print(f"ksm_real: unknown contender(s) {unknown}: use {list(CONTENDERS)}", file=sys.stderr)
        return 2
    if args.window < QUIET_SECONDS + 60:
        print(f"ksm_real: --window must be at least {QUIET_SECONDS + 60:g} s", file=sys.stderr)
        return 2
    realguests.build_images()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    with KSM_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with (
            ksm_restored(),
            temporary_lab() as lab,
            tempfile.TemporaryDirectory(prefix="ksm-real-") as tmp,
        ):
            for name, image in realguests.FULL:
                lab.define(name, image=image, memory_mib=realguests.MEMORY_MIB)
            print("== warm-up (not measured)", flush=True)
            warm_up(lab, args.window)
            for contender in names:
                work = Path(tmp) / contender
                work.mkdir()
                print(f"== {contender}", flush=True)
                run = run_contender(CONTENDERS[contender], lab, work, args.window)
                print(json.dumps(run.figures or {"skipped": run.skipped}), flush=True)
                runs.append(run)
    cap = shipped_cpu_cap()
    result: dict[str, object] = {
        "machine": machine_name(),
        "guests": ", ".join(f"{name} ({image})" for name, image in realguests.FULL),
        "window_seconds": float(args.window),
        "physical_bound_seconds": measured_bound(runs),
        "cpu_cap_percent": cap,
        "runs": [asdict(r) for r in runs],
    }
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    plotted = plot(runs, out / f"{args.name}.png")
    text = markdown(result, runs, args.name, plotted)
    (out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
