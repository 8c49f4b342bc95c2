"""The page map: which KSM pages each process maps, read from the kernel's page tables (root).

Three files, all read-only:

* `/proc/PID/pagemap`: 8 bytes per virtual page: bit 63 present, 62 swapped, 56 mapped
  exclusively (by this one page table entry), bits 0-54 the page frame number (PFN). Only the
  process's mergeable VMAs (`mg` in smaps) are read: KSM pages live nowhere else.
* `/proc/kpageflags`: 8 bytes per PFN: bit 21 `KPF_KSM`, 24 `KPF_ZERO_PAGE`, 22 `KPF_THP`.
* `/proc/kpagecount`: 8 bytes per PFN: how many page table entries map it.

**Cost.** A page mapped exclusively is never shared, so only present pages *without* bit 56
are looked up in kpageflags: on a merged host that is the KSM pages, a small part of guest
RAM. The PFN files are never read whole (kpageflags is 8 bytes per page of host RAM): the
sorted PFNs are read in windows of at most 64 Ki PFNs, only the span each window needs.
Memory: pagemap is read 256 MiB of guest RAM at a time and each piece reduced to its distinct
PFNs at once; the walk keeps, per process, the KSM PFNs it maps and how often (12 bytes per
distinct KSM page), and no addresses: the few it needs later (to read a page's content) are
found again in the pagemap of one process that maps them. Measured: under 16 bytes per guest
page at the peak (bench/results/pagemap.md).

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

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ksmpolicy.errors import HostError
from ksmpolicy.kernel.ksm import PAGE_SIZE, read_ksm
from ksmpolicy.paths import HostPaths

PM_PRESENT = np.uint64(1 << 63)
PM_SWAPPED = np.uint64(1 << 62)
PM_EXCLUSIVE = np.uint64(1 << 56)
PM_PFN = np.uint64((1 << 55) - 1)
KPF_KSM = 21
KPF_THP = 22
KPF_ZERO_PAGE = 24
CHUNK_PAGES = 1 << 16  # pagemap entries read at once: 512 KiB of pagemap, 256 MiB of guest RAM
WINDOW_PFNS = 1 << 16  # kpageflags / kpagecount: at most 512 KiB read at once
_VMA = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) ", re.MULTILINE)
_FLAGS = re.compile(rb"^VmFlags:([^\n]*)$", re.MULTILINE)

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


def mergeable_ranges(smaps: bytes) -> list[tuple[int, int]]:
    """(start, end) of each VMA whose VmFlags include `mg` (MADV_MERGEABLE or prctl)."""
    ranges = []
    headers = list(_VMA.finditer(smaps))
    for index, header in enumerate(headers):
        end_of_block = headers[index + 1].start() if index + 1 < len(headers) else len(smaps)
        flags = _FLAGS.search(smaps, header.end(), end_of_block)
        if flags is not None and b" mg" in flags.group(1) + b" ":
            ranges.append((int(header.group(1), 16), int(header.group(2), 16)))
    return ranges


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

    def walk(self, pids: Iterable[int]) -> PageMap:
        import time  # noqa: PLC0415

        started = time.monotonic()
        before = self._pages_sharing()
        candidates: dict[int, tuple[U64, U32]] = {}
        present: dict[int, tuple[int, int]] = {}
        exited = []
        everything = np.zeros(0, np.uint64)  # the union so far: VMs share most of their PFNs
        for pid in pids:
            try:
                pfns, mappings, n_present, n_swapped = self._candidates(pid)
            except ProcessLookupError:
                exited.append(pid)
                continue
            candidates[pid] = (pfns, mappings)
            present[pid] = (n_present, n_swapped)
            everything = np.union1d(everything, pfns)
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

    def _candidates(self, pid: int) -> tuple[U64, U32, int, int]:
        """The distinct PFNs a process maps that could be shared (present, not mapped
        exclusively), how often it maps each, and its present and swapped page counts."""
        proc = self.paths.proc / str(pid)
        try:
            smaps = (proc / "smaps").read_bytes()
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
            for start, end in mergeable_ranges(smaps):
                for _chunk, entries in _entries(fd, proc, pid, start, end):
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
            smaps = (proc / "smaps").read_bytes()
            fd = os.open(proc / "pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return found
        try:
            for start, end in mergeable_ranges(smaps):
                for chunk, entries in _entries(fd, proc, pid, start, end):
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
        """The 8-byte entries of sorted, unique PFNs from kpageflags or kpagecount, read in
        windows of at most WINDOW_PFNS (never the whole file)."""
        result = np.zeros(pfns.size, dtype=np.uint64)
        if not pfns.size:
            return result
        windows = pfns // np.uint64(WINDOW_PFNS)
        bounds = np.flatnonzero(np.diff(windows)) + 1
        starts = np.concatenate(([0], bounds))
        ends = np.concatenate((bounds, [pfns.size]))
        for begin, finish in zip(starts.tolist(), ends.tolist(), strict=True):
            low, high = int(pfns[begin]), int(pfns[finish - 1])
            data = os.pread(fd, (high - low + 1) * 8, low * 8)
            words = np.frombuffer(data, dtype=np.uint64)
            offsets = (pfns[begin:finish] - np.uint64(low)).astype(np.int64)
            inside = offsets < words.size  # PFNs beyond the end of RAM read as nothing
            result[begin:finish][inside] = words[offsets[inside]]
        return result


def _entries(fd: int, proc: object, pid: int, start: int, end: int) -> Iterable[tuple[int, U64]]:
    """(first page number, pagemap entries) of a VMA, CHUNK_PAGES at a time."""
    first, last = start // PAGE_SIZE, end // PAGE_SIZE
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


def read_page(paths: HostPaths, pid: int, address: int) -> bytes | None:
    """One page of a process's memory (root), or None when it cannot be read (gone, unmapped).
    Reading does not unshare a KSM page."""
    try:
        fd = os.open(paths.proc / str(pid) / "mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.pread(fd, PAGE_SIZE, address)
    except OSError:
        return None
    finally:
        os.close(fd)


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
            for pfn, address in reader.addresses_of(pid, mine).items():
                if read_page(paths, pid, address) == blank:
                    zeros.add(pfn)
            wanted = wanted[~_member(wanted, mine)]
            if not wanted.size:
                break
    return zeros
