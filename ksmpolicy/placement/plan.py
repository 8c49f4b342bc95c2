"""Predictions from sketches: what a VM would save on each host (`place`), and the migrations
that would save the most (`rebalance`). Pure computation; nothing is read or run here.

What a VM saves on a host, in pages, from its sketch (K: the sampling rate):

    sum over the contents c in its sketch of w(c) x (count(c) - 1 + [c is held on the host])
    + its zero-filled pages (n - ceil(n / max_page_sharing) of them without use_zero_pages)

where count(c) is how many of its pages hold c, and w(c) is K for a content sampled by value
(it stands for K contents like it) and 1 for one kept because the VM holds it K times or more.

where "held on the host" counts only VMs there that merge now and are in the VM's own trust
domain: a VM is never predicted to share with another domain's VMs, whatever their content
(their values are under another key, so they could not even be compared). A VM saves nothing
where it would not merge: where the policy excludes it, and, on a host with trust domains, where
another domain is the one that merges (the keeper lets one domain merge per merge scope; with
merge_across_nodes=0 a domain that merges on any NUMA node counts). The headroom after the move
is the host's MemAvailable, less the VM's present pages, plus what it saves, less the reserve;
on its current host, MemAvailable less the reserve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from ksmpolicy.paths import FLEET_KEY, PAGE_SIZE
from ksmpolicy.placement.holders import DomainIndex
from ksmpolicy.placement.sketch import UUID, VMID, HostSketch, SketchError, VmSketch
from ksmpolicy.quoting import quote, shell_command


@dataclass(frozen=True)
class Prediction:
    host: str
    current: bool  # the VM runs there now
    saved_bytes: int  # what the VM would save there (for its current host: what it saves now)
    shared_bytes: int  # of which with the host's other VMs (its own domain only)
    headroom_bytes: int  # the host's MemAvailable after the move, less the reserve
    fits: bool
    why_not: str | None  # why the VM would not merge there (None: it would)


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


def check_comparable(hosts: Sequence[HostSketch]) -> None:
    """Sketches compare only under one key and one K, each host once, and each VM in one of
    them (a VM found twice moved between two sketches: it would be placed beside itself)."""
    if not hosts:
        raise SketchError("no host sketch given")
    first = hosts[0]
    for host in hosts[1:]:
        if host.key_id != first.key_id:
            raise SketchError(
                f"{host.source or host.host} was sketched under another fleet key "
                f"({host.key_id}, not {first.key_id}): give every host the same {FLEET_KEY}"
            )
        if host.k != first.k:
            raise SketchError(
                f"{host.source or host.host} samples 1 page in {host.k}, "
                f"{first.source or first.host} 1 in {first.k}: sketch both with the same --k"
            )
    names = [h.host for h in hosts]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SketchError(f"host {', '.join(twice)} given twice")
    seen: dict[str, str] = {}
    for host in hosts:
        for vm in host.vms:
            for identity in _identities(vm):
                if identity in seen:
                    raise SketchError(
                        f"{identity} is in the sketches of both {seen[identity]} and "
                        f"{host.host}: it moved between them; sketch those hosts again"
                    )
                seen[identity] = host.host


def _identities(vm: VmSketch) -> list[str]:
    found = [f"VM {vm.uuid}"] if vm.uuid else []
    if vm.platform == "proxmox" and vm.vmid:
        found.append(f"Proxmox VM {vm.vmid}")
    return found


def _zero_saving(zero_pages: int, host: HostSketch) -> int:
    if host.use_zero_pages:
        return zero_pages
    return zero_pages - math.ceil(zero_pages / host.max_page_sharing) if zero_pages else 0


def saving(vm: VmSketch, k: int, host: HostSketch, there: npt.NDArray[np.bool_]) -> tuple[int, int]:
    """(saved, shared with others) pages of `vm` on `host` if it merges there; `there`: which
    of its values the host's other VMs of its domain hold. Of a content's c copies, all c save
    a page when another VM holds it, else c - 1: so the saving is the sum of w(c - 1) over
    every content, plus w over those held there (`VmSketch.terms`)."""
    weights, held, own = vm.terms(k)
    shared = int(held[there].sum())  # every copy saves a page
    return own + int(weights[there].sum()) + _zero_saving(vm.zero_pages, host), shared


def _held_on_each(vm: VmSketch, hosts: Sequence[HostSketch]) -> list[npt.NDArray[np.bool_]]:
    """For each host, which of the VM's values another VM of its domain that merges there
    holds: the same as `host.union(vm.domain).there(vm, ...)`, in one pass over each host's
    values and without building any host's union (sorting a host's values costs more than
    the question). Each host's values go through a filter made from the VM's own (a table
    of the top bits of its values: it lets through the VM's values and a few others), and
    only what passes is looked up exactly among the VM's values."""
    found = [np.zeros(vm.values.size, dtype=bool) for _ in hosts]
    if not vm.values.size:
        return found
    bits = min(26, max(16, int(vm.values.size).bit_length() + 8))  # about 1 in 256 let through
    shift = np.uint64(64 - bits)
    table = np.zeros(2**bits, dtype=bool)
    table[vm.values >> shift] = True
    members = [
        [o.values for o in host.vms if o.active and o.domain == vm.domain and o is not vm]
        for host in hosts
    ]
    most = max((sum(part.size for part in parts) for parts in members), default=0)
    # one buffer each, reused from host to host: fresh arrays this size cost more in page
    # faults than the filter itself
    every = np.empty(most, dtype=np.uint64)
    top = np.empty(most, dtype=np.uint64)
    passes = np.empty(most, dtype=bool)
    for parts, there in zip(members, found, strict=True):
        size = sum(part.size for part in parts)
        if not size:
            continue
        np.concatenate(parts, out=every[:size])
        np.right_shift(every[:size], shift, out=top[:size])
        np.take(table, top[:size].view(np.int64), out=passes[:size])  # intp: no copy
        passed = every[:size][passes[:size]]
        at = np.minimum(np.searchsorted(vm.values, passed), vm.values.size - 1)
        there[at[vm.values[at] == passed]] = True
    return found


def find_vm(hosts: Sequence[HostSketch], ref: str) -> tuple[HostSketch, VmSketch]:
    """The VM `ref` names: a UUID names a UUID, digits a VMID, anything else a name; never a
    name for a UUID or a VMID (a tenant chooses its VM's name, and could choose another VM's
    UUID or VMID for it)."""
    if UUID.fullmatch(ref.lower()):
        kind, found = "UUID", [(h, vm) for h in hosts for vm in h.vms if vm.uuid == ref.lower()]
    elif VMID.fullmatch(ref):
        kind, found = "VMID", [(h, vm) for h in hosts for vm in h.vms if vm.vmid == ref]
    else:
        kind, found = "name", [(h, vm) for h in hosts for vm in h.vms if vm.name == ref]
    if not found:
        hint = " (a VM whose name is digits or a UUID: give its UUID)" if kind != "name" else ""
        raise SketchError(f"no VM with the {kind} {ref!r} in the sketches given{hint}")
    if len(found) > 1:
        where = ", ".join(f"{quote(vm.name)} on {h.host}" for h, vm in found)
        raise SketchError(f"the {kind} {ref!r} names more than one VM: {where}; give its UUID")
    return found[0]


def place(
    hosts: Sequence[HostSketch], name: str, *, reserve_bytes: int = 0
) -> tuple[VmSketch, list[Prediction]]:
    """For each host, what the VM would save there; best first (its current host included)."""
    check_comparable(hosts)
    home, vm = find_vm(hosts, name)
    return vm, rank(hosts, home, vm, _held_on_each(vm, hosts), reserve_bytes=reserve_bytes)


def rank(
    hosts: Sequence[HostSketch],
    home: HostSketch,
    vm: VmSketch,
    held: Sequence[npt.NDArray[np.bool_]],
    *,
    reserve_bytes: int = 0,
) -> list[Prediction]:
    """What `vm` (running on `home`) would save on each host, best first, given for each host
    which of its values another VM of its domain that merges there holds (`held`): from the
    sketches (`place`) or from the fleet index (fleetindex.py), the same rules either way."""
    k = hosts[0].k
    predictions = []
    for host, there in zip(hosts, held, strict=True):
        current = host is home
        if current:
            why_not = None if vm.active else (host.would_merge(vm) or "it does not merge now")
        else:
            why_not = host.would_merge(vm)
        saved, shared = saving(vm, k, host, there) if why_not is None else (0, 0)
        headroom = host.mem_available_bytes - reserve_bytes
        if not current:
            headroom -= (vm.present_pages - saved) * PAGE_SIZE
        predictions.append(
            Prediction(
                host=host.host,
                current=current,
                saved_bytes=saved * PAGE_SIZE,
                shared_bytes=shared * PAGE_SIZE,
                headroom_bytes=headroom,
                fits=current or headroom >= 0,
                why_not=why_not,
            )
        )
    predictions.sort(key=lambda p: (not p.fits, -p.saved_bytes, not p.current, p.host))
    return predictions


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


def best_hosts(hosts: Sequence[HostSketch], *, reserve_bytes: int = 0) -> list[Best]:
    """Every VM of the sketches that may merge, with the other host where it would save the
    most and fits (headroom after the move at least the reserve)."""
    check_comparable(hosts)
    fleet = _Fleet(hosts)
    found = []
    for home in hosts:
        for vm in home.vms:
            if not vm.merges:
                continue
            here = fleet.here(vm, home.host)
            best: tuple[int, str] | None = None
            for target in fleet.views:
                if target == home.host:
                    continue
                there, cost = fleet.there(vm, home.host, target)
                if fleet.available[target] - cost >= reserve_bytes and (
                    best is None or there > best[0]
                ):
                    best = (there, target)
            found.append(
                Best(
                    vm=vm.name,
                    uuid=vm.uuid,
                    vmid=vm.vmid,
                    domain=vm.domain,
                    host=home.host,
                    saved_bytes=here * PAGE_SIZE,
                    best_host=None if best is None else best[1],
                    gain_bytes=0 if best is None else (best[0] - here) * PAGE_SIZE,
                )
            )
    return found


def rebalance(
    hosts: Sequence[HostSketch],
    *,
    max_moves: int = 5,
    reserve_bytes: int = 0,
    min_gain_bytes: int = 64 * 2**20,
) -> list[Move]:
    """Migrations that raise the fleet's savings the most, one at a time (greedy): each move is
    the one with the largest gain given the moves before it, never across trust domains (each
    VM keeps its domain and shares only with its own), never leaving a host below the reserve,
    and each gains at least `min_gain_bytes`. A VM moves at most once."""
    check_comparable(hosts)
    fleet = _Fleet(hosts)
    moves: list[Move] = []
    while len(moves) < max_moves:
        best = fleet.best_move(reserve_bytes, min_gain_bytes)
        if best is None:
            break
        moves.append(best)
    return moves


class _Fleet:
    """Where each VM is while a plan is made, each host's memory left, and what each VM would
    save on each host. Per trust domain, one sorted index of what each host's VMs of that
    domain that merge hold (`DomainIndex`) answers for one VM and every host at once; what a
    VM saves is kept until a move touches it (a move changes only its domain's index, and only
    the VMs that hold some of the moved VM's contents; every VM, when the move makes its
    domain the one that merges on the target)."""

    def __init__(self, hosts: Sequence[HostSketch]) -> None:
        self.k = hosts[0].k
        self.views = {h.host: h for h in hosts}
        self.slot = {name: i for i, name in enumerate(self.views)}
        self.available = {h.host: h.mem_available_bytes for h in hosts}
        self.moved: set[int] = set()
        self._arrived: list[VmSketch] = []
        self._indexes: dict[str, DomainIndex] = {}
        self._saved: dict[int, tuple[VmSketch, npt.NDArray[np.int64]]] = {}

    def here(self, vm: VmSketch, home: str) -> int:
        """What the VM saves where it runs (its own copies left out of the host's)."""
        return int(self._savings(vm, home)[self.slot[home]])

    def there(self, vm: VmSketch, home: str, host: str) -> tuple[int, int]:
        """What the VM would save on another host, and the memory it would take there."""
        saved = int(self._savings(vm, home)[self.slot[host]])
        return saved, (vm.present_pages - saved) * PAGE_SIZE

    def _savings(self, vm: VmSketch, home: str) -> npt.NDArray[np.int64]:
        """Pages the VM saves on each host (`home`: where it runs, its own copies apart); the
        same figures as `saving` with each host's union, for every host in one pass."""
        if id(vm) in self._saved:
            return self._saved[id(vm)][1]
        out = np.zeros(len(self.views), dtype=np.int64)
        if vm.merges:
            index = self._indexes.get(vm.domain)
            if index is None:
                index = self._indexes[vm.domain] = DomainIndex.of(self.views.values(), vm.domain)
            ones, k_times = index.held(vm, self.slot[home], len(self.views))
            _weights, _held, own = vm.terms(self.k)
            for i, view in enumerate(self.views.values()):
                merging = vm.active if i == self.slot[home] else view.would_merge(vm) is None
                if merging:
                    sampled = own + int(ones[i]) + self.k * int(k_times[i])
                    out[i] = sampled + _zero_saving(vm.zero_pages, view)
        self._saved[id(vm)] = (vm, out)
        return out

    def best_move(self, reserve_bytes: int, min_gain_bytes: int) -> Move | None:
        """The move that gains the most now (a VM's saving is its marginal one: a copy it adds
        to a content held there saves a page; leaving, it un-saves its copies held here)."""
        best: tuple[int, VmSketch, str, str] | None = None
        for source, view in self.views.items():
            for vm in view.vms:
                if id(vm) in self.moved or not vm.merges:
                    continue
                here = self.here(vm, source)
                for target in self.views:
                    if target == source:
                        continue
                    there, cost = self.there(vm, source, target)
                    gain = (there - here) * PAGE_SIZE
                    if self.available[target] - cost < reserve_bytes or gain < min_gain_bytes:
                        continue
                    if best is None or gain > best[0]:
                        best = (gain, vm, source, target)
        if best is None:
            return None
        gain, vm, source, target = best
        self._move(vm, source, target)
        return Move(vm, source, target, gain)

    def _move(self, vm: VmSketch, source: str, target: str) -> None:
        """Move `vm`: it merges there if its domain may (and then, if none merged there, its
        domain becomes the one that does)."""
        self.available[target] -= self.there(vm, source, target)[1]
        self.available[source] += (vm.present_pages - self.here(vm, source)) * PAGE_SIZE
        arrived = replace(vm, active=self.views[target].would_merge(vm) is None)
        self.moved.update((id(vm), id(arrived)))
        self._arrived.append(arrived)  # keeps its id() from being reused
        old_target = self.views[target]
        domains = old_target.active_domains
        took_over = domains == () and arrived.active
        if took_over:
            domains = (vm.domain,)
        self.views[source] = _with_vms(
            self.views[source], [v for v in self.views[source].vms if v is not vm], None
        )
        self.views[target] = _with_vms(old_target, [*old_target.vms, arrived], domains)
        self._indexes.pop(vm.domain, None)
        for key, (other, _saved) in list(self._saved.items()):
            if (other.domain == vm.domain and _share(other, vm)) or took_over:
                del self._saved[key]
        self._saved.pop(id(vm), None)


def _share(a: VmSketch, b: VmSketch) -> bool:
    """Whether two VMs' sketches hold a content in common."""
    if not a.values.size or not b.values.size:
        return False
    at = np.minimum(np.searchsorted(b.values, a.values), b.values.size - 1)
    return bool(np.any(b.values[at] == a.values))


def _with_vms(host: HostSketch, vms: list[VmSketch], active: tuple[str, ...] | None) -> HostSketch:
    """The host with other VMs (`active`: its domains that merge; None: unchanged)."""
    domains = host.active_domains if active is None else active
    return replace(host, vms=tuple(vms), active_domains=domains)
