"""Running VMs and other KSM users, found in /proc: identity, guest RAM, mergeable memory."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ksmpolicy.kernel.procfs import effective_uid, read_stat, start_of
from ksmpolicy.kernel.smaps import Smaps
from ksmpolicy.kernel.smaps import parse as parse_smaps
from ksmpolicy.kernel.vmm import classify
from ksmpolicy.paths import HostPaths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KsmStat:
    """/proc/PID/ksm_stat (Linux 6.1+); fields a kernel lacks are None."""

    rmap_items: int | None = None
    zero_pages: int | None = None
    merging_pages: int | None = None
    process_profit: int | None = None
    mergeable: bool | None = None  # any VMA of the process is mergeable (6.10+)
    merge_any: bool | None = None  # prctl(PR_SET_MEMORY_MERGE) was used


@dataclass(frozen=True)
class VmProcess:
    pid: int
    # "qemu"; for other processes with mergeable memory: "firecracker", "cloud-hypervisor",
    # "crosvm", "kata" (a VMM in a kata sandbox), "service" (in a systemd unit) or "process"
    kind: str
    name: str  # the VM name; for others "comm[pid]"
    uuid: str | None
    vmid: str | None  # Proxmox `-id`
    ram_bytes: int | None  # guest RAM from `-m`
    mem_merge: bool | None  # `-machine mem-merge=`: False for nosharepages / allow-ksm 0
    mergeable_bytes: int  # resident memory in VMAs marked mergeable (smaps VmFlags "mg")
    mergeable_vmas: int
    ksm: KsmStat | None
    # Whether the guest RAM itself (the VMAs at least half the size of -m) is mergeable. QEMU's
    # small ROM regions stay mergeable when RAM is switched off, so ksm_stat can't tell.
    ram_mergeable: bool | None = None
    # (start, end) of the mergeable VMAs, as of the smaps read the other figures come from
    mergeable_ranges: tuple[tuple[int, int], ...] = ()
    uid: int | None = None  # who runs it (its effective uid, from /proc/PID/status)
    start: int | None = None  # start time in clock ticks since boot: PID and start name it
    unit: str | None = None  # its systemd unit (from /proc/PID/cgroup), e.g. "jenkins.service"
    mergeable_size: int = 0  # virtual size of the mergeable VMAs (resident or not)
    # Why its guest RAM mappings can never merge, from the running mappings: "hugetlb",
    # "shared", or "confidential" (guest_memfd, SEV/TDX); None when some of them can.
    ram_unmergeable: str | None = None

    @property
    def trusted(self) -> bool:
        """Run by root or by the hypervisor's QEMU user: its name and command line are the
        hypervisor's word. Anyone can start a process that calls itself qemu-system-x86_64."""
        return trusted_uid(self.uid)


@dataclass(frozen=True)
class _Mergeable:
    """What one smaps read says about a process's mergeable memory."""

    resident: int
    vmas: int
    ram: bool | None
    ranges: tuple[tuple[int, int], ...]
    size: int = 0  # virtual size of the mergeable VMAs
    ram_unmergeable: str | None = None  # see VmProcess


@dataclass(frozen=True)
class _Identity:
    kind: str
    name: str
    uuid: str | None
    vmid: str | None
    ram_bytes: int | None
    mem_merge: bool | None
    unit: str | None = None
    confidential: bool = False  # started as a confidential guest (SEV, SEV-SNP, TDX)


# Mappings of guest memory only the guest can read: KVM's guest_memfd.
CONFIDENTIAL_PATHS = (b"kvm-gmem", b"guest_memfd")


def read_ksm_stat(path: Path) -> KsmStat | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.replace(":", " ", 1).partition(" ")
        values[key.strip()] = value.strip()

    def number(key: str) -> int | None:
        value = values.get(key)
        return int(value) if value and value.lstrip("-").isdigit() else None

    def flag(key: str) -> bool | None:
        value = values.get(key)
        return None if value is None else value == "yes"

    return KsmStat(
        rmap_items=number("ksm_rmap_items"),
        zero_pages=number("ksm_zero_pages"),
        merging_pages=number("ksm_merging_pages"),
        process_profit=number("ksm_process_profit"),
        mergeable=flag("ksm_mergeable"),
        merge_any=flag("ksm_merge_any"),
    )


