"""`place` and `rebalance` on sketch files, as an operator runs them: the ranked table, the JSON
a scheduler reads, every VM's best host, the commands `rebalance` prints, and errors that name
the file and the key (exit 1, one line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ksmpolicy.cli.main import main
from ksmpolicy.placement.sketch import to_json
from tests.placement.test_plan import DB, WEB, host, vm


@pytest.fixture
def sketches(tmp_path: Path) -> list[str]:
    a = host("a", vm("web-1", WEB), vm("web-2", WEB))
    b = host("b", vm("db-1", DB), vm("web-3", WEB))
    files = []
    for sketch in (a, b):
        path = tmp_path / f"{sketch.host}.json"
        path.write_text(json.dumps(to_json(sketch)))
        files += ["--host", str(path)]
    return files


def test_place_ranks_the_hosts(sketches: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["place", "web-3", *sketches]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "web-3 (trust domain default)"
    assert lines[2].split()[:3] == ["a", "150.0", "150.0"]  # 600 samples x 64 pages
    assert lines[3].split()[0] == "b" and lines[3].endswith("(current)")
    assert main(["place", "web-3", *sketches, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [h["host"] for h in found["hosts"]] == ["a", "b"]
    assert found["hosts"][0]["shared_bytes"] == 150 * 2**20


def test_every_vms_best_host_for_schedulers(
    sketches: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["place", *sketches, "--json"]) == 0
    best = {b["vm"]: b for b in json.loads(capsys.readouterr().out)}
    assert best["web-3"]["best_host"] == "a" and best["web-3"]["gain_bytes"] == 150 * 2**20
    assert best["web-1"]["gain_bytes"] == 0  # it shares with web-2 where it is, web-3 there


def test_rebalance_prints_commands(sketches: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rebalance", *sketches, "--max-moves", "1", "--reserve-mib", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# 1 moves, 150 MiB more saved")
    assert out[1].startswith("virsh migrate --live --persistent web-3 qemu+ssh://a/system")


def test_bad_sketches_are_one_line_errors(
    tmp_path: Path, sketches: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "ksmpolicy-sketch/1", "vms": 3}')
    assert main(["place", "web-3", "--host", str(broken)]) == 1
    assert capsys.readouterr().err == f"ksmpolicy: error: {broken}: vms: expected a list\n"
    assert main(["place", "nobody", *sketches]) == 1
    assert "no VM 'nobody' in the sketches" in capsys.readouterr().err
    assert main(["place", "web-3", *sketches, *sketches]) == 1
    assert capsys.readouterr().err == "ksmpolicy: error: host a, b given twice\n"
