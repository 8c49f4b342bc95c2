"""`place` and `rebalance` on sketch files, as an operator runs them: the ranked table, the JSON
a scheduler reads, every VM's best host, the commands `rebalance` prints, and errors that name
the file and the key (exit 1, one line)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from ksmpolicy.cli.main import main
from ksmpolicy.paths import FLEET_KEY
from ksmpolicy.placement.document import to_json
from tests.placement.test_plan import DB, KEY, WEB, host, vm


@pytest.fixture
def sketches(tmp_path: Path) -> list[str]:
    """Two hosts' sketch files, and --root of a tree holding the fleet key they are sealed
    under (as /etc/ksmpolicy/fleet.key on a host)."""
    key = tmp_path / FLEET_KEY.lstrip("/")
    key.parent.mkdir(parents=True)
    key.write_text(KEY.secret.hex() + "\n")
    key.chmod(0o600)
    a = host("a", vm("web-1", WEB), vm("web-2", WEB))
    b = host("b", vm("db-1", DB), vm("web-3", WEB))
    files = ["--root", str(tmp_path)]
    for sketch in (a, b):
        path = tmp_path / f"{sketch.host}.json"
        recent = dataclasses.replace(sketch, taken_at=time.time())
        path.write_text(json.dumps(to_json(recent, KEY)))
        files += ["--host", str(path)]
    return files


def test_place_ranks_the_hosts(sketches: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["place", "web-3", *sketches]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == "web-3 (trust domain default)"
    assert lines[2].split()[:3] == ["a", "150.0", "150.0"]  # 600 samples x 64 pages
    assert lines[3].split()[0] == "b" and lines[3].endswith("(current)")
    assert main(["place", "web-3", *sketches, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [h["host"] for h in found["hosts"]] == ["a", "b"]
    assert found["hosts"][0]["shared_bytes"] == 150 * 2**20
    assert found["hosts"][0]["why_not"] is None


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
    uuid = vm("web-3", WEB).uuid
    assert out[1].startswith(
        f"virsh migrate --live --persistent --domain {uuid} --desturi qemu+ssh://a/system   "
    )
    assert out[1].endswith("# web-3: b -> a, +150 MiB")


def test_bad_sketches_are_one_line_errors(
    tmp_path: Path, sketches: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    root = sketches[:2]
    broken = tmp_path / "broken.json"
    document = {**to_json(host("c"), KEY), "vms": 3}
    broken.write_text(json.dumps({**document, "seal": KEY.seal(document)}))
    assert main(["place", "web-3", *root, "--host", str(broken)]) == 1
    assert capsys.readouterr().err == f"ksmpolicy: error: {broken}: vms: expected a list\n"
    broken.write_text(json.dumps(document))
    assert main(["place", "web-3", *root, "--host", str(broken)]) == 1
    assert "its seal does not match its contents" in capsys.readouterr().err
    broken.write_text("[" * 100_000)
    assert main(["place", "web-3", *root, "--host", str(broken)]) == 1
    assert capsys.readouterr().err.startswith(f"ksmpolicy: error: {broken}: not JSON")
    assert main(["place", "web-3", "--root", str(tmp_path / "keyless"), *sketches[2:]]) == 1
    assert "no fleet key at" in capsys.readouterr().err
    assert main(["place", "nobody", *sketches]) == 1
    assert "no VM with the name 'nobody' in the sketches given" in capsys.readouterr().err
    assert main(["place", "web-3", *sketches, *sketches]) == 1
    assert capsys.readouterr().err == "ksmpolicy: error: host a, b given twice\n"


def test_an_old_sketch_is_said(
    tmp_path: Path, sketches: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    old = host("c", vm("web-9", WEB))
    path = tmp_path / "c.json"
    path.write_text(json.dumps(to_json(dataclasses.replace(old, taken_at=time.time() - 7200), KEY)))
    assert main(["place", "web-9", *sketches, "--host", str(path)]) == 0
    assert capsys.readouterr().err == (
        f"note: {path} was taken 2.0 h ago: predicted from what its VMs held then\n"
    )


def test_a_tenants_name_neither_breaks_the_sketch_nor_the_output(
    tmp_path: Path, sketches: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """libvirt takes any name: one with a newline and a terminal escape is read, printed
    escaped, and never named in a command (rebalance names the VM by its UUID)."""
    hostile = "web\n\x1b[2Jrm -rf /"
    c = host("c", vm(hostile, WEB))
    path = tmp_path / "c.json"
    path.write_text(json.dumps(to_json(dataclasses.replace(c, taken_at=time.time()), KEY)))
    assert main(["rebalance", *sketches, "--host", str(path), "--reserve-mib", "0"]) == 0
    out = capsys.readouterr().out
    # one line per move: a pasted plan runs only the commands it shows
    assert "\x1b" not in out and "\nrm" not in out, out
    assert "# web\\u000a\\u001b[2Jrm -rf /: c -> a" in out, out
    assert main(["place", hostile, *sketches, "--host", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("web\\u000a\\u001b[2Jrm -rf / (trust domain default)\n"), out
    assert main(["place", *sketches, "--host", str(path)]) == 0
    assert "\x1b" not in capsys.readouterr().out


def test_new_key_help_names_the_key_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sketch", "--help"]) == 0
    assert FLEET_KEY in " ".join(capsys.readouterr().out.split())
