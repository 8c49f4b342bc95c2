"""What KSM would save, before ksmd does any work: a prediction from the guests' own pages.

1. Read every present page of each VM's guest RAM (kernel/guestmem.py) and hash it (xxh3-128).
2. Wait a few seconds and hash again every page whose content appears more than once: ksmd
   merges a page only once its checksum held still for a whole scan, so pages that changed
   in between (volatile) are left out.
   Zero pages inside a transparent huge page are set apart: to merge a huge page ksmd splits
   it, and the kernel (6.12+) then maps its zero-filled subpages to the shared zero page.
   That frees them, but the kernel counts it in neither pages_sharing nor ksm_zero_pages
   (measured on TCG guests, whose RAM is THP-backed: 34 MiB per 256 MiB guest). They are
   predicted as `split_zero_bytes`, apart from what KSM itself saves.
3. Count the copies of each content among the VMs the policy lets merge. n copies become
   ceil(n / max_page_sharing) KSM pages (one KSM page has at most that many sharers), so
   they save n - ceil(n / max_page_sharing) pages; with `use_zero_pages`, zero pages merge
   with the kernel's zero page and each one saves a page. Each copy is credited its share.
4. For each VM the policy excludes: what merging it would add (the host-wide saving with it,
   minus without), and how much of its content each group already holds.
5. Suggested groups: VMs whose content overlaps (at least a quarter of the smaller one's
   non-zero pages) are joined, transitively.

What it cannot see: pages that are swapped out or not yet touched, memory a balloon driver
took back, and how guests will change their memory later. It never runs ksmd and never writes
a KSM knob.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ksmpolicy.kernel import guestmem
from ksmpolicy.kernel.pagemap import PageMapReader, PageMapUnavailable
from ksmpolicy.paths import PAGE_SIZE, HostPaths

ALIKE = 0.25  # shared non-zero content, as a share of the smaller VM's, to suggest a group
MIN_ALIKE_PAGES = 256


@dataclass(frozen=True)
class Guest:
    """A VM to read: who it is, and whether the policy lets it merge."""

    pid: int
    name: str
    group: str | None
    merges: bool  # the policy lets it merge (its prediction counts in the host's)
    ram_bytes: int | None = None
    start: int | None = None  # when it started (clock ticks since boot): PID and start name it


@dataclass(frozen=True)
class GuestEstimate:
    name: str
    group: str | None
    merges: bool
    present_bytes: int
    volatile_pages: int
    predicted_saved_bytes: int  # its share of the host's saving (0 when it does not merge)
    split_zero_bytes: int  # zero subpages of its huge pages that splitting frees
    if_merged_saved_bytes: int  # for an excluded VM: what merging it would add host-wide
    shares_with: tuple[tuple[str, int], ...]  # (group, bytes of its content that group holds)


@dataclass(frozen=True)
class SuggestedGroup:
    name: str  # a new group's name, or the existing group the VMs should join
    vms: tuple[str, ...]
    shared_bytes: int
    extends: bool = False  # the VMs join the policy's existing group `name`


@dataclass(frozen=True)
class Estimate:
    vms: tuple[GuestEstimate, ...]
    groups: tuple[tuple[str, int], ...]  # (group, predicted saved bytes)
    predicted_saved_bytes: int  # what KSM saves, as the kernel counts it
    split_zero_bytes: int  # what splitting huge pages frees besides (not counted by KSM)
    suggested: tuple[SuggestedGroup, ...]
    read_bytes: int
    seconds: float
    max_page_sharing: int
    use_zero_pages: bool


@dataclass
class _Sample:
    guest: Guest
    process: guestmem.Process  # its /proc/PID, held from the first read to the last
    runs: guestmem.Runs
    hashes: np.ndarray  # N x 2 uint64: the digest of each page, in reading order
    ids: np.ndarray | None = None  # N int64: each page's content as a dense id (see _number)
    apart: np.ndarray | None = None  # pages left out of the pool (changed, or split zero)
    split_zero: int = 0  # zero pages in huge pages, set apart from the pool
    volatile: int = 0

    def pool_ids(self) -> np.ndarray:
        """Its pages' content ids, without the pages set apart."""
        assert self.ids is not None
        return self.ids if self.apart is None else self.ids[~self.apart]


