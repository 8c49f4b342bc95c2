"""Reading another process's memory (kernel/guestmem.py): the digests are those of its pages,
by process_vm_readv or, where that is refused, by /proc/PID/mem; a process reaped during the
read reads as gone; `distinct` numbers contents as a sort by both words would (root for the
reads: they need ptrace access to another process)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import xxhash

from ksmpolicy.kernel import guestmem
from ksmpolicy.paths import PAGE_SIZE, HostPaths

PAGES = 96

# a child that maps PAGES pages, writes page i as b"page i" padded, prints the address, waits
CHILD = f"""
import mmap, sys
m = mmap.mmap(-1, {PAGES} * {PAGE_SIZE})
for i in range({PAGES}):
    m[i * {PAGE_SIZE}:(i + 1) * {PAGE_SIZE}] = (b"page %d" % (i % 40)).ljust({PAGE_SIZE}, b".")
import ctypes
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def child() -> Iterator[tuple[subprocess.Popen[str], int]]:
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        address = int(process.stdout.readline())
        yield process, address
    finally:
        process.kill()
        process.wait()


def expected(first: int, count: int) -> np.ndarray:
    pages = [(b"page %d" % (i % 40)).ljust(PAGE_SIZE, b".") for i in range(first, first + count)]
    data = b"".join(xxhash.xxh3_128_digest(page) for page in pages)
    return np.frombuffer(data, dtype=np.uint64).reshape(-1, 2)


def runs(address: int, *pieces: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    starts = np.array([address + first * PAGE_SIZE for first, _ in pieces], dtype=np.uint64)
    lengths = np.array([count for _, count in pieces], dtype=np.int64)
    return starts, lengths


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="reads another process: root")


@needs_root
@pytest.mark.root
def test_the_digests_are_those_of_the_pages(
    child: tuple[subprocess.Popen[str], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    process, address = child
    monkeypatch.setattr(guestmem, "READ_PAGES", 16)  # runs longer than one read, and shorter
    starts, lengths = runs(address, (0, 40), (50, 3), (60, 36))
    got = guestmem.hash_runs(HostPaths(), process.pid, starts, lengths, guestmem.RateLimit(None))
    want = np.concatenate([expected(0, 40), expected(50, 3), expected(60, 36)])
    assert np.array_equal(got, want)


@needs_root
@pytest.mark.root
def test_hash_pages_reads_the_pages_it_is_given(child: tuple[subprocess.Popen[str], int]) -> None:
    process, address = child
    present = guestmem.Runs(*runs(address, (0, 10), (20, 30)))  # 40 pages, in two runs
    indices = np.array([0, 1, 2, 9, 10, 11, 39], dtype=np.int64)  # one crosses the gap
    pages = [0, 1, 2, 9, 20, 21, 49]
    got = guestmem.hash_pages(HostPaths(), process.pid, present, indices, guestmem.RateLimit(None))
    assert np.array_equal(got, np.concatenate([expected(p, 1) for p in pages]))


@needs_root
@pytest.mark.root
def test_where_process_vm_readv_is_refused_proc_mem_reads_the_same(
    child: tuple[subprocess.Popen[str], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    process, address = child
    calls = []

    def refused(*_args: Any) -> int:
        calls.append(1)
        ctypes.set_errno(errno.EPERM)
        return -1

    monkeypatch.setattr(guestmem, "_process_vm_readv", lambda: refused)
    starts, lengths = runs(address, (0, PAGES))
    got = guestmem.hash_runs(HostPaths(), process.pid, starts, lengths, guestmem.RateLimit(None))
    assert calls == [1]  # asked once, then /proc/PID/mem for the rest
    assert np.array_equal(got, expected(0, PAGES))


@needs_root
@pytest.mark.root
def test_a_page_unmapped_meanwhile_gets_a_digest_no_page_has(
    child: tuple[subprocess.Popen[str], int],
) -> None:
    process, address = child
    starts, lengths = runs(address, (PAGES - 2, 4))  # the last two pages are past the mapping
    got = guestmem.hash_runs(HostPaths(), process.pid, starts, lengths, guestmem.RateLimit(None))
    assert np.array_equal(got[:2], expected(PAGES - 2, 2))
    assert not np.array_equal(got[2], got[3])  # each of its own address
    assert not (got[2:] == expected(0, PAGES)[:, None, :]).all(axis=2).any()


@needs_root
@pytest.mark.root
def test_a_process_reaped_during_the_read_reads_as_gone(
    child: tuple[subprocess.Popen[str], int],
) -> None:
    process, address = child
    starts, lengths = runs(address, (0, 8))

    def reaped(_bytes: int) -> None:
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
            process.wait()  # reaped: its pid may now be anyone's

    with pytest.raises(ProcessLookupError):
        guestmem.hash_runs(
            HostPaths(), process.pid, starts, lengths, guestmem.RateLimit(None), reaped
        )


def test_a_process_gone_before_the_read_reads_as_gone() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    with pytest.raises(OSError):
        guestmem.hash_runs(
            HostPaths(),
            process.pid,
            np.array([mmap.PAGESIZE], dtype=np.uint64),
            np.array([1], dtype=np.int64),
            guestmem.RateLimit(None),
        )


def reference(digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    contents, ids = np.unique(digests, axis=0, return_inverse=True)
    return contents, ids.reshape(-1)


@pytest.mark.parametrize("seed", range(20))
def test_distinct_numbers_contents_as_a_sort_by_both_words_does(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 2**64, size=(int(rng.integers(1, 50)), 2), dtype=np.uint64)
    if seed % 2:  # digests that share their first word and differ in the second
        pool[: pool.shape[0] // 2, 0] = pool[0, 0]
    digests = pool[rng.integers(0, pool.shape[0], size=int(rng.integers(0, 400)))]
    contents, ids = guestmem.distinct(digests)
    want_contents, want_ids = reference(digests)
    assert np.array_equal(contents, want_contents)
    assert np.array_equal(ids, want_ids)
    assert np.array_equal(contents[ids], digests)
