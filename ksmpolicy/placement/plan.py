"""Predictions from sketches: what a VM would save on each host (`place`), and the migrations
that would save the most (`rebalance`). Pure computation; nothing is read or run here.

What a VM saves on a host, in pages, from its sketch (K: the sampling rate):

    sum over the contents c in its sketch of w(c) x (count(c) - 1 + [c is held on the host])
    + its zero-filled pages (n - ceil(n / max_page_sharing) of them without use_zero_pages)

where count(c) is how many of its pages hold c, and w(c) is K for a content sampled by value
(it stands for K contents like it) and 1 for one kept because the VM holds it K times or more.

where "held on the host" counts only VMs there that may merge and are in the VM's own trust
domain: a VM is never predicted to share with another domain's VMs, whatever their content. A
VM the policy excludes saves nothing. The host's headroom after the move is its MemAvailable,
less the VM's present pages, plus what it saves, less the reserve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ksmpolicy.paths import FLEET_KEY, PAGE_SIZE
from ksmpolicy.placement.sketch import HostSketch, SketchError, VmSketch
from ksmpolicy.quoting import quote, shell_command


@dataclass(frozen=True)
class Prediction:
    host: str
    current: bool  # the VM runs there now
    saved_bytes: int  # what the VM would save there (for its current host: what it saves now)
    shared_bytes: int  # of which with the host's other VMs (its own domain only)
    headroom_bytes: int  # the host's MemAvailable after the move, less the reserve
    fits: bool


@dataclass(frozen=True)
class Move:
    vm: str
    platform: str
    ref: str  # how the platform's commands name it: libvirt name, Proxmox VMID
    source: str
    target: str
    gain_bytes: int  # fleet savings added by this move

    def command(self) -> str:
        """The migration as one command line to paste, every name quoted for a shell (a VM's
        name is its owner's choice)."""
        if self.platform == "proxmox":
            words = ["qm", "migrate", self.ref, self.target, "--online"]
        else:
            words = ["virsh", "migrate", "--live", "--persistent", self.ref]
            words.append(f"qemu+ssh://{self.target}/system")
        line = shell_command(*words)
        return line if line is not None else f"# {quote(self.vm)}: a name that cannot be pasted"


def check_comparable(hosts: Sequence[HostSketch]) -> None:
    """Sketches compare only under one key and one K."""
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


def _saving_on(vm: VmSketch, k: int, host: HostSketch, *, member: bool) -> tuple[int, int]:
    return saving(vm, k, host, host.union(vm.domain).there(vm, member=member))


def _zero_saving(zero_pages: int, host: HostSketch) -> int:
    if host.use_zero_pages:
        return zero_pages
    return zero_pages - math.ceil(zero_pages / host.max_page_sharing) if zero_pages else 0


def saving(vm: VmSketch, k: int, host: HostSketch, there: npt.NDArray[np.bool_]) -> tuple[int, int]:
    """(saved, shared with others) pages of `vm` on `host`; `there`: which of its values the
    host's other VMs of its domain hold."""
    if not vm.merges:
        return 0, 0
    weights = vm.weights(k)
    copies = vm.counts.astype(np.int64)
    shared = int(np.sum(weights[there] * copies[there]))  # every copy saves a page
    own = int(np.sum(weights[~there] * (copies[~there] - 1)))  # all but one copy
    return shared + own + _zero_saving(vm.zero_pages, host), shared


def find_vm(hosts: Sequence[HostSketch], name: str) -> tuple[HostSketch, VmSketch]:
    found = [(h, vm) for h in hosts for vm in h.vms if name in (vm.name, vm.uuid, vm.vmid)]
    if not found:
        raise SketchError(f"no VM {name!r} in the sketches given (name, UUID or VMID)")
    if len(found) > 1:
        where = ", ".join(f"{vm.name} on {h.host}" for h, vm in found)
        raise SketchError(f"{name!r} names more than one VM: {where}; give its UUID")
    return found[0]


def place(
    hosts: Sequence[HostSketch], name: str, *, reserve_bytes: int = 0
) -> tuple[VmSketch, list[Prediction]]:
    """For each host, what the VM would save there; best first (its current host included)."""
    check_comparable(hosts)
    home, vm = find_vm(hosts, name)
    k = hosts[0].k
    predictions = []
    for host in hosts:
        current = host is home
        saved, shared = _saving_on(vm, k, host, member=current)
        moved_in = 0 if current else vm.present_pages
        headroom = host.mem_available_bytes - (moved_in - saved) * PAGE_SIZE - reserve_bytes
        predictions.append(
            Prediction(
                host=host.host,
                current=current,
                saved_bytes=saved * PAGE_SIZE,
                shared_bytes=shared * PAGE_SIZE,
                headroom_bytes=headroom,
                fits=current or headroom >= 0,
            )
        )
    predictions.sort(key=lambda p: (not p.fits, -p.saved_bytes, not p.current, p.host))
    return vm, predictions


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
                there, cost = fleet.there(vm, target)
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
    save on each host (kept between moves: a move changes only its two hosts)."""

    def __init__(self, hosts: Sequence[HostSketch]) -> None:
        self.k = hosts[0].k
        self.views = {h.host: h for h in hosts}
        self.available = {h.host: h.mem_available_bytes for h in hosts}
        self.moved: set[int] = set()
        self._there: dict[tuple[int, str], tuple[int, int]] = {}  # (vm, host): (saved, cost)
        self._here: dict[int, int] = {}

    def here(self, vm: VmSketch, host: str) -> int:
        """What the VM saves where it runs (its own copies left out of the host's)."""
        if id(vm) not in self._here:
            saved, _ = _saving_on(vm, self.k, self.views[host], member=True)
            self._here[id(vm)] = saved
        return self._here[id(vm)]

    def there(self, vm: VmSketch, host: str) -> tuple[int, int]:
        """What the VM would save on another host, and the memory it would take there."""
        key = (id(vm), host)
        if key not in self._there:
            saved, _ = _saving_on(vm, self.k, self.views[host], member=False)
            self._there[key] = (saved, (vm.present_pages - saved) * PAGE_SIZE)
        return self._there[key]

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
                    there, cost = self.there(vm, target)
                    gain = (there - here) * PAGE_SIZE
                    if self.available[target] - cost < reserve_bytes or gain < min_gain_bytes:
                        continue
                    if best is None or gain > best[0]:
                        best = (gain, vm, source, target)
        if best is None:
            return None
        gain, vm, source, target = best
        self._move(vm, source, target)
        ref = vm.vmid if vm.platform == "proxmox" and vm.vmid else vm.name
        return Move(vm.name, vm.platform, ref, source, target, gain)

    def _move(self, vm: VmSketch, source: str, target: str) -> None:
        self.available[target] -= self.there(vm, target)[1]
        self.available[source] += (vm.present_pages - self.here(vm, source)) * PAGE_SIZE
        self.moved.add(id(vm))
        for name, change in (
            (source, [v for v in self.views[source].vms if v is not vm]),
            (target, [*self.views[target].vms, vm]),
        ):
            old = self.views[name]
            self.views[name] = _with_vms(old, change)
            for other in old.vms:
                self._here.pop(id(other), None)
            for key in [key for key in self._there if key[1] == name]:
                del self._there[key]
        self._here.pop(id(vm), None)


def _with_vms(host: HostSketch, vms: list[VmSketch]) -> HostSketch:
    return HostSketch(
        host=host.host,
        key_id=host.key_id,
        k=host.k,
        use_zero_pages=host.use_zero_pages,
        max_page_sharing=host.max_page_sharing,
        mem_total_bytes=host.mem_total_bytes,
        mem_available_bytes=host.mem_available_bytes,
        taken_at=host.taken_at,
        vms=tuple(vms),
        source=host.source,
    )
