"""The fleet-wide questions, on plan.py's model of what a VM saves on a host: the migrations
that would save the most (`rebalance`), and every VM's best other host (`best_hosts`).

`rebalance` is greedy: each move is the one with the largest gain given the moves before it
(ties: the VM first in the sketches' order, then the host first). Weighing every VM on every
host at each step costs about 0.05 s per VM at a thousand hosts, so a plan does not:

* **A bound on each VM's gain.** A VM can save at most its own repeated contents, its zero
  pages and every content that another VM of its domain that may merge holds, wherever that
  VM is (`limits`); its gain is at most that less what it saves where it runs. The VMs are
  weighed in the order of that bound, and a step stops at the first VM whose bound cannot beat
  the best move found (or the minimum gain). On a fleet of similar VMs almost every VM saves
  where it runs nearly all it could, and only the few that do not are weighed.
* **Moves correct the index, not rebuild it.** A VM is weighed against its domain's
  `DomainIndex` as the plan began, corrected by the moves so far: a moved VM's contents leave
  its source and arrive on its target (`_corrected`).
* **What a VM saves where it runs** is kept, and recomputed after a move only for the VMs of
  the moved VM's domain on the two hosts the move touched.

The bounds of a fleet index are computed when it is built (fleetindex.py); from sketches, when
the plan begins (`Fleet.of`). Both give the same plan as weighing everything
(tests/placement/test_rebalance_model.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from ksmpolicy.paths import PAGE_SIZE
from ksmpolicy.placement.holders import DamagedHolders, DomainIndex, Positions, Slots, held_counts
from ksmpolicy.placement.plan import check_comparable, saving, zero_saving
from ksmpolicy.placement.sketch import DomainUnion, HostSketch, VmSketch
from ksmpolicy.quoting import quote, shell_command

Pages = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Move:
    vm: VmSketch
    source: str
    target: str
    gain_bytes: int  # fleet savings added by this move

    def command(self) -> str:
        """The migration as one command line to paste. The VM is named by what its operator
        controls (libvirt: its UUID, Proxmox VE: its VMID), never by its name, which a tenant
        may choose; the sketch's reader checked both, and the host names."""
        vm = self.vm
        if vm.platform == "proxmox" and vm.vmid:
            words = ["qm", "migrate", vm.vmid, self.target, "--online"]
        elif vm.platform == "libvirt" and vm.uuid:
            host = f"[{self.target}]" if ":" in self.target else self.target
            words = ["virsh", "migrate", "--live", "--persistent", "--domain", vm.uuid]
            words += ["--desturi", f"qemu+ssh://{host}/system"]
        else:
            return f"# {quote(vm.name)}: no UUID or VMID in its sketch: migrate it by hand"
        line = shell_command(*words)
        return line if line is not None else f"# {quote(vm.name)}: cannot be pasted"


@dataclass(frozen=True)
class Best:
    """For schedulers: a VM's best other host (None: none fits) and what moving there gains."""

    vm: str
    uuid: str | None
    vmid: str | None
    domain: str
    host: str  # where it runs now
    saved_bytes: int  # what it saves there now
    best_host: str | None
    gain_bytes: int  # saved on the best host minus saved now (may be negative)


@dataclass(frozen=True)
class Fleet:
    """What a plan starts from: the hosts (their VMs may be figures only: `whole` gives a VM
    with its contents), per trust domain what each host's merging VMs hold (`domain`), and
    for each VM in the sketches' order the most it could save on any host and what it saves
    where it runs now, in pages (`limits`)."""

    hosts: tuple[HostSketch, ...]
    whole: Callable[[VmSketch], VmSketch]
    domain: Callable[[str], DomainIndex]
    most: Pages
    here: Pages

    @classmethod
    def of(cls, hosts: Sequence[HostSketch]) -> Fleet:
        """From sketches read whole (their values in memory)."""
        check_comparable(hosts)
        indexes: dict[str, DomainIndex] = {}

        def domain(name: str) -> DomainIndex:
            if name not in indexes:
                indexes[name] = DomainIndex.of(hosts, name)
            return indexes[name]

        most, here = limits(hosts, domain)
        return cls(tuple(hosts), lambda vm: vm, domain, most, here)


