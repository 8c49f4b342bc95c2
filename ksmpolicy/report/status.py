"""What KSM saves, for which VM, at what CPU cost: collected from /sys, /proc and the VMs'
definitions, with findings that say what to do. Read-only."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.files import read_regular
from ksmpolicy.hookcore import said_path
from ksmpolicy.kernel.controllers import Controller, daemon_pids, other_controllers
from ksmpolicy.kernel.ksm import KsmState, read_ksm
from ksmpolicy.kernel.procfs import ksmd_pid, process_cpu_seconds, started_at
from ksmpolicy.kernel.scan import ProcessScanner, VmProcess
from ksmpolicy.paths import PAGE_SIZE, HostPaths
from ksmpolicy.policy.decide import Decider, Decision, VmFacts
from ksmpolicy.policy.model import CONFLICT_DOMAIN, DEFAULT_DOMAIN, HOST_DOMAIN, Action, Policy
from ksmpolicy.quoting import one_line
from ksmpolicy.report.findings import vm_findings
from ksmpolicy.report.model import Finding, GroupStatus, HostStatus, ScopeStatus, Status, VmStatus
from ksmpolicy.runtime.alive import read_alive

if TYPE_CHECKING:
    from ksmpolicy.report.sharing import Sharing


def collect(
    paths: HostPaths,
    policy: Policy | None,
    *,
    sample_seconds: float = 0.2,
    scanner: ProcessScanner | None = None,
    policy_error: str | None = None,
    pagemap: bool = True,
    reuse: Sharing | None = None,
) -> Status:
    """One look at the host. `sample_seconds` measures ksmd's CPU share (0: not measured);
    `pagemap` reads the page map for exact savings and the sharing map (root); `reuse` gives
    an earlier walk's map instead (the figures of VMs that still run)."""
    state = read_ksm(paths)
    ksmd = ksmd_pid(paths) if state is not None else None
    cpu_before = process_cpu_seconds(paths, ksmd) if ksmd else None
    started = time.monotonic()
    # Before a page-map walk every smaps is read afresh: the walk reads the mergeable areas
    # it names, and a VM switched on since a cached read would be missed.
    processes = (scanner or ProcessScanner(paths)).scan(refresh=pagemap and reuse is None)
    decider = Decider(policy) if policy is not None else None
    vms = tuple(_vm_status(paths, p, decider) for p in processes)
    if cpu_before is not None and sample_seconds > 0:
        time.sleep(max(0.0, sample_seconds - (time.monotonic() - started)))
    elapsed = time.monotonic() - started
    cpu_after = process_cpu_seconds(paths, ksmd) if ksmd else None
    share = None
    if cpu_before is not None and cpu_after is not None and elapsed > 0 and sample_seconds > 0:
        share = 100 * (cpu_after - cpu_before) / elapsed
    host = _host_status(paths, state, share, cpu_after)
    sharing: Sharing | None
    note: str | None
    if reuse is not None:
        sharing, note = reuse, None
    elif pagemap:
        ranges = {p.pid: p.mergeable_ranges for p in processes}  # smaps is not read twice
        domains = policy is not None and policy.uses_domains
        sharing, note = _sharing(paths, vms, host, ranges, domains=domains)
    else:
        sharing, note = None, "the page map was not read"
    if sharing is not None:
        exact = {v.pid: v.saved_bytes for v in sharing.vms}
        vms = tuple(
            replace(v, saved_bytes=exact[v.pid], savings_source="pagemap") if v.pid in exact else v
            for v in vms
        )
    scopes: tuple[ScopeStatus, ...] = ()
    extra: list[Finding] = []
    if policy is not None and policy.uses_domains:
        from ksmpolicy.report.trust import domain_view  # noqa: PLC0415

        daemon_running = host.controller == DAEMON_CONTROLLER
        scopes, vms, extra = domain_view(paths, policy, vms, daemon_running)
    groups = _groups(vms)
    findings = (
        *_findings(host, vms, domains=policy is not None and policy.uses_domains),
        *extra,
        *(sharing.findings if sharing else ()),
    )
    return Status(
        host,
        vms,
        groups,
        findings,
        policy.source if policy else None,
        policy_error,
        sharing=sharing,
        savings_note=note,
        scopes=scopes,
    )


