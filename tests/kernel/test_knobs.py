"""KsmKnobs on a fake sysfs tree: allow-list, no run=2, skip unchanged, restore in order."""

from __future__ import annotations

from pathlib import Path

import pytest

from ksmpolicy.errors import HostError
from ksmpolicy.kernel.ksm import KsmKnobs
from ksmpolicy.kernel.procfs import ksmd_pid, process_cpu_seconds, processes_named
from ksmpolicy.paths import HostPaths
from tests.fakehost import FakeHost


def fake_ksm(root: Path, **values: str) -> Path:
    defaults = {"run": "0", "pages_to_scan": "100", "sleep_millisecs": "20"}
    return FakeHost(root).ksm(**{**defaults, **values}).ksm_dir


def test_writes_only_changes_and_remembers_originals(tmp_path: Path) -> None:
    ksm = fake_ksm(tmp_path)
    knobs = KsmKnobs(HostPaths(tmp_path))
    assert knobs.apply([("pages_to_scan", 100), ("sleep_millisecs", 10), ("run", 1)]) == [
        "sleep_millisecs",
        "run",
    ]
    assert (ksm / "sleep_millisecs").read_text() == "10\n"
    assert knobs.apply([("sleep_millisecs", 10), ("run", 1)]) == []
    assert knobs.original == {"pages_to_scan": 100, "sleep_millisecs": 20, "run": 0}


def test_refuses_run_2_and_unknown_knobs(tmp_path: Path) -> None:
    ksm = fake_ksm(tmp_path)
    knobs = KsmKnobs(HostPaths(tmp_path))
    with pytest.raises(HostError, match=r"refusing to write run=2: ksmpolicy only writes 0 or 1"):
        knobs.write("run", 2)
    with pytest.raises(HostError, match="refusing to write merge_across_nodes"):
        knobs.write("merge_across_nodes", 0)
    assert (ksm / "run").read_text() == "0\n"


def test_missing_knob_is_a_clear_error(tmp_path: Path) -> None:
    fake_ksm(tmp_path)
    with pytest.raises(HostError, match=r"cannot read .*/advisor_mode: No such file"):
        KsmKnobs(HostPaths(tmp_path)).write("advisor_mode", "none")


def test_restore_stops_first_when_found_stopped(tmp_path: Path) -> None:
    ksm = fake_ksm(tmp_path, run="2")
    knobs = KsmKnobs(HostPaths(tmp_path))
    knobs.apply([("pages_to_scan", 5000), ("run", 1)])
    knobs.restore()
    assert (ksm / "run").read_text() == "0\n"  # 2 is restored as 0, never written
    assert (ksm / "pages_to_scan").read_text() == "100\n"


def test_restore_with_advisor_found_on(tmp_path: Path) -> None:
    ksm = fake_ksm(tmp_path, run="1", advisor_mode="none [scan-time]")
    knobs = KsmKnobs(HostPaths(tmp_path))
    knobs.apply([("advisor_mode", "none"), ("pages_to_scan", 5000)])
    (ksm / "advisor_mode").write_text("[none] scan-time\n")
    knobs.restore()
    # pages_to_scan is the advisor's to set; it is not written back.
    assert (ksm / "pages_to_scan").read_text() == "5000\n"
    assert (ksm / "advisor_mode").read_text() == "scan-time\n"


def test_ksmd_cpu_from_stat(tmp_path: Path) -> None:
    kthread = str(0x00200040)  # PF_KTHREAD in stat's flags
    for pid, comm, flags, uid, utime, stime in (
        (3, "ksmd", "0", 1000, 9, 9),  # a user's process that calls itself ksmd
        (7, "ksmd", kthread, 0, 250, 50),
        (8, "ksmtuned", "4194560", 0, 1, 1),
        (9, "ksmtuned", "4194560", 1000, 1, 1),  # a user's: no controller of the knobs
    ):
        d = tmp_path / "proc" / str(pid)
        d.mkdir(parents=True)
        (d / "comm").write_text(comm + "\n")
        (d / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
        fields = ["S", "2", "0", "0", "0", "0", flags, "0", "0", "0", "0"]
        fields += [str(utime), str(stime)] + ["0"] * 30
        (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields) + "\n")
    paths = HostPaths(tmp_path)
    assert ksmd_pid(paths) == 7
    assert process_cpu_seconds(paths, 7) == 3.0  # 300 ticks at 100 Hz
    assert processes_named(paths, ["ksmtuned"]) == [8]


def test_switching_the_merge_scope_unmerges_first_and_leaves_ksmd_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run=2 (everything unmerged; the kernel refuses merge_across_nodes otherwise), then the
    knob, then run=0 for the caller to start again; `run` as found is what restore() puts
    back, and a write the kernel refuses stops there with the path in the message."""
    ksm = fake_ksm(tmp_path, run="1", merge_across_nodes="1")
    knobs = KsmKnobs(HostPaths(tmp_path))
    written: list[tuple[str, str]] = []
    real_write = Path.write_text

    def recording(path: Path, text: str, *args: object, **kwargs: object) -> int:
        written.append((path.name, text.strip()))
        return real_write(path, text, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", recording)
    knobs.switch_merge_across_nodes(False)
    assert written == [("run", "2"), ("merge_across_nodes", "0"), ("run", "0")]
    assert knobs.original["run"] == 1
    knobs.restore()
    assert (ksm / "run").read_text().strip() == "1"
    (ksm / "merge_across_nodes").unlink()
    (ksm / "merge_across_nodes").mkdir()  # the kernel says EBUSY; a directory says EISDIR
    with pytest.raises(HostError, match="merge_across_nodes"):
        knobs.switch_merge_across_nodes(True)