def limits(
    hosts: Sequence[HostSketch], domain: Callable[[str], DomainIndex]
) -> tuple[Pages, Pages]:
    """For each VM of `hosts` (whole), in order: the most it could save on any host (its own
    repeats, its zero pages, and each content another VM of its domain that may merge holds
    anywhere; nothing for a VM the policy excludes), and what it saves where it runs now."""
    k = hosts[0].k
    count = sum(len(host.vms) for host in hosts)
    most, here = np.zeros(count, np.int64), np.zeros(count, np.int64)
    holding: dict[str, DomainUnion] = {}
    number = 0
    for host in hosts:
        for vm in host.vms:
            if vm.merges:
                if vm.domain not in holding:
                    holding[vm.domain] = _holding(hosts, vm.domain, domain(vm.domain))
                weights, _held, own = vm.terms(k)
                shared = holding[vm.domain].there(vm, member=True)  # another VM holds it
                most[number] = own + int(weights[shared].sum()) + vm.zero_pages
                here[number] = _saved_here(vm, k, host, host.union(vm.domain))
            number += 1
    return most, here


def _holding(hosts: Sequence[HostSketch], name: str, index: DomainIndex) -> DomainUnion:
    """The domain's union over the fleet: each content (sorted) and how many of its VMs that
    may merge hold it, as far as `>= 2` needs: those that merge now, from the index (it keeps
    only the contents two or more hold, or one and a VM that does not merge now: one VM's
    alone count 0 here), and those that do not merge now, from their sketches."""
    values, holders = np.asarray(index.values), np.asarray(index.holders)
    if values.size:
        starts = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))
        values, holders = values[starts], np.add.reduceat(holders.astype(np.int64), starts)
    idle = [
        vm.values
        for host in hosts
        for vm in host.vms
        if vm.domain == name and vm.merges and not vm.active and vm.values.size
    ]
    if idle:
        more, counts = np.unique(np.concatenate(idle), return_counts=True)
        every = np.concatenate((values, more))
        order = np.argsort(every, kind="stable")
        every, summed = every[order], np.concatenate((holders, counts))[order]
        starts = np.flatnonzero(np.concatenate(([True], every[1:] != every[:-1])))
        values, holders = every[starts], np.add.reduceat(summed, starts)
    return DomainUnion(values, holders.astype(np.int64))


def _saved_here(vm: VmSketch, k: int, host: HostSketch, union: DomainUnion) -> int:
    """What a VM saves where it runs: nothing unless it merges now (`union`: what its
    domain's VMs that merge there hold, itself among them)."""
    return saving(vm, k, host, union.there(vm, member=True))[0] if vm.active else 0


@dataclass(frozen=True)
class _Moved:
    number: int
    vm: VmSketch  # whole
    source: int
    merged_there: bool  # it merged on its source
    target: int
    merges_there: bool  # it merges on its target


