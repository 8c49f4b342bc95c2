"""The fleet index: the hosts' sketches read and checked once (`ksmpolicy index`), kept on disk
so that `place --index` answers without reading, unsealing and checking a document per host.

What it holds, in a directory of root's (0700):

* `index.json`: the format, the fleet key's id and K, when it was built, and each host's and
  each VM's figures (everything a prediction uses but the values), in the sketches' order;
* arrays, one `.npy` file each, loaded mapped (np.load(mmap_mode="r")): each VM's values end
  to end (`vm_values`, from `vm_starts`), where its counts above 1 are and what they are
  (`repeat_at`, `repeat_count`), which it keeps exactly (`exact_at`); and, per trust domain,
  what each host's merging VMs of the domain hold, sorted by value once (holders.DomainIndex,
  `held_*`, each domain a run of them named in index.json); and each VM's bounds for
  `rebalance` (`vm_most`: the most it could save anywhere, `vm_here`: what it saves now;
  rebalance.py).

`place` then takes the VM's values, finds them in its domain's sorted values (searchsorted),
and so knows on every host at once which of them another VM of its domain that merges there
holds; from there, the same ranking as from the sketches (plan.rank).

**Trusted by ownership, not by a MAC.** Each document's seal was checked when the index was
built; a MAC over the arrays (a gigabyte and more for 1,000 hosts) would cost more to check at
every load than the question itself. An index is loaded only when it, each of its files and
every directory above them are root's and writable by no one else (files.untrusted_reason,
the check the fleet key and the hooks' files pass): then only root could have changed it since
root wrote it. It records the fleet key's id and K: one built under another key is refused.

**Replaced whole.** A new build writes its arrays under new names (its generation), then
`index.json` (atomically, naming that generation), then removes the previous generation's
arrays: a reader gets one build or the other, never a mix (one that read the old index.json
just before, and opens its arrays after they are gone, is told the index is incomplete).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ksmpolicy.files import make_private_dir, read_regular, untrusted_reason, write_atomic_parts
from ksmpolicy.paths import PAGE_SIZE
from ksmpolicy.placement.holders import DamagedHolders, DomainIndex
from ksmpolicy.placement.plan import Prediction, check_comparable, find_vm, rank
from ksmpolicy.placement.rebalance import Best, Fleet, Move, best_hosts, limits, rebalance
from ksmpolicy.placement.sketch import HostSketch, SketchError, VmSketch

FORMAT = "ksmpolicy-fleet-index/2"
META = "index.json"
MAX_META_BYTES = 512 * 2**20
ARRAYS: dict[str, type[np.generic]] = {
    "vm_values": np.uint64,
    "vm_starts": np.int64,
    "repeat_at": np.int64,
    "repeat_count": np.uint32,
    "exact_at": np.int64,
    "held_values": np.uint64,
    "held_hosts": np.int32,
    "held_holders": np.int32,
    "vm_most": np.int64,
    "vm_here": np.int64,
}
_ARRAY_FILE = re.compile(rf"(?:{'|'.join(ARRAYS)})-[0-9a-f]{{16}}\.npy")
# a VM's figures in index.json, in VmSketch's order: its fields but the arrays
VM_FIELDS = tuple(f.name for f in fields(VmSketch) if f.name not in ("values", "counts", "exact"))
HOST_FIELDS = (
    "host",
    "use_zero_pages",
    "max_page_sharing",
    "mem_total_bytes",
    "mem_available_bytes",
    "taken_at",
    "source",
)
# the arrays of a VM as `hosts` carries it (its figures only)
_NO_VALUES = np.zeros(0, np.uint64)
_NO_COUNTS = np.zeros(0, np.uint32)
_NO_EXACT = np.zeros(0, bool)


class FleetIndexError(SketchError):
    """A fleet index that cannot be used (the message names it and what to do)."""


def _rebuild(directory: Path) -> str:
    return f"build it again: ksmpolicy index --host ... --out {directory}"


def write_index(directory: Path, hosts: Sequence[HostSketch], *, built_at: float) -> int:
    """Write the index of `hosts` (sketches whose seals were checked) into `directory`,
    replacing the one there; the bytes written."""
    check_comparable(hosts)
    vms = [vm for host in hosts for vm in host.vms]
    arrays, runs = _arrays(hosts, vms, sorted({vm.domain for vm in vms}))
    generation = os.urandom(8).hex()
    meta = {
        "format": FORMAT,
        "key_id": hosts[0].key_id,
        "k": hosts[0].k,
        "built_at": built_at,
        "generation": generation,
        "bounds_digest": _bounds_digest(arrays["vm_most"], arrays["vm_here"]),
        "arrays": {name: int(array.size) for name, array in arrays.items()},
        "domains": runs,
        "host_fields": HOST_FIELDS,
        "vm_fields": VM_FIELDS,
        "hosts": [
            {
                "figures": [getattr(host, name) for name in HOST_FIELDS],
                "active_domains": host.active_domains,
                "vms": len(host.vms),
            }
            for host in hosts
        ],
        "vms": [[getattr(vm, name) for name in VM_FIELDS] for vm in vms],
    }
    text = json.dumps(meta, separators=(",", ":")).encode()
    try:
        make_private_dir(directory)
        for name, array in arrays.items():
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                header, np.lib.format.header_data_from_array_1_0(array)
            )
            parts = (header.getvalue(), np.ascontiguousarray(array).data)
            path = directory / f"{name}-{generation}.npy"
            write_atomic_parts(path, parts, 0o600, private_dir=True)
        write_atomic_parts(directory / META, (text,), 0o600, private_dir=True)
        # the previous build's arrays (a reader that opened them keeps them while it runs)
        for entry in directory.iterdir():
            if _ARRAY_FILE.fullmatch(entry.name) and generation not in entry.name:
                entry.unlink(missing_ok=True)
    except OSError as exc:
        raise FleetIndexError(
            f"cannot write the fleet index in {directory}: {exc.strerror or exc}"
        ) from exc
    return sum(array.nbytes for array in arrays.values()) + len(text)


def _arrays(
    hosts: Sequence[HostSketch], vms: list[VmSketch], domains: list[str]
) -> tuple[dict[str, npt.NDArray[Any]], dict[str, list[int]]]:
    """The index's arrays, and where each domain's run of `held_*` starts and ends."""
    sizes = np.array([vm.values.size for vm in vms], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)

    def joined(parts: list[npt.NDArray[Any]], dtype: type[np.generic]) -> npt.NDArray[Any]:
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

    repeated = [np.flatnonzero(vm.counts > 1) for vm in vms]
    arrays = {
        "vm_values": joined([vm.values for vm in vms], np.uint64),
        "vm_starts": starts,
        "repeat_at": joined([at + s for at, s in zip(repeated, starts, strict=False)], np.int64),
        "repeat_count": joined(
            [vm.counts[at] for vm, at in zip(vms, repeated, strict=True)], np.uint32
        ),
        "exact_at": joined(
            [np.flatnonzero(vm.exact) + s for vm, s in zip(vms, starts, strict=False)], np.int64
        ),
    }
    held = [DomainIndex.of(hosts, domain) for domain in domains]
    by_domain = dict(zip(domains, held, strict=True))
    arrays["vm_most"], arrays["vm_here"] = limits(hosts, lambda name: by_domain[name])
    runs, end = {}, 0
    for domain, index in zip(domains, held, strict=True):
        runs[domain] = [end, end + int(index.values.size)]
        end += int(index.values.size)
    arrays["held_values"] = joined([i.values for i in held], np.uint64)
    arrays["held_hosts"] = joined([i.hosts for i in held], np.int32)
    arrays["held_holders"] = joined([i.holders for i in held], np.int32)
    return arrays, runs


@dataclass(frozen=True)
class FleetIndex:
    """An index as loaded: the hosts with their VMs' figures (no values: `vm` gives a VM
    whole), its arrays mapped, read only as a question needs them."""

    directory: Path
    built_at: float
    hosts: tuple[HostSketch, ...]
    arrays: dict[str, npt.NDArray[Any]]
    runs: dict[str, tuple[int, int]]

    def vm(self, figures: VmSketch) -> VmSketch:
        """A VM of `hosts` with its values, counts and exact contents."""
        number = self._numbers()[id(figures)]
        starts = self.arrays["vm_starts"]
        low, high = int(starts[number]), int(starts[number + 1])
        values = np.asarray(self.arrays["vm_values"][low:high])
        counts = np.ones(values.size, dtype=np.uint32)
        at = self.arrays["repeat_at"]
        first, last = np.searchsorted(at, [low, high])
        counts[at[first:last] - low] = self.arrays["repeat_count"][first:last]
        exact = np.zeros(values.size, dtype=bool)
        at = self.arrays["exact_at"]
        first, last = np.searchsorted(at, [low, high])
        exact[at[first:last] - low] = True
        return replace(figures, values=values, counts=counts, exact=exact)

    def _numbers(self) -> dict[int, int]:
        numbers: dict[int, int] = self.__dict__.setdefault("_vm_numbers", {})
        if not numbers:
            vms = (vm for host in self.hosts for vm in host.vms)
            numbers.update((id(vm), n) for n, vm in enumerate(vms))
        return numbers

    def domain(self, name: str) -> DomainIndex:
        """What each host's merging VMs of one domain hold (nothing for a domain none holds)."""
        low, high = self.runs.get(name, (0, 0))
        return DomainIndex(
            self.arrays["held_values"][low:high],
            self.arrays["held_hosts"][low:high],
            self.arrays["held_holders"][low:high],
        )

    def place(self, name: str, *, reserve_bytes: int = 0) -> tuple[VmSketch, list[Prediction]]:
        """`plan.place` from the index: what the VM named would save on each host."""
        home, figures = find_vm(self.hosts, name)
        vm = self.vm(figures)
        slot = next(i for i, host in enumerate(self.hosts) if host is home)
        try:
            held = self.domain(vm.domain).there(vm, slot, len(self.hosts))
        except DamagedHolders as exc:
            raise _damaged(self.directory, exc) from exc
        return vm, rank(self.hosts, home, vm, list(held), reserve_bytes=reserve_bytes)

    def fleet(self) -> Fleet:
        """The index as `rebalance` and every VM's best host plan on it: each VM's values read
        only when the plan weighs it, and its bounds as computed when the index was built."""
        return Fleet(
            self.hosts, self.vm, self.domain, self.arrays["vm_most"], self.arrays["vm_here"]
        )

    def rebalance(self, **limits: int) -> list[Move]:
        """`rebalance.rebalance` on the index (a damaged one is a FleetIndexError)."""
        try:
            return rebalance(self.fleet(), **limits)
        except DamagedHolders as exc:
            raise _damaged(self.directory, exc) from exc

    def best_hosts(self, *, reserve_bytes: int = 0) -> list[Best]:
        """Every VM's best other host, from the index (a damaged one is a FleetIndexError)."""
        try:
            return best_hosts(self.fleet(), reserve_bytes=reserve_bytes)
        except DamagedHolders as exc:
            raise _damaged(self.directory, exc) from exc

    @property
    def taken_at(self) -> tuple[float, float]:
        """When the oldest and the newest of its sketches were taken."""
        times = [host.taken_at for host in self.hosts]
        return min(times), max(times)


