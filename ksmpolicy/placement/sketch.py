"""Sketches: a compact, comparable summary of what each VM's memory holds (root, read-only).

A VM's sketch keeps a sample of its stable page contents, chosen by content so that the same
content is sampled on every host:

1. every present page of its guest RAM is hashed with xxh3-128, as the estimate reads it
   (kernel/guestmem.py; pages mapped to the kernel's zero page are not read);
2. a page is sampled when the low 64 bits of its digest are 0 modulo K (default 64): one page
   content in K, the same contents everywhere; so is every content the VM holds K times or
   more (exactly: it stands for itself, not for K); zero-filled pages are counted apart;
3. after `interval` seconds the sampled pages are hashed again; those that changed are
   volatile (ksmd would not merge them) and are left out, counted as `volatile_pages` (x K);
4. each sampled content is kept as an 8-byte keyed hash: BLAKE2b of its digest under the fleet
   key (/etc/ksmpolicy/fleet.key, root-only), with how many of the VM's pages hold it.

Why keyed: a 128-bit digest of a page is a fingerprint anyone can compute for a page they can
guess (a known binary, a page of a known file, a page holding a guessed secret), so publishing
digests would let whoever reads the sketch test such guesses against a tenant's memory. Under a
key that only the fleet's hosts hold, a reader without the key learns how much VMs share (what
the sketch is for), never what; a host with the key is root on a fleet host, and could read
the guests' memory anyway. Hosts compare sketches only under the same key (`key_id` says
which key, not the key).

Size: about one 8-byte value per K distinct contents, plus, exactly, every content the VM holds
K times or more (at most one per K pages): at K = 64 about 43 KiB per GiB of guest RAM as JSON.
The sampling error: a VM's sharing with a host is estimated from the sampled contents they
share, about shared/K of them; the relative standard error is about sqrt(K / shared pages)
(6 % for 64 MiB shared at K = 64; bench/results/placement.md measures it).
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.files import read_regular, untrusted_reason, write_atomic
from ksmpolicy.kernel import guestmem
from ksmpolicy.kernel.pagemap import PageMapReader, PageMapUnavailable
from ksmpolicy.paths import FLEET_KEY, PAGE_SIZE, HostPaths
from ksmpolicy.policy.model import DEFAULT_DOMAIN, Policy

FORMAT = "ksmpolicy-sketch/1"
DEFAULT_K = 64
KEY_BYTES = 32
MAX_SKETCH_BYTES = 512 * 2**20  # a host's sketch file; larger is refused

Values = npt.NDArray[np.uint64]


class SketchError(KsmPolicyError):
    """A sketch that cannot be read or compared (the message names the file and the key)."""


# --- the fleet key ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetKey:
    secret: bytes

    @property
    def key_id(self) -> str:
        """Names the key (a hash of it under a tag), never reveals it."""
        return hashlib.blake2b(self.secret, person=b"ksmpolicy-keyid", digest_size=8).hexdigest()

    def values(self, digests: npt.NDArray[np.uint64]) -> Values:
        """The keyed 64-bit value of each N x 2 digest."""
        raw = digests.astype("<u8", copy=False).tobytes()
        out = bytearray(8 * len(digests))
        for i in range(len(digests)):
            out[8 * i : 8 * i + 8] = hashlib.blake2b(
                raw[16 * i : 16 * i + 16], key=self.secret, digest_size=8
            ).digest()
        return np.frombuffer(bytes(out), dtype="<u8").astype(np.uint64)


def load_key(paths: HostPaths, *, create: bool = False) -> tuple[FleetKey, bool]:
    """The fleet key (and whether it was made now). It must be root's alone: owned by root,
    readable by no one else, on a path no other user can change."""
    path = paths.under_root(FLEET_KEY)
    if create and not path.exists():
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_atomic(path, os.urandom(KEY_BYTES).hex().encode() + b"\n", 0o600)
        made = True
    else:
        made = False
    if not path.exists():
        raise SketchError(
            f"no fleet key at {path}: `ksmpolicy sketch --new-key` makes one; copy the same "
            "file (root, mode 0600) to every host whose sketches you compare"
        )
    if paths.root == HostPaths().root:  # a test tree under /tmp is not a host's path
        reason = untrusted_reason(path)
        if reason:
            raise SketchError(f"refusing the fleet key {path}: {reason}")
    if path.stat().st_mode & 0o077:
        raise SketchError(f"refusing the fleet key {path}: others may read it (chmod 600 it)")
    text = read_regular(path, 4096).decode("ascii", "replace").strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) < 16 or len(secret) > 64:
        raise SketchError(
            f"{path}: not a fleet key (16 to 64 bytes as hex on one line; "
            "`ksmpolicy sketch --new-key` writes one)"
        )
    return FleetKey(secret), made


# --- sketches -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmSketch:
    """One VM's sample. `values` sorted and unique; `counts[i]` of its pages hold `values[i]`."""

    name: str
    uuid: str | None
    vmid: str | None
    platform: str  # libvirt | proxmox | process
    domain: str  # its trust domain here ("default" without trust domains)
    group: str | None
    merges: bool  # the policy lets it merge here
    ram_bytes: int | None
    present_pages: int
    zero_pages: int
    volatile_pages: int  # estimated: changed samples x K
    values: Values = field(repr=False)
    counts: npt.NDArray[np.uint32] = field(repr=False)
    # values kept because the VM holds them K times or more: each stands for itself (weight 1),
    # the others for K contents like them (weight K)
    exact: npt.NDArray[np.bool_] = field(repr=False)

    def weights(self, k: int) -> npt.NDArray[np.int64]:
        return np.where(self.exact, 1, k).astype(np.int64)