class Planner:
    """A fleet while a plan is made: where each VM is (by its number, its place in the
    sketches' order), each host's memory left, which domain merges where, what each VM saves
    where it runs, and what each VM weighed would save on each host until a move changes it."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.k = fleet.hosts[0].k
        self.views = list(fleet.hosts)
        self.vms = [vm for host in fleet.hosts for vm in host.vms]
        self.home = [slot for slot, host in enumerate(fleet.hosts) for _ in host.vms]
        self.members: list[list[int]] = [[] for _ in fleet.hosts]
        for number, slot in enumerate(self.home):
            self.members[slot].append(number)
        self.active = [vm.active for vm in self.vms]
        self.available = np.array([h.mem_available_bytes for h in fleet.hosts], np.int64)
        self.here = fleet.here.copy()
        self.moved: set[int] = set()
        self._moves: dict[str, list[_Moved]] = {}
        self._whole: dict[int, VmSketch] = {}
        self._there: dict[int, Pages] = {}
        self.weighed = 0  # VMs weighed on every host (each costs a look-up in the index)

    def vm(self, number: int) -> VmSketch:
        """The VM whole (with its contents)."""
        if number not in self._whole:
            self._whole[number] = self.fleet.whole(self.vms[number])
        return self._whole[number]

    def there(self, number: int) -> Pages:
        """Pages the VM would save on each host if it moved there (where it runs: what it
        saves now, which must be what the plan knows it saves: else the index is damaged)."""
        if number in self._there:
            return self._there[number]
        vm, home = self.vm(number), self.home[number]
        self.weighed += 1
        out = np.zeros(len(self.views), np.int64)
        if vm.merges:
            ones, k_times = self._held(number, vm)
            own = vm.terms(self.k)[2]
            for slot, view in enumerate(self.views):
                merging = self.active[number] if slot == home else view.would_merge(vm) is None
                if merging:
                    sampled = own + int(ones[slot]) + self.k * int(k_times[slot])
                    out[slot] = sampled + zero_saving(vm.zero_pages, view)
        if out[home] != self.here[number]:
            raise DamagedHolders(
                f"vm_here: {quote(vm.name)} saves {self.here[number]} pages where it runs by "
                f"its figures, {out[home]} by its contents"
            )
        self._there[number] = out
        return out

    def _held(self, number: int, vm: VmSketch) -> tuple[Pages, Pages]:
        """`DomainIndex.held` for the VM, with the moves so far."""
        holders: npt.NDArray[np.integer]
        which, where, holders = self.fleet.domain(vm.domain).entries(vm, len(self.views))
        moves = [m for m in self._moves.get(vm.domain, ()) if m.number != number]
        if moves:
            which, where, holders = _corrected(vm, which, where, holders, moves, len(self.views))
        return held_counts(vm, which, where, holders, self.home[number], len(self.views))

    def best_move(self, reserve_bytes: int, min_gain_bytes: int) -> Move | None:
        """The move that gains the most now, weighing the VMs in the order of their bound."""
        bound = (self.fleet.most - self.here) * PAGE_SIZE
        order = np.lexsort((np.arange(bound.size), -bound))
        best: tuple[int, int, int] | None = None  # gain, VM, target
        for number in order.tolist():
            limit = int(bound[number])
            if limit < min_gain_bytes or (best is not None and limit < best[0]):
                break
            if best is not None and limit == best[0] and number > best[1]:
                continue  # it could only tie, and comes later
            if number in self.moved or not self.vms[number].merges:
                continue
            found = self._best_target(number, reserve_bytes, min_gain_bytes)
            if found is not None and (
                best is None or found[0] > best[0] or (found[0] == best[0] and number < best[1])
            ):
                best = (found[0], number, found[1])
        if best is None:
            return None
        gain, number, target = best
        source = self.home[number]
        self._move(number, target)
        return Move(self.vm(number), self.views[source].host, self.views[target].host, gain)

    def _best_target(
        self, number: int, reserve_bytes: int, min_gain_bytes: int
    ) -> tuple[int, int] | None:
        """(gain, host) of the VM's best move that fits and gains enough, the first host of
        the largest gain; None: none."""
        there = self.there(number)
        gains = (there - self.here[number]) * PAGE_SIZE
        costs = (self.vms[number].present_pages - there) * PAGE_SIZE
        allowed = (self.available - costs >= reserve_bytes) & (gains >= min_gain_bytes)
        allowed[self.home[number]] = False
        if not allowed.any():
            return None
        target = int(np.argmax(np.where(allowed, gains, np.iinfo(np.int64).min)))
        return int(gains[target]), target

    def best_other(self, number: int, reserve_bytes: int) -> Best:
        """The VM's other host where it would save the most and fits (for `best_hosts`)."""
        vm, home = self.vms[number], self.home[number]
        there = self.there(number)
        costs = (vm.present_pages - there) * PAGE_SIZE
        fits = self.available - costs >= reserve_bytes
        fits[home] = False
        target = int(np.argmax(np.where(fits, there, -1))) if fits.any() else None
        here = int(self.here[number])
        return Best(
            vm=vm.name,
            uuid=vm.uuid,
            vmid=vm.vmid,
            domain=vm.domain,
            host=self.views[home].host,
            saved_bytes=here * PAGE_SIZE,
            best_host=None if target is None else self.views[target].host,
            gain_bytes=0 if target is None else (int(there[target]) - here) * PAGE_SIZE,
        )

    def _move(self, number: int, target: int) -> None:
        """Move a VM: it merges there if its domain may (and then, if none merged there, its
        domain becomes the one that does)."""
        vm, source = self.vm(number), self.home[number]
        self.available[target] -= (vm.present_pages - int(self.there(number)[target])) * PAGE_SIZE
        self.available[source] += (vm.present_pages - int(self.here[number])) * PAGE_SIZE
        merges = self.views[target].would_merge(vm) is None
        took_over = self.views[target].active_domains == () and merges
        if took_over:
            self.views[target] = replace(self.views[target], active_domains=(vm.domain,))
        moved = _Moved(number, vm, source, self.active[number], target, merges)
        self._moves.setdefault(vm.domain, []).append(moved)
        self.members[source].remove(number)
        self.members[target].append(number)
        self.home[number], self.active[number] = target, merges
        self.moved.add(number)
        for slot in (source, target):
            self._here_on(slot, vm.domain)
        for other in list(self._there):
            if took_over or self.vms[other].domain == vm.domain:
                del self._there[other]

    def _here_on(self, slot: int, domain: str) -> None:
        """What each VM of `domain` on a host saves there, after a move."""
        numbers = [n for n in self.members[slot] if self.vms[n].domain == domain]
        union = DomainUnion.of([self.vm(n) for n in numbers if self.active[n]])
        for n in numbers:
            one = replace(self.vm(n), active=self.active[n])
            self.here[n] = _saved_here(one, self.k, self.views[slot], union)


