"""The kernel's process events: parsing, the real connector (root), the daemon reacting to a
VMM's exec without a hook note, and polling when the connector is unavailable."""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ksmpolicy.kernel import procevents
from ksmpolicy.kernel.procevents import ProcEvent, open_events, parse
from ksmpolicy.paths import HostPaths
from ksmpolicy.runtime.alive import Alive, read_alive
from lab.simguest import spawn
from tests.conftest import AS_NOBODY, IS_ROOT, RealKsm
from tests.control.test_daemon import DaemonProcess, fake_host, wait_for


def datagram(what: int, pid: int, tgid: int) -> bytes:
    event = struct.pack("=IIQ", what, 0, 123) + struct.pack("=II", pid, tgid) + bytes(16)
    cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(event), 0) + event
    return struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn


def test_parse_keeps_execs_and_process_exits() -> None:
    data = (
        datagram(procevents.PROC_EVENT_EXEC, 101, 101)
        + datagram(procevents.PROC_EVENT_EXIT, 102, 100)  # a thread: skipped
        + datagram(procevents.PROC_EVENT_EXIT, 100, 100)
        + datagram(0x1, 103, 103)  # fork: skipped
    )
    assert parse(data) == [ProcEvent("exec", 101), ProcEvent("exit", 100)]
    assert parse(b"\x00" * 10) == []


@pytest.mark.root
def test_the_real_connector_reports_an_exec_and_its_exit() -> None:
    if not IS_ROOT:
        pytest.skip("the proc connector needs root (CI runs as root)")
    events = open_events()
    try:
        process = subprocess.Popen(["sleep", "0.2"])
        seen: list[ProcEvent] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and ProcEvent("exit", process.pid) not in seen:
            seen += [e for e in events.read() if e.pid == process.pid]
            time.sleep(0.01)
        process.wait()
        assert seen[:1] == [ProcEvent("exec", process.pid)]
        assert ProcEvent("exit", process.pid) in seen
    finally:
        events.close()


@pytest.mark.root
@pytest.mark.kernel
def test_the_daemon_sprints_for_a_vmm_that_execs_without_a_hook_note(
    real_ksm: RealKsm, tmp_path: Path
) -> None:
    """Interval 60 s, no hook: only the exec event can make it look before then."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nreconciler: {interval_seconds: 60, max_ksmd_cpu_percent: 50}\n")
    policy.chmod(0o644)
    real_ksm.write("run", 0)
    daemon = DaemonProcess(policy, tmp_path / "run")
    try:
        assert wait_for(lambda: "stopped" in daemon.output() or "calm" in daemon.output(), 15)
        impostor = exec_as_nobody("qemu-system-x86_64")  # any user may exec such a name
        time.sleep(2)
        assert f"exec: pid {impostor}" not in daemon.output()
        assert real_ksm.read("run") == 0  # no sprint at their word
        started = time.monotonic()
        excluded = real_ksm.track(spawn("pe-0", mib=64, no_merge=True))  # <nosharepages/>
        assert wait_for(
            lambda: (
                f"pid {excluded.pid} (qemu-system-x86_64), started with "
                "mem-merge=off: no sprint" in daemon.output()
            ),
            5,
        ), daemon.output()
        time.sleep(2)
        assert real_ksm.read("run") == 0, daemon.output()  # nothing to merge: no sprint
        guest = real_ksm.track(spawn("pe-1", mib=64))
        assert wait_for(lambda: f"exec: pid {guest.pid} (qemu-system-x86_64)" in daemon.output(), 5)
        assert wait_for(lambda: real_ksm.read("run") == 1, 20), daemon.output()
        # while its memory fills, the pace follows it (settle); then the sprint
        assert wait_for(lambda: "sprint: new memory" in daemon.output(), 20), daemon.output()
        assert time.monotonic() - started < 30  # well before the 60 s interval
        alive = read_alive(HostPaths(run_override=tmp_path / "run"))
        assert alive is not None and alive.discovery == "process events (proc connector)"
    finally:
        daemon.stop()


def exec_as_nobody(name: str) -> int:
    """Run `sleep 1`, as nobody, under a binary named `name`; its PID once it has exited."""
    directory = Path(tempfile.mkdtemp(prefix="ksmpolicy-impostor-"))
    try:
        directory.chmod(0o755)
        binary = directory / name
        shutil.copy("/bin/sleep", binary)
        binary.chmod(0o755)
        process = subprocess.Popen([*AS_NOBODY, str(binary), "1"])  # setpriv execs: same PID
        assert process.wait(timeout=10) == 0
        return process.pid
    finally:
        shutil.rmtree(directory)


def test_without_the_connector_the_daemon_polls_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ksmpolicy.control import daemon as daemon_module
    from ksmpolicy.report.render import text
    from ksmpolicy.report.status import collect

    def refused() -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(daemon_module, "open_events", refused)
    fake_host(tmp_path / "root")
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nreconciler: {interval_seconds: 1}\n")
    paths = HostPaths(tmp_path / "root", tmp_path / "run")
    signs: list[Alive] = []
    monkeypatch.setattr(daemon_module, "write_alive", lambda _paths, alive: signs.append(alive))
    options = daemon_module.DaemonOptions(dry_run=True, use_libvirt=False)
    daemon = daemon_module.Daemon(paths, str(policy), options)
    daemon.run(max_seconds=1.5)
    assert daemon.events is None
    assert daemon.discovery.startswith("polling every interval (the kernel's process events")
    assert "Operation not permitted" in daemon.discovery
    # its sign of life says so, and status tells the operator while that daemon runs
    assert signs and signs[-1].discovery == daemon.discovery
    monkeypatch.setattr("ksmpolicy.inventory.host.daemon_pids", lambda _paths: [signs[-1].pid])
    monkeypatch.setattr("ksmpolicy.inventory.host.read_alive", lambda _paths: signs[-1])
    assert f"new VMs found by: {daemon.discovery}" in text(collect(paths, None, sample_seconds=0))