def _damaged(directory: Path, why: object) -> FleetIndexError:
    return FleetIndexError(
        f"the fleet index in {directory} is damaged or incomplete ({why}): {_rebuild(directory)}"
    )


def _trusted(path: Path) -> None:
    reason = untrusted_reason(path)
    if reason:
        raise FleetIndexError(
            f"refusing the fleet index {path}: {reason}. An index is not sealed: only root may "
            "be able to change it, along its whole path (fix that, or build it again into a "
            f"directory of root's: ksmpolicy index --host ... --out DIR)"
        )


def load_index(directory: Path, key_id: str, *, check_owner: bool = True) -> FleetIndex:
    """The index in `directory`, built under the fleet key `key_id`. `check_owner`: refuse it
    unless root alone could have changed it (off only for a test tree, as for the key)."""
    meta_path = directory / META
    if check_owner:
        _trusted(meta_path)
    try:
        data = read_regular(meta_path, MAX_META_BYTES)
    except FileNotFoundError:
        raise FleetIndexError(f"no fleet index in {directory}: {_rebuild(directory)}") from None
    except OSError as exc:
        raise FleetIndexError(f"cannot read {meta_path}: {exc.strerror or exc}") from exc
    try:
        meta = json.loads(data)
        if meta.get("format") != FORMAT:
            raise FleetIndexError(
                f"{directory}: not a fleet index of this version (format "
                f"{meta.get('format')!r}, expected {FORMAT!r}): {_rebuild(directory)}"
            )
        if meta["key_id"] != key_id:
            raise FleetIndexError(
                f"{directory}: built under another fleet key ({meta['key_id']}, not this "
                f"host's {key_id}): {_rebuild(directory)} with this host's key"
            )
        return _loaded(directory, meta, check_owner)
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        IndexError,
        AttributeError,
        RecursionError,
    ) as exc:
        raise _damaged(directory, f"{type(exc).__name__}: {exc}") from exc