@dataclass(frozen=True)
class HostSketch:
    host: str
    key_id: str
    k: int
    use_zero_pages: bool
    max_page_sharing: int
    mem_total_bytes: int
    mem_available_bytes: int
    taken_at: float
    vms: tuple[VmSketch, ...]
    source: str = ""  # where it was read from (for messages)

    def union(self, domain: str) -> DomainUnion:
        """The domain's union on this host (built once, when first asked for)."""
        unions: dict[str, DomainUnion] = self.__dict__.setdefault("_unions", {})
        if domain not in unions:
            members = [vm for vm in self.vms if vm.merges and vm.domain == domain]
            unions[domain] = DomainUnion.of(members)
        return unions[domain]


@dataclass(frozen=True)
class DomainUnion:
    """A trust domain's sketch on one host: the union of what its VMs that may merge hold, of
    the sketched contents (sorted), and how many of those VMs hold each."""

    values: Values
    holders: npt.NDArray[np.int64]

    @classmethod
    def of(cls, vms: Sequence[VmSketch]) -> DomainUnion:
        parts = [vm.values for vm in vms if vm.values.size]
        if not parts:
            return cls(np.zeros(0, np.uint64), np.zeros(0, np.int64))
        every = np.sort(np.concatenate(parts))  # np.unique hashes, 50x slower here
        starts = np.flatnonzero(np.concatenate(([True], every[1:] != every[:-1])))
        holders = np.diff(np.append(starts, every.size)).astype(np.int64)
        return cls(every[starts], holders)

    def there(self, vm: VmSketch, *, member: bool) -> npt.NDArray[np.bool_]:
        """Which of the VM's values another VM holds here (`member`: the VM is one of them)."""
        if not self.values.size:
            return np.zeros(vm.values.size, dtype=bool)
        at = np.searchsorted(self.values, vm.values)
        at[at == self.values.size] = 0
        found: npt.NDArray[np.bool_] = (self.values[at] == vm.values) & (
            self.holders[at] >= (2 if member else 1)
        )
        return found


@dataclass(frozen=True)
class Subject:
    """A VM to sketch: what the inventory knows of it."""

    pid: int
    name: str
    uuid: str | None
    vmid: str | None
    platform: str
    domain: str
    group: str | None
    merges: bool
    ram_bytes: int | None


