"""What runs on this host, as records: the host's KSM state and who controls it, and each VM
(or other KSM user) with its identity, facts, decision and merge state. The inventory
(`inventory/__init__.py: take`) makes them; the reports, the keeper and the daemon read them."""

from __future__ import annotations

from dataclasses import dataclass

from ksmpolicy.platforms.base import VmRef


@dataclass(frozen=True)
class VmStatus:
    pid: int
    name: str  # VM name, or "VM <vmid>", or "comm[pid]" for non-QEMU processes
    vmid: str | None
    uuid: str | None
    kind: str  # qemu, or another KSM user's kind (firecracker, service, ...: VmProcess.kind)
    source: str  # libvirt | proxmox | process: where the facts came from
    group: str | None
    decision: str | None  # merge | exclude | never (memory cannot merge) | None (no policy)
    rule: str | None
    compliant: bool | None  # running state matches the decision; None when unknown
    ram_bytes: int | None
    mergeable_bytes: int
    merged_bytes: int  # this VM's pages mapped to KSM pages (ksm_merging_pages)
    zero_bytes: int  # this VM's pages mapped to the zero page (ksm_zero_pages)
    profit_bytes: int | None  # ksm_process_profit: signed, rmap overhead counted
    # What merging saves this VM: exact from the page map (each KSM page's saving split among
    # its mappers), else ksm_stat's merged and zero pages, which count a shared page fully
    # for every VM that maps it.
    saved_bytes: int = 0
    savings_source: str = "ksm_stat"  # pagemap | ksm_stat
    domain: str | None = None  # its trust domain (None: no policy)
    domain_reason: str | None = None  # what put it there (policy.decide.Decider.domain_of)
    merging_now: bool | None = None  # its guest RAM is mergeable now (None: cannot tell)
    mergeable_vmas: int = 0  # VMAs of it KSM may scan now (guest RAM, ROMs, video RAM)
    trusted: bool = True  # run by root or the hypervisor's user: its identity is believed
    start: int | None = None  # start time (clock ticks since boot): with the PID, names it
    unit: str | None = None  # its systemd unit (services, and VMs started in one)
    reason: str | None = None  # the decision's reason (which regions of RAM cannot merge)
    # Mergeable VMAs while its guest RAM is not: QEMU's ROMs and video RAM, which keep the
    # setting QEMU started with until it restarts (a live switch cannot reach them).
    residue_vmas: int = 0
    mergeable_size: int = 0  # virtual size of its mergeable VMAs (resident or not)
    ram_unmergeable: str | None = None  # hugetlb | shared | confidential: from its mappings
    mem_merge: bool | None = None  # QEMU's -machine mem-merge= at start (None: not given)
    hook_said: tuple[str, ...] = ()  # what the hook said about it at its last start

    @property
    def ref(self) -> VmRef:
        """The VM as its platform's commands name it."""
        merge = None if self.decision is None else self.decision == "merge"
        return VmRef(self.pid, self.name, self.uuid, self.vmid, merge)


@dataclass(frozen=True)
class HostStatus:
    available: bool  # the kernel has KSM
    running: bool
    controller: str  # who sets the knobs: ksmpolicy daemon, ksmtuned, kernel advisor, ...
    knobs: dict[str, int | str]
    saved_bytes: int
    general_profit_bytes: int | None
    full_scans: int | None
    ksmd_cpu_percent: float | None
    ksmd_cpu_seconds: float | None
    pages_sharing: int | None
    pages_shared: int | None
    zero_pages: int | None
    pages_scanned: int | None = None  # since boot, including the current, unfinished scan
    # Other controllers of the knobs: "ksmtuned (pid 812)", and whether each runs (else: boot)
    others: tuple[tuple[str, bool], ...] = ()
    passive: str | None = None  # the daemon writes no knob, and why (from its daemon.json)
    discovery: str | None = None  # how the daemon finds new VMs (process events, polling)
    pace: str | None = None  # the daemon's last plan: mode and why