def _figures(row: list[Any]) -> VmSketch:
    """A VM as `FleetIndex.hosts` carries it: its figures, no values."""
    figures = dict(zip(VM_FIELDS, row, strict=True))
    return VmSketch(**figures, values=_NO_VALUES, counts=_NO_COUNTS, exact=_NO_EXACT)


def _loaded(directory: Path, meta: dict[str, Any], check_owner: bool) -> FleetIndex:
    if tuple(meta["vm_fields"]) != VM_FIELDS or tuple(meta["host_fields"]) != HOST_FIELDS:
        raise ValueError("its fields are not this version's")
    arrays = {}
    for name, dtype in ARRAYS.items():
        size = int(meta["arrays"][name])
        path = directory / f"{name}-{meta['generation']}.npy"
        if check_owner:
            _trusted(path)
        array = np.load(path, mmap_mode="r", allow_pickle=False) if size else np.zeros(0, dtype)
        if array.dtype != dtype or array.shape != (size,):
            raise ValueError(f"{path.name}: {array.dtype} x {array.shape}, not {size} x {dtype}")
        arrays[name] = array
    rows = iter(meta["vms"])
    hosts = []
    for entry in meta["hosts"]:
        figures = dict(zip(HOST_FIELDS, entry["figures"], strict=True))
        vms = tuple(_figures(next(rows)) for _ in range(entry["vms"]))
        active = entry["active_domains"]
        hosts.append(
            HostSketch(
                **figures,
                key_id=meta["key_id"],
                k=int(meta["k"]),
                active_domains=None if active is None else tuple(active),
                vms=vms,
            )
        )
    starts = arrays["vm_starts"]
    count = sum(len(host.vms) for host in hosts)
    if starts.size != count + 1 or int(starts[-1]) != arrays["vm_values"].size:
        raise ValueError("vm_starts does not match its VMs and values")
    most, here = arrays["vm_most"], arrays["vm_here"]
    if _bounds_digest(most, here) != meta["bounds_digest"]:
        raise ValueError("vm_most or vm_here is not what was written")
    _check_bounds(most, here, [vm for h in hosts for vm in h.vms])
    runs = {d: (int(low), int(high)) for d, (low, high) in meta["domains"].items()}
    if any(not 0 <= low <= high <= arrays["held_values"].size for low, high in runs.values()):
        raise ValueError("a domain's run is outside held_values")
    return FleetIndex(directory, float(meta["built_at"]), tuple(hosts), arrays, runs)


