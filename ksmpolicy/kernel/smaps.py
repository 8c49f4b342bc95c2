"""/proc/PID/smaps, parsed once: the VMAs the scanner, the page-map walk and the estimate need.

Reading smaps walks the page tables of the whole process (its Rss lines), so callers read it
once and ask this parse everything: resident mergeable memory, whether guest RAM is mergeable,
and where the mergeable VMAs are. Parsing looks only at each VMA's header, `Rss:` and
`VmFlags:` lines (a QEMU process has a few hundred VMAs; a pass takes well under a millisecond).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Vma:
    start: int
    end: int
    perms: bytes  # "rw-p"
    rss_bytes: int
    mergeable: bool  # VmFlags has `mg` (MADV_MERGEABLE, or prctl PR_SET_MEMORY_MERGE)
    hugetlb: bool = False  # VmFlags `ht`: hugetlbfs pages, which KSM never merges
    path: bytes = b""  # what the mapping maps: "/memfd:pc.ram (deleted)", "[heap]", b""

    @property
    def shared(self) -> bool:
        """MAP_SHARED: KSM merges private anonymous pages only."""
        return self.perms[3:4] == b"s"

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Smaps:
    vmas: tuple[Vma, ...]

    def mergeable_ranges(self) -> list[tuple[int, int]]:
        """(start, end) of each mergeable VMA: KSM pages live nowhere else."""
        return [(v.start, v.end) for v in self.vmas if v.mergeable]

    def mergeable_resident(self) -> tuple[int, int]:
        """(resident bytes, VMA count) of the mergeable VMAs."""
        mergeable = [v for v in self.vmas if v.mergeable]
        return sum(v.rss_bytes for v in mergeable), len(mergeable)

    def ram_vmas(self, ram_bytes: int | None) -> list[Vma]:
        """The VMAs that hold guest RAM: those of at least half of `ram_bytes` (a guest with
        two NUMA nodes has two). QEMU's ROMs and video RAM are far smaller. A guest with more
        nodes has RAM mappings below that size: none are found, and callers say "unknown"."""
        if not ram_bytes:
            return []
        return [v for v in self.vmas if v.size >= ram_bytes // 2]

    def ram_mergeable(self, ram_bytes: int | None) -> bool | None:
        """Whether any VMA holding guest RAM is mergeable; None without a RAM size or without
        such a VMA. QEMU's small ROM regions stay mergeable when RAM is switched off, so only
        VMAs of RAM's size count."""
        ram = self.ram_vmas(ram_bytes)
        return any(v.mergeable for v in ram) if ram else None

    def guest_ranges(self, ram_bytes: int | None) -> list[tuple[int, int]]:
        """The VMAs whose pages could be merged: mergeable ones, and guest RAM whether or not
        it is mergeable now: writable, not executable (TCG's translation buffer is larger than
        RAM and executable), from half of `ram_bytes` to its size (and alignment)."""
        ranges = set(self.mergeable_ranges())
        if ram_bytes:
            for v in self.vmas:
                if (
                    v.perms[:2] == b"rw"
                    and b"x" not in v.perms
                    and ram_bytes // 2 <= v.size <= ram_bytes + (4 << 20)
                ):
                    ranges.add((v.start, v.end))
        return sorted(ranges)


def parse(data: bytes) -> Smaps:
    """The VMAs of an smaps text. Blocks that do not parse (a truncated read) are skipped."""
    vmas = []
    pos, size = 0, len(data)
    while pos < size:
        header_end = data.find(b"\n", pos)
        flags_at = data.find(b"\nVmFlags:", pos)
        if header_end < 0 or flags_at < 0:
            break
        flags_end = data.find(b"\n", flags_at + 1)
        if flags_end < 0:
            flags_end = size
        head, _, rest = data[pos:header_end].partition(b" ")
        low, _, high = head.partition(b"-")
        rss_at = data.find(b"\nRss:", header_end - 1, flags_at)
        rss_end = data.find(b"kB", rss_at, flags_at) if rss_at >= 0 else -1
        try:
            start, end = int(low, 16), int(high, 16)
            rss = int(data[rss_at + 5 : rss_end]) * 1024 if rss_end >= 0 else 0
        except ValueError:
            pos = flags_end + 1
            continue
        flags = data[flags_at + 9 : flags_end].split()
        fields = rest.split(None, 4)
        path = fields[4].strip() if len(fields) == 5 else b""
        vmas.append(Vma(start, end, rest[:4], rss, b"mg" in flags, b"ht" in flags, path))
        pos = flags_end + 1
    return Smaps(tuple(vmas))
