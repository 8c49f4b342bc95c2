"""Sketches: a compact, comparable summary of what each VM's memory holds (root: it reads
guest memory, and changes nothing in it).

A VM's sketch keeps a sample of its stable page contents, chosen by content so that the same
content is sampled on every host:

1. every present page of its guest RAM is hashed with xxh3-128, as the estimate reads it
   (kernel/guestmem.py; pages mapped to the kernel's zero page are not read);
2. a page is sampled when the low 64 bits of its digest are 0 modulo K (default 64): one page
   content in K, the same contents everywhere; so is every content the VM holds K times or
   more (exactly: it stands for itself, not for K); zero-filled pages are counted apart;
3. `interval` seconds after each VM's own first read, its sampled pages are hashed again;
   those that changed are volatile (ksmd would not merge them) and are left out, counted as
   `volatile_pages` (x K);
4. each sampled content is kept as an 8-byte keyed hash: BLAKE2b of its digest under a key
   derived from the fleet key (/etc/ksmpolicy/fleet.key, root-only) and the VM's trust domain,
   with how many of the VM's pages hold it.

Why keyed: a 128-bit digest of a page is a fingerprint anyone can compute for a page they can
guess (a known binary, a page of a known file, a page holding a guessed secret), so publishing
digests would let whoever reads the sketch test such guesses against a tenant's memory. Under a
key that only the fleet's hosts hold, a reader without the key cannot test a guess. Why per
domain: with one key for all, equal values would still tell a reader which VMs of different
tenants hold the same pages; each domain's values are under its own key, so values compare
only within a domain (the only comparison placement makes). What a reader without the key
still learns: how many sampled contents each VM holds, how often, and which VMs of one domain
hold the same ones (how much they share, what the sketch is for). A host with the key is root
on a fleet host, and could read the guests' memory anyway.

Why sealed: the whole document carries a MAC under the fleet key (`seal`), so a sketch that a
local user or a host outside the fleet wrote, or one changed on the way, is refused before any
of its fields is used; and every field is checked (host names, UUIDs and VMIDs appear in the
commands `rebalance` prints). Hosts compare sketches only under the same key (`key_id` says
which key, not the key).

Size: about one 8-byte value per K distinct contents, plus, exactly, every content the VM holds
K times or more (at most one per K pages): at K = 64 about 43 KiB per GiB of guest RAM as JSON.
The sampling error: a VM's sharing with a host is estimated from the sampled contents they
share, about shared/K of them; the relative standard error is about sqrt(K / shared pages)
(6 % for 64 MiB shared at K = 64; bench/results/placement.md measures it).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.files import read_regular, untrusted_reason
from ksmpolicy.kernel import guestmem
from ksmpolicy.paths import FLEET_KEY, HostPaths
from ksmpolicy.policy.model import CONFLICT_DOMAIN, DEFAULT_DOMAIN, Policy

if TYPE_CHECKING:
    from ksmpolicy.inventory.model import VmStatus

FORMAT = "ksmpolicy-sketch/2"
DEFAULT_K = 64
MAX_K = 2**20
KEY_BYTES = 32
MAX_SKETCH_BYTES = 512 * 2**20  # a host's sketch file; larger is refused
PLATFORMS = ("libvirt", "proxmox", "process")

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

    def values(self, digests: npt.NDArray[np.uint64], domain: str) -> Values:
        """The keyed 64-bit value of each N x 2 digest, under the trust domain's own key."""
        key = hashlib.blake2b(
            domain.encode(), key=self.secret, person=b"ksmpolicy-domain", digest_size=32
        ).digest()
        raw = digests.astype("<u8", copy=False).tobytes()
        out = bytearray(8 * len(digests))
        for i in range(len(digests)):
            out[8 * i : 8 * i + 8] = hashlib.blake2b(
                raw[16 * i : 16 * i + 16], key=key, digest_size=8
            ).digest()
        return np.frombuffer(bytes(out), dtype="<u8").astype(np.uint64)

    def seal(self, document: dict[str, object]) -> str:
        """The MAC of a sketch document (every field but `seal`, in canonical JSON)."""
        body = {name: value for name, value in document.items() if name != "seal"}
        payload = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.blake2b(
            payload, key=self.secret, person=b"ksmpolicy-seal", digest_size=32
        ).hexdigest()


