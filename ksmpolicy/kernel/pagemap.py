"""The page map: which KSM pages each process maps, read from the kernel's page tables (root).

Three files, all read-only:

* `/proc/PID/pagemap`: 8 bytes per virtual page: bit 63 present, 62 swapped, 56 mapped
  exclusively (by this one page table entry), bits 0-54 the page frame number (PFN). Only the
  process's mergeable VMAs (`mg` in smaps) are read: KSM pages live nowhere else.
* `/proc/kpageflags`: 8 bytes per PFN: bit 21 `KPF_KSM`, 24 `KPF_ZERO_PAGE`, 22 `KPF_THP`.
* `/proc/kpagecount`: 8 bytes per PFN: how many page table entries map it.

**Cost.** Guest RAM is mostly holes on an idle host (a 1 GiB guest may touch 32 MiB), so the
walk first asks the PAGEMAP_SCAN ioctl (Linux 6.7+) where the present and swapped pages are and
reads pagemap entries only there (runs a few pages apart are read as one); older kernels get
the whole VMA read. The mergeable VMAs come from the caller's smaps read when it has one
(`status` passes the scanner's), since reading smaps costs as much as the walk. A page mapped
exclusively is never shared, so only present pages *without* bit 56 are looked up in
kpageflags: on a merged host that is the KSM pages, a small part of guest RAM. The PFN files
are never read whole (kpageflags is 8 bytes per page of host RAM): the sorted PFNs are read in
clusters, at most 64 Ki PFNs at once, never the PFNs between clusters. Memory: pagemap is read
256 MiB of guest RAM at a time and each piece reduced to its distinct PFNs at once; the walk
keeps, per process, the KSM PFNs it maps and how often (12 bytes per distinct KSM page), and no
addresses: the few it needs later (to read a page's content) are found again in the pagemap of
one process that maps them. Measured: under 16 bytes per guest page at the peak
(bench/results/pagemap.md).

**Accuracy.** A walk is a snapshot of moving state: between reading a process's pagemap and a
PFN's flags, ksmd may merge or a guest may write (breaking a merge), so a page can be counted in
the state it had a few milliseconds earlier. The error is bounded by the pages that changed
during the walk (ksmd's own rate: at most `pages_to_scan` per `sleep_millisecs`, and guest
writes to merged pages); `PageMap.pages_sharing_drift` reports how far the kernel's counter
moved while the walk ran. A process that exits mid-walk is left out and listed in `exited`.

Without CAP_SYS_ADMIN the kernel zeroes the PFNs in pagemap (since 4.2): the reader says so
(`PfnsHidden`) and callers fall back to /proc/PID/ksm_stat.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ksmpolicy.errors import HostError
from ksmpolicy.kernel.ksm import read_ksm
from ksmpolicy.kernel.smaps import parse as parse_smaps
from ksmpolicy.paths import PAGE_SIZE, HostPaths

PM_PRESENT = np.uint64(1 << 63)
PM_SWAPPED = np.uint64(1 << 62)
PM_EXCLUSIVE = np.uint64(1 << 56)
PM_PFN = np.uint64((1 << 55) - 1)
KPF_KSM = 21
KPF_THP = 22
KPF_ZERO_PAGE = 24
CHUNK_PAGES = 1 << 16  # pagemap entries read at once: 512 KiB of pagemap, 256 MiB of guest RAM
WINDOW_PFNS = 1 << 16  # kpageflags / kpagecount: at most 512 KiB read at once
PFN_GAP = 32  # PFNs closer than this are read in one pread (a syscall costs ~30 entries)
# PAGEMAP_SCAN (Linux 6.7+): an ioctl on a pagemap fd that returns runs of pages by category,
# so the walk reads pagemap entries only where pages are, not across the holes of guest RAM.
PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg), 96 bytes
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
SCAN_REGIONS = 1 << 12  # page_region entries per ioctl (96 KiB)
SPAN_GAP_PAGES = 64  # runs closer than this are read as one span (fewer reads)
_scan_works = True  # cleared when the kernel answers that it has no PAGEMAP_SCAN

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
U32 = npt.NDArray[np.uint32]


class PageMapUnavailable(HostError):
    """This kernel, container or user cannot read the page map (the caller falls back)."""


class PfnsHidden(PageMapUnavailable):
    """The kernel hides page frame numbers from this user (not root, or no CAP_SYS_ADMIN)."""


@dataclass
class ProcessPages:
    """What one process maps: its KSM pages (sorted) and how many of its entries map each."""

    pid: int
    ksm_pfns: U64
    mappings: U32
    present_pages: int = 0
    swapped_pages: int = 0


@dataclass
class PageMap:
    """One walk: every process's KSM pages and each KSM page's map count."""

    processes: dict[int, ProcessPages]
    ksm_pfns: U64  # every KSM page any walked process maps, sorted
    mapcount: I64  # kpagecount of each, in the same order
    exited: list[int] = field(default_factory=list)
    pages_sharing: int | None = None  # the kernel's counter when the walk ended
    pages_sharing_drift: int = 0  # how far that counter moved during the walk
    seconds: float = 0.0

    def counts_of(self, pfns: U64) -> I64:
        """kpagecount of KSM pages of this map (each must be in `ksm_pfns`)."""
        return self.mapcount[np.searchsorted(self.ksm_pfns, pfns)]

    def saved_pages(self, pid: int) -> float:
        """Pages a process's merging saves: each of its mappings of a KSM page mapped m times
        is credited (m - 1) / m, so the credits of all mappers add up to the kernel's
        pages_sharing (a KSM page mapped m times saves m - 1 pages)."""
        process = self.processes.get(pid)
        if process is None or process.ksm_pfns.size == 0:
            return 0.0
        counts = self.counts_of(process.ksm_pfns).astype(np.float64)
        return float(np.sum(process.mappings * (counts - 1) / np.maximum(counts, 1)))

    def unmerge_pages(self) -> int:
        """Pages that unmerging every walked process would re-materialise: each of their
        mappings of a KSM page becomes a private copy, and a KSM page nobody else maps is
        freed. (Zero pages merged with the zero page come on top: see ksm_stat.)"""
        parts = [p for p in self.processes.values() if p.ksm_pfns.size]
        if not parts:
            return 0
        pfns = np.concatenate([p.ksm_pfns for p in parts])
        mappings = np.concatenate([p.mappings for p in parts]).astype(np.int64)
        unique, inverse = np.unique(pfns, return_inverse=True)
        own = np.bincount(inverse, weights=mappings, minlength=unique.size)
        freed = int(np.count_nonzero(own >= self.counts_of(unique)))
        return int(own.sum()) - freed


class PageMapReader:
    """Walks processes' page tables. One reader per walk; `close` (or `with`) releases it."""

    def __init__(self, paths: HostPaths) -> None:
        self.paths = paths
        try:
            self._flags = os.open(paths.proc / "kpageflags", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PageMapUnavailable(
                f"{paths.proc / 'kpageflags'} does not exist (a container, or a kernel "
                "without CONFIG_PROC_PAGE_MONITOR): per-VM savings come from ksm_stat"
            ) from None
        except PermissionError:
            raise PfnsHidden(
                f"cannot read {paths.proc / 'kpageflags'}: permission denied (run as root): "
                "per-VM savings come from ksm_stat"
            ) from None
        except OSError as exc:
            raise PageMapUnavailable(f"cannot read {paths.proc / 'kpageflags'}: {exc}") from None
        try:
            self._counts = os.open(paths.proc / "kpagecount", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            os.close(self._flags)
            raise PageMapUnavailable(f"cannot read {paths.proc / 'kpagecount'}: {exc}") from None

    @property
    def flags_fd(self) -> int:
        """/proc/kpageflags, open (for `read_words`)."""
        return self._flags

    def __enter__(self) -> PageMapReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in (self._flags, self._counts):
            try:  # noqa: SIM105
                os.close(fd)
            except OSError:
                pass

    def walk(
        self, pids: Iterable[int], ranges: Mapping[int, Sequence[tuple[int, int]]] | None = None
    ) -> PageMap:
        """Walk these processes. `ranges` gives a process's mergeable VMAs when the caller has
        just parsed its smaps (reading smaps again costs as much as the walk itself)."""
        import time  # noqa: PLC0415

        started = time.monotonic()
        before = self._pages_sharing()
        candidates: dict[int, tuple[U64, U32]] = {}
        present: dict[int, tuple[int, int]] = {}
        exited = []
        everything = np.zeros(0, np.uint64)  # the union so far: VMs share most of their PFNs
        pending: list[U64] = []  # candidates not yet in it: joined once they are as many
        for pid in pids:
            try:
                known = ranges.get(pid) if ranges is not None else None
                pfns, mappings, n_present, n_swapped = self._candidates(pid, known)
            except ProcessLookupError:
                exited.append(pid)
                continue
            candidates[pid] = (pfns, mappings)
            present[pid] = (n_present, n_swapped)
            pending.append(pfns)
            if sum(p.size for p in pending) >= max(everything.size, 1 << 16):
                everything = np.unique(np.concatenate([everything, *pending]))
                pending.clear()
        everything = np.unique(np.concatenate([everything, *pending]))
        pending.clear()
        flags = self.read_words(self._flags, everything)
        ksm_pfns = everything[(flags >> np.uint64(KPF_KSM)) & np.uint64(1) == 1]
        del everything, flags
        mapcount = self.read_words(self._counts, ksm_pfns).astype(np.int64)
        processes = {}
        for pid in list(candidates):
            pfns, mappings = candidates.pop(pid)  # one process's arrays at a time, not two copies
            keep = _member(pfns, ksm_pfns)
            processes[pid] = ProcessPages(
                pid,
                pfns[keep],
                mappings[keep],
                present_pages=present[pid][0],
                swapped_pages=present[pid][1],
            )
            del pfns, mappings, keep
        after = self._pages_sharing()
        return PageMap(
            processes,
            ksm_pfns,
            mapcount,
            exited,
            pages_sharing=after,
            pages_sharing_drift=abs((after or 0) - (before or 0)),
            seconds=time.monotonic() - started,
        )

    def _pages_sharing(self) -> int | None:
        state = read_ksm(self.paths)
        return state.get("pages_sharing") if state is not None else None

    def _candidates(
        self, pid: int, ranges: Sequence[tuple[int, int]] | None = None
    ) -> tuple[U64, U32, int, int]:
        """The distinct PFNs a process maps that could be shared (present, not mapped
        exclusively), how often it maps each, and its present and swapped page counts."""
        proc = self.paths.proc / str(pid)
        try:
            if ranges is None:
                ranges = parse_smaps((proc / "smaps").read_bytes()).mergeable_ranges()
            fd = os.open(proc / "pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ProcessLookupError(pid) from None
        except PermissionError:
            raise PfnsHidden(
                f"cannot read {proc / 'pagemap'}: permission denied (run as root)"
            ) from None
        pieces: list[tuple[U64, U32]] = []
        present = swapped = 0
        seen_pfn = False
        try:
            for first, last in _spans(fd, proc, pid, ranges):
                for _chunk, entries in _entries(fd, proc, pid, first, last):
                    is_present = (entries & PM_PRESENT) != 0
                    n_present = int(np.count_nonzero(is_present))
                    present += n_present
                    swapped += int(np.count_nonzero(entries & PM_SWAPPED))
                    if not n_present:
                        continue
                    if not seen_pfn:
                        seen_pfn = bool(np.any(entries[is_present] & PM_PFN))
                    shared = entries[is_present & ((entries & PM_EXCLUSIVE) == 0)] & PM_PFN
                    if shared.size:
                        unique, counts = np.unique(shared, return_counts=True)
                        pieces.append((unique, counts.astype(np.uint32)))
        finally:
            os.close(fd)
        if present and not seen_pfn:
            raise PfnsHidden(
                f"{proc / 'pagemap'} shows no page frame numbers (this user lacks "
                "CAP_SYS_ADMIN): per-VM savings come from ksm_stat"
            )
        if not pieces:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint32), present, swapped
        if len(pieces) == 1:
            return pieces[0][0], pieces[0][1], present, swapped
        pfns = np.concatenate([p[0] for p in pieces])
        counts = np.concatenate([p[1] for p in pieces])
        pieces.clear()
        unique, inverse = np.unique(pfns, return_inverse=True)
        del pfns
        total = np.bincount(inverse, weights=counts, minlength=unique.size).astype(np.uint32)
        return unique, total, present, swapped

    def addresses_of(self, pid: int, pfns: U64) -> dict[int, int]:
        """One virtual address at which a process maps each of these (sorted) PFNs."""
        proc = self.paths.proc / str(pid)
        found: dict[int, int] = {}
        try:
            ranges = parse_smaps((proc / "smaps").read_bytes()).mergeable_ranges()
            fd = os.open(proc / "pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return found
        try:
            for first, last in _spans(fd, proc, pid, ranges):
                for chunk, entries in _entries(fd, proc, pid, first, last):
                    page_pfns = entries & PM_PFN
                    hits = np.flatnonzero(_member(page_pfns, pfns) & ((entries & PM_PRESENT) != 0))
                    for index in hits.tolist():
                        found.setdefault(int(page_pfns[index]), (chunk + index) * PAGE_SIZE)
                    if len(found) == pfns.size:
                        return found
        except (ProcessLookupError, HostError):
            pass
        finally:
            os.close(fd)
        return found

    @staticmethod
    def read_words(fd: int, pfns: U64) -> U64:
        """The 8-byte entries of sorted, unique PFNs from kpageflags or kpagecount: each cluster
        of PFNs less than PFN_GAP apart is read with one pread of at most WINDOW_PFNS entries
        (never the whole file, and not the PFNs between clusters: the kernel computes each
        entry it returns, about 60 ns apiece)."""
        result = np.zeros(pfns.size, dtype=np.uint64)
        if not pfns.size:
            return result
        windows = pfns // np.uint64(WINDOW_PFNS)
        cut = (np.diff(pfns) > np.uint64(PFN_GAP)) | (np.diff(windows) != 0)
        firsts = np.concatenate(([0], np.flatnonzero(cut) + 1))
        lasts = np.concatenate((firsts[1:], [pfns.size])) - 1
        low, high = pfns[firsts], pfns[lasts]
        lengths = (high - low + np.uint64(1)).astype(np.int64)
        pieces = []
        for start, count in zip(low.tolist(), lengths.tolist(), strict=True):
            data = os.pread(fd, count * 8, start * 8)
            pieces.append(data + bytes(count * 8 - len(data)))  # beyond the end of RAM: 0
        words = np.frombuffer(b"".join(pieces), dtype=np.uint64)
        bases = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        cluster = np.repeat(np.arange(firsts.size), lasts - firsts + 1)
        offsets = bases[cluster] + (pfns - low[cluster]).astype(np.int64)
        result[:] = words[offsets]
        return result


def _spans(
    fd: int, proc: object, pid: int, ranges: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """(first, last) page numbers worth reading in these address ranges: the runs of present
    or swapped pages PAGEMAP_SCAN finds, joined across gaps under SPAN_GAP_PAGES; the whole
    ranges on a kernel without it."""
    global _scan_works  # noqa: PLW0603
    spans: list[tuple[int, int]] = []
    for start, end in ranges:
        runs = _scan(fd, proc, pid, start, end) if _scan_works else None
        if runs is None:
            _scan_works = False
            spans.append((start // PAGE_SIZE, end // PAGE_SIZE))
        elif runs.size:
            # Successive ioctls can report a run twice (a full buffer makes the kernel resume
            # at the start of a page table), so the runs are joined as a union.
            pages = (runs // np.uint64(PAGE_SIZE)).astype(np.int64)
            pages = pages[np.argsort(pages[:, 0], kind="stable")]
            reach = np.maximum.accumulate(pages[:, 1])  # the furthest end so far
            breaks = np.flatnonzero(pages[1:, 0] - reach[:-1] >= SPAN_GAP_PAGES) + 1
            firsts = pages[np.concatenate(([0], breaks)), 0]
            lasts = reach[np.concatenate((breaks - 1, [len(pages) - 1]))]
            spans.extend(zip(firsts.tolist(), lasts.tolist(), strict=True))
    return spans


def _scan(fd: int, proc: object, pid: int, start: int, end: int) -> U64 | None:
    """(start, end) address pairs of the runs of present or swapped pages between start and
    end, from the PAGEMAP_SCAN ioctl; None if this kernel does not have it."""
    regions = np.zeros((SCAN_REGIONS, 3), dtype=np.uint64)  # struct page_region[]
    runs: list[U64] = []
    wanted = PAGE_IS_PRESENT | PAGE_IS_SWAPPED
    while start < end:
        arg = bytearray(
            struct.pack(
                "12Q",
                96,
                0,
                start,
                end,
                0,
                regions.ctypes.data,
                SCAN_REGIONS,
                0,
                0,
                0,
                wanted,
                wanted,
            )
        )
        try:
            found = fcntl.ioctl(fd, PAGEMAP_SCAN, arg, True)
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                return None
            if exc.errno == errno.ESRCH:
                raise ProcessLookupError(pid) from None
            raise HostError(f"cannot scan {proc}/pagemap: {exc.strerror}") from None
        runs.append(regions[:found, :2].copy())
        walk_end = struct.unpack_from("Q", arg, 32)[0]
        if walk_end <= start:
            break
        if found == SCAN_REGIONS and walk_end - start < SCAN_REGIONS * SPAN_GAP_PAGES * PAGE_SIZE:
            # runs this dense would be read as one span anyway: scanning on costs more
            runs.append(np.array([[walk_end, end]], dtype=np.uint64))
            break
        start = walk_end
    return np.concatenate(runs) if runs else np.zeros((0, 2), np.uint64)


def _entries(fd: int, proc: object, pid: int, first: int, last: int) -> Iterable[tuple[int, U64]]:
    """(first page number, pagemap entries) of pages first..last, CHUNK_PAGES at a time."""
    for chunk in range(first, last, CHUNK_PAGES):
        count = min(CHUNK_PAGES, last - chunk)
        try:
            data = os.pread(fd, count * 8, chunk * 8)
        except ProcessLookupError:
            raise
        except OSError as exc:
            if exc.errno == 3:  # ESRCH: the process is gone
                raise ProcessLookupError(pid) from None
            raise HostError(f"cannot read {proc}/pagemap: {exc.strerror}") from None
        if not data:
            raise ProcessLookupError(pid)
        yield chunk, np.frombuffer(data, dtype=np.uint64)


def _member(values: U64, sorted_set: U64) -> npt.NDArray[np.bool_]:
    """Which of `values` are in `sorted_set` (sorted, distinct): searchsorted, which needs no
    sorting of `values` and no temporaries beyond one index per value."""
    if not sorted_set.size:
        return np.zeros(values.size, dtype=bool)
    where = np.searchsorted(sorted_set, values)
    where[where == sorted_set.size] = 0
    found: npt.NDArray[np.bool_] = sorted_set[where] == values
    return found


def zero_pfns(paths: HostPaths, pagemap: PageMap, pfns: Sequence[int]) -> set[int]:
    """Which of these KSM pages hold only zeros (read through one mapper each). Identical zero
    pages merge across every group: they are shown apart from content sharing."""
    wanted = np.unique(np.fromiter(pfns, np.uint64, len(pfns)))
    zeros: set[int] = set()
    blank = bytes(PAGE_SIZE)
    if not wanted.size:
        return zeros
    with PageMapReader(paths) as reader:
        for pid, process in pagemap.processes.items():
            mine = wanted[_member(wanted, process.ksm_pfns)]
            if not mine.size:
                continue
            try:  # read-only: reading a KSM page does not unshare it
                fd = os.open(paths.proc / str(pid) / "mem", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # gone: another mapper may say
            try:
                for pfn, address in reader.addresses_of(pid, mine).items():
                    try:
                        if os.pread(fd, PAGE_SIZE, address) == blank:
                            zeros.add(pfn)
                    except OSError:
                        break
            finally:
                os.close(fd)
            wanted = wanted[~_member(wanted, mine)]
            if not wanted.size:
                break
    return zeros
