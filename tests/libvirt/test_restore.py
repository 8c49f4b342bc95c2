"""`ksmpolicy restore` on a real libvirtd (root): a definition `apply` changed comes back as
it was, the current one is saved first, --dry-run changes nothing, and a backup that holds
another domain's definition is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ksmpolicy.libvirt.domain import domain_facts
from lab.libvirtd import Lab

pytestmark = [pytest.mark.root]
KSMPOLICY = str(Path(sys.executable).parent / "ksmpolicy")
EXCLUDE_ALL = "version: 1\nrules:\n  - {match: {names: ['*']}, action: exclude}\n"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KSMPOLICY, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_restore_brings_back_the_definition_before_ksmpolicy(lab: Lab, tmp_path: Path) -> None:
    domain = lab.define("restore-1")
    full = domain.name()
    before = domain.XMLDesc(2 | 1)
    assert not domain_facts(before).nosharepages
    policy = tmp_path / "policy.yaml"
    policy.write_text(EXCLUDE_ALL)
    policy.chmod(0o644)
    root = ["--root", str(tmp_path)]
    done = cli("-p", str(policy), "apply", "-c", "qemu:///system", "-d", full, *root)
    assert done.returncode == 0 and f"{full}: changed" in done.stdout, done.stderr
    assert domain_facts(lab.domain("restore-1").XMLDesc(2 | 1)).nosharepages
    backups = tmp_path / "var/lib/ksmpolicy/backups"
    (first,) = backups.iterdir()
    # a planted backup that claims this UUID but holds another domain is refused
    uuid = domain.UUIDString()
    other = before.replace(uuid, "00000000-0000-4000-8000-000000000001")
    planted = backups / f"{full}.{uuid}.19990101T000000.000000000.xml"
    planted.write_text(other)
    refused = cli("restore", "-c", "qemu:///system", "-d", full, *root)
    assert refused.returncode == 1 and "holds another domain's definition" in refused.stderr
    planted.unlink()
    # --dry-run: the diff, nothing changed
    dry = cli("restore", "-c", "qemu:///system", "-d", full, "--dry-run", *root)
    assert dry.returncode == 0, dry.stderr
    assert "-    <nosharepages/>" in dry.stdout and f"{full}: would change" in dry.stdout
    assert domain_facts(lab.domain("restore-1").XMLDesc(2 | 1)).nosharepages
    # for real: the definition is the one before apply, and the current one was saved
    done = cli("restore", "-c", "qemu:///system", "-d", full, *root)
    assert done.returncode == 0 and f"{full}: changed" in done.stdout, done.stderr
    assert lab.domain("restore-1").XMLDesc(2 | 1) == before
    saved = sorted(p for p in backups.iterdir() if p != first)
    assert len(saved) == 1 and domain_facts(saved[0].read_text()).nosharepages
    # again: the oldest backup is still the one before ksmpolicy, and it complies now
    again = cli("restore", "-c", "qemu:///system", "-d", full, *root)
    assert f"{full}: unchanged" in again.stdout, again.stdout
