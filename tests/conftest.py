"""Shared fixtures and markers: root-only tests skip with a reason when not root."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ksmpolicy.kernel.ksm import WRITABLE_KNOBS, KsmKnobs, read_ksm
from ksmpolicy.paths import HostPaths

REPO = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0
# Run a command as nobody (util-linux setpriv; root only), as a local user would.
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--no-new-privs"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("root") and not IS_ROOT:
            item.add_marker(pytest.mark.skip(reason="needs root (CI runs as root)"))


def replace_policy(path: Path, text: str) -> None:
    """Replace a policy file with a new one (a new inode, as an editor's save makes: the hooks'
    compiled cache sees the change), root-trustable (0644)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.chmod(0o644)
    temporary.rename(path)


@pytest.fixture
def write_policy(tmp_path: Path) -> Callable[..., Path]:
    """Write policy text to a root-trustable file (mode 0644 in a private directory)."""

    def write(text: str, name: str = "policy.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        path.chmod(0o644)
        return path

    return write


# --- real KSM: one test at a time, every knob restored, every process ended -------------------

KSM_DIR = Path("/sys/kernel/mm/ksm")
KSM_LOCK = Path(tempfile.gettempdir()) / "ksmpolicy-tests-ksm.lock"


def saved_knobs() -> dict[str, int | str]:
    """Every knob ksmpolicy may write (its own allow-list) that this kernel has, as it is now."""
    state = read_ksm(HostPaths())
    values = state.values if state is not None else {}
    return {name: value for name, value in values.items() if name in WRITABLE_KNOBS}


def restore_knobs(saved: dict[str, int | str]) -> None:
    """Put the knobs back as `saved_knobs` found them, in the order KsmKnobs.restore uses."""
    knobs = KsmKnobs(HostPaths())
    knobs.original = dict(saved)
    knobs.restore()


@dataclass
class RealKsm:
    """Handle for a test that drives the real ksmd; see the `real_ksm` fixture."""

    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def read(self, name: str) -> int | str:
        text = (KSM_DIR / name).read_text().strip()
        if "[" in text:
            return text[text.index("[") + 1 : text.index("]")]
        return int(text)

    def write(self, name: str, value: int | str) -> None:
        (KSM_DIR / name).write_text(f"{value}\n")

    def track(self, process: subprocess.Popen[str]) -> subprocess.Popen[str]:
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[str]) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def real_ksm() -> Iterator[RealKsm]:
    """The real ksmd, for one test at a time (a file lock across processes).

    Records the knobs first and restores them afterwards even on failure; ends every process
    the test tracked (they unmerge their own pages by exiting). Never writes run=2.
    """
    if not IS_ROOT:
        pytest.skip("needs root to drive /sys/kernel/mm/ksm (CI runs as root)")
    if not (KSM_DIR / "run").exists():
        pytest.skip("this kernel has no KSM")
    with KSM_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ksm = RealKsm()
        saved = saved_knobs()
        try:
            yield ksm
        finally:
            for process in ksm.processes:
                ksm.stop(process)
            restore_knobs(saved)


# --- the host as we found it ------------------------------------------------------------------

WATCHED = (
    Path("/run/ksmpolicy"),
    Path("/var/lib/ksmpolicy"),
    Path("/etc/libvirt/hooks/qemu.d"),
    Path("/etc/libvirt/hooks/qemu"),
)


def _snapshot() -> dict[str, set[str]]:
    found = {}
    for path in WATCHED:
        if path.is_dir():
            found[str(path)] = {p.name for p in path.iterdir()}
        elif path.exists():
            found[str(path)] = {"(file)"}
    return found


@pytest.fixture(scope="session", autouse=True)
def host_left_as_found() -> Iterator[None]:
    """Fails the run if the tests leave files in the host's ksmpolicy or hook directories."""
    before = _snapshot()
    yield
    after = _snapshot()
    leftovers = {
        path: sorted(names - before.get(path, set()))
        for path, names in after.items()
        if names - before.get(path, set())
    }
    assert not leftovers, f"tests left these behind: {leftovers}"
