"""The page-map reader's own reading: PFN files in clusters, pagemap only where pages are."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from ksmpolicy.kernel import pagemap
from ksmpolicy.kernel.pagemap import PageMapReader
from ksmpolicy.paths import HostPaths


def test_read_words_reads_clusters_and_zero_beyond_the_end(tmp_path: Path) -> None:
    size = 3 * pagemap.WINDOW_PFNS + 123  # a "kpageflags" of this many PFNs
    words = np.arange(size, dtype=np.uint64) * np.uint64(7) + np.uint64(1)
    path = tmp_path / "kpageflags"
    path.write_bytes(words.tobytes())
    rng = np.random.default_rng(5)
    scattered = rng.choice(size, 4000, replace=False)
    dense = np.arange(pagemap.WINDOW_PFNS - 50, pagemap.WINDOW_PFNS + 50)  # across a window
    beyond = np.array([size, size + 5, size + 10**6])
    pfns = np.unique(np.concatenate((scattered, dense, beyond))).astype(np.uint64)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = PageMapReader.read_words(fd, pfns)
    finally:
        os.close(fd)
    inside = pfns < size
    assert np.array_equal(got[inside], words[pfns[inside].astype(np.int64)])
    assert not got[~inside].any()
    assert PageMapReader.read_words(0, np.zeros(0, np.uint64)).size == 0


PATTERNS = {  # VMA size, first and last touched offset, step between touched pages
    "sparse": (256 << 20, 0, 256 << 20, 7 * mmap.PAGESIZE),  # dense runs: read as one span
    "spread": (4 << 30, 0, 4 << 30, 128 * mmap.PAGESIZE),  # 8 Ki runs: the scan buffer refills
    "contiguous": (256 << 20, 64 << 20, 96 << 20, mmap.PAGESIZE),
}


def touched_region(pattern: str) -> mmap.mmap:
    size, first, last, step = PATTERNS[pattern]
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_NOHUGEPAGE)
    region.madvise(mmap.MADV_MERGEABLE)
    for offset in range(first, last, step):
        region[offset] = 1
    _ = region[200 << 20]  # a read maps the zero page
    return region


@pytest.mark.root
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_the_scan_finds_what_reading_everything_finds(
    pattern: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PAGEMAP_SCAN (skipping holes) and the whole-VMA read agree, also when the scan's buffer
    fills up and the kernel resumes at the start of a page table, reporting runs twice."""
    region = touched_region(pattern)
    try:
        with PageMapReader(HostPaths()) as reader:
            scanned = reader._candidates(os.getpid())
            monkeypatch.setattr(pagemap, "_scan_works", False)
            whole = reader._candidates(os.getpid())
    finally:
        region.close()
    _size, first, last, step = PATTERNS[pattern]
    touched = len(range(first, last, step))
    assert scanned[2] == whole[2] >= touched  # present pages
    assert np.array_equal(scanned[0], whole[0])  # the same candidate PFNs
    assert np.array_equal(scanned[1], whole[1])  # mapped as often
