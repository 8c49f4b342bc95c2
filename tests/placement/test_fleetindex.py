"""The fleet index (placement/fleetindex.py): the same predictions as `place` on the sketches,
for every VM of random fleets; refused when someone but root could have changed it, when built
under another fleet key, and with a clear error (never a traceback) when damaged."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ksmpolicy.cli.main import main
from ksmpolicy.placement.document import to_json
from ksmpolicy.placement.fleetindex import (
    ARRAYS,
    FleetIndex,
    FleetIndexError,
    load_index,
    write_index,
)
from ksmpolicy.placement.plan import place
from ksmpolicy.placement.rebalance import Fleet, best_hosts, rebalance
from ksmpolicy.placement.sketch import FleetKey, HostSketch
from tests.placement.test_plan import DB, KEY, WEB, host, vm
from tests.placement.test_rebalance_model import random_fleet

NOBODY = 65534


def with_repeats(fleet: list[HostSketch], rng: np.random.Generator) -> list[HostSketch]:
    """The random fleet's VMs, some of their contents held more than once, some exactly (K
    times or more): the terms the saving weighs differently."""
    out = []
    for h in fleet:
        vms = []
        for one in h.vms:
            counts = one.counts.copy()
            repeated = rng.random(counts.size) < 0.1
            counts[repeated] = rng.integers(2, 200, int(repeated.sum()))
            exact = repeated & (rng.random(counts.size) < 0.3)
            vms.append(dataclasses.replace(one, counts=counts, exact=exact))
        out.append(dataclasses.replace(h, vms=tuple(vms)))
    return out


def test_the_index_predicts_what_place_does_on_random_fleets(tmp_path: Path) -> None:
    """Every VM of 200 random fleets (two trust domains, VMs that merge, do not merge now, or
    are excluded, zero pages, hosts with use_zero_pages on and off, repeated and exact
    contents): the same ranked predictions from the index as from the sketches."""
    rng = np.random.default_rng(26)
    compared = shared = idle = 0
    for n in range(200):
        fleet = with_repeats(random_fleet(rng), rng)
        directory = tmp_path / f"index-{n}"
        write_index(directory, fleet, built_at=0.0)
        index = load_index(directory, KEY.key_id, check_owner=False)
        for one in (v for h in fleet for v in h.vms):
            subject, expected = place(fleet, one.name, reserve_bytes=2**26)
            got_subject, got = index.place(one.name, reserve_bytes=2**26)
            assert got == expected, (n, one.name)
            assert np.array_equal(got_subject.values, subject.values)
            assert np.array_equal(got_subject.counts, subject.counts)
            assert np.array_equal(got_subject.exact, subject.exact)
            compared += len(got)
            shared += sum(p.shared_bytes > 0 for p in got)
            idle += one.merges and not one.active
    assert compared > 1000 and shared > 300 and idle > 30, (compared, shared, idle)


def test_rebalance_plans_the_same_from_the_index(tmp_path: Path) -> None:
    """`rebalance --index` and every VM's best host plan on the index (its VMs' values read
    when weighed, the bounds stored at the build): the same moves and answers as on the
    sketches, and the same bounds as computed from them."""
    rng = np.random.default_rng(7)
    moved = 0
    for n in range(60):
        fleet = random_fleet(rng)
        write_index(tmp_path / str(n), fleet, built_at=0.0)
        index = load_index(tmp_path / str(n), KEY.key_id, check_owner=False)
        for before, after in zip(fleet, index.hosts, strict=True):
            assert dataclasses.replace(after, vms=()) == dataclasses.replace(before, vms=())
        from_sketches, from_index = Fleet.of(fleet), index.fleet()
        assert np.array_equal(from_index.most, from_sketches.most)
        assert np.array_equal(from_index.here, from_sketches.here)
        expected = rebalance(fleet, max_moves=3, min_gain_bytes=2**20)
        got = rebalance(from_index, max_moves=3, min_gain_bytes=2**20)
        assert [(m.vm.name, m.target, m.gain_bytes) for m in got] == [
            (m.vm.name, m.target, m.gain_bytes) for m in expected
        ]
        assert best_hosts(from_index) == best_hosts(fleet)
        moved += len(got)
    assert moved > 20, moved


def test_a_new_build_replaces_the_old_whole(tmp_path: Path) -> None:
    write_index(tmp_path, [host("a", vm("web-1", WEB)), host("b", vm("web-2", WEB))], built_at=1)
    write_index(tmp_path, [host("a", vm("db-1", DB))], built_at=2)
    index = load_index(tmp_path, KEY.key_id, check_owner=False)
    assert [h.host for h in index.hosts] == ["a"] and index.built_at == 2
    assert len(list(tmp_path.glob("*.npy"))) == len(ARRAYS)  # the first build's arrays are gone


def test_an_index_is_written_only_where_others_cannot_change_it(tmp_path: Path) -> None:
    fleet = [host("a", vm("web-1", WEB))]
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o770)
    shared.chmod(0o770)
    with pytest.raises(FleetIndexError, match=f"cannot write the fleet index in {shared}: "):
        write_index(shared, fleet, built_at=0.0)
    assert list(shared.iterdir()) == []
    taken = tmp_path / "a-file"
    taken.write_text("")
    with pytest.raises(FleetIndexError, match=f"cannot write the fleet index in {taken}: "):
        write_index(taken, fleet, built_at=0.0)


def test_an_index_built_under_another_key_is_refused(tmp_path: Path) -> None:
    other = FleetKey(b"j" * 32)
    sketch = dataclasses.replace(host("a", vm("web-1", WEB)), key_id=other.key_id)
    write_index(tmp_path, [sketch], built_at=0.0)
    with pytest.raises(FleetIndexError, match=f"built under another fleet key .{other.key_id}"):
        load_index(tmp_path, KEY.key_id, check_owner=False)


def _damage_json(directory: Path) -> None:
    (directory / "index.json").write_text("{")


def _truncate_values(directory: Path) -> None:
    (values,) = directory.glob("vm_values-*.npy")
    os.truncate(values, values.stat().st_size // 2)


def _drop_holders(directory: Path) -> None:
    (holders,) = directory.glob("held_hosts-*.npy")
    holders.unlink()


def _shorter_starts(directory: Path) -> None:
    meta = json.loads((directory / "index.json").read_text())
    meta["vms"].pop()
    meta["hosts"][-1]["vms"] -= 1
    (directory / "index.json").write_text(json.dumps(meta))


def _rewrite(directory: Path, name: str, change: Callable[[np.ndarray], None]) -> None:
    (path,) = directory.glob(f"{name}-*.npy")
    array = np.load(path)
    change(array)
    np.save(path, array)


def _host_past_the_end(directory: Path) -> None:
    _rewrite(directory, "held_hosts", lambda a: a.fill(7))


def _host_before_the_first(directory: Path) -> None:
    _rewrite(directory, "held_hosts", lambda a: a.fill(-1))


def _held_by_nobody(directory: Path) -> None:
    _rewrite(directory, "held_holders", lambda a: a.fill(0))


def _nothing_to_gain(directory: Path) -> None:  # every bound zero: rebalance would weigh none
    _rewrite(directory, "vm_most", lambda a: a.fill(0))


def _saves_more_than_it_does(directory: Path) -> None:  # its gain would be understated
    _rewrite(directory, "vm_here", lambda a: a.__setitem__(0, 1))


def _saves_less_than_nothing(directory: Path) -> None:
    _rewrite(directory, "vm_here", lambda a: a.__setitem__(0, -25_600))


def _saves_past_any_count(directory: Path) -> None:
    _rewrite(directory, "vm_most", lambda a: a.fill(2**52))


QUESTIONS: dict[str, Callable[[FleetIndex], object]] = {
    "place VM": lambda index: index.place("web-1"),
    "place": lambda index: index.best_hosts(),
    "rebalance": lambda index: index.rebalance(min_gain_bytes=2**20),
}


@pytest.mark.parametrize("question", list(QUESTIONS))
@pytest.mark.parametrize(
    "damage",
    [
        _damage_json,
        _truncate_values,
        _drop_holders,
        _shorter_starts,
        _host_past_the_end,
        _host_before_the_first,
        _held_by_nobody,
        _nothing_to_gain,
        _saves_more_than_it_does,
        _saves_less_than_nothing,
        _saves_past_any_count,
    ],
)
def test_a_damaged_index_is_a_clear_error(tmp_path: Path, damage, question: str) -> None:  # type: ignore[no-untyped-def]
    """Every question the index answers says a damaged one is damaged, never a wrong answer
    or a traceback (web-1, alone on a, would gain by moving beside web-2 on b)."""
    fleet = [host("a", vm("web-1", WEB)), host("b", vm("web-2", WEB), vm("db-1", DB))]
    write_index(tmp_path, fleet, built_at=0.0)
    intact = load_index(tmp_path, KEY.key_id, check_owner=False)
    assert QUESTIONS["rebalance"](intact), "the intact index plans a move"
    damage(tmp_path)
    with pytest.raises(FleetIndexError, match="is damaged or incomplete") as caught:
        QUESTIONS[question](load_index(tmp_path, KEY.key_id, check_owner=False))
    assert f"ksmpolicy index --host ... --out {tmp_path}" in str(caught.value)


def test_a_missing_index_says_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(FleetIndexError, match=r"no fleet index in .*: build it again"):
        load_index(tmp_path / "none", KEY.key_id, check_owner=False)


# --- ownership: the index is root's along its whole path -------------------------------------


@pytest.fixture
def built(tmp_path: Path) -> Path:
    """An index root wrote in a directory of root's (pytest's tmp_path, made by root)."""
    directory = tmp_path / "index"
    write_index(directory, [host("a", vm("web-1", WEB)), host("b", vm("web-2", WEB))], built_at=0)
    return directory


@pytest.mark.root
def test_an_index_of_roots_alone_is_loaded(built: Path) -> None:
    _vm, ranked = load_index(built, KEY.key_id).place("web-1")
    assert ranked[0].host == "b" and ranked[0].shared_bytes > 0


@pytest.mark.root
@pytest.mark.parametrize("name", ["index.json", "held_values-*.npy", "vm_values-*.npy"])
def test_a_file_someone_else_owns_or_may_write_is_refused(built: Path, name: str) -> None:
    (path,) = built.glob(name)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(FleetIndexError, match=f"refusing the fleet index {path}: .*uid {NOBODY}"):
        load_index(built, KEY.key_id)
    os.chown(path, 0, 0)
    path.chmod(0o620)
    with pytest.raises(FleetIndexError, match=f"{path} is writable by its group"):
        load_index(built, KEY.key_id)


@pytest.mark.root
def test_a_directory_above_it_someone_else_may_change_is_refused(built: Path) -> None:
    built.chmod(0o777)
    with pytest.raises(FleetIndexError, match=f"{built} is writable by everyone"):
        load_index(built, KEY.key_id)
    built.chmod(0o700)
    parent = built.parent
    os.chown(parent, NOBODY, NOBODY)
    try:
        with pytest.raises(
            FleetIndexError, match=rf"{parent} \(directory\) belongs to uid {NOBODY}"
        ):
            load_index(built, KEY.key_id)
    finally:
        os.chown(parent, 0, 0)
    parent.chmod(0o775)
    with pytest.raises(FleetIndexError, match=f"{parent} is writable by its group"):
        load_index(built, KEY.key_id)


# --- the commands ------------------------------------------------------------------------------


@pytest.fixture
def root_tree(tmp_path: Path) -> tuple[list[str], Path]:
    """--root of a tree with the fleet key, and --host options for three hosts' sketch files."""
    key = tmp_path / "etc/ksmpolicy/fleet.key"
    key.parent.mkdir(parents=True)
    key.write_text(KEY.secret.hex() + "\n")
    key.chmod(0o600)
    hosts = [
        host("a", vm("web-1", WEB), vm("web-2", WEB)),
        host("b", vm("db-1", DB), vm("web-3", WEB), zero_page=False),
        host("c", vm("db-2", DB, domain="other"), vm("web-4", WEB, active=False)),
    ]
    given = []
    for sketch in hosts:
        path = tmp_path / f"{sketch.host}.json"
        recent = dataclasses.replace(sketch, taken_at=time.time())
        path.write_text(json.dumps(to_json(recent, KEY)))
        given += ["--host", str(path)]
    return given, tmp_path