def take(
    paths: HostPaths,
    subjects: Sequence[Subject],
    key: FleetKey,
    *,
    k: int = DEFAULT_K,
    interval: float = 3.0,
    limit_bytes_per_second: float | None = None,
) -> list[VmSketch]:
    """Read and sample each subject's guest RAM (root). VMs that exit meanwhile are left out."""
    if k < 1:
        raise ValueError("K must be at least 1")
    limit = guestmem.RateLimit(limit_bytes_per_second)
    try:
        reader: PageMapReader | None = PageMapReader(paths)
    except PageMapUnavailable:
        reader = None
    read: list[tuple[Subject, guestmem.Runs, npt.NDArray[np.uint64]]] = []
    started = time.monotonic()
    try:
        for subject in subjects:
            try:
                runs = guestmem.guest_runs(paths, subject.pid, subject.ram_bytes, reader)
                hashes = guestmem.hash_runs(paths, subject.pid, runs.starts, runs.lengths, limit)
            except OSError:
                continue  # gone
            read.append((subject, runs, hashes))
    finally:
        if reader is not None:
            reader.close()
    time.sleep(max(0.0, interval - (time.monotonic() - started)))
    sketches = []
    for subject, runs, hashes in read:
        sketch = _sample(paths, subject, runs, hashes, key, k, limit)
        if sketch is not None:
            sketches.append(sketch)
    return sketches


def _sample(
    paths: HostPaths,
    subject: Subject,
    runs: guestmem.Runs,
    hashes: npt.NDArray[np.uint64],
    key: FleetKey,
    k: int,
    limit: guestmem.RateLimit,
) -> VmSketch | None:
    """Keep the contents sampled by value and, exactly, every content the VM holds K times or
    more (a few such contents can hold much of a guest's memory: sampled one in K, they would
    be all or nothing); re-read their pages and leave out those that changed."""
    zero = np.all(hashes == guestmem.ZERO, axis=1)
    pages = np.flatnonzero(~zero)
    contents, ids = _contents(hashes[pages])
    copies = np.bincount(ids, minlength=len(contents))
    heavy = copies >= k
    keep = heavy | (contents[:, 0] % np.uint64(k) == 0)
    chosen = pages[keep[ids]]
    stable = np.ones(chosen.size, dtype=bool)
    if chosen.size:
        addresses = runs.addresses(chosen)
        breaks = np.flatnonzero(np.diff(addresses) != PAGE_SIZE) + 1
        pieces = np.split(addresses, breaks)
        starts = np.array([p[0] for p in pieces], dtype=np.uint64)
        lengths = np.array([p.size for p in pieces], dtype=np.int64)
        try:
            again = guestmem.hash_runs(paths, subject.pid, starts, lengths, limit)
        except OSError:
            return None  # gone
        stable = np.all(again == hashes[chosen], axis=1)
    chosen_ids = ids[keep[ids]]
    held = np.bincount(chosen_ids[stable], minlength=len(contents))
    changed = np.bincount(chosen_ids[~stable], minlength=len(contents))
    volatile = int(changed[heavy].sum()) + k * int(changed[~heavy].sum())
    kept = np.flatnonzero(keep & (held > 0))
    values, inverse = np.unique(key.values(contents[kept]), return_inverse=True)
    counts = np.bincount(inverse, weights=held[kept], minlength=values.size)
    exact = np.zeros(values.size, dtype=bool)
    exact[inverse[heavy[kept]]] = True
    return VmSketch(
        name=subject.name,
        uuid=subject.uuid,
        vmid=subject.vmid,
        platform=subject.platform,
        domain=subject.domain,
        group=subject.group,
        merges=subject.merges,
        ram_bytes=subject.ram_bytes,
        present_pages=runs.pages,
        zero_pages=int(zero.sum()),
        volatile_pages=volatile,
        values=values.astype(np.uint64),
        counts=counts.astype(np.uint32),
        exact=exact,
    )


