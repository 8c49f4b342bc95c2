"""smaps parsing: the fake text the scanner tests use, and this process's real smaps."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from ksmpolicy.kernel.smaps import parse
from tests.kernel.test_scan import SMAPS


def test_mergeable_resident_counts_only_mg_vmas() -> None:
    assert parse(SMAPS).mergeable_resident() == ((200000 + 512) * 1024, 2)


def test_guest_ram_mergeable_looks_at_the_ram_vma_only() -> None:
    assert parse(SMAPS).ram_mergeable(256 * 2**20) is True  # the 256 MiB VMA has "mg"
    unmerged = SMAPS.replace(
        b"VmFlags: rd wr mr mw me ac sd mg\n7f0010", b"VmFlags: rd wr mr mw me ac sd\n7f0010"
    )
    assert parse(unmerged).ram_mergeable(256 * 2**20) is False  # a ROM-sized "mg" VMA is not RAM
    assert parse(SMAPS).ram_mergeable(None) is None
    assert parse(SMAPS).ram_mergeable(64 * 2**30) is None  # no VMA that large


def test_a_truncated_text_keeps_the_whole_blocks() -> None:
    cut = SMAPS[: SMAPS.rindex(b"VmFlags:")]
    assert len(parse(cut).vmas) == len(parse(SMAPS).vmas) - 1
    assert parse(b"").vmas == ()
    assert parse(b"garbage-xyz rw-p\nVmFlags: mg\n").vmas == ()


def test_real_smaps_agrees_with_a_line_by_line_reading() -> None:
    region = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_MERGEABLE)
    region[: 1 << 20] = b"x" * (1 << 20)
    data = (Path("/proc") / str(os.getpid()) / "smaps").read_bytes()
    # the slow, obvious reading: one line at a time
    expected, current = [], None
    for line in data.splitlines():
        head = line.split(b" ", 1)[0]
        if b"-" in head and not head.endswith(b":"):
            low, high = head.split(b"-")
            current = [int(low, 16), int(high, 16), 0, False]
        elif line.startswith(b"Rss:") and current is not None:
            current[2] = int(line.split()[1]) * 1024
        elif line.startswith(b"VmFlags:") and current is not None:
            current[3] = b"mg" in line.split()
            expected.append(tuple(current))
    got = [(v.start, v.end, v.rss_bytes, v.mergeable) for v in parse(data).vmas]
    assert got == expected
    mine = [v for v in parse(data).vmas if v.mergeable and v.size == 8 << 20]
    assert len(mine) == 1 and mine[0].rss_bytes >= 1 << 20
    region.close()