def _sharing(
    paths: HostPaths,
    vms: Sequence[VmStatus],
    host: HostStatus,
    ranges: Mapping[int, Sequence[tuple[int, int]]],
    *,
    domains: bool = False,
) -> tuple[Sharing | None, str | None]:
    """The sharing map of the running VMs, or None and why it could not be read."""
    if not host.available:
        return None, "this kernel has no KSM"
    # numpy loads only here, so `status --no-pagemap` and the hook never pay for it
    from ksmpolicy.kernel.pagemap import PageMapUnavailable  # noqa: PLC0415
    from ksmpolicy.report.sharing import Party, measure  # noqa: PLC0415

    parties = [
        Party(v.pid, v.name, v.group, domain=party_domain(v, domains=domains), kind=v.kind)
        for v in vms
    ]
    zeros = {v.pid: v.zero_bytes // PAGE_SIZE for v in vms}
    try:
        found = measure(
            paths, parties, zero_pages=zeros, ksm_zero_pages=host.zero_pages, ranges=ranges
        )
        return found, None
    except PageMapUnavailable as exc:
        return None, str(exc)


def party_domain(vm: VmStatus, *, domains: bool) -> str:
    """The trust domain a process counts in on the page map: a VM's policy domain; under
    trust domains, a process that is no VM, or one not run by root or the hypervisor's user
    (anyone can call a process qemu-system-x86_64), counts in `host`, apart from every domain."""
    if vm.kind != "qemu" or not vm.trusted:
        return HOST_DOMAIN if domains else DEFAULT_DOMAIN
    if vm.domain == CONFLICT_DOMAIN:  # apart from every domain, and from each other
        return f"{CONFLICT_DOMAIN} pid {vm.pid}"
    return vm.domain or DEFAULT_DOMAIN


def _host_status(
    paths: HostPaths, state: KsmState | None, share: float | None, cpu: float | None
) -> HostStatus:
    if state is None:
        return HostStatus(
            False,
            False,
            "none (no KSM in this kernel)",
            {},
            0,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )
    values = state.values
    running = state.get("run") == 1
    daemons = daemon_pids(paths)  # one walk of /proc for the daemons, one for the others
    others = other_controllers(
        paths, own_pids=tuple(daemons[:1]), advisor_wanted=bool(daemons), daemons=daemons
    )
    alive = read_alive(paths) if daemons else None
    return HostStatus(
        available=True,
        running=running,
        controller=_controller(state, daemons, others),
        knobs={k: v for k, v in values.items() if k in _SHOWN_KNOBS},
        saved_bytes=state.saved_bytes,
        general_profit_bytes=state.get("general_profit"),
        full_scans=state.get("full_scans"),
        ksmd_cpu_percent=share,
        ksmd_cpu_seconds=cpu,
        pages_sharing=state.get("pages_sharing"),
        pages_shared=state.get("pages_shared"),
        zero_pages=state.get("ksm_zero_pages"),
        pages_scanned=state.get("pages_scanned"),
        others=tuple((f"{c.name} ({c.detail})", c.running) for c in others),
        passive=alive.passive if alive is not None and alive.fresh() else None,
        discovery=alive.discovery if alive is not None and alive.fresh() else None,
    )


_SHOWN_KNOBS = (
    "run",
    "pages_to_scan",
    "sleep_millisecs",
    "advisor_mode",
    "max_page_sharing",
    "merge_across_nodes",
    "use_zero_pages",
    "smart_scan",
)


DAEMON_CONTROLLER = "ksmpolicy daemon"


def _controller(state: KsmState, daemons: Sequence[int], others: Sequence[Controller]) -> str:
    if daemons:
        return DAEMON_CONTROLLER
    if any(c.name == "ksmtuned" and c.running for c in others):
        return "ksmtuned"
    if state.values.get("advisor_mode") == "scan-time":
        return "kernel scan-time advisor"
    if state.get("run") == 1:
        return "unknown (KSM runs with fixed knobs)"
    return "nobody (KSM is stopped)"


def _vm_status(paths: HostPaths, process: VmProcess, decider: Decider | None) -> VmStatus:
    facts, source = _facts(paths, process)
    decision = decider.decide(facts) if decider is not None else None
    ksm = process.ksm
    return VmStatus(
        pid=process.pid,
        name=facts.name,
        vmid=process.vmid,
        uuid=facts.uuid or process.uuid,
        kind=process.kind,
        source=source,
        group=decision.group if decision else None,
        decision=decision.verdict if decision else None,
        rule=decision.rule if decision else None,
        compliant=_compliant(process, decision),
        ram_bytes=process.ram_bytes,
        mergeable_bytes=process.mergeable_bytes,
        merged_bytes=(ksm.merging_pages or 0) * PAGE_SIZE if ksm else 0,
        zero_bytes=(ksm.zero_pages or 0) * PAGE_SIZE if ksm else 0,
        profit_bytes=ksm.process_profit if ksm else None,
        saved_bytes=((ksm.merging_pages or 0) + (ksm.zero_pages or 0)) * PAGE_SIZE if ksm else 0,
        domain=decision.domain if decision else None,
        domain_reason=decision.domain_reason if decision else None,
        merging_now=_merging_now(process),
        mergeable_vmas=process.mergeable_vmas,
        trusted=process.trusted,
        start=process.start,
        unit=process.unit,
        reason=decision.reason if decision else None,
        residue_vmas=process.mergeable_vmas if process.ram_mergeable is False else 0,
        mergeable_size=process.mergeable_size,
        ram_unmergeable=process.ram_unmergeable,
        mem_merge=process.mem_merge,
        hook_said=_hook_said(paths, process, facts),
    )


# The hook runs before QEMU starts (libvirt's prepare, Proxmox's pre-start): what it said counts
# for the running process when it is at most this much older.
HOOK_BEFORE_START_SECONDS = 300.0


def _hook_said(paths: HostPaths, process: VmProcess, facts: VmFacts) -> tuple[str, ...]:
    """What the hook said about this VM at the start of its running process (hookcore keeps
    it in the run directory), or () when it said nothing or the note is older."""
    if process.kind != "qemu" or not process.trusted:
        return ()
    key = process.vmid or facts.name
    note = Path(said_path(str(paths.run_dir), key))
    started = started_at(paths, process.pid) or 0.0
    try:
        if note.stat().st_mtime < started - HOOK_BEFORE_START_SECONDS:
            return ()
        lines = read_regular(note, 65536).decode("utf-8", "replace").splitlines()
    except OSError:
        return ()
    if not lines or lines[0] != one_line(key):
        return ()
    return tuple(line.partition("\t")[2] for line in lines[1:] if "\t" in line)


def _merging_now(process: VmProcess) -> bool | None:
    if process.ram_mergeable is not None:
        return process.ram_mergeable
    return process.mergeable_bytes > 0 if process.kind == "qemu" else None


def _facts(paths: HostPaths, process: VmProcess) -> tuple[VmFacts, str]:
    """The richest facts available without libvirt: Proxmox's config, libvirt's status XML."""
    if process.vmid:
        try:
            from ksmpolicy.proxmox.conf import facts, parse  # noqa: PLC0415
            from ksmpolicy.proxmox.node import read_config  # noqa: PLC0415

            text = read_config(paths, process.vmid)
            return facts(parse(text), process.vmid).vm, "proxmox"
        except KsmPolicyError:
            pass
    if process.kind == "qemu" and process.name and "/" not in process.name:
        status_xml = paths.libvirt_run / f"{process.name}.xml"
        try:
            from ksmpolicy.libvirt.domain import MAX_XML_BYTES, facts_of  # noqa: PLC0415
            from ksmpolicy.libvirt.domain import parse as parse_xml  # noqa: PLC0415

            data = read_regular(status_xml, MAX_XML_BYTES)

            root, _raw = parse_xml(data)
            domain = root if root.tag == "domain" else root.child("domain")
            if domain is not None:
                return facts_of(domain).vm, "libvirt"
        except (OSError, KsmPolicyError):
            pass
    found = VmFacts(
        name=process.name,
        uuid=process.uuid,
        vmid=process.vmid,
        kind=process.kind,
        unit=process.unit,
    )
    return found, "process"


def _compliant(process: VmProcess, decision: Decision | None) -> bool | None:
    """Whether the running process merges as decided: an excluded VM has nothing mergeable at
    all (neither guest RAM nor QEMU's ROMs and video RAM, which keep their start-time setting);
    one that may merge has its guest RAM mergeable; one whose RAM never merges complies."""
    if decision is None:
        return None
    if decision.action is Action.EXCLUDE:
        return process.mergeable_vmas == 0
    if not decision.merge:
        return True
    mergeable = process.ram_mergeable
    if mergeable is None:
        mergeable = process.mergeable_bytes > 0
    return mergeable


def _groups(vms: Sequence[VmStatus]) -> tuple[GroupStatus, ...]:
    totals: dict[str, list[int]] = {}
    for vm in vms:
        if vm.kind != "qemu":
            continue
        entry = totals.setdefault(vm.group or "(none)", [0, 0, 0])
        entry[0] += 1
        entry[1] += vm.mergeable_bytes
        entry[2] += vm.merged_bytes
    return tuple(GroupStatus(name, *values) for name, values in sorted(totals.items()))


def _findings(host: HostStatus, vms: Sequence[VmStatus], *, domains: bool = False) -> list[Finding]:
    """The findings of the running state: the host's, then each VM's (report/findings.py);
    under trust domains (`domains`) report/trust.py judges whether a VM's RAM should be
    mergeable now."""
    if not host.available:
        return [
            Finding("info", None, "this kernel has no KSM (CONFIG_KSM)", "nothing to do", "no-ksm")
        ]
    findings = []
    wanting = [v for v in vms if v.decision == "merge" and v.mergeable_bytes > 0]
    if wanting and not host.running:
        findings.append(
            Finding(
                "error",
                None,
                f"KSM is stopped while {len(wanting)} VM(s) may merge",
                "start the daemon: systemctl start ksmpolicy (or ksmpolicy daemon)",
                "ksm-stopped",
            )
        )
    if host.passive is not None:
        findings.append(
            Finding(
                "warning",
                None,
                "the ksmpolicy daemon is passive: another controller sets the KSM knobs",
                host.passive,
                "passive",
            )
        )
    for vm in vms:
        findings += vm_findings(
            vm, ksm_running=host.running, full_scans=host.full_scans or 0, domains=domains
        )
    return findings
