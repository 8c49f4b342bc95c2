"""Who else sets the KSM knobs: another ksmpolicy daemon counts only when it may write them."""

from __future__ import annotations

from pathlib import Path

from ksmpolicy.kernel.controllers import daemon_pids
from ksmpolicy.paths import HostPaths


def _process(proc: Path, pid: int, argv: list[str], uid: int = 0) -> None:
    entry = proc / str(pid)
    entry.mkdir(parents=True)
    (entry / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (entry / "status").write_text(f"Name:\tksmpolicy\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")


def test_only_a_daemon_that_may_write_the_knobs_is_another_controller(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path, tmp_path / "run")
    ksmpolicy = "/usr/bin/ksmpolicy"
    _process(paths.proc, 10, ["/usr/bin/python3", ksmpolicy, "daemon"])
    _process(paths.proc, 11, ["/usr/bin/python3", ksmpolicy, "daemon", "--dry-run"])
    _process(paths.proc, 12, ["/usr/bin/python3", ksmpolicy, "daemon", "--help"])  # man pages
    _process(paths.proc, 13, ["/usr/bin/python3", ksmpolicy, "-p", "x.yaml", "daemon", "-h"])
    _process(paths.proc, 14, ["/usr/bin/python3", ksmpolicy, "daemon"], uid=1000)  # not root
    _process(paths.proc, 15, ["/usr/bin/python3", ksmpolicy, "-p", "p.yaml", "daemon", "-c", "x"])
    assert sorted(daemon_pids(paths)) == [10, 15]
