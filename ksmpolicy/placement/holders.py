"""Who holds each sampled content across a fleet, for one trust domain: one array sorted by
value of every host's union (what the domain's VMs that merge there hold, and how many of them
hold each), which answers for one VM and every host at once. `rebalance` builds one per domain
when it plans on sketches (rebalance.py); the fleet index (fleetindex.py) keeps them on disk,
built once, for `place --index` and `rebalance --index`.

Only the contents that two or more of the domain's VMs hold (or that a VM holds which may
merge but does not now, and may move) are kept: a content one VM alone holds is no other VM's
to share, and that is most of a fleet's contents.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ksmpolicy.placement.sketch import HostSketch, Values, VmSketch

Slots = npt.NDArray[np.int32]
Positions = npt.NDArray[np.intp]  # of values among one VM's


@dataclass(frozen=True)
class DomainIndex:
    """Sorted by value: each host's union's values, the host's slot (its position in the
    hosts the index was made of) and how many of its VMs of the domain that merge hold it."""

    values: Values
    hosts: Slots
    holders: Slots

    @classmethod
    def of(cls, views: Iterable[HostSketch], domain: str) -> DomainIndex:
        views = list(views)
        unions = [view.union(domain) for view in views]
        values = np.concatenate([u.values for u in unions])
        hosts = np.concatenate([np.full(u.values.size, i, np.int32) for i, u in enumerate(unions)])
        holders = np.concatenate([u.holders for u in unions]).astype(np.int32)
        order = np.argsort(values, kind="stable")
        values, hosts, holders = values[order], hosts[order], holders[order]
        # The unions count only VMs that merge now; one that may merge but does not (its
        # domain does not merge where it is) may move, and share what it holds.
        if values.size:
            starts = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))
            alone = np.add.reduceat(holders, starts) == 1
            idle = [
                vm.values
                for view in views
                for vm in view.vms
                if vm.domain == domain and vm.merges and not vm.active
            ]
            if idle:
                alone &= ~np.isin(values[starts], np.concatenate(idle))
            keep = np.repeat(~alone, np.diff(np.append(starts, values.size)))
            values, hosts, holders = values[keep], hosts[keep], holders[keep]
        return cls(values, hosts, holders)

    def entries(self, vm: VmSketch, hosts: int) -> tuple[Positions, Slots, Slots]:
        """Every (value of the VM, host) the index holds: the value's position among the VM's,
        the host's slot and how many VMs there hold it; sorted by position, then slot. An
        index read from disk is checked here, where it is used: a slot outside the `hosts` it
        was made of, or a count below one, is `DamagedHolders`."""
        low = np.searchsorted(self.values, vm.values, "left")
        count = np.searchsorted(self.values, vm.values, "right") - low
        which = np.repeat(np.arange(vm.values.size), count)
        first = np.cumsum(count) - count
        at = np.repeat(low - first, count) + np.arange(which.size)
        where, holders = np.asarray(self.hosts[at]), np.asarray(self.holders[at])
        if where.size and (int(where.min()) < 0 or int(where.max()) >= hosts):
            raise DamagedHolders(f"held_hosts: a slot outside the {hosts} hosts")
        if holders.size and int(holders.min()) < 1:
            raise DamagedHolders("held_holders: a content held by no VM")
        return which, where, holders

    def there(self, vm: VmSketch, home: int, hosts: int) -> npt.NDArray[np.bool_]:
        """For each host (a row), which of the VM's values another VM of its domain that merges
        there holds: what `plan.saving` takes; on `home`, a VM besides it."""
        which, where, holders = self.entries(vm, hosts)
        other = by_others(where, holders, home)
        found = np.zeros((hosts, vm.values.size), dtype=bool)
        found[where[other], which[other]] = True
        return found


class DamagedHolders(ValueError):
    """A `DomainIndex` whose entries cannot be what was written (read from a damaged index)."""


def by_others(where: Slots, holders: npt.NDArray[np.integer], home: int) -> npt.NDArray[np.bool_]:
    """Which entries another VM holds: on the VM's own host (where it runs, and is one of the
    holders when it merges) a second holder is needed."""
    found: npt.NDArray[np.bool_] = ((where != home) & (holders >= 1)) | (holders >= 2)
    return found


def held_counts(
    vm: VmSketch,
    which: Positions,
    where: Slots,
    holders: npt.NDArray[np.integer],
    home: int,
    hosts: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """From a VM's entries (`DomainIndex.entries`, or them corrected for moves), for each
    host how many of its values another VM holds there, exact (weight 1) and sampled
    (weight K)."""
    other = by_others(where, holders, home)
    which, where = which[other], where[other]
    exact = vm.exact[which]
    ones = np.bincount(where[exact], minlength=hosts)
    k_times = np.bincount(where[~exact], minlength=hosts)
    return ones.astype(np.int64), k_times.astype(np.int64)
