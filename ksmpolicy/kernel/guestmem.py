"""Reading guest RAM for the savings estimate: present pages only, hashed, never written (root).

Which memory: a process's mergeable VMAs (`mg`), and for a QEMU guest also its guest-RAM VMAs
when they are not mergeable, so that the estimate can tell what merging an excluded VM would
save. Which pages: those present in RAM (pagemap's present bit), except those mapped to the
kernel's zero page or huge zero page: a guest that only read a page gets the zero page, which
costs no memory and which KSM neither can nor needs to merge (measured on TCG guests: about
40 MiB of each 256 MiB guest, which ksmd reports as volatile). Such mappings are told apart by
their PFN's `KPF_ZERO_PAGE`; they are never exclusive, so only the few non-exclusive PFNs are
looked up. How: `pread` on /proc/PID/mem in runs of consecutive present pages, 4 MiB at a time
into one buffer, each page hashed with xxHash's xxh3-128.

Which process: every file (smaps, pagemap, mem) is opened through one handle on the VM's
/proc/PID directory (`Process`), taken before the first read. A file opened through it is that
process's or the open fails once the process has been reaped, even when its PID names another
process by then; so the mappings, the page table and the memory read for a VM are never those
of a process that took its PID over. An open /proc/PID/mem stays with the memory it was opened
on (it reads nothing once that is gone).

Why not `process_vm_readv`, which copies each page once where /proc/PID/mem copies it twice
(1.6 times less CPU on a 1 GiB guest here): it pins the pages it reads, and the kernel (5.19 and
later) gives a process its own copy of a shared anonymous page before letting anyone pin it, so
reading a VM that way would undo every merge KSM made in it. /proc/PID/mem takes plain
references: reading a KSM page through it does not unshare it. Nothing is written, no KSM knob
is touched. Pages that are swapped out, not yet touched, or given back by a balloon driver are
not read: the estimate cannot see them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.kernel.pagemap import (
    KPF_THP,
    KPF_ZERO_PAGE,
    PM_EXCLUSIVE,
    PM_PFN,
    PM_PRESENT,
    PageMapReader,
    PageMapUnavailable,
)
from ksmpolicy.kernel.procfs import parse_stat, start_of
from ksmpolicy.kernel.smaps import parse as smaps_of
from ksmpolicy.paths import PAGE_SIZE, HostPaths

READ_PAGES = 1024  # pages per read: 4 MiB
ZERO_DIGEST = xxhash.xxh3_128_digest(bytes(PAGE_SIZE))
# xxh3-128 digests as rows of two 64-bit words (an N x 2 array): compared and sorted as plain
# integers, which is ten times faster than as 16-byte records.
Hashes = npt.NDArray[np.uint64]
ZERO = np.frombuffer(ZERO_DIGEST, dtype=np.uint64)


@dataclass
class Runs:
    """Present pages of a process: (first address, pages) runs, in address order."""

    starts: npt.NDArray[np.uint64]
    lengths: npt.NDArray[np.int64]

    @property
    def pages(self) -> int:
        return int(self.lengths.sum())

    def addresses(self, indices: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
        """The addresses of the pages with these indices (in reading order)."""
        ends = np.cumsum(self.lengths)
        run = np.searchsorted(ends, indices, side="right")
        before = ends[run] - self.lengths[run]
        return self.starts[run] + ((indices - before) * PAGE_SIZE).astype(np.uint64)


class RateLimit:
    """At most `bytes_per_second` read on average (None: no limit)."""

    def __init__(self, bytes_per_second: float | None) -> None:
        self.rate = bytes_per_second
        self.started = time.monotonic()
        self.done = 0

    def take(self, count: int) -> None:
        self.done += count
        if self.rate:
            ahead = self.done / self.rate - (time.monotonic() - self.started)
            if ahead > 0:
                time.sleep(ahead)


GONE = (FileNotFoundError, ProcessLookupError)  # what reading a VM that has exited raises


class Process:
    """A process's /proc/PID directory and memory, held open: the files read through it are
    that process's, or opening them fails with one of GONE once it has been reaped, even when
    its PID names another process by then; its memory file stays with the memory it was opened
    on. `start` (clock ticks since boot, as the inventory read it): the process must be the one
    that started then, else ProcessLookupError. Other OSErrors (too many open files, say) are
    the caller's to report, not a VM gone. Close it, or use it as a context manager."""

    def __init__(self, paths: HostPaths, pid: int, start: int | None = None) -> None:
        self.pid = pid
        self.fd = os.open(paths.proc / str(pid), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.memory = -1
        try:
            if start is not None and self.start() != start:
                raise ProcessLookupError(f"PID {pid} is another process than the one found")
            self.memory = self.open("mem")
        except BaseException:
            self.close()
            raise

    def open(self, name: str) -> int:
        """A file of this process's directory, opened read-only (the caller closes it)."""
        return os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.fd)

    def read(self, name: str) -> bytes:
        fd = self.open(name)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _stat(self) -> tuple[str, list[str]] | None:
        return parse_stat(self.read("stat").decode(errors="replace"))

    def start(self) -> int | None:
        return start_of(self._stat())

    def check_alive(self) -> None:
        """ProcessLookupError when it has exited (reaped, or a zombie whose memory is gone)."""
        stat = self._stat()
        if stat is None or not stat[1] or stat[1][0] in ("Z", "X", "x"):
            raise ProcessLookupError(f"PID {self.pid} has exited")

    def close(self) -> None:
        for fd in (self.memory, self.fd):
            if fd >= 0:
                os.close(fd)
        self.memory = self.fd = -1

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *_failure: object) -> None:
        self.close()


