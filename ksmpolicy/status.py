"""What KSM saves, for which VM, at what CPU cost: collected from /sys, /proc and the VMs'
definitions, with findings that say what to do. Read-only."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ksmpolicy.decide import Decider, Decision, VmFacts
from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.host import (
    HostPaths,
    KsmState,
    ksmd_pid,
    process_cpu_seconds,
    processes_named,
    read_ksm,
)
from ksmpolicy.policy import Action, Policy
from ksmpolicy.vms import ProcessScanner, VmProcess

PAGE = 4096
JSON_VERSION = 1
# A VM that merges nothing after this many full scans costs scan CPU for no gain.
USELESS_AFTER_FULL_SCANS = 3


@dataclass(frozen=True)
class VmStatus:
    pid: int
    name: str  # VM name, or "VM <vmid>", or "comm[pid]" for non-QEMU processes
    vmid: str | None
    kind: str  # qemu | other
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


@dataclass(frozen=True)
class GroupStatus:
    name: str
    vms: int
    mergeable_bytes: int
    merged_bytes: int


@dataclass(frozen=True)
class Finding:
    severity: str  # info | warning
    vm: str | None
    message: str
    fix: str


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


@dataclass(frozen=True)
class Status:
    host: HostStatus
    vms: tuple[VmStatus, ...]
    groups: tuple[GroupStatus, ...]
    findings: tuple[Finding, ...]
    policy: str | None = None
    policy_error: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def collect(
    paths: HostPaths,
    policy: Policy | None,
    *,
    sample_seconds: float = 0.2,
    scanner: ProcessScanner | None = None,
    policy_error: str | None = None,
) -> Status:
    """One look at the host. `sample_seconds` measures ksmd's CPU share (0: not measured)."""
    state = read_ksm(paths)
    ksmd = ksmd_pid(paths) if state is not None else None
    cpu_before = process_cpu_seconds(paths, ksmd) if ksmd else None
    started = time.monotonic()
    processes = (scanner or ProcessScanner(paths)).scan()
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
    groups = _groups(vms)
    findings = tuple(_findings(host, vms, paths))
    return Status(host, vms, groups, findings, policy.source if policy else None, policy_error)


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
    return HostStatus(
        available=True,
        running=running,
        controller=_controller(paths, state),
        knobs={k: v for k, v in values.items() if k in _SHOWN_KNOBS},
        saved_bytes=state.saved_bytes,
        general_profit_bytes=state.get("general_profit"),
        full_scans=state.get("full_scans"),
        ksmd_cpu_percent=share,
        ksmd_cpu_seconds=cpu,
        pages_sharing=state.get("pages_sharing"),
        pages_shared=state.get("pages_shared"),
        zero_pages=state.get("ksm_zero_pages"),
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


def _controller(paths: HostPaths, state: KsmState) -> str:
    if daemon_pids(paths):
        return "ksmpolicy daemon"
    if processes_named(paths, ["ksmtuned"]):
        return "ksmtuned"
    if state.values.get("advisor_mode") == "scan-time":
        return "kernel scan-time advisor"
    if state.get("run") == 1:
        return "unknown (KSM runs with fixed knobs)"
    return "nobody (KSM is stopped)"


def daemon_pids(paths: HostPaths) -> list[int]:
    """PIDs of running `ksmpolicy daemon` processes."""
    found = []
    try:
        entries = [e for e in paths.proc.iterdir() if e.name.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"daemon" in argv and any(
            a.endswith(b"ksmpolicy") or a == b"ksmpolicy.cli" for a in argv
        ):
            found.append(int(entry.name))
    return found


def _vm_status(paths: HostPaths, process: VmProcess, decider: Decider | None) -> VmStatus:
    facts, source = _facts(paths, process)
    decision = decider.decide(facts) if decider is not None and process.kind == "qemu" else None
    ksm = process.ksm
    return VmStatus(
        pid=process.pid,
        name=facts.name,
        vmid=process.vmid,
        kind=process.kind,
        source=source,
        group=decision.group if decision else None,
        decision=_verdict(decision),
        rule=decision.rule if decision else None,
        compliant=_compliant(process, facts, decision),
        ram_bytes=process.ram_bytes,
        mergeable_bytes=process.mergeable_bytes,
        merged_bytes=(ksm.merging_pages or 0) * PAGE if ksm else 0,
        zero_bytes=(ksm.zero_pages or 0) * PAGE if ksm else 0,
        profit_bytes=ksm.process_profit if ksm else None,
    )


def _facts(paths: HostPaths, process: VmProcess) -> tuple[VmFacts, str]:
    """The richest facts available without libvirt: Proxmox's config, libvirt's status XML."""
    if process.vmid:
        try:
            from ksmpolicy import proxmox, proxmox_conf  # noqa: PLC0415

            text = proxmox.read_config(paths, process.vmid)
            return proxmox_conf.facts(proxmox_conf.parse(text), process.vmid).vm, "proxmox"
        except KsmPolicyError:
            pass
    if process.kind == "qemu" and process.name and "/" not in process.name:
        status_xml = paths.libvirt_run / f"{process.name}.xml"
        try:
            data = status_xml.read_bytes()
            from ksmpolicy.libvirt_xml import facts_of, parse  # noqa: PLC0415

            root, _raw = parse(data)
            domain = root if root.tag == "domain" else root.child("domain")
            if domain is not None:
                return facts_of(domain).vm, "libvirt"
        except (OSError, KsmPolicyError):
            pass
    return VmFacts(name=process.name, uuid=process.uuid, vmid=process.vmid), "process"


def _verdict(decision: Decision | None) -> str | None:
    if decision is None:
        return None
    if decision.merge:
        return "merge"
    return "exclude" if decision.action is Action.EXCLUDE else "never"


def _compliant(process: VmProcess, facts: VmFacts, decision: Decision | None) -> bool | None:
    if decision is None:
        return None
    if facts.hugepages or facts.shared_memory:
        return True  # its memory cannot merge, whatever the policy says; a finding tells
    mergeable = process.ram_mergeable
    if mergeable is None:
        mergeable = process.mergeable_bytes > 0
    return mergeable == decision.merge


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


def _findings(host: HostStatus, vms: Sequence[VmStatus], paths: HostPaths) -> list[Finding]:
    findings = []
    if not host.available:
        return [Finding("info", None, "this kernel has no KSM (CONFIG_KSM)", "nothing to do")]
    wanting = [v for v in vms if v.decision == "merge" and v.mergeable_bytes > 0]
    if wanting and not host.running:
        findings.append(
            Finding(
                "warning",
                None,
                f"KSM is stopped while {len(wanting)} VM(s) may merge",
                "start the daemon: ksmpolicy daemon (or systemctl start ksmpolicy)",
            )
        )
    if daemon_pids(paths) and processes_named(paths, ["ksmtuned"]):
        findings.append(
            Finding(
                "warning",
                None,
                "ksmtuned runs alongside the ksmpolicy daemon: they fight over the knobs",
                "systemctl disable --now ksmtuned",
            )
        )
    scans = host.full_scans or 0
    for vm in vms:
        if vm.kind != "qemu":
            continue
        if vm.decision == "exclude" and vm.compliant is False:
            fix = (
                f"ksmpolicy apply --proxmox --vmid {vm.vmid} (it follows at the next start)"
                if vm.vmid
                else f"ksmpolicy enforce --live --domain {vm.name}"
            )
            findings.append(
                Finding(
                    "warning", vm.name, "excluded by the policy but its memory is mergeable", fix
                )
            )
        elif vm.decision == "merge" and vm.compliant is False:
            findings.append(
                Finding(
                    "info",
                    vm.name,
                    "the policy lets it merge but its memory is not mergeable",
                    f"ksmpolicy enforce --live --domain {vm.name}"
                    if not vm.vmid
                    else f"ksmpolicy apply --proxmox --vmid {vm.vmid}",
                )
            )
        elif vm.decision == "never":
            findings.append(
                Finding(
                    "info",
                    vm.name,
                    "the policy wants it merged, but hugepage/shared memory never merges",
                    "exclude it in the policy, or drop hugepages if merging matters more",
                )
            )
        if (
            vm.decision == "merge"
            and host.running
            and scans >= USELESS_AFTER_FULL_SCANS
            and vm.mergeable_bytes > 0
            and vm.merged_bytes == 0
            and vm.zero_bytes == 0
        ):
            findings.append(
                Finding(
                    "info",
                    vm.name,
                    f"merges nothing after {scans} full scans: it costs scan CPU for no gain",
                    "exclude it in the policy (e.g. tag it and add a rule)",
                )
            )
    return findings


# --- output ---------------------------------------------------------------------------------


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def text(status: Status) -> str:
    """The status for a terminal, readable at 80 columns."""
    host = status.host
    lines = []
    if not host.available:
        lines.append("KSM: not available (this kernel has no /sys/kernel/mm/ksm; CONFIG_KSM=n)")
    else:
        state = "running" if host.running else "stopped"
        lines.append(f"KSM: {state}, controlled by {host.controller}")
        knobs = [f"{k}={v}" for k, v in host.knobs.items() if k != "run"]
        lines += _wrap("  knobs: ", knobs)
        cpu = "-" if host.ksmd_cpu_percent is None else f"{host.ksmd_cpu_percent:.1f} %"
        lines.append(
            f"  saved: {mib(host.saved_bytes)} MiB  general_profit: "
            f"{mib(host.general_profit_bytes)} MiB  ksmd CPU: {cpu}  "
            f"full_scans: {host.full_scans if host.full_scans is not None else '-'}"
        )
        if not host.full_scans and not host.saved_bytes:
            lines.append("  (KSM has not scanned anything since boot)")
    if status.policy_error:
        lines.append(f"policy: not usable: {status.policy_error}")
    elif status.policy:
        lines.append(f"policy: {status.policy}")
    qemus = [v for v in status.vms if v.kind == "qemu"]
    others = [v for v in status.vms if v.kind != "qemu"]
    lines.append("")
    if not qemus:
        lines.append("No running VMs.")
    else:
        columns = ("VM", "GROUP", "DECISION", "OK", "MERGEABLE", "MERGED", "PROFIT")
        units = ("", "RULE", "", "", "MiB", "MiB", "MiB")
        lines += [_row(columns), _row(units)]
        for vm in sorted(qemus, key=lambda v: v.name):
            ok = {True: "yes", False: "NO", None: "-"}[vm.compliant]
            lines.append(
                f"{_cut(vm.name, 18):<18} {_cut(vm.group or '-', 12):<12} "
                f"{vm.decision or '-':<8} {ok:<3} {mib(vm.mergeable_bytes):>9} "
                f"{mib(vm.merged_bytes):>8} {mib(vm.profit_bytes):>8}"
            )
            if vm.rule:
                lines.append(f"{'':<18} {_cut(vm.rule, 60)}")
    if others:
        total = sum(v.mergeable_bytes for v in others)
        lines.append(f"Other processes that opted in: {len(others)}, {mib(total)} MiB mergeable")
    if status.groups and qemus:
        lines.append("")
        lines.append(f"{'GROUP':<24} {'VMS':>4} {'MERGEABLE MiB':>14} {'MERGED MiB':>11}")
        for group in status.groups:
            lines.append(
                f"{_cut(group.name, 24):<24} {group.vms:>4} {mib(group.mergeable_bytes):>14} "
                f"{mib(group.merged_bytes):>11}"
            )
    if status.findings:
        lines.append("")
        lines.append("Findings:")
        for finding in status.findings:
            who = f"{finding.vm}: " if finding.vm else ""
            lines.append(f"  [{finding.severity}] {who}{finding.message}")
            lines.append(f"      -> {finding.fix}")
    return "\n".join(lines)


def _wrap(prefix: str, words: list[str], width: int = 80) -> list[str]:
    lines, line = [], prefix
    for word in words:
        if len(line) + len(word) + 1 > width and line.strip():
            lines.append(line.rstrip())
            line = " " * len(prefix)
        line += word + " "
    lines.append(line.rstrip())
    return lines


def _row(cells: tuple[str, ...]) -> str:
    vm, group, decision, ok, mergeable, merged, profit = cells
    return f"{vm:<18} {group:<12} {decision:<8} {ok:<3} {mergeable:>9} {merged:>8} {profit:>8}"


def _cut(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "~"


def as_json(status: Status) -> dict[str, object]:
    """The documented, stable JSON form (`version` changes if a key changes meaning)."""
    host = status.host
    return {
        "version": JSON_VERSION,
        "policy": status.policy,
        "policy_error": status.policy_error,
        "host": {
            "ksm_available": host.available,
            "running": host.running,
            "controller": host.controller,
            "knobs": host.knobs,
            "saved_bytes": host.saved_bytes,
            "general_profit_bytes": host.general_profit_bytes,
            "full_scans": host.full_scans,
            "pages_sharing": host.pages_sharing,
            "pages_shared": host.pages_shared,
            "ksm_zero_pages": host.zero_pages,
            "ksmd_cpu_percent": host.ksmd_cpu_percent,
            "ksmd_cpu_seconds": host.ksmd_cpu_seconds,
        },
        "vms": [
            {
                "pid": v.pid,
                "name": v.name,
                "vmid": v.vmid,
                "kind": v.kind,
                "source": v.source,
                "group": v.group,
                "decision": v.decision,
                "rule": v.rule,
                "compliant": v.compliant,
                "ram_bytes": v.ram_bytes,
                "mergeable_bytes": v.mergeable_bytes,
                "merged_bytes": v.merged_bytes,
                "zero_bytes": v.zero_bytes,
                "profit_bytes": v.profit_bytes,
            }
            for v in status.vms
        ],
        "groups": [
            {
                "name": g.name,
                "vms": g.vms,
                "mergeable_bytes": g.mergeable_bytes,
                "merged_bytes": g.merged_bytes,
            }
            for g in status.groups
        ],
        "findings": [
            {"severity": f.severity, "vm": f.vm, "message": f.message, "fix": f.fix}
            for f in status.findings
        ],
    }
