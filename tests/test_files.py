"""files.py: reads that never block, writes that follow no planted link, trust along a path.
And the writers that use it: the hook installers, the policy cache, the backups."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.files import (
    NotRegularFile,
    carries_marker,
    read_regular,
    untrusted_reason,
    write_atomic,
)
from tests.conftest import IS_ROOT

FIXED = b"\x01\x02\x03\x04\x05\x06"  # os.urandom's bytes while a test predicts a temporary name


@pytest.fixture
def predictable(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], Path]:
    """Make the next temporary names predictable, as an attacker would need them to be, and
    return the name that writing `target` will use."""
    monkeypatch.setattr(os, "urandom", lambda n: FIXED[:n])

    def temporary_for(target: Path) -> Path:
        return target.with_name(f".{target.name}.{FIXED.hex()}.tmp")

    return temporary_for


def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_text("root's file\n")
    return path


def test_a_symlink_at_the_final_name_is_replaced_not_followed(tmp_path: Path) -> None:
    target = victim(tmp_path)
    final = tmp_path / "out"
    final.symlink_to(target)
    write_atomic(final, b"new\n", 0o600)
    assert target.read_text() == "root's file\n"
    assert not final.is_symlink() and final.read_text() == "new\n"
    assert stat.S_IMODE(final.stat().st_mode) == 0o600


def test_a_symlink_at_the_temporary_name_is_not_followed(
    tmp_path: Path, predictable: Callable[[Path], Path]
) -> None:
    target = victim(tmp_path)
    final = tmp_path / "out"
    predictable(final).symlink_to(target)
    with pytest.raises(FileExistsError):
        write_atomic(final, b"new\n")
    assert target.read_text() == "root's file\n"
    assert not final.exists()


def test_a_private_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="is writable by others"):
        write_atomic(shared / "backup.xml", b"x", 0o600, private_dir=True)
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(PermissionError, match="is a symbolic link"):
        write_atomic(link / "backup.xml", b"x", 0o600, private_dir=True)


def test_reads_refuse_fifos_and_devices_without_opening_them(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer
    with pytest.raises(NotRegularFile, match="is a FIFO, not a regular file"):
        read_regular(fifo, 100)
    with pytest.raises(NotRegularFile, match="is a character device"):
        read_regular("/dev/zero", 100)
    with pytest.raises(IsADirectoryError):
        read_regular(tmp_path, 100)
    (tmp_path / "ok").write_bytes(b"x" * 50)
    assert read_regular(tmp_path / "ok", 10) == b"x" * 11  # the limit, and one byte to tell


def test_a_marker_behind_a_symlink_is_not_ours(tmp_path: Path) -> None:
    ours = tmp_path / "ours"
    ours.write_text("# MARK\n")
    link = tmp_path / "link"
    link.symlink_to(ours)
    assert carries_marker(ours, "# MARK") is True
    assert carries_marker(link, "# MARK") is False
    assert carries_marker(tmp_path / "none", "# MARK") is None


# --- the writers --------------------------------------------------------------------------------


def test_the_libvirt_hook_installer_follows_no_planted_link(
    tmp_path: Path, predictable: Callable[[Path], Path]
) -> None:
    from ksmpolicy.libvirt.install import install
    from ksmpolicy.paths import HostPaths

    target = victim(tmp_path)
    hooks = tmp_path / "etc/libvirt/hooks/qemu.d"
    hooks.mkdir(parents=True)
    final = hooks / "ksmpolicy"
    final.symlink_to(target)  # a link is not a hook ksmpolicy wrote: refused
    with pytest.raises(KsmPolicyError, match="not written by ksmpolicy"):
        install(HostPaths(tmp_path))
    final.unlink()
    predictable(final).symlink_to(target)
    with pytest.raises(KsmPolicyError, match="cannot write"):
        install(HostPaths(tmp_path))
    assert target.read_text() == "root's file\n"


def test_the_proxmox_hookscript_installer_follows_no_planted_link(
    tmp_path: Path, predictable: Callable[[Path], Path]
) -> None:
    from ksmpolicy.paths import HostPaths
    from ksmpolicy.proxmox.hookscript import install_hookscript

    target = victim(tmp_path)
    (tmp_path / "etc/pve").mkdir(parents=True)
    (tmp_path / "etc/pve/storage.cfg").write_text("dir: shared\n\tpath /mnt/nfs\n")
    snippets = tmp_path / "mnt/nfs/snippets"  # shared storage: others may write here
    snippets.mkdir(parents=True)
    final = snippets / "ksmpolicy-hook"
    final.symlink_to(target)
    with pytest.raises(KsmPolicyError, match="not written by ksmpolicy"):
        install_hookscript(HostPaths(tmp_path), "shared", sys.executable)
    final.unlink()
    predictable(final).symlink_to(target)
    with pytest.raises(KsmPolicyError, match="cannot write"):
        install_hookscript(HostPaths(tmp_path), "shared", sys.executable)
    assert target.read_text() == "root's file\n"


def test_the_policy_cache_follows_no_planted_link(
    tmp_path: Path, predictable: Callable[[Path], Path]
) -> None:
    from ksmpolicy.policy.load import _cache_path, load_policy

    target = victim(tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\n")
    policy.chmod(0o644)
    cache = tmp_path / "run"
    cache.mkdir(mode=0o700)
    final = Path(_cache_path(str(cache), (str(policy),)))
    predictable(final).symlink_to(target)  # the cache write fails: loading still works
    assert load_policy(policy, cache_dir=str(cache)).version == 1
    assert target.read_text() == "root's file\n"
    predictable(final).unlink()
    final.symlink_to(target)  # read: not followed; written: replaced
    assert load_policy(policy, cache_dir=str(cache)).version == 1
    assert target.read_text() == "root's file\n"
    assert not final.is_symlink()


def test_backups_follow_no_planted_link_and_refuse_a_shared_directory(
    tmp_path: Path, predictable: Callable[[Path], Path]
) -> None:
    from ksmpolicy.apply import ApplyError, write_backup

    target = victim(tmp_path)
    backups = tmp_path / "backups"
    backups.mkdir(mode=0o700)
    path = write_backup(backups, "web-1.uuid", ".xml", "<domain/>")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    backups.chmod(0o733)  # others may add names here
    with pytest.raises(ApplyError, match="refusing backup directory"):
        write_backup(backups, "web-1.uuid", ".xml", "<domain/>")
    assert target.read_text() == "root's file\n"


# --- trust along a path ------------------------------------------------------------------------


def test_a_root_path_is_trusted() -> None:
    assert untrusted_reason("/etc/passwd") is None


@pytest.mark.skipif(not IS_ROOT, reason="needs root to own and chown the files (CI runs as root)")
def test_what_others_could_change_is_named(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir(mode=0o755)
    policy = base / "policy.yaml"
    policy.write_text("version: 1\n")
    policy.chmod(0o644)
    assert untrusted_reason(policy) is None
    base.chmod(0o775)  # group-writable, not sticky: the group could swap the policy
    assert untrusted_reason(policy) == (
        f"{base} is writable by its group (mode 0775), who could replace {policy}; "
        f"run: chmod go-w {base}"
    )
    base.chmod(0o1777)  # sticky, like /tmp: root's entry stays root's
    assert untrusted_reason(policy) is None
    os.chown(policy, 65534, 65534)  # but an entry someone else owns is theirs
    assert untrusted_reason(policy) == (
        f"{policy} (file) belongs to uid 65534; run: chown -h root {policy}"
    )
    os.chown(policy, 0, 0)
    base.chmod(0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chown(elsewhere, 65534, 65534)
    (elsewhere / "real.yaml").write_text("version: 1\n")
    link = base / "via.yaml"
    link.symlink_to(elsewhere / "real.yaml")  # root's link, into someone else's directory
    assert untrusted_reason(link) == (
        f"{elsewhere} (directory) belongs to uid 65534; run: chown -h root {elsewhere}"
    )
    relative = base / "sub"
    relative.mkdir()
    assert untrusted_reason(relative / ".." / "policy.yaml") is None