def test_place_answers_from_the_index_as_from_the_sketches(
    root_tree: tuple[list[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    given, root = root_tree
    assert main(["index", *given, "--root", str(root)]) == 0
    said = capsys.readouterr().out
    assert said.startswith("indexed 3 hosts, 6 VMs (sketches taken ")
    assert f"into {root}/var/lib/ksmpolicy/fleet-index: " in said
    from_index = ["--root", str(root), "--index", str(root / "var/lib/ksmpolicy/fleet-index")]
    for name in ("web-3", "web-4", "db-2"):
        assert main(["place", name, *given, "--root", str(root), "--json"]) == 0
        expected = json.loads(capsys.readouterr().out)
        assert main(["place", name, *from_index, "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got.pop("index")["sketches_taken_from"] > time.time() - 60
        assert got == expected
    assert main(["place", "web-3", *from_index]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("  from the fleet index built ")
    assert lines[3].split()[:3] == ["a", "150.0", "150.0"]
    assert main(["rebalance", *from_index, "--reserve-mib", "0"]) == 0
    assert "web-3: b -> a" in capsys.readouterr().out


def test_place_takes_sketches_or_an_index_not_both(
    root_tree: tuple[list[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    given, root = root_tree
    assert main(["place", "web-3", *given, "--index", str(root)]) == 2
    assert "give either --host (once per host) or --index DIR" in capsys.readouterr().err
    assert main(["place", "web-3", "--root", str(root)]) == 2


def test_a_damaged_index_is_one_line_from_the_command(
    root_tree: tuple[list[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    given, root = root_tree
    out = root / "index"
    assert main(["index", *given, "--root", str(root), "--out", str(out)]) == 0
    _truncate_values(out)
    capsys.readouterr()
    assert main(["place", "web-3", "--root", str(root), "--index", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ksmpolicy: error: the fleet index in {out} is damaged or incomplete")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
