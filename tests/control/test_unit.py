"""The shipped systemd unit, checked with the real systemd-analyze (installed here, not PID 1)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from ksmpolicy.paths import HostPaths
from tests.conftest import REPO

UNIT = REPO / "contrib/systemd/ksmpolicy.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze missing (scripts/bootstrap installs systemd)"
)


def settings(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", "[")):
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def writable(unit: dict[str, list[str]]) -> list[PurePosixPath]:
    """What a service may write under ProtectSystem=strict: ReadWritePaths=, and the
    directories systemd makes for RuntimeDirectory= and StateDirectory=."""
    paths = [PurePosixPath(p) for value in unit.get("ReadWritePaths", []) for p in value.split()]
    paths += [PurePosixPath("/run", d) for v in unit.get("RuntimeDirectory", []) for d in v.split()]
    paths += [
        PurePosixPath("/var/lib", d) for v in unit.get("StateDirectory", []) for d in v.split()
    ]
    return paths


def test_every_path_the_daemon_writes_is_writable_under_the_unit() -> None:
    unit = settings(UNIT.read_text())
    assert unit["ProtectSystem"] == ["strict"]  # else the check below would prove nothing
    allowed = writable(unit)
    for path in HostPaths().daemon_writes():
        target = PurePosixPath(path)
        assert any(target == a or a in target.parents for a in allowed), (
            f"the daemon writes {target}, but the unit only allows {allowed}"
        )


def test_the_check_fails_for_a_unit_without_the_state_directory() -> None:
    """The unit before this check: backups under /var/lib/ksmpolicy were read-only."""
    text = re.sub(r"^StateDirectory.*$", "", UNIT.read_text(), flags=re.MULTILINE)
    allowed = writable(settings(text))
    backups = PurePosixPath(HostPaths().backup_dir)
    assert not any(backups == a or a in backups.parents for a in allowed)


def runnable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's command (verify checks it exists)."""
    command = Path(sys.executable).with_name("ksmpolicy")
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={command}", UNIT.read_text(), flags=re.MULTILINE)
    copy = tmp_path / "ksmpolicy.service"
    copy.write_text(text)
    return copy


@needs_systemd
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    result = subprocess.run(
        [SYSTEMD_ANALYZE or "", "verify", str(runnable_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


@needs_systemd
def test_the_unit_is_confined(tmp_path: Path) -> None:
    result = subprocess.run(
        [SYSTEMD_ANALYZE or "", "security", "--offline=true", str(runnable_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) < 5.0, result.stdout