def hold(
    paths: HostPaths, wanted: Sequence[tuple[int, int | None]], stack: contextlib.ExitStack
) -> list[Process | None]:
    """A held `Process` for each (PID, start) the inventory found, all opened at once before
    anything is read (None: gone, or no longer the process found), closed with `stack`. The
    soft limit on open files is raised to fit them; another failure is an error that says
    what to do, never a VM taken for gone."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * len(wanted) + 256
    if soft != resource.RLIM_INFINITY and soft < needed:
        top = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, top), hard))
    held: list[Process | None] = []
    for pid, start in wanted:
        try:
            held.append(stack.enter_context(Process(paths, pid, start)))
        except GONE:
            held.append(None)
        except OSError as error:
            raise KsmPolicyError(
                f"cannot hold the memory of VM PID {pid} ({len(wanted)} VMs): {error.strerror}"
                + _what_to_do(error)
            ) from error
    return held


def _what_to_do(error: OSError) -> str:
    if error.errno in (errno.EMFILE, errno.ENFILE):
        return "; raise the open-file limit (LimitNOFILE= in the unit, ulimit -n)"
    if isinstance(error, PermissionError):
        return "; reading guest memory needs root"
    return ""


def held_runs(
    paths: HostPaths,
    wanted: Sequence[tuple[int, int | None, int | None]],
    stack: contextlib.ExitStack,
) -> list[tuple[int, Process, Runs]]:
    """For each (PID, start, guest RAM bytes) the inventory found that still runs: its index in
    `wanted`, its held `Process` (closed with `stack`) and the present pages of its guest RAM,
    without pages mapped to the zero page where the kernel's page flags can be read (root)."""
    held = hold(paths, [(pid, start) for pid, start, _ram in wanted], stack)
    try:
        reader: PageMapReader | None = PageMapReader(paths)
    except PageMapUnavailable:
        reader = None
    found = []
    try:
        for index, process in enumerate(held):
            if process is None:
                continue  # gone
            try:
                found.append((index, process, guest_runs(process, wanted[index][2], reader)))
            except GONE:
                continue
    finally:
        if reader is not None:
            reader.close()
    return found