class ProcessScanner:
    """Finds VM processes in /proc. Keeps what is costly to read between passes.

    Reading smaps walks the page tables of the whole process (about 1 ms per small process), so
    its result is reused: a process seen for less than `young_seconds` (a booting guest, whose
    memory becomes resident) is re-read on every pass; an older one after
    `smaps_max_age_seconds`, spread by PID so that not all of them come due in one pass; any
    process at once when ksm_stat says its mergeability changed (a live toggle). Processes are
    keyed by PID and start time, so a reused PID is a new process. An exec keeps both: libvirt
    forks, prepares the child, then execs QEMU, and a pass in between sees libvirtd. So who a
    process is is also tied to its name (comm), which an exec changes, and `forget` drops a
    PID the kernel reported an exec for. ksm_stat is read every pass.
    """

    def __init__(
        self,
        paths: HostPaths,
        *,
        smaps_max_age_seconds: float = 30.0,
        young_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.paths = paths
        self.smaps_max_age_seconds = smaps_max_age_seconds
        self.young_seconds = young_seconds
        self.clock = clock
        # key -> (comm when identified, identity)
        self._identity: dict[tuple[int, int], tuple[str, _Identity | None]] = {}
        self._first_seen: dict[tuple[int, int], float] = {}
        # key -> (read at, resident mergeable bytes, VMA count, ksm_stat's flag, RAM mergeable)
        self._smaps: dict[tuple[int, int], tuple[float, bool | None, _Mergeable]] = {}

    def scan(self, *, refresh: bool = False) -> list[VmProcess]:
        """Every QEMU process, and every other process with mergeable memory.

        `refresh` re-reads smaps of every process (after a VM started or stopped).
        """
        now = self.clock()
        found = []
        alive: set[tuple[int, int]] = set()
        try:
            entries = [e for e in os.scandir(self.paths.proc) if e.name.isdigit()]
        except OSError:
            return []
        for entry in entries:
            pid = int(entry.name)
            proc = Path(entry.path)
            stat = read_stat(proc)
            start = start_of(stat)
            if stat is None or start is None:
                continue  # gone, or a kernel thread
            key = (pid, start)
            alive.add(key)
            known = self._identity.get(key)
            if known is None or known[0] != stat[0]:  # new, or exec'd since
                self._identity[key] = (stat[0], _identify_safely(proc, pid))
                self._first_seen[key] = now
                self._smaps.pop(key, None)
            identity = self._identity[key][1]
            if identity is None:
                continue
            ksm = read_ksm_stat(proc / "ksm_stat")
            if identity.kind != "qemu" and not (ksm and (ksm.mergeable or ksm.merge_any)):
                continue
            if ksm is not None and ksm.mergeable is False and not ksm.merge_any:
                mergeable = _Mergeable(0, 0, False if identity.ram_bytes else None, ())
            else:
                flag = ksm.mergeable if ksm else None
                mergeable = self._mergeable(
                    proc, key, now, refresh=refresh, flag=flag, ram_bytes=identity.ram_bytes
                )
                if identity.kind != "qemu" and mergeable.vmas == 0:
                    continue
            found.append(
                VmProcess(
                    uid=effective_uid(proc),
                    start=start,
                    pid=pid,
                    kind=identity.kind,
                    name=identity.name,
                    uuid=identity.uuid,
                    vmid=identity.vmid,
                    ram_bytes=identity.ram_bytes,
                    mem_merge=identity.mem_merge,
                    mergeable_bytes=mergeable.resident,
                    mergeable_vmas=mergeable.vmas,
                    ksm=ksm,
                    ram_mergeable=mergeable.ram,
                    mergeable_ranges=mergeable.ranges,
                    unit=identity.unit,
                    mergeable_size=mergeable.size,
                    ram_unmergeable="confidential"
                    if identity.confidential
                    else mergeable.ram_unmergeable,
                )
            )
        for cache in (self._identity, self._first_seen, self._smaps):
            for key in [k for k in cache if k not in alive]:
                del cache[key]
        return found

    def forget(self, pid: int) -> None:
        """Identify `pid` afresh on the next pass: it exec'd (the kernel's process events)."""
        for key in [k for k in self._identity if k[0] == pid]:
            del self._identity[key]
            self._smaps.pop(key, None)

    def _mergeable(
        self,
        proc: Path,
        key: tuple[int, int],
        now: float,
        *,
        refresh: bool,
        flag: bool | None,
        ram_bytes: int | None,
    ) -> _Mergeable:
        cached = self._smaps.get(key)
        young = now - self._first_seen.get(key, now) < self.young_seconds
        max_age = self.smaps_max_age_seconds * (1 + (key[0] % 8) / 8)
        if cached and not (refresh or young) and cached[1] == flag and now - cached[0] < max_age:
            return cached[2]
        try:
            smaps = parse_smaps((proc / "smaps").read_bytes())
        except OSError:
            return cached[2] if cached else _Mergeable(0, 0, None, ())
        resident, count = smaps.mergeable_resident()
        found = _Mergeable(
            resident,
            count,
            smaps.ram_mergeable(ram_bytes),
            tuple(smaps.mergeable_ranges()),
            sum(v.size for v in smaps.vmas if v.mergeable),
            _ram_unmergeable(smaps, ram_bytes),
        )
        self._smaps[key] = (now, flag, found)
        return found


def _ram_unmergeable(smaps: Smaps, ram_bytes: int | None) -> str | None:
    """Why no guest RAM mapping of a QEMU can ever merge, or None when one can: each is
    hugetlb or mapped shared (libvirt's hugepages or shared access for every node), or guest
    memory lives in a guest_memfd."""
    if any(p in v.path for v in smaps.vmas for p in CONFIDENTIAL_PATHS):
        return "confidential"
    ram = smaps.ram_vmas(ram_bytes)
    if not ram:
        return None
    if all(v.hugetlb for v in ram):
        return "hugetlb"
    if all(v.hugetlb or v.shared for v in ram):
        return "shared"
    return None


def footprint_bytes(processes: Sequence[VmProcess]) -> int:
    """The mergeable footprint: resident mergeable memory of every process, VM or not."""
    return sum(p.mergeable_bytes for p in processes)


def _identify_safely(proc: Path, pid: int) -> _Identity | None:
    """`_identify`, for any process: its command line and cgroup are whatever its owner wrote,
    so one that this code cannot read must cost that process its identity, never the scan
    (status, metrics, the daemon) of every other one. Said in the log, once per process."""
    try:
        return _identify(proc, pid)
    except Exception as exc:  # a process's own bytes must not stop the scan
        log.warning("pid %d: cannot read who it is (%s: %r)", pid, type(exc).__name__, str(exc))
        return _Identity("process", f"pid {pid}", None, None, None, None, None)


def _identify(proc: Path, pid: int) -> _Identity | None:
    try:
        raw = (proc / "cmdline").read_bytes()
        comm = (proc / "comm").read_text().strip()
    except OSError:
        return None
    if not raw:
        return None  # kernel thread or zombie
    argv = raw.rstrip(b"\0").decode("utf-8", "replace").split("\0")
    unit = systemd_unit(proc)
    found = classify(argv, comm, unit)
    if found.kind == "qemu":
        label = found.name or (f"vmid {found.vmid}" if found.vmid else f"{comm}[{pid}]")
    else:
        label = found.name or f"{comm}[{pid}]"
    return _Identity(
        found.kind,
        label,
        found.uuid,
        found.vmid,
        found.ram_bytes,
        found.mem_merge,
        unit,
        found.confidential,
    )


def systemd_unit(proc: Path) -> str | None:
    """The system unit a process runs in, from /proc/PID/cgroup: the unified hierarchy's path
    (cgroup v2), else the name=systemd one (v1); its last `.service` or `.scope` component.

    The kernel prints cgroup paths as they are, and a user with a delegated subtree names
    their cgroups (a newline in one adds lines; `postgresql.service` is a fine name for a
    user unit). So a hierarchy listed twice means a forged line: no unit; and a process under
    a user's manager (`user@UID.service`) runs one of that user's units, not the system's.
    """
    try:
        text = (proc / "cgroup").read_text(errors="replace")
    except OSError:
        return None
    paths: dict[str, str] = {}
    seen: set[str] = set()
    for line in text.split("\n"):
        if not line:
            continue
        hierarchy, _sep, rest = line.partition(":")
        if hierarchy in seen:
            return None
        seen.add(hierarchy)
        controllers, _sep, path = rest.partition(":")
        paths.setdefault(controllers, path)
    for found in (paths.get(""), paths.get("name=systemd")):  # v2 first; hybrid hosts have both
        parts = (found or "").split("/")
        if any(part.startswith("user@") and part.endswith(".service") for part in parts):
            return None
        for part in reversed(parts):
            if part.endswith((".service", ".scope")):
                return part
    return None


_HYPERVISOR_USERS = ("libvirt-qemu", "qemu")  # Debian's and Red Hat's QEMU user for libvirt
_hypervisor_uids: frozenset[int] | None = None


def trusted_uid(uid: int | None) -> bool:
    """Whether a process run by `uid` is the hypervisor's word: root's, or the QEMU user's."""
    return uid is not None and uid in hypervisor_uids()


def hypervisor_uids() -> frozenset[int]:
    """root, and the users libvirt runs QEMU as."""
    global _hypervisor_uids  # noqa: PLW0603
    if _hypervisor_uids is None:
        import pwd  # noqa: PLC0415

        found = {0}
        for name in _HYPERVISOR_USERS:
            with contextlib.suppress(KeyError):
                found.add(pwd.getpwnam(name).pw_uid)
        _hypervisor_uids = frozenset(found)
    return _hypervisor_uids