def load_key(paths: HostPaths, *, create: bool = False) -> tuple[FleetKey, bool]:
    """The fleet key (and whether it was made now). It must be root's alone: owned by root,
    readable by no one else, on a path no other user can change."""
    path = paths.under_root(FLEET_KEY)
    host = paths.root == HostPaths().root  # a test tree under /tmp is not a host's path
    made = False
    if create and not path.exists():
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        reason = untrusted_reason(path.parent) if host else None
        if reason:
            raise SketchError(f"refusing to make the fleet key in {path.parent}: {reason}")
        made = _create_key(path)
    if not path.exists():
        raise SketchError(
            f"no fleet key at {path}: `ksmpolicy sketch --new-key` makes one; copy the same "
            "file (root, mode 0600) to every host whose sketches you compare"
        )
    if host:
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


def _create_key(path: Path) -> bool:
    """Write a new key at `path` unless one appears there meanwhile (then False): written whole
    to a file of its own first, then linked in place, which fails if the name exists."""
    spare = path.with_name(f".{path.name}.{os.getpid()}.new")
    fd = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(os.urandom(KEY_BYTES).hex().encode() + b"\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(spare, path)
        except FileExistsError:
            return False
        return True
    finally:
        spare.unlink(missing_ok=True)


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
    active: bool  # its memory merges now (under trust domains: its domain is the active one)
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

    def terms(self, k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
        """(w, w x copies, the sum of w x (copies - 1)) for its values: what `plan.saving`
        adds up, made once per K (a plan asks for them at every host)."""
        cache: dict[int, tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]]
        cache = self.__dict__.setdefault("_terms", {})
        if k not in cache:
            weights = self.weights(k)
            held = weights * self.counts.astype(np.int64)
            cache[k] = (weights, held, int(held.sum() - weights.sum()))
        return cache[k]


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
    # under trust domains, the domains that merge now (one per merge scope: the host, or each
    # NUMA node with merge_across_nodes=0); None: the host does not use trust domains
    active_domains: tuple[str, ...] | None
    vms: tuple[VmSketch, ...]
    source: str = ""  # where it was read from (for messages)

    def union(self, domain: str) -> DomainUnion:
        """What the domain's VMs that merge now hold on this host (built when first asked)."""
        unions: dict[str, DomainUnion] = self.__dict__.setdefault("_unions", {})
        if domain not in unions:
            members = [vm for vm in self.vms if vm.active and vm.domain == domain]
            unions[domain] = DomainUnion.of(members)
        return unions[domain]

    def would_merge(self, vm: VmSketch) -> str | None:
        """Why `vm` would not merge here if it moved here, or None: the policy must let it, and
        under trust domains its domain must be one that merges here, or none may merge yet."""
        if not vm.merges:
            return "the policy excludes it"
        if self.active_domains and vm.domain not in self.active_domains:
            return f"trust domain {', '.join(self.active_domains)} merges there"
        return None


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
        every = np.concatenate(parts)
        every.sort()  # in place (a copy costs as much again in page faults); np.unique is slower
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
    active: bool
    ram_bytes: int | None
    start: int | None = None  # when it started (clock ticks since boot): PID and start name it


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
    # each VM's pages are read again `interval` seconds after its own first read, whatever the
    # VMs read before it took: a change in that time marks a page volatile
    read: list[tuple[Subject, guestmem.Process, guestmem.Runs, guestmem.Hashes, float]] = []
    sketches = []
    with contextlib.ExitStack() as stack:
        wanted = [(subject.pid, subject.start, subject.ram_bytes) for subject in subjects]
        for index, process, runs in guestmem.held_runs(paths, wanted, stack):
            try:
                hashes = guestmem.hash_runs(process, runs.starts, runs.lengths, limit)
            except guestmem.GONE:
                continue
            read.append((subjects[index], process, runs, hashes, time.monotonic()))
        for subject, process, runs, hashes, read_at in read:
            time.sleep(max(0.0, read_at + interval - time.monotonic()))
            sketch = _sample(process, subject, runs, hashes, key, k, limit)
            if sketch is not None:
                sketches.append(sketch)
    return sketches


def _sample(
    process: guestmem.Process,
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
    contents, ids = guestmem.distinct(hashes[pages])
    copies = np.bincount(ids, minlength=len(contents))
    heavy = copies >= k
    keep = heavy | (contents[:, 0] % np.uint64(k) == 0)
    chosen = pages[keep[ids]]
    try:
        again = guestmem.hash_pages(process, runs, chosen, limit)
    except guestmem.GONE:
        return None
    stable = np.all(again == hashes[chosen], axis=1)
    chosen_ids = ids[keep[ids]]
    held = np.bincount(chosen_ids[stable], minlength=len(contents))
    changed = np.bincount(chosen_ids[~stable], minlength=len(contents))
    volatile = int(changed[heavy].sum()) + k * int(changed[~heavy].sum())
    kept = np.flatnonzero(keep & (held > 0))
    values, inverse = np.unique(key.values(contents[kept], subject.domain), return_inverse=True)
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
        active=subject.active,
        ram_bytes=subject.ram_bytes,
        present_pages=runs.pages,
        zero_pages=int(zero.sum()),
        volatile_pages=volatile,
        values=values.astype(np.uint64),
        counts=counts.astype(np.uint32),
        exact=exact,
    )


# --- identities a sketch may carry ---------------------------------------------------------

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
VMID = re.compile(r"[1-9][0-9]{0,8}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=[A-Za-z0-9.-]{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*")
MAX_PAGES = 2**40  # 4 PiB of 4 KiB pages: more is no real host's
MAX_BYTES = 2**53
MAX_NAME = 1024


def is_host_name(text: str) -> bool:
    """A DNS name or an IP address literal (no zone index): what a host may be called in a
    sketch, since it becomes part of a printed migration URI."""
    if _DNS_NAME.fullmatch(text):
        return True
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return "%" not in text


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
    """The sketch of the VMs running here (or those named) that `subjects_of` takes (root).
    Each VM's domain is this host's policy's (`policy`: None is no policy: every VM in
    `default`); a caller whose policy does not load must not sketch."""
    from ksmpolicy.kernel.ksm import read_ksm  # noqa: PLC0415
    from ksmpolicy.kernel.procfs import read_meminfo  # noqa: PLC0415
    from ksmpolicy.report.status import collect  # noqa: PLC0415

    status = collect(paths, policy, sample_seconds=0, pagemap=False)
    domains = policy is not None and policy.uses_domains
    active = tuple(sorted({s.domain for s in status.scopes})) if domains else None
    subjects = subjects_of(status.vms, active, names)
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
    name = host_name()
    if not is_host_name(name):
        raise SketchError(f"this host's name {name!r} is no DNS name: set one (hostnamectl)")
    total = memory.get("MemTotal", 0)
    return HostSketch(
        host=name,
        key_id=key.key_id,
        k=k,
        use_zero_pages=bool(zero),
        max_page_sharing=int(cap),
        mem_total_bytes=total,
        mem_available_bytes=min(memory.get("MemAvailable", 0), total),
        taken_at=time.time(),
        active_domains=active,
        vms=tuple(sketches),
    )


def subjects_of(
    vms: Sequence[VmStatus], active: tuple[str, ...] | None, names: Sequence[str] = ()
) -> list[Subject]:
    """The VMs to sketch among those running (`active`: under trust domains, the domains that
    merge now; None without trust domains). Only VMs whose identity is believed: a process any
    local user can start and call qemu-system-x86_64 is left out, and so is a VM that two
    bindings put in different domains (it never merges), or one the policy never lets merge."""
    subjects = []
    for vm in vms:
        if vm.kind != "qemu" or not vm.trusted or vm.domain == CONFLICT_DOMAIN:
            continue
        if vm.decision == "never" or (names and vm.name not in names):
            continue
        domain = vm.domain or DEFAULT_DOMAIN
        merges = vm.decision in ("merge", None)
        uuid = (vm.uuid or "").lower()
        subjects.append(
            Subject(
                pid=vm.pid,
                name=vm.name,
                uuid=uuid if UUID.fullmatch(uuid) else None,
                vmid=vm.vmid if vm.vmid and VMID.fullmatch(vm.vmid) else None,
                platform=vm.source if vm.source in PLATFORMS else "process",
                domain=domain,
                group=vm.group,
                merges=merges,
                active=merges and (active is None or domain in active),
                ram_bytes=vm.ram_bytes,
                start=vm.start,
            )
        )
    return subjects