def present_runs(
    process: Process, ranges: list[tuple[int, int]], reader: PageMapReader | None = None
) -> Runs:
    """Runs of present pages in `ranges`, from /proc/PID/pagemap; with `reader` (root), pages
    mapped to the zero page are left out."""
    starts: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    with os.fdopen(process.open("pagemap"), "rb", buffering=0) as pagemap:
        fd = pagemap.fileno()
        for start, end in ranges:
            first, last = start // PAGE_SIZE, end // PAGE_SIZE
            for chunk in range(first, last, 1 << 18):
                count = min(1 << 18, last - chunk)
                data = os.pread(fd, count * 8, chunk * 8)
                entries = np.frombuffer(data, np.uint64)
                present = (entries & PM_PRESENT) != 0
                if reader is not None:
                    present &= ~_zero_page_mappings(reader, entries)
                if not present.any():
                    continue
                edges = np.flatnonzero(np.diff(np.concatenate(([0], present.view(np.int8), [0]))))
                run_starts, run_ends = edges[0::2], edges[1::2]
                starts.append((run_starts + chunk).astype(np.uint64) * np.uint64(PAGE_SIZE))
                lengths.append((run_ends - run_starts).astype(np.int64))
    if not starts:
        return Runs(np.zeros(0, np.uint64), np.zeros(0, np.int64))
    return Runs(np.concatenate(starts), np.concatenate(lengths))


def guest_runs(process: Process, ram_bytes: int | None, reader: PageMapReader | None) -> Runs:
    """The present pages of a VM's guest RAM (its mappings as `smaps` tells them apart), as
    `present_runs` finds them. One of GONE when the process is gone."""
    ranges = smaps_of(process.read("smaps")).guest_ranges(ram_bytes)
    return present_runs(process, ranges, reader)


def _zero_page_mappings(reader: PageMapReader, entries: np.ndarray) -> np.ndarray:
    """Which pagemap entries map the zero page or the huge zero page."""
    shared = ((entries & PM_PRESENT) != 0) & ((entries & PM_EXCLUSIVE) == 0)
    if not shared.any():
        return np.zeros(entries.size, dtype=bool)
    pfns = entries[shared] & PM_PFN
    unique = np.unique(pfns)
    flags = reader.read_words(reader.flags_fd, unique)
    zero_pfns = unique[(flags >> np.uint64(KPF_ZERO_PAGE)) & np.uint64(1) == 1]
    found = np.zeros(entries.size, dtype=bool)
    found[np.flatnonzero(shared)[np.isin(pfns, zero_pfns)]] = True
    return found


