"""A short run of the pacing benchmark (bench/ksm_bench.py), so it keeps working: tiny sizes,
two contenders, about a minute. Root and the real ksmd (CI runs as root); the benchmark takes
the KSM test lock itself and restores the knobs it found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import IS_ROOT

pytestmark = [pytest.mark.root, pytest.mark.kernel]


def test_benchmark_smoke_run_writes_its_results(tmp_path: Path) -> None:
    if not IS_ROOT or not Path("/sys/kernel/mm/ksm/run").exists():
        pytest.skip("needs root and KSM")
    from bench import ksm_bench

    assert ksm_bench.main(["--smoke", "--out", str(tmp_path)]) == 0
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