def _bounds_digest(most: npt.NDArray[np.int64], here: npt.NDArray[np.int64]) -> str:
    """A digest of each VM's bounds, kept in index.json: a bound that reads too low would hide
    a move without a trace (a plan never weighs that VM), and the two arrays are small (16
    bytes a VM) where the others are not."""
    digest = hashlib.blake2b(np.ascontiguousarray(most).tobytes(), digest_size=16)
    digest.update(np.ascontiguousarray(here).tobytes())
    return digest.hexdigest()


def _check_bounds(
    most: npt.NDArray[np.int64], here: npt.NDArray[np.int64], vms: list[VmSketch]
) -> None:
    """Each VM's bounds (`rebalance.limits`) as a build could have written them: one of each
    per VM, what it saves now at most what it could save anywhere, nothing for a VM that
    does not merge (now, or at all), and small enough to count in bytes. (That what it saves
    now matches its contents is checked when a plan weighs it.)"""
    if most.size != len(vms) or here.size != len(vms):
        raise ValueError("vm_most or vm_here does not have one figure per VM")
    merges = np.array([vm.merges for vm in vms], dtype=bool)
    active = np.array([vm.active for vm in vms], dtype=bool)
    if most.size and not (
        np.all(here >= 0)
        and np.all(here <= most)
        and np.all(most < 2**51 // PAGE_SIZE)
        and np.all(most[~merges] == 0)
        and np.all(here[~(merges & active)] == 0)
    ):
        raise ValueError("vm_most and vm_here are not bounds a build writes")