def in_huge_pages(
    process: Process, addresses: npt.NDArray[np.uint64], reader: PageMapReader
) -> npt.NDArray[np.bool_]:
    """Which of these pages are subpages of a transparent huge page (KPF_THP)."""
    pages = (addresses // np.uint64(PAGE_SIZE)).astype(np.int64)
    entries = np.zeros(pages.size, dtype=np.uint64)
    with os.fdopen(process.open("pagemap"), "rb", buffering=0) as pagemap:
        fd = pagemap.fileno()
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        for run in np.split(np.arange(pages.size), breaks):
            if run.size:
                data = os.pread(fd, int(run.size) * 8, int(pages[run[0]]) * 8)
                got = np.frombuffer(data, np.uint64)
                entries[run[: got.size]] = got
    pfns = entries & PM_PFN
    unique = np.unique(pfns)
    flags = reader.read_words(reader.flags_fd, unique)
    huge = unique[(flags >> np.uint64(KPF_THP)) & np.uint64(1) == 1]
    found: npt.NDArray[np.bool_] = np.isin(pfns, huge) & ((entries & PM_PRESENT) != 0)
    return found


def hash_runs(
    process: Process,
    starts: npt.NDArray[np.uint64],
    lengths: npt.NDArray[np.int64],
    limit: RateLimit,
    progress: Callable[[int], None] = lambda _bytes: None,
) -> Hashes:
    """xxh3-128 of every page in the runs, in order. A page that cannot be read (unmapped
    meanwhile) hashes as the zero page would not: it gets a digest of its own address. One of
    GONE when the process has exited (a read came back short, and it is gone)."""
    digest = xxhash.xxh3_128_digest
    parts: list[bytes] = []
    memory = _Memory(process)
    short = False
    for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
        for offset in range(0, length, READ_PAGES):
            count = min(READ_PAGES, length - offset)
            address = start + offset * PAGE_SIZE
            view = memory.read(address, count * PAGE_SIZE)
            if len(view) == count * PAGE_SIZE:  # the usual case: one C loop over the pages
                pages = memory.pages if count == READ_PAGES else memory.pages[:count]
                parts.append(b"".join(map(digest, pages)))
            else:
                parts.append(_partial(view, count, address))
                short = True
            limit.take(count * PAGE_SIZE)
            progress(count * PAGE_SIZE)
    if short:
        process.check_alive()  # the memory of a process that exited reads as nothing
    return np.frombuffer(b"".join(parts), dtype=np.uint64).reshape(-1, 2)


def hash_pages(
    process: Process,
    runs: Runs,
    indices: npt.NDArray[np.int64],
    limit: RateLimit,
    progress: Callable[[int], None] = lambda _bytes: None,
) -> Hashes:
    """`hash_runs` of the pages with these indices in `runs` (ascending): a second read of
    some of the pages a first read hashed, in as few runs as they allow."""
    if not indices.size:
        return np.zeros((0, 2), dtype=np.uint64)
    addresses = runs.addresses(indices)
    firsts = np.concatenate(([0], np.flatnonzero(np.diff(addresses) != PAGE_SIZE) + 1))
    lengths = np.diff(np.append(firsts, addresses.size)).astype(np.int64)
    return hash_runs(process, addresses[firsts], lengths, limit, progress)


def distinct(digests: Hashes) -> tuple[Hashes, npt.NDArray[np.int64]]:
    """The distinct digests (rows, sorted) and, for each row, the index of its content among
    them. Sorted by the first word alone (four times faster than both); only when two
    different digests share a first word (which a tenant can make happen) by both."""
    order = np.argsort(digests[:, 0])
    ordered = digests[order]
    same_first = ordered[1:, 0] == ordered[:-1, 0]
    if np.any(same_first & (ordered[1:, 1] != ordered[:-1, 1])):
        order = np.lexsort((digests[:, 1], digests[:, 0]))
        ordered = digests[order]
        same_first = ordered[1:, 0] == ordered[:-1, 0]
    new = np.ones(order.size, dtype=bool)
    new[1:] = ~(same_first & (ordered[1:, 1] == ordered[:-1, 1]))
    ids = np.empty(order.size, dtype=np.int64)
    ids[order] = np.cumsum(new) - 1
    return ordered[new], ids


class _Memory:
    """A held process's memory, read (never written) into one reused buffer: `read` returns a
    view of what it got, short or empty where pages could not be read."""

    def __init__(self, process: Process) -> None:
        self.fd = process.memory
        self.view = memoryview(bytearray(READ_PAGES * PAGE_SIZE))
        # a view of each page of the buffer, made once: hashing them is one map() per read
        self.pages = [self.view[o : o + PAGE_SIZE] for o in range(0, len(self.view), PAGE_SIZE)]

    def read(self, address: int, size: int) -> memoryview:
        if size > len(self.view):
            raise ValueError(f"a read of {size} bytes: at most {len(self.view)}")
        try:
            got = os.preadv(self.fd, [self.view[:size]], address)
        except OSError:
            got = 0
        return self.view[:got]


def _partial(view: memoryview, count: int, address: int) -> bytes:
    """The digests of a read that came back short: the pages it holds, then, for each page
    gone (unmapped meanwhile), a digest no real page has (of its address, with a tag)."""
    digest = xxhash.xxh3_128_digest
    out = []
    for page in range(count):
        piece = view[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
        if len(piece) == PAGE_SIZE:
            out.append(digest(piece))
        else:
            out.append(digest(b"unreadable" + str(address + page * PAGE_SIZE).encode()))
    return b"".join(out)
