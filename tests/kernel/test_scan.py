"""VM discovery from /proc: a fake tree with real command lines, and real processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ksmpolicy.kernel.scan import (
    KsmStat,
    ProcessScanner,
    footprint_bytes,
    read_ksm_stat,
)
from ksmpolicy.kernel.vmm import parse_qemu_cmdline
from ksmpolicy.paths import HostPaths
from lab.simguest import spawn
from tests.conftest import RealKsm
from tests.fakehost import FakeHost

# Command lines as libvirt 9 and Proxmox VE start QEMU (abridged to the options that matter).
LIBVIRT = [
    "/usr/bin/qemu-system-x86_64",
    "-name",
    "guest=web-1,,blue,debug-threads=on",
    "-S",
    "-machine",
    "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram,mem-merge=off",
    "-accel",
    "tcg",
    "-m",
    "size=262144k",
    "-object",
    '{"qom-type":"memory-backend-ram","id":"pc.ram","size":268435456}',
    "-uuid",
    "0A0A0A0A-0000-4000-8000-000000000001",
]
PROXMOX = [
    "/usr/bin/kvm",
    "-id",
    "101",
    "-name",
    "pg-primary,debug-threads=on",
    "-no-shutdown",
    "-chardev",
    "socket,id=qmp,path=/var/run/qemu-server/101.qmp,server=on,wait=off",
    "-m",
    "2048",
    "-machine",
    "type=pc+pve0",
]

SMAPS = b"""\
55d0c0a00000-55d0c0a21000 r--p 00000000 fe:01 123 /usr/bin/qemu-system-x86_64
Size:                132 kB
Rss:                 132 kB
VmFlags: rd mr mw me dw sd
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:              200000 kB
KSM:               51200 kB
VmFlags: rd wr mr mw me ac sd mg
7f0010000000-7f0010100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                 512 kB
VmFlags: rd wr mr mw me ac sd mg
7f0020000000-7f0020100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                1024 kB
VmFlags: rd wr mr mw me ac sd
"""


def test_libvirt_cmdline() -> None:
    assert parse_qemu_cmdline(LIBVIRT) == (
        "web-1,blue",
        "0a0a0a0a-0000-4000-8000-000000000001",
        None,
        256 * 2**20,
        False,
    )


def test_proxmox_cmdline() -> None:
    assert parse_qemu_cmdline(PROXMOX) == ("pg-primary", None, "101", 2 * 2**30, None)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("512", 512 * 2**20), ("2G", 2 * 2**30), ("size=1048576k,slots=4,maxmem=8G", 2**30)],
)
def test_memory_sizes(value: str, expected: int) -> None:
    assert parse_qemu_cmdline(["qemu-system-x86_64", "-m", value])[3] == expected


def write_process(
    proc: Path,
    pid: int,
    argv: list[str],
    comm: str,
    smaps: bytes,
    ksm_stat: str | None,
    uid: int = 0,
) -> None:
    FakeHost(proc.parent).process(pid, argv, comm, smaps, ksm_stat, uid)


KSM_STAT_YES = (
    "ksm_rmap_items 100\nksm_zero_pages 3\nksm_merging_pages 40\nksm_process_profit 4096\n"
    "ksm_merge_any: no\nksm_mergeable: yes\n"
)
KSM_STAT_NO = KSM_STAT_YES.replace("ksm_mergeable: yes", "ksm_mergeable: no")


def test_fake_host_finds_vms_and_opted_in_processes(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    write_process(proc, 100, LIBVIRT, "qemu-system-x86", SMAPS, KSM_STAT_YES)
    write_process(proc, 101, PROXMOX, "kvm", b"", KSM_STAT_NO)
    write_process(proc, 102, ["/usr/bin/redis-server"], "redis-server", SMAPS, KSM_STAT_YES)
    write_process(proc, 103, ["/bin/bash"], "bash", b"", KSM_STAT_NO)
    write_process(proc, 2, [], "kthreadd", b"", None)  # a kernel thread: empty cmdline
    found = {p.pid: p for p in ProcessScanner(HostPaths(tmp_path)).scan()}
    assert sorted(found) == [100, 101, 102]
    web = found[100]
    assert (web.kind, web.name, web.mem_merge, web.ram_bytes) == (
        "qemu",
        "web-1,blue",
        False,
        2**28,
    )
    assert web.mergeable_bytes == (200000 + 512) * 1024
    assert web.ksm == KsmStat(100, 3, 40, 4096, True, False)
    pve = found[101]
    assert (pve.kind, pve.name, pve.vmid, pve.mergeable_bytes) == ("qemu", "pg-primary", "101", 0)
    assert (found[102].kind, found[102].name) == ("process", "redis-server[102]")
    assert footprint_bytes(list(found.values())) == 2 * (200000 + 512) * 1024


def test_kernel_without_ksm_stat_reads_smaps_of_qemu_only(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    write_process(proc, 100, LIBVIRT, "qemu-system-x86", SMAPS, None)
    write_process(proc, 102, ["/usr/bin/redis-server"], "redis-server", SMAPS, None)
    found = ProcessScanner(HostPaths(tmp_path)).scan()
    assert [(p.pid, p.ksm) for p in found] == [(100, None)]
    assert found[0].mergeable_bytes == (200000 + 512) * 1024


def test_smaps_is_cached_until_refresh(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    write_process(proc, 100, LIBVIRT, "qemu-system-x86", SMAPS, KSM_STAT_YES)
    now = [0.0]
    scanner = ProcessScanner(
        HostPaths(tmp_path), smaps_max_age_seconds=30, young_seconds=60, clock=lambda: now[0]
    )
    assert scanner.scan()[0].mergeable_bytes > 0
    (proc / "100/smaps").write_bytes(b"")
    assert scanner.scan()[0].mergeable_bytes == 0  # young: re-read on every pass
    (proc / "100/smaps").write_bytes(SMAPS)
    now[0] = 61.0
    assert scanner.scan()[0].mergeable_bytes > 0
    (proc / "100/smaps").write_bytes(b"")
    now[0] = 62.0
    assert scanner.scan()[0].mergeable_bytes > 0  # old: cached
    assert scanner.scan(refresh=True)[0].mergeable_bytes == 0
    (proc / "100/smaps").write_bytes(SMAPS)
    now[0] = 62.0 + 30 * (1 + 100 % 8 / 8)
    assert scanner.scan()[0].mergeable_bytes > 0  # aged out
    (proc / "100/smaps").write_bytes(b"")
    (proc / "100/ksm_stat").write_text(
        KSM_STAT_NO.replace("ksm_mergeable: no", "ksm_merge_any: yes")
    )
    assert scanner.scan()[0].mergeable_bytes == 0  # mergeability changed: re-read


def test_ksm_stat_of_an_old_kernel() -> None:
    assert read_ksm_stat(Path("/nonexistent/ksm_stat")) is None


@pytest.mark.kernel
def test_real_guest_like_processes_are_found(real_ksm: RealKsm) -> None:
    """Real processes that /proc shows as QEMU; needs root for ksm_stat of any process."""
    libvirt_like = real_ksm.track(spawn("lv-guest", mib=16))
    proxmox_like = real_ksm.track(spawn("pve-guest", mib=16, vmid="4242", binary="kvm"))
    excluded = real_ksm.track(spawn("nomerge-guest", mib=16, no_merge=True))
    found = {p.pid: p for p in ProcessScanner(HostPaths()).scan()}
    lv, pve, ex = found[libvirt_like.pid], found[proxmox_like.pid], found[excluded.pid]
    assert (lv.kind, lv.name, lv.ram_bytes) == ("qemu", "lv-guest", 16 * 2**20)
    assert lv.mergeable_bytes >= 16 * 2**20
    assert lv.ksm is not None and lv.ksm.mergeable is True
    assert (pve.name, pve.vmid) == ("pve-guest", "4242")
    assert (ex.mem_merge, ex.mergeable_bytes) == (False, 0)
    assert ex.ksm is not None and ex.ksm.mergeable is False
    assert os.getpid() not in found


def test_a_process_that_execs_a_vmm_is_seen_as_the_vmm(tmp_path: Path) -> None:
    """libvirt forks, prepares the child, then execs QEMU: PID and start time stay the same.
    A pass that saw the child before its exec must not hide the QEMU after it."""
    import shutil

    proc = tmp_path / "proc"
    write_process(proc, 300, ["/usr/sbin/libvirtd"], "rpc-libvirtd", b"", None)
    scanner = ProcessScanner(HostPaths(tmp_path))
    assert scanner.scan() == []
    shutil.rmtree(proc / "300")
    write_process(proc, 300, LIBVIRT, "qemu-system-x86", SMAPS, KSM_STAT_YES)  # exec'd
    assert [p.kind for p in scanner.scan()] == ["qemu"]
    # the same name before and after an exec: the process events say it exec'd, and the
    # scanner forgets what it knew
    write_process(proc, 301, ["/usr/bin/wrapper"], "wrapper", b"", None)
    assert [p.pid for p in scanner.scan()] == [300]
    shutil.rmtree(proc / "301")
    write_process(proc, 301, LIBVIRT, "wrapper", SMAPS, None)
    assert [p.pid for p in scanner.scan()] == [300]  # nothing told the scanner yet
    scanner.forget(301)
    assert [p.pid for p in scanner.scan()] == [300, 301]
