"""Predictions from sketches: what a VM would save on each host (`place`); the fleet-wide
questions on the same model are in rebalance.py. Pure computation; nothing is read or run here.

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
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ksmpolicy.paths import FLEET_KEY, PAGE_SIZE
from ksmpolicy.placement.sketch import UUID, VMID, HostSketch, SketchError, VmSketch
from ksmpolicy.quoting import quote


@dataclass(frozen=True)
class Prediction:
    host: str
    current: bool  # the VM runs there now
    saved_bytes: int  # what the VM would save there (for its current host: what it saves now)
    shared_bytes: int  # of which with the host's other VMs (its own domain only)
    headroom_bytes: int  # the host's MemAvailable after the move, less the reserve
    fits: bool
    why_not: str | None  # why the VM would not merge there (None: it would)


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


def zero_saving(zero_pages: int, host: HostSketch) -> int:
    """What a VM's zero-filled pages save on the host (all of them with use_zero_pages; else
    all but one per max_page_sharing of them)."""
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
    return own + int(weights[there].sum()) + zero_saving(vm.zero_pages, host), shared


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