def _contents(
    digests: npt.NDArray[np.uint64],
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """The distinct digests (rows) and, for each page, the index of its content among them."""
    order = np.lexsort((digests[:, 1], digests[:, 0]))
    ordered = digests[order]
    new = np.ones(order.size, dtype=bool)
    new[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
    ids = np.empty(order.size, dtype=np.int64)
    ids[order] = np.cumsum(new) - 1
    return ordered[new], ids


# --- JSON ---------------------------------------------------------------------------------------


def to_json(sketch: HostSketch) -> dict[str, object]:
    return {
        "format": FORMAT,
        "host": sketch.host,
        "key_id": sketch.key_id,
        "k": sketch.k,
        "use_zero_pages": sketch.use_zero_pages,
        "max_page_sharing": sketch.max_page_sharing,
        "mem_total_bytes": sketch.mem_total_bytes,
        "mem_available_bytes": sketch.mem_available_bytes,
        "taken_at": round(sketch.taken_at, 3),
        "vms": [_vm_json(vm) for vm in sketch.vms],
    }


def _vm_json(vm: VmSketch) -> dict[str, object]:
    repeated = np.flatnonzero(vm.counts > 1)
    return {
        "name": vm.name,
        "uuid": vm.uuid,
        "vmid": vm.vmid,
        "platform": vm.platform,
        "domain": vm.domain,
        "group": vm.group,
        "merges": vm.merges,
        "ram_bytes": vm.ram_bytes,
        "present_pages": vm.present_pages,
        "zero_pages": vm.zero_pages,
        "volatile_pages": vm.volatile_pages,
        "values": base64.b64encode(vm.values.astype("<u8").tobytes()).decode("ascii"),
        # [index, count] of the values more than one of its pages hold
        "repeats": [[int(i), int(vm.counts[i])] for i in repeated],
        # indices of the values kept because it holds them K times or more
        "exact": [int(i) for i in np.flatnonzero(vm.exact)],
    }


def from_json(data: object, source: str) -> HostSketch:
    """A host sketch from its JSON, every field checked; SketchError names `source` and the key."""
    where = _Where(source)
    top = where.mapping(data, "")
    if top.get("format") != FORMAT:
        raise SketchError(f"{source}: not a ksmpolicy sketch (format {top.get('format')!r})")
    vms = [_vm_from(where, vm, f"vms.{i}") for i, vm in enumerate(where.list(top, "vms"))]
    k = where.integer(top, "k", 1)
    return HostSketch(
        host=where.text(top, "host"),
        key_id=where.text(top, "key_id"),
        k=k,
        use_zero_pages=where.flag(top, "use_zero_pages"),
        max_page_sharing=where.integer(top, "max_page_sharing", 2),
        mem_total_bytes=where.integer(top, "mem_total_bytes", 0),
        mem_available_bytes=where.integer(top, "mem_available_bytes", 0),
        taken_at=float(where.integer(top, "taken_at", 0, number=True)),
        vms=tuple(vms),
        source=source,
    )


def _vm_from(where: _Where, data: object, at: str) -> VmSketch:
    vm = where.mapping(data, at)
    try:
        raw = base64.b64decode(where.text(vm, "values", at), validate=True)
    except ValueError as exc:
        raise SketchError(f"{where.source}: {at}.values: not base64") from exc
    if len(raw) % 8:
        raise SketchError(f"{where.source}: {at}.values: not a whole number of 8-byte values")
    values = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
    if values.size > 1 and not bool(np.all(values[1:] > values[:-1])):
        raise SketchError(f"{where.source}: {at}.values: not sorted and unique")
    counts = np.ones(values.size, dtype=np.uint32)
    for n, pair in enumerate(where.list(vm, "repeats", at)):
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
            or not 0 <= pair[0] < values.size
            or not 2 <= pair[1] < 2**32
        ):
            raise SketchError(
                f"{where.source}: {at}.repeats.{n}: expected [index, count] with count >= 2"
            )
        counts[pair[0]] = pair[1]
    exact = np.zeros(values.size, dtype=bool)
    for n, index in enumerate(where.list(vm, "exact", at)):
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < values.size:
            raise SketchError(f"{where.source}: {at}.exact.{n}: expected an index of values")
        exact[index] = True
    ram = vm.get("ram_bytes")
    return VmSketch(
        name=where.text(vm, "name", at),
        uuid=where.optional_text(vm, "uuid", at),
        vmid=where.optional_text(vm, "vmid", at),
        platform=where.text(vm, "platform", at),
        domain=where.text(vm, "domain", at),
        group=where.optional_text(vm, "group", at),
        merges=where.flag(vm, "merges", at),
        ram_bytes=None if ram is None else where.integer(vm, "ram_bytes", 0, at),
        present_pages=where.integer(vm, "present_pages", 0, at),
        zero_pages=where.integer(vm, "zero_pages", 0, at),
        volatile_pages=where.integer(vm, "volatile_pages", 0, at),
        values=values,
        counts=counts,
        exact=exact,
    )


class _Where:
    """Typed field access that names the file and the key in its errors."""

    def __init__(self, source: str) -> None:
        self.source = source

    def _fail(self, at: str, key: str, want: str) -> SketchError:
        place = f"{at}.{key}" if at else key
        return SketchError(f"{self.source}: {place}: expected {want}")

    def mapping(self, data: object, at: str) -> dict[str, object]:
        if not isinstance(data, dict):
            raise SketchError(f"{self.source}: {at or 'the document'}: expected a mapping")
        return data

    def list(self, data: dict[str, object], key: str, at: str = "") -> list[object]:
        value = data.get(key)
        if not isinstance(value, list):
            raise self._fail(at, key, "a list")
        return value

    def text(self, data: dict[str, object], key: str, at: str = "") -> str:
        value = data.get(key)
        if not isinstance(value, str) or not value.isprintable():
            raise self._fail(at, key, "printable text")
        return value

    def optional_text(self, data: dict[str, object], key: str, at: str = "") -> str | None:
        return None if data.get(key) is None else self.text(data, key, at)

    def flag(self, data: dict[str, object], key: str, at: str = "") -> bool:
        value = data.get(key)
        if not isinstance(value, bool):
            raise self._fail(at, key, "true or false")
        return value

    def integer(
        self, data: dict[str, object], key: str, least: int, at: str = "", *, number: bool = False
    ) -> int:
        value = data.get(key)
        if isinstance(value, float) and number and math.isfinite(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise self._fail(at, key, f"a number of at least {least}")
        return value


def host_name() -> str:
    return socket.gethostname()


# --- this host ----------------------------------------------------------------------------------


def sketch_host(
    paths: HostPaths,
    policy: Policy | None,
    key: FleetKey,
    *,
    k: int = DEFAULT_K,
    interval: float = 3.0,
    names: Sequence[str] = (),
    limit_bytes_per_second: float | None = None,
) -> HostSketch:
    """The sketch of every VM running here (or those named) whose memory can merge (root)."""
    from ksmpolicy.kernel.ksm import read_ksm  # noqa: PLC0415
    from ksmpolicy.kernel.procfs import read_meminfo  # noqa: PLC0415
    from ksmpolicy.report.status import collect  # noqa: PLC0415

    status = collect(paths, policy, sample_seconds=0, pagemap=False)
    subjects = [
        Subject(
            pid=vm.pid,
            name=vm.name,
            uuid=vm.uuid,
            vmid=vm.vmid,
            platform=vm.source,
            domain=vm.domain or DEFAULT_DOMAIN,
            group=vm.group,
            merges=vm.decision in ("merge", None),
            ram_bytes=vm.ram_bytes,
        )
        for vm in status.vms
        if vm.kind == "qemu" and vm.decision != "never" and (not names or vm.name in names)
    ]
    if names and not subjects:
        raise SketchError(f"no running VM named {', '.join(names)}")
    state = read_ksm(paths)
    zero = state.get("use_zero_pages") if state else None
    if policy is not None:
        zero = int(policy.reconciler.use_zero_pages)  # the daemon writes it
    cap = (state.get("max_page_sharing") if state else None) or 256
    memory = read_meminfo(paths)
    sketches = take(
        paths, subjects, key, k=k, interval=interval, limit_bytes_per_second=limit_bytes_per_second
    )
    return HostSketch(
        host=host_name(),
        key_id=key.key_id,
        k=k,
        use_zero_pages=bool(zero),
        max_page_sharing=int(cap),
        mem_total_bytes=memory.get("MemTotal", 0),
        mem_available_bytes=memory.get("MemAvailable", 0),
        taken_at=time.time(),
        vms=tuple(sketches),
    )


def read_sketch(where: str, *, timeout: float = 10.0) -> HostSketch:
    """A host's sketch from a file or an http(s) URL (a daemon's /sketch)."""
    import json  # noqa: PLC0415

    if where.startswith(("http://", "https://")):
        import urllib.request  # noqa: PLC0415

        try:
            with urllib.request.urlopen(where, timeout=timeout) as response:
                data = response.read(MAX_SKETCH_BYTES + 1)
        except OSError as exc:
            raise SketchError(f"cannot fetch {where}: {exc}") from exc
    else:
        try:
            data = read_regular(where, MAX_SKETCH_BYTES)
        except OSError as exc:
            raise SketchError(f"cannot read {where}: {exc.strerror or exc}") from exc
    if len(data) > MAX_SKETCH_BYTES:
        raise SketchError(f"{where}: larger than {MAX_SKETCH_BYTES // 2**20} MiB: refusing it")
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise SketchError(f"{where}: not JSON ({exc})") from exc
    return from_json(document, where)