def _corrected(
    vm: VmSketch,
    which: Positions,
    where: Slots,
    holders: npt.NDArray[np.integer],
    moves: Sequence[_Moved],
    hosts: int,
) -> tuple[Positions, Slots, npt.NDArray[np.int64]]:
    """A VM's entries in its domain's index as the plan began, corrected by the moves so far:
    each content it shares with a moved VM has one holder less on the moved VM's source (if
    it merged there) and one more on its target (if it merges there)."""
    keys, changes = [], []
    for m in moves:
        _common, mine, _theirs = np.intersect1d(
            vm.values, m.vm.values, assume_unique=True, return_indices=True
        )
        for slot, counted, step in (
            (m.source, m.merged_there, -1),
            (m.target, m.merges_there, 1),
        ):
            if counted and mine.size:
                keys.append(mine.astype(np.int64) * hosts + slot)
                changes.append(np.full(mine.size, step, np.int64))
    counts = holders.astype(np.int64)
    if not keys:
        return which, where, counts
    every, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    change = np.bincount(inverse, weights=np.concatenate(changes)).astype(np.int64)
    existing = which.astype(np.int64) * hosts + where  # sorted: by position, then slot
    at = np.minimum(np.searchsorted(existing, every), max(existing.size - 1, 0))
    found = (existing[at] == every) if existing.size else np.zeros(every.size, bool)
    counts[at[found]] += change[found]
    new = ~found
    which = np.concatenate((which, (every[new] // hosts).astype(which.dtype)))
    where = np.concatenate((where, (every[new] % hosts).astype(where.dtype)))
    return which, where, np.concatenate((counts, change[new]))


def rebalance(
    hosts: Sequence[HostSketch] | Fleet,
    *,
    max_moves: int = 5,
    reserve_bytes: int = 0,
    min_gain_bytes: int = 64 * 2**20,
) -> list[Move]:
    """Migrations that raise the fleet's savings the most, one at a time (greedy): each move is
    the one with the largest gain given the moves before it, never across trust domains (each
    VM keeps its domain and shares only with its own), never leaving a host below the reserve,
    and each gains at least `min_gain_bytes`. A VM moves at most once."""
    planner = Planner(hosts if isinstance(hosts, Fleet) else Fleet.of(hosts))
    moves: list[Move] = []
    while len(moves) < max_moves:
        best = planner.best_move(reserve_bytes, min_gain_bytes)
        if best is None:
            break
        moves.append(best)
    return moves


def best_hosts(hosts: Sequence[HostSketch] | Fleet, *, reserve_bytes: int = 0) -> list[Best]:
    """Every VM that may merge, with the other host where it would save the most and fits
    (headroom after the move at least the reserve). Weighs every VM on every host."""
    planner = Planner(hosts if isinstance(hosts, Fleet) else Fleet.of(hosts))
    return [
        planner.best_other(number, reserve_bytes)
        for number, vm in enumerate(planner.vms)
        if vm.merges
    ]
