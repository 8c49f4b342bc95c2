"""The trust-domain part of `status`: each merge scope and its active domain, whether each VM
merges as the domains allow, and what needs attention."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ksmpolicy.inventory.model import VmStatus
from ksmpolicy.paths import HostPaths
from ksmpolicy.policy.model import CONFLICT_DOMAIN, Policy
from ksmpolicy.report.finding import Finding
from ksmpolicy.report.findings import redefine, residue_finding
from ksmpolicy.report.model import ScopeStatus
from ksmpolicy.trust.state import load


def domain_view(
    paths: HostPaths, policy: Policy, vms: Sequence[VmStatus], daemon_running: bool
) -> tuple[tuple[ScopeStatus, ...], tuple[VmStatus, ...], list[Finding]]:
    """(scopes, VMs with compliance judged under domains, findings)."""
    state = load(paths)
    live = state.live_domains(paths)
    scopes = tuple(
        ScopeStatus(scope, claim.domain, claim.since, claim.why)
        for scope, claim in sorted(state.scopes.items())
        if scope in live
    )
    on = {m.pid: m.start for m in state.members.values()}
    judged = []
    findings = []
    for vm in vms:
        if vm.kind != "qemu" or vm.decision is None:
            judged.append(vm)
            continue
        if vm.domain == CONFLICT_DOMAIN:
            findings.append(
                Finding(
                    "warning",
                    vm.name,
                    f"{vm.domain_reason}: a VM bound to two trust domains never merges",
                    "make its bindings agree in the policy (ksmpolicy explain shows them)",
                    "identity-conflict",
                )
            )
        switched_on = vm.pid in on and on[vm.pid] == vm.start
        expected = vm.decision == "merge" and switched_on
        compliant = None
        if vm.merging_now is not None:  # switched off: nothing of it mergeable, ROMs included
            compliant = vm.merging_now == expected and (expected or vm.residue_vmas == 0)
        judged.append(replace(vm, compliant=compliant))
        if vm.merging_now and not expected:
            findings.append(
                Finding(
                    "error",
                    vm.name,
                    f"its guest RAM is mergeable but trust domain {vm.domain!r} does not merge "
                    "now: it could share pages across a trust boundary",
                    "start the daemon (systemctl start ksmpolicy), which switches it off; and "
                    f"for its next start: {redefine(vm)}",
                    "domain-mergeable",
                )
            )
        elif vm.merging_now is False and vm.residue_vmas > 0:
            findings.append(residue_finding(vm, f"in trust domain {vm.domain!r}"))
    wanting = [v for v in vms if v.kind == "qemu" and v.decision == "merge"]
    if wanting and not daemon_running:
        findings.append(
            Finding(
                "warning",
                None,
                f"trust domains are on and {len(wanting)} VM(s) may merge, but no daemon "
                "runs: only the daemon (or the Proxmox hookscript, for an idle scope) switches "
                "merging on",
                "systemctl start ksmpolicy (or run: ksmpolicy daemon)",
                "no-daemon",
            )
        )
    return scopes, tuple(judged), findings
