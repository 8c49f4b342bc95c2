"""`ksmpolicy systemd-dropin` with the real systemctl and systemd-analyze (installed here,
systemd 252, not PID 1)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.control.test_daemon import KSMPOLICY

POLICY = """version: 1
rules:
  - {name: databases, match: {tags: [database]}, action: exclude}
"""
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def dropin(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    return subprocess.run(
        [KSMPOLICY, "-p", str(policy), "systemd-dropin", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def installed_version() -> int:
    first = subprocess.run(["systemctl", "--version"], capture_output=True, text=True, check=True)
    return int(first.stdout.split()[1])


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl missing")
def test_an_old_systemd_is_refused_with_its_version(tmp_path: Path) -> None:
    version = installed_version()
    result = dropin(tmp_path, "jenkins.service", "--dir", str(tmp_path))
    if version >= 254:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 1
    assert f"systemd {version} has no MemoryKSM= (it came with systemd 254)" in result.stderr
    assert not (tmp_path / "jenkins.service.d").exists()


def test_the_dropin_follows_the_decision(tmp_path: Path) -> None:
    for unit, tags, want in (
        ("jenkins.service", (), "yes"),
        ("pg.service", ("--tag", "database"), "no"),
    ):
        result = dropin(tmp_path, unit, *tags, "--systemd-version", "254", "--dir", str(tmp_path))
        assert result.returncode == 0, result.stderr
        text = (tmp_path / f"{unit}.d/50-ksmpolicy.conf").read_text()
        assert text.splitlines()[1:] == ["[Service]", f"MemoryKSM={want}"]
    printed = dropin(tmp_path, "web", "--systemd-version", "255", "--print")
    assert printed.stdout.endswith("[Service]\nMemoryKSM=yes\n")


@pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze missing (bootstrap installs it)"
)
def test_systemd_analyze_verify_reads_the_dropin(tmp_path: Path) -> None:
    """verify loads the unit with its drop-in; systemd before 254 does not know the key and
    says only that (everything else in the drop-in is valid), 254 and later say nothing."""
    unit = tmp_path / "sample.service"
    unit.write_text("[Unit]\nDescription=sample\n[Service]\nExecStart=/bin/true\n")
    assert (
        dropin(
            tmp_path, "sample.service", "--systemd-version", "254", "--dir", str(tmp_path)
        ).returncode
        == 0
    )
    result = subprocess.run(
        [SYSTEMD_ANALYZE or "", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    complaints = [line for line in result.stderr.splitlines() if line.strip()]
    if installed_version() >= 254:
        assert complaints == []
    else:
        assert len(complaints) == 1, complaints
        assert "50-ksmpolicy.conf:3: Unknown key 'MemoryKSM' in section [Service]" in complaints[0]


SYSTEMD_254 = Path(sys.executable).parent.parent / "opt/systemd-254"


def analyze_254(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """systemd 254's systemd-analyze, unpacked from Debian's bookworm-backports by
    scripts/bootstrap (the first systemd that knows MemoryKSM=)."""
    binary = SYSTEMD_254 / "usr/bin/systemd-analyze"
    assert binary.exists(), f"{binary} is missing: run scripts/bootstrap"
    libraries = next(SYSTEMD_254.glob("usr/lib/*/systemd"))
    return subprocess.run(
        [str(binary), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        env={**os.environ, "LD_LIBRARY_PATH": str(libraries)},
    )


def test_systemd_254_verifies_the_dropin_and_would_catch_a_bad_one(tmp_path: Path) -> None:
    assert analyze_254("--version", cwd=tmp_path).stdout.startswith("systemd 254 ")
    unit = tmp_path / "sample.service"
    unit.write_text("[Unit]\nDescription=sample\n[Service]\nExecStart=/bin/true\n")
    for name, tags in (("sample.service", ()), ("sample.service", ("--tag", "database"))):
        made = dropin(tmp_path, name, *tags, "--systemd-version", "254", "--dir", str(tmp_path))
        assert made.returncode == 0, made.stderr
        result = analyze_254("verify", str(unit), cwd=tmp_path)
        assert (result.returncode, result.stderr) == (0, ""), result.stderr
    # the check can fail: a value systemd does not take is reported
    dropin_file = tmp_path / "sample.service.d/50-ksmpolicy.conf"
    dropin_file.write_text(dropin_file.read_text().replace("MemoryKSM=no", "MemoryKSM=maybe"))
    result = analyze_254("verify", str(unit), cwd=tmp_path)
    assert "Failed to parse boolean value for MemoryKSM=" in result.stderr
