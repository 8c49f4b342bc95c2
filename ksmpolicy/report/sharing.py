"""Who shares what with whom: exact per-VM savings and the sharing map, from a page-map walk.

* **Savings.** A KSM page mapped m times saves m - 1 pages. Each mapping is credited
  (m - 1) / m, so the per-VM figures add up to the kernel's `pages_sharing` (ksm_stat's
  `ksm_process_profit` gives every mapper the whole saving: two VMs sharing 32 MiB each
  "save" 32 MiB). Zero pages merged with the kernel's zero page (`use_zero_pages=1`) are no
  KSM pages; they come from ksm_stat's per-process `ksm_zero_pages` and are counted apart.
* **Pairs.** For every pair of VMs, and of groups: the KSM pages both map. One copy of each
  such page serves both, so `saved_bytes` of a pair is one page per shared KSM page: what
  merging between the two saves. KSM pages that hold only zeros merge across every group;
  they are counted apart (`zero_pages`) so that they never read as two groups booting the
  same image.
* **How.** KSM pages are grouped by the set of VMs that map them (a bit mask per page, one
  `numpy.unique` over the masks); each distinct set adds its page count to all of its pairs.
  The cost follows the number of distinct sharing sets, not the square of the VMs.

Findings (thresholds below): a VM in a group that shares almost nothing with its group; a VM
outside every group that shares a lot with one; two groups that share a lot (they boot the
same image); groups of different trust domains that share pages at all.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ksmpolicy.kernel.pagemap import U64, PageMap, PageMapReader
from ksmpolicy.kernel.pagemap import zero_pfns as zero_pfns_of
from ksmpolicy.paths import PAGE_SIZE, HostPaths
from ksmpolicy.report.finding import Finding

NO_GROUP = "-"
# Findings' thresholds, as shares of a VM's present pages (and a floor in pages).
ALONE_IN_GROUP = 0.01  # shares less than this with its own group
BELONGS_TO_GROUP = 0.10  # an ungrouped VM sharing at least this with one group
GROUPS_ALIKE = 0.10  # two groups sharing this much of the smaller one's KSM pages
FLOOR_PAGES = 256  # 1 MiB: below this nothing is worth a finding


@dataclass(frozen=True)
class Party:
    """A VM (or another KSM user) as the map labels it."""

    pid: int
    name: str
    group: str | None
    domain: str = "default"
    kind: str = "qemu"


@dataclass(frozen=True)
class VmShare:
    name: str
    pid: int
    group: str | None
    domain: str
    kind: str
    saved_bytes: int  # exact: KSM credits plus zero pages merged with the zero page
    ksm_saved_bytes: int
    zero_bytes: int  # ksm_stat's ksm_zero_pages
    ksm_pages: int  # distinct KSM pages it maps
    present_pages: int
    shared_with_group_pages: int  # content KSM pages it shares with other VMs of its group


@dataclass(frozen=True)
class PairShare:
    a: str
    b: str
    shared_pages: int  # KSM pages with content both map
    zero_pages: int  # all-zero KSM pages both map
    # the two processes of a VM pair (names need not be unique); None for group pairs
    a_pid: int | None = None
    b_pid: int | None = None

    @property
    def saved_bytes(self) -> int:
        return self.shared_pages * PAGE_SIZE


@dataclass(frozen=True)
class Sharing:
    vms: tuple[VmShare, ...]
    pairs: tuple[PairShare, ...]  # VM pairs that share anything, a < b in `vms` order
    group_pairs: tuple[PairShare, ...]  # group pairs (a group with itself: within the group)
    pages_sharing: int | None
    ksm_zero_pages: int | None
    findings: tuple[Finding, ...]
    seconds: float
    exited: tuple[int, ...] = ()
    # KSM pages mapped by parties of two or more trust domains: content, and zero-filled ones
    cross_domain_pages: int = 0
    cross_domain_zero_pages: int = 0


def share(
    pagemap: PageMap,
    parties: Sequence[Party],
    *,
    zero_pfns: set[int] | frozenset[int] = frozenset(),
    zero_pages: dict[int, int] | None = None,
    ksm_zero_pages: int | None = None,
) -> Sharing:
    """The sharing map of `parties` (their pids must have been walked, or exited meanwhile).

    `zero_pfns`: the KSM pages known to hold only zeros; `zero_pages`: ksm_stat's
    ksm_zero_pages per pid.
    """
    alive = [p for p in parties if p.pid in pagemap.processes]
    zero_pages = zero_pages or {}
    zero_array = np.fromiter(sorted(zero_pfns), np.uint64, len(zero_pfns))
    vm_matrix, zero_matrix = _pair_counts(pagemap, [p.pid for p in alive], zero_array)
    groups = sorted({p.group or NO_GROUP for p in alive})
    group_index = {g: i for i, g in enumerate(groups)}
    membership = np.array([group_index[p.group or NO_GROUP] for p in alive], dtype=np.int64)
    group_content, group_zero = _group_counts(pagemap, alive, membership, len(groups), zero_array)
    members = _members_per_page(pagemap, alive)

    vms = []
    for party in alive:
        process = pagemap.processes[party.pid]
        credit = pagemap.saved_pages(party.pid)
        zeros = zero_pages.get(party.pid, 0)
        with_group = _shared_with_group(process.ksm_pfns, members.get(party.group), zero_array)
        vms.append(
            VmShare(
                name=party.name,
                pid=party.pid,
                group=party.group,
                domain=party.domain,
                kind=party.kind,
                saved_bytes=round((credit + zeros) * PAGE_SIZE),
                ksm_saved_bytes=round(credit * PAGE_SIZE),
                zero_bytes=zeros * PAGE_SIZE,
                ksm_pages=int(process.ksm_pfns.size),
                present_pages=process.present_pages,
                shared_with_group_pages=with_group,
            )
        )
    pairs = tuple(
        PairShare(
            alive[i].name,
            alive[j].name,
            int(vm_matrix[i, j]),
            int(zero_matrix[i, j]),
            alive[i].pid,
            alive[j].pid,
        )
        for i in range(len(alive))
        for j in range(i + 1, len(alive))
        if vm_matrix[i, j] or zero_matrix[i, j]
    )
    group_pairs = tuple(
        PairShare(groups[i], groups[j], int(group_content[i, j]), int(group_zero[i, j]))
        for i in range(len(groups))
        for j in range(i, len(groups))
        if group_content[i, j] or group_zero[i, j]
    )
    findings = _findings(vms, alive, vm_matrix, groups, group_content)
    cross, cross_zero = _cross_domain(pagemap, alive, zero_array)
    return Sharing(
        tuple(vms),
        pairs,
        group_pairs,
        pagemap.pages_sharing,
        ksm_zero_pages,
        tuple(findings),
        pagemap.seconds,
        tuple(pagemap.exited),
        cross,
        cross_zero,
    )


def _cross_domain(pagemap: PageMap, parties: Sequence[Party], zero: U64) -> tuple[int, int]:
    """KSM pages mapped by parties of at least two trust domains: (content, zero)."""
    domains = sorted({p.domain for p in parties})
    if len(domains) < 2:
        return 0, 0
    index = {d: i for i, d in enumerate(domains)}
    labels = [(p.pid, index[p.domain]) for p in parties]
    distinct, counts, words = _signatures(pagemap, labels, zero)
    content = zeros = 0
    for row, pages in zip(distinct, counts.tolist(), strict=True):
        if sum(int(row[w]).bit_count() for w in range(words)) >= 2:
            if row[words]:
                zeros += pages
            else:
                content += pages
    return content, zeros


def _signatures(
    pagemap: PageMap, labels: Sequence[tuple[int, int]], zero: U64
) -> tuple[np.ndarray, np.ndarray, int]:
    """For every KSM page any labelled process maps: a bit mask of the labels (groups or VMs)
    mapping it, and whether it is a zero page. `labels`: (pid, label index). Returns the
    distinct (mask words..., zero) rows, their page counts, and the number of mask words."""
    count = max((label for _pid, label in labels), default=-1) + 1
    words = max(1, (count + 63) // 64)
    pfn_parts = []
    label_parts = []
    for pid, label in labels:
        pfns = pagemap.processes[pid].ksm_pfns
        pfn_parts.append(pfns)
        label_parts.append(np.full(pfns.size, label, dtype=np.int64))
    if not pfn_parts or not sum(p.size for p in pfn_parts):
        return np.zeros((0, words + 1), np.uint64), np.zeros(0, np.int64), words
    pfns = np.concatenate(pfn_parts)
    owners = np.concatenate(label_parts)
    order = np.argsort(pfns, kind="stable")
    pfns, owners = pfns[order], owners[order]
    starts = np.concatenate(([0], np.flatnonzero(np.diff(pfns)) + 1))
    rows = np.zeros((starts.size, words + 1), dtype=np.uint64)
    for word in range(words):
        in_word = (owners // 64) == word
        bits = np.where(in_word, np.left_shift(np.uint64(1), (owners % 64).astype(np.uint64)), 0)
        rows[:, word] = np.bitwise_or.reduceat(bits.astype(np.uint64), starts)
    rows[:, words] = np.isin(pfns[starts], zero).astype(np.uint64)
    distinct, counts = np.unique(rows, axis=0, return_counts=True)
    return distinct, counts.astype(np.int64), words


def _members(row: np.ndarray, words: int) -> np.ndarray:
    found = []
    for word in range(words):
        value = int(row[word])
        while value:
            low = value & -value
            found.append(word * 64 + low.bit_length() - 1)
            value ^= low
    return np.array(found, dtype=np.int64)


def _matrices(
    distinct: np.ndarray, counts: np.ndarray, words: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    content = np.zeros((size, size), dtype=np.int64)
    zero = np.zeros((size, size), dtype=np.int64)
    for row, pages in zip(distinct, counts.tolist(), strict=True):
        members = _members(row, words)
        target = zero if row[words] else content
        target[np.ix_(members, members)] += pages
    return content, zero


def _pair_counts(pagemap: PageMap, pids: Sequence[int], zero: U64) -> tuple[np.ndarray, np.ndarray]:
    distinct, counts, words = _signatures(pagemap, [(pid, i) for i, pid in enumerate(pids)], zero)
    return _matrices(distinct, counts, words, len(pids))


def _group_counts(
    pagemap: PageMap, parties: Sequence[Party], membership: np.ndarray, size: int, zero: U64
) -> tuple[np.ndarray, np.ndarray]:
    labels = [(p.pid, int(membership[i])) for i, p in enumerate(parties)]
    distinct, counts, words = _signatures(pagemap, labels, zero)
    content, zeros = _matrices(distinct, counts, words, size)
    # A group's own diagonal counts pages two of its VMs share, not pages one VM maps alone.
    for g in range(size):
        members = [p.pid for i, p in enumerate(parties) if membership[i] == g]
        content[g, g], zeros[g, g] = _within(pagemap, members, zero)
    return content, zeros


def _within(pagemap: PageMap, pids: Sequence[int], zero: U64) -> tuple[int, int]:
    """KSM pages mapped by at least two of `pids`: (content, zero)."""
    if len(pids) < 2:
        return 0, 0
    pfns = np.concatenate([pagemap.processes[pid].ksm_pfns for pid in pids])
    unique, counts = np.unique(pfns, return_counts=True)
    shared = unique[counts >= 2]
    is_zero = np.isin(shared, zero)
    return int((~is_zero).sum()), int(is_zero.sum())


def _members_per_page(
    pagemap: PageMap, parties: Sequence[Party]
) -> dict[str | None, tuple[U64, np.ndarray]]:
    """For each group: its VMs' KSM pages (sorted) and how many of its VMs map each. (A
    process lists each of its KSM pages once, so the count is of VMs, not mappings.)"""
    found: dict[str | None, tuple[U64, np.ndarray]] = {}
    for group in {p.group for p in parties if p.group is not None}:
        pfns = [pagemap.processes[p.pid].ksm_pfns for p in parties if p.group == group]
        unique, counts = np.unique(np.concatenate(pfns), return_counts=True)
        found[group] = (unique, counts)
    return found


def _shared_with_group(mine: U64, group: tuple[U64, np.ndarray] | None, zero: U64) -> int:
    """Content KSM pages a VM shares with another VM of its group: those of its pages that
    two or more of the group's VMs map. One lookup per page, whatever the group's size."""
    if group is None or not mine.size:
        return 0
    unique, counts = group
    where = np.searchsorted(unique, mine)
    shared = mine[counts[np.minimum(where, unique.size - 1)] >= 2]
    return int((~np.isin(shared, zero)).sum())


def _findings(
    vms: Sequence[VmShare],
    parties: Sequence[Party],
    vm_matrix: np.ndarray,
    groups: Sequence[str],
    group_content: np.ndarray,
) -> list[Finding]:
    """What the map says about the groups: VMs in the wrong group or in none, groups that boot
    the same image, groups of two trust domains that share pages."""
    found = []
    for i, vm in enumerate(vms):
        if vm.kind == "qemu" and vm.present_pages:
            found += _vm_group_findings(i, vm, parties, vm_matrix)
    domain_of = {p.group or NO_GROUP: p.domain for p in parties}
    for a, b in itertools.combinations(range(len(groups)), 2):
        pages = int(group_content[a, b])
        if pages and NO_GROUP not in (groups[a], groups[b]):
            alike = min(int(group_content[a, a]), int(group_content[b, b])) or pages
            found += _group_pair_findings(groups[a], groups[b], pages, alike, domain_of)
    return found


def _vm_group_findings(
    i: int, vm: VmShare, parties: Sequence[Party], vm_matrix: np.ndarray
) -> list[Finding]:
    mib = PAGE_SIZE / 2**20
    if vm.group is not None:
        members = [j for j, p in enumerate(parties) if j != i and p.group == vm.group]
        alone = vm.shared_with_group_pages < max(FLOOR_PAGES, ALONE_IN_GROUP * vm.present_pages)
        if not (members and alone):
            return []
        shared = vm.shared_with_group_pages * mib
        what = f"in group {vm.group} but shares only {shared:.1f} MiB with it"
        fix = "check its image: it may belong to another group, or to none"
        return [Finding("info", vm.name, what, fix, "group-alone")]
    best: tuple[int, str] | None = None
    for group in {p.group for p in parties if p.group is not None}:
        pages = sum(int(vm_matrix[i, j]) for j, p in enumerate(parties) if p.group == group)
        if best is None or pages > best[0]:
            best = (pages, group)
    if not best or best[0] < max(FLOOR_PAGES, BELONGS_TO_GROUP * vm.present_pages):
        return []
    what = f"in no group, but shares {best[0] * mib:.1f} MiB with group {best[1]}"
    fix = f"add it to group {best[1]} in the policy (names: or images:)"
    return [Finding("info", vm.name, what, fix, "group-suggested")]


def _group_pair_findings(
    a: str, b: str, pages: int, smaller: int, domain_of: dict[str, str]
) -> list[Finding]:
    mib = PAGE_SIZE / 2**20
    if domain_of.get(a) != domain_of.get(b):
        what = (
            f"groups {a} ({domain_of[a]}) and {b} ({domain_of[b]}) share {pages * mib:.1f} MiB "
            "across trust domains"
        )
        fix = "put them in one domain, or keep the domains from merging together"
        return [Finding("error", None, what, fix, "cross-domain-groups")]
    if pages < max(FLOOR_PAGES, GROUPS_ALIKE * smaller):
        return []
    what = f"groups {a} and {b} share {pages * mib:.1f} MiB: they probably boot the same image"
    return [Finding("info", None, what, "merge them into one group", "groups-alike")]


def measure(
    paths: HostPaths,
    parties: Sequence[Party],
    *,
    zero_pages: dict[int, int] | None = None,
    ksm_zero_pages: int | None = None,
    ranges: Mapping[int, Sequence[tuple[int, int]]] | None = None,
) -> Sharing:
    """Walk the parties' page tables and build their sharing map (root). Raises
    PageMapUnavailable (with the reason) when this host or user cannot read the page map.
    `ranges` gives the parties' mergeable VMAs when the caller has just read their smaps.

    Zero pages are told apart by reading one mapper's copy of each KSM page that VMs of more
    than one group or trust domain map (a zero page merges across every group; that is where
    it matters).
    """
    with PageMapReader(paths) as reader:
        pagemap = reader.walk([p.pid for p in parties], ranges)
    by_group: dict[tuple[str, str], list[U64]] = {}  # by group and trust domain
    for party in parties:
        process = pagemap.processes.get(party.pid)
        if process is not None:
            key = (party.group or NO_GROUP, party.domain)
            by_group.setdefault(key, []).append(process.ksm_pfns)
    unions = [np.unique(np.concatenate(parts)) for parts in by_group.values()]
    if len(unions) > 1:
        every, times = np.unique(np.concatenate(unions), return_counts=True)
        crossing = every[times >= 2].tolist()
    else:
        crossing = []
    zeros = zero_pfns_of(paths, pagemap, crossing)
    return share(
        pagemap, parties, zero_pfns=zeros, zero_pages=zero_pages, ksm_zero_pages=ksm_zero_pages
    )