def estimate(
    paths: HostPaths,
    guests: Sequence[Guest],
    *,
    interval: float = 3.0,
    limit_bytes_per_second: float | None = None,
    max_page_sharing: int = 256,
    use_zero_pages: bool = False,
    progress: Callable[[int, int], None] = lambda _done, _total: None,
) -> Estimate:
    """Read, hash twice `interval` seconds apart, and predict."""
    started = time.monotonic()
    limit = guestmem.RateLimit(limit_bytes_per_second)
    with contextlib.ExitStack() as stack:
        wanted = [(guest.pid, guest.start, guest.ram_bytes) for guest in guests]
        samples = [
            _Sample(guests[index], process, runs, _NO_HASHES)
            for index, process, runs in guestmem.held_runs(paths, wanted, stack)
        ]
        total = 2 * sum(s.runs.pages for s in samples) * PAGE_SIZE  # a generous progress total
        done = [0]

        def step(count: int) -> None:
            done[0] += count
            progress(done[0], total)

        for sample in samples:
            try:
                sample.hashes = guestmem.hash_runs(
                    sample.process, sample.runs.starts, sample.runs.lengths, limit, step
                )
            except guestmem.GONE:
                sample.hashes = _NO_HASHES
        first_pass = time.monotonic()
        zero_id = _number(samples)
        _second_pass(samples, limit, step, max(0.0, interval - (first_pass - started)))
        _set_apart_huge_zero_pages(paths, samples, zero_id)
        progress(total, total)
    return _predict(samples, zero_id, max_page_sharing, use_zero_pages, done[0], started)


_NO_HASHES = np.zeros((0, 2), dtype=np.uint64)


def _number(samples: Sequence[_Sample]) -> int:
    """Give each distinct digest a dense id (0, 1, ...), once, for all that follows: counting
    and matching plain integers, not 16-byte digests. Returns the zero page's id (-1: none)."""
    every = np.concatenate([s.hashes for s in samples]) if samples else _NO_HASHES
    contents, ids = guestmem.distinct(every)
    at = 0
    for sample in samples:
        sample.ids = ids[at : at + len(sample.hashes)]
        at += len(sample.hashes)
    zero = np.flatnonzero(np.all(contents == guestmem.ZERO, axis=1))
    return int(zero[0]) if zero.size else -1


def _second_pass(
    samples: Sequence[_Sample],
    limit: guestmem.RateLimit,
    step: Callable[[int], None],
    wait: float,
) -> None:
    """Hash again the pages whose content appeared more than once; a page that changed is set
    apart from the pool."""
    counts = np.bincount(
        np.concatenate([s.ids for s in samples if s.ids is not None] or [np.zeros(0, np.int64)])
    )
    time.sleep(wait)
    for sample in samples:
        assert sample.ids is not None
        sample.apart = np.zeros(sample.ids.size, dtype=bool)
        indices = np.flatnonzero(counts[sample.ids] >= 2).astype(np.int64)
        if not indices.size:
            continue
        try:
            again = guestmem.hash_pages(sample.process, sample.runs, indices, limit, step)
        except guestmem.GONE:
            again = np.zeros((indices.size, 2), dtype=np.uint64)
        changed = indices[np.any(again != sample.hashes[indices], axis=1)]
        sample.apart[changed] = True
        sample.volatile = int(changed.size)


def _set_apart_huge_zero_pages(paths: HostPaths, samples: Sequence[_Sample], zero_id: int) -> None:
    """Zero pages that sit in transparent huge pages leave the pool: splitting frees them."""
    if zero_id < 0:
        return
    try:
        reader = PageMapReader(paths)
    except PageMapUnavailable:
        return  # no PFNs: they cannot be told apart
    try:
        for sample in samples:
            assert sample.ids is not None and sample.apart is not None
            indices = np.flatnonzero((sample.ids == zero_id) & ~sample.apart).astype(np.int64)
            if not indices.size:
                continue
            try:
                huge = guestmem.in_huge_pages(
                    sample.process, sample.runs.addresses(indices), reader
                )
            except guestmem.GONE:
                continue
            sample.apart[indices[huge]] = True
            sample.split_zero = int(huge.sum())
    finally:
        reader.close()


def _saving(copies: np.ndarray, is_zero: np.ndarray, cap: int, zero_page: bool) -> np.ndarray:
    """Pages saved by each content's copies: n - ceil(n / cap), or n for zero pages merged
    with the zero page."""
    merged = copies - np.ceil(copies / cap)
    return np.where(is_zero & zero_page, copies, merged).astype(np.float64)


