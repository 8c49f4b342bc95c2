"""What KSM saves, for which VM, at what CPU cost: the inventory of the host, the page map's
exact savings, and the findings that say what to do. Read-only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ksmpolicy.inventory import take
from ksmpolicy.inventory.host import DAEMON_CONTROLLER
from ksmpolicy.inventory.model import HostStatus, VmStatus
from ksmpolicy.kernel.scan import ProcessScanner
from ksmpolicy.paths import PAGE_SIZE, HostPaths
from ksmpolicy.policy.model import CONFLICT_DOMAIN, DEFAULT_DOMAIN, HOST_DOMAIN, Policy
from ksmpolicy.report.finding import Finding
from ksmpolicy.report.findings import vm_findings
from ksmpolicy.report.model import GroupStatus, ScopeStatus, Status

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
    # Before a page-map walk every smaps is read afresh: the walk reads the mergeable areas
    # it names, and a VM switched on since a cached read would be missed.
    found = take(
        paths,
        policy,
        sample_seconds=sample_seconds,
        scanner=scanner,
        refresh=pagemap and reuse is None,
    )
    host, vms, processes = found.host, found.vms, found.processes
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
