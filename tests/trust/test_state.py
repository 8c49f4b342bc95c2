"""The shared state: claims by the first VM to start, refusals while another domain holds a
scope, stopped members forgotten, and a file that cannot be trusted read as nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ksmpolicy.kernel.procfs import start_ticks
from ksmpolicy.paths import HostPaths
from ksmpolicy.trust.choose import Claim
from ksmpolicy.trust.state import STATE_FILE, Member, State, admit, load, save


@pytest.fixture
def paths(tmp_path: Path) -> HostPaths:
    return HostPaths(run_override=tmp_path / "run")


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def member(process: subprocess.Popen[bytes], domain: str, scopes: tuple[str, ...]) -> Member:
    start = start_ticks(HostPaths(), process.pid)
    assert start is not None
    return Member(process.pid, start, f"vm-{process.pid}", domain, scopes)


def test_the_first_vm_claims_and_another_domain_waits(paths: HostPaths) -> None:
    first, second, third = sleeper(), sleeper(), sleeper()
    try:
        ok, why = admit(paths, member(first, "provider", ("host",)), 100.0)
        assert ok, why
        ok, why = admit(paths, member(second, "tenant-b", ("host",)), 101.0)
        assert not ok
        assert why == "merge scope host belongs to trust domain 'provider'"
        assert admit(paths, member(third, "provider", ("host",)), 102.0)[0]
        state = load(paths)
        assert state.scopes["host"] == Claim("provider", 100.0, f"vm-{first.pid} started first")
        assert set(state.members) == {first.pid, third.pid}
    finally:
        for process in (first, second, third):
            process.kill()
            process.wait()
    # Every member gone: the scope is idle and the next VM claims it.
    late = sleeper()
    try:
        ok, _why = admit(paths, member(late, "tenant-b", ("host",)), 200.0)
        assert ok
        assert load(paths).scopes["host"].domain == "tenant-b"
        assert set(load(paths).members) == {late.pid}
    finally:
        late.kill()
        late.wait()


def test_a_vm_in_two_scopes_needs_both(paths: HostPaths) -> None:
    a, b = sleeper(), sleeper()
    try:
        assert admit(paths, member(a, "x", ("node0",)), 1.0)[0]
        ok, why = admit(paths, member(b, "y", ("node1", "node0")), 2.0)
        assert not ok and "node0" in why
        assert "node1" not in load(paths).scopes  # nothing claimed on a refusal
    finally:
        for process in (a, b):
            process.kill()
            process.wait()


def test_a_reused_pid_is_not_a_member(paths: HostPaths) -> None:
    process = sleeper()
    try:
        real = member(process, "x", ("host",))
        state = State(
            scopes={"host": Claim("x", 0.0, "t")},
            members={process.pid: Member(process.pid, real.start + 1, "old", "x", ("host",))},
        )
        assert state.live_domains(paths) == {}
    finally:
        process.kill()
        process.wait()


def test_a_broken_or_foreign_file_is_an_empty_state(paths: HostPaths) -> None:
    save(paths, State(scopes={"host": Claim("x", 1.0, "t")}))
    path = paths.run_dir / STATE_FILE
    assert load(paths).scopes
    path.write_text("{not json")
    assert load(paths) == State()
    path.write_text('{"version": 99, "scopes": {}, "members": []}')
    assert load(paths) == State()
    if os.geteuid() == 0:
        save(paths, State(scopes={"host": Claim("x", 1.0, "t")}))
        os.chown(path, 65534, 65534)  # written by someone else: not believed
        assert load(paths) == State()