def _predict(
    samples: Sequence[_Sample],
    zero_id: int,
    cap: int,
    zero_page: bool,
    read_bytes: int,
    started: float,
) -> Estimate:
    size = 1 + max(
        (int(s.ids.max()) for s in samples if s.ids is not None and s.ids.size), default=0
    )
    is_zero = np.zeros(size, dtype=bool)
    if zero_id >= 0:
        is_zero[zero_id] = True
    merging = [s.pool_ids() for s in samples if s.guest.merges]
    copies = np.bincount(np.concatenate(merging or [np.zeros(0, np.int64)]), minlength=size)
    copies = copies.astype(np.float64)
    saved = _saving(copies, is_zero, cap, zero_page)
    per_copy = np.divide(saved, copies, out=np.zeros_like(saved), where=copies > 0)
    held = {
        group: np.bincount(
            np.concatenate([s.pool_ids() for s in samples if s.guest.group == group]),
            minlength=size,
        )
        > 0
        for group in sorted({s.guest.group for s in samples if s.guest.group})
    }
    vms = []
    group_totals: dict[str, float] = {}
    for sample in samples:
        guest = sample.guest
        mine = sample.pool_ids()
        predicted = if_merged = 0.0
        if guest.merges:
            predicted = float(per_copy[mine].sum())
            if guest.group is not None:
                group_totals[guest.group] = group_totals.get(guest.group, 0.0) + predicted
        else:
            ids, counts = np.unique(mine, return_counts=True)
            base = copies[ids]
            with_it = base + counts
            zeros = is_zero[ids]
            if_merged = float(
                np.sum(
                    _saving(with_it, zeros, cap, zero_page) - _saving(base, zeros, cap, zero_page)
                )
            )
        content = mine[~is_zero[mine]]
        shares = []
        for group, present in held.items():
            others = [s for s in samples if s.guest.group == group and s is not sample]
            if not others:
                continue
            theirs = present if guest.group != group else _held_by(others, size)
            pages = int(theirs[content].sum())
            if pages:
                shares.append((group, pages * PAGE_SIZE))
        vms.append(
            GuestEstimate(
                name=guest.name,
                group=guest.group,
                merges=guest.merges,
                present_bytes=sample.runs.pages * PAGE_SIZE,
                volatile_pages=sample.volatile,
                predicted_saved_bytes=round(predicted * PAGE_SIZE),
                split_zero_bytes=sample.split_zero * PAGE_SIZE,
                if_merged_saved_bytes=round(if_merged * PAGE_SIZE),
                shares_with=tuple(sorted(shares, key=lambda item: -item[1])),
            )
        )
    return Estimate(
        vms=tuple(vms),
        groups=tuple(sorted((g, round(t * PAGE_SIZE)) for g, t in group_totals.items())),
        predicted_saved_bytes=round(float(saved.sum()) * PAGE_SIZE),
        split_zero_bytes=sum(s.split_zero for s in samples) * PAGE_SIZE,
        suggested=_suggest(samples, is_zero),
        read_bytes=read_bytes,
        seconds=time.monotonic() - started,
        max_page_sharing=cap,
        use_zero_pages=zero_page,
    )


def _held_by(samples: Sequence[_Sample], size: int) -> np.ndarray:
    return np.bincount(np.concatenate([s.pool_ids() for s in samples]), minlength=size) > 0


def _suggest(all_samples: Sequence[_Sample], is_zero: np.ndarray) -> tuple[SuggestedGroup, ...]:
    """Clusters of VMs whose non-zero content overlaps, as groups for the policy. Only VMs the
    policy lets merge are suggested (an excluded VM stays excluded whatever group it is in);
    VMs already in a group stay there: a cluster of ungrouped VMs with one existing group's VMs
    is a suggestion to join that group, one that spans two groups is left to the operator."""
    samples = [s for s in all_samples if s.guest.merges]
    distinct = []
    for sample in samples:
        ids = np.unique(sample.pool_ids())
        distinct.append(ids[~is_zero[ids]])
    parent = list(range(len(samples)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    shared: dict[tuple[int, int], int] = {}
    for i in range(len(samples)):
        for j in range(i + 1, len(samples)):
            both = int(np.isin(distinct[i], distinct[j], assume_unique=True).sum())
            smaller = min(distinct[i].size, distinct[j].size)
            if both >= max(MIN_ALIKE_PAGES, ALIKE * smaller):
                shared[(i, j)] = both
                parent[root(i)] = root(j)
    clusters: dict[int, list[int]] = {}
    for i in range(len(samples)):
        clusters.setdefault(root(i), []).append(i)
    suggested = []
    taken = {s.guest.group for s in all_samples if s.guest.group is not None}
    for members in sorted(clusters.values(), key=lambda m: min(samples[i].guest.name for i in m)):
        existing = {samples[i].guest.group for i in members} - {None}
        new = [i for i in members if samples[i].guest.group is None]
        if len(members) < 2 or not new or len(existing) > 1 or (not existing and len(new) < 2):
            continue
        names = tuple(sorted(samples[i].guest.name for i in new))
        pages = max((shared.get((a, b), 0) for a in members for b in members if a < b), default=0)
        if existing:
            (group,) = existing
            suggested.append(SuggestedGroup(str(group), names, pages * PAGE_SIZE, extends=True))
            continue
        name = _group_name(names, taken)
        taken.add(name)
        suggested.append(SuggestedGroup(name, names, pages * PAGE_SIZE))
    return tuple(suggested)


def _group_name(names: Sequence[str], taken: set[str]) -> str:
    """A name for a suggested group: the members' common prefix ("web-1", "web-2": "web"),
    else image-N."""
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    base = prefix.rstrip("-_.0123456789 ")
    # what `check` accepts of a group name: ASCII letters, digits, - and _, at most 64
    base = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "-" for c in base)
    base = base[:64].strip("-_")
    if not base or base in taken:
        number = 1
        while f"image-{number}" in taken:
            number += 1
        base = f"image-{number}"
    return base
