"""A short run of the pacing benchmark (bench/ksm_bench.py), so it keeps working: tiny sizes,
two contenders, about a minute. Root and the real ksmd (CI runs as root); the benchmark takes
the KSM test lock itself and restores the knobs it found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import IS_ROOT, saved_knobs


@pytest.mark.root
@pytest.mark.kernel
def test_benchmark_smoke_run_writes_its_results(tmp_path: Path) -> None:
    if not IS_ROOT or not Path("/sys/kernel/mm/ksm/run").exists():
        pytest.skip("needs root and KSM")
    from bench import ksm_bench

    found = saved_knobs()
    assert ksm_bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    # every knob a contender may write is as found (the shipped policy sets use_zero_pages)
    assert saved_knobs() == found
    result = json.loads((tmp_path / "smoke.json").read_text())
    runs = {run["contender"]: run for run in result["runs"]}
    assert set(runs) == {"ksmpolicy", "kernel-defaults"}
    for run in runs.values():
        assert len(run["samples"]) >= 20
        assert run["figures"]["achievable_a_gib"] > 0
        assert run["figures"]["ksmd_cpu_seconds"] >= 0
    # The tiny workload merges fully under ksmpolicy within the run.
    assert runs["ksmpolicy"]["figures"]["seconds_to_90_a"] is not None
    table = (tmp_path / "smoke.md").read_text()
    assert "| ksmpolicy |" in table and "| kernel-defaults |" in table
    assert (tmp_path / "smoke.png").stat().st_size > 10_000
    # Re-rendering the recorded run recomputes the same figures from its samples.
    again = ["--render", str(tmp_path / "smoke.json"), "--out", str(tmp_path / "r")]
    assert ksm_bench.main(again) == 0
    rendered = json.loads((tmp_path / "r/smoke.json").read_text())
    assert [r["figures"] for r in rendered["runs"]] == [r["figures"] for r in result["runs"]]


def test_figures_are_measured_from_each_group_start() -> None:
    from bench.ksm_bench import Run, Workload, figures

    workload = Workload()
    a_only = workload.achievable(4, 0)
    both = workload.achievable(4, 2)
    samples: list[dict[str, float]] = []
    for t in range(0, 331):
        saved = 0 if t < 13 else a_only  # group A (started at 3 s) merged at 13 s
        if t >= 160:
            saved = both  # group B (started at 150 s) merged at 160 s
        cpu = 0.5 * min(max(t - 3, 0), 10) + 0.01 * t  # 50 % while A merges, then 1 %
        samples.append({"t": float(t), "saved_pages": saved, "ksmd_cpu_seconds": cpu})
    run = Run("x", "synthetic", samples, [(3.0, "group A starts"), (150.0, "group B starts")])
    found = figures(run, workload)
    assert found["seconds_to_90_a"] == 10.0
    assert found["seconds_to_90_b"] == 10.0
    # CPU to 90 % counts from group A's start, not from the start of the run.
    assert found["ksmd_cpu_seconds_to_90_a"] == pytest.approx(5.1, abs=0.01)
    assert found["peak_ksmd_cpu_percent"] == pytest.approx(51.0, abs=0.1)
    assert found["quiet_ksmd_cpu_percent"] == pytest.approx(1.0, abs=0.01)


def test_workload_parameters_by_name() -> None:
    from bench.ksm_bench import Workload, parse_workload

    changed = parse_workload(Workload(), ["vm_mib=1024", "image_percent=50", "group_a=8"])
    assert (changed.vm_mib, changed.image_percent, changed.group_a) == (1024, 50.0, 8)
    with pytest.raises(SystemExit, match="vm_mib: 'big' is not a int"):
        parse_workload(Workload(), ["vm_mib=big"])
    with pytest.raises(SystemExit, match="KEY one of group_a"):
        parse_workload(Workload(), ["vms=3"])


def test_times_count_from_the_first_exec_and_from_ready() -> None:
    from bench.ksm_bench import Run, Workload, figures, physical_bound

    workload = Workload(all_at_once=True)
    both = workload.achievable(4, 2)
    samples = [
        {"t": t / 4, "saved_pages": 0 if t / 4 < 20 else both, "ksmd_cpu_seconds": 0.5 * t / 4}
        for t in range(0, 4 * 120)
    ]
    run = Run("x", "synthetic", samples, [(0.0, "group A exec"), (6.0, "group A ready")])
    found = figures(run, workload)
    assert found["seconds_to_90_a"] == 20.0  # from the exec: what a user sees
    assert found["seconds_to_90_a_from_ready"] == 14.0
    assert found["seconds_to_90_b"] is None  # all at once: no later start
    assert found["ready_after_seconds"] == 6.0
    # The integral is time-weighted: 100 s of `both` at 0.25 s samples.
    assert found["savings_gib_seconds"] == pytest.approx(
        both * 4096 / 2**30 * (119.75 - 20), rel=0.01
    )
    run.figures = found
    spent = found["ksmd_cpu_seconds_to_90_a"]
    assert spent is not None
    # ready at 6 s, then what ksmd spent to 90 %, at a 50 % cap
    assert physical_bound([run], 50.0) == pytest.approx(6.0 + spent / 0.5, abs=0.05)


def test_a_boolean_workload_parameter() -> None:
    from bench.ksm_bench import Workload, parse_workload

    assert parse_workload(Workload(), ["all_at_once=1"]).all_at_once is True
    assert parse_workload(Workload(), ["all_at_once=0"]).all_at_once is False


def test_docs_figures_are_the_results_and_a_changed_one_fails(tmp_path: Path) -> None:
    """Every benchmark figure in the README and docs/ is what bench/results/*.json says, and
    a figure changed by hand fails the check, naming its file and line."""
    from bench import docs

    assert [p for doc in docs.documents() for p in docs.check(doc, write=False)] == []
    readme = (docs.REPO / "README.md").read_text()
    assert "<!-- bench:ksm-headline -->" in readme
    edited = tmp_path / "README.md"
    marker = "<!-- bench:libvirt.json#hook_prepare_ms|.1f -->"
    text = f"intro\nthe hook costs {marker}12.3<!-- /bench --> ms\n"
    edited.write_text(text)
    original = docs.REPO
    try:
        docs.REPO = tmp_path  # the message names the file relative to the checkout
        problems = docs.check(edited, write=False)
    finally:
        docs.REPO = original
    assert len(problems) == 1 and problems[0].startswith("README.md:2: libvirt.json#"), problems
    assert "'12.3'" in problems[0]
