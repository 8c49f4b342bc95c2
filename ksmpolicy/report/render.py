"""`ksmpolicy status` and `ksmpolicy pages` for people (80 columns) and for scripts (the
documented JSON)."""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

from ksmpolicy.paths import PAGE_SIZE
from ksmpolicy.quoting import one_line, printable
from ksmpolicy.report.finding import Finding
from ksmpolicy.report.fleet import NEEDS_OPERATOR, HostRow
from ksmpolicy.report.model import Status

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ksmpolicy.report.estimate import Estimate, SuggestedGroup
    from ksmpolicy.report.sharing import PairShare, Sharing

JSON_VERSION = 1


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def text(status: Status) -> str:
    """The status for a terminal, readable at 80 columns: one section after the other."""
    sections = (
        _host_lines,
        _policy_lines,
        _vm_lines,
        _other_lines,
        _group_lines,
        _scope_lines,
        _finding_lines,
        _hook_lines,
    )
    return printable("\n".join(line for section in sections for line in section(status)))


def _host_lines(status: Status) -> list[str]:
    host = status.host
    if not host.available:
        return ["KSM: not available (this kernel has no /sys/kernel/mm/ksm; CONFIG_KSM=n)"]
    state = "running" if host.running else "stopped"
    lines = [f"KSM: {state}, controlled by {host.controller}"]
    if host.passive is not None:
        lines.append(f"  the daemon is passive: {host.passive}")
    if host.discovery is not None:
        lines.append(f"  new VMs found by: {host.discovery}")
    if host.pace is not None:
        lines.append(f"  the daemon's pace: {host.pace}")
    for other, running in host.others:
        when = "also sets the knobs" if running else "sets them at boot"
        lines.append(f"  other controller: {other} {when} (ksmpolicy doctor says the fix)")
    lines += _wrap("  knobs: ", [f"{k}={v}" for k, v in host.knobs.items() if k != "run"])
    cpu = "-" if host.ksmd_cpu_percent is None else f"{host.ksmd_cpu_percent:.1f} %"
    lines.append(
        f"  saved: {mib(host.saved_bytes)} MiB  general_profit: "
        f"{mib(host.general_profit_bytes)} MiB  ksmd CPU: {cpu}  "
        f"full_scans: {host.full_scans if host.full_scans is not None else '-'}"
    )
    if not host.full_scans and not host.saved_bytes:
        if host.pages_scanned:
            lines.append(
                f"  (ksmd has scanned {host.pages_scanned} pages, but not yet one full scan)"
            )
        else:
            lines.append("  (KSM has not scanned anything since boot)")
    return lines


def _policy_lines(status: Status) -> list[str]:
    if status.policy_error:
        return [f"policy: not usable: {status.policy_error}"]
    return [f"policy: {status.policy}"] if status.policy else []


def _vm_lines(status: Status) -> list[str]:
    qemus = [v for v in status.vms if v.kind == "qemu"]
    if not qemus:
        return ["", "No running VMs."]
    columns = ("VM", "GROUP", "DECISION", "OK", "MERGEABLE", "MERGED", "SAVED")
    units = ("", "RULE", "", "", "MiB", "MiB", "MiB")
    lines = ["", _row(columns), _row(units)]
    show_domains = bool(status.scopes) or any(v.domain not in (None, "default") for v in qemus)
    for vm in sorted(qemus, key=lambda v: v.name):
        ok = {True: "yes", False: "NO", None: "-"}[vm.compliant]
        lines.append(
            f"{_cut(vm.name, 18):<18} {_cut(vm.group or '-', 12):<12} "
            f"{vm.decision or '-':<8} {ok:<3} {mib(vm.mergeable_bytes):>9} "
            f"{mib(vm.merged_bytes):>8} {mib(vm.saved_bytes):>8}"
        )
        under = [vm.rule] if vm.rule else []
        if not vm.trusted:
            under.append(f"pid {vm.pid}: not the hypervisor's (see Findings)")
        if show_domains:
            under.append(f"domain {vm.domain}")
        if under:
            lines.append(f"{'':<18} {_cut('; '.join(u for u in under if u), 60)}")
    return lines + _wrap("", _savings_line(status).split())


def _other_lines(status: Status) -> list[str]:
    others = [v for v in status.vms if v.kind != "qemu"]
    if not others:
        return []
    total = sum(v.mergeable_bytes for v in others)
    lines = [
        "",
        f"Other KSM users (VMMs, services, processes): {len(others)}, {mib(total)} MiB mergeable",
        f"{'NAME':<16} {'KIND':<14} {'UNIT':<18} {'DECISION':<8} {'MERGEABLE':>9} {'MERGED':>8}",
    ]
    for vm in sorted(others, key=lambda v: v.name):
        lines.append(
            f"{_cut(vm.name, 16):<16} {_cut(vm.kind, 14):<14} {_cut(vm.unit or '-', 18):<18} "
            f"{vm.decision or '-':<8} {mib(vm.mergeable_bytes):>9} {mib(vm.merged_bytes):>8}"
        )
    return lines


def _group_lines(status: Status) -> list[str]:
    if not status.groups or not any(v.kind == "qemu" for v in status.vms):
        return []
    lines = ["", f"{'GROUP':<24} {'VMS':>4} {'MERGEABLE MiB':>14} {'MERGED MiB':>11}"]
    for group in status.groups:
        lines.append(
            f"{_cut(group.name, 24):<24} {group.vms:>4} {mib(group.mergeable_bytes):>14} "
            f"{mib(group.merged_bytes):>11}"
        )
    return lines


def _scope_lines(status: Status) -> list[str]:
    if not status.scopes:
        return []
    lines = ["", "Trust domains, by merge scope:"]
    for scope in status.scopes:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(scope.since))
        lines.append(f"  {scope.name}: {scope.domain} (since {since}: {scope.why})")
    return lines


def _finding_lines(status: Status) -> list[str]:
    if not status.findings:
        return []
    lines = ["", "Findings:"]
    for finding in status.findings:
        who = f"{one_line(finding.vm)}: " if finding.vm else ""
        lines += _finding_text(finding, who)
    return lines


def _finding_text(finding: Finding, who: str) -> list[str]:
    """A finding as two lines, whatever its message and fix hold (they may quote a VM's name,
    a path or a host's word: each is kept to its one line)."""
    return [
        f"  [{finding.severity}] {who}{one_line(finding.message)}",
        f"      -> {one_line(finding.fix)}",
    ]


def _hook_lines(status: Status) -> list[str]:
    said = [v for v in status.vms if v.hook_said]
    if not said:
        return []
    lines = ["", "The hook at their last start (libvirt shows it only when it refuses one):"]
    return lines + [f"  {line}" for vm in said for line in vm.hook_said]


def _savings_line(status: Status) -> str:
    if status.sharing is not None:
        total = sum(v.saved_bytes for v in status.sharing.vms)
        return (
            f"SAVED: exact, from the page map ({mib(total)} MiB in all; "
            "`ksmpolicy pages` shows who shares with whom)"
        )
    why = f" ({status.savings_note})" if status.savings_note else ""
    return f"SAVED: from ksm_stat, counting a shared page fully for each VM{why}"


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
    text = one_line(text)
    return text if len(text) <= width else text[: width - 1] + "~"


def as_json(status: Status) -> dict[str, object]:
    """The documented, stable JSON form (`version` changes if a key changes meaning)."""
    host = status.host
    return {
        "version": JSON_VERSION,
        "hostname": socket.gethostname(),
        "policy": status.policy,
        "policy_error": status.policy_error,
        "savings_note": status.savings_note,
        "host": {
            "ksm_available": host.available,
            "running": host.running,
            "controller": host.controller,
            "other_controllers": [{"name": n, "running": r} for n, r in host.others],
            "passive": host.passive,
            "discovery": host.discovery,
            "pace": host.pace,
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
                "uuid": v.uuid,
                "kind": v.kind,
                "unit": v.unit,
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
                "saved_bytes": v.saved_bytes,
                "savings_source": v.savings_source,
                "domain": v.domain,
                "merging_now": v.merging_now,
                "hook_said": list(v.hook_said),
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
        "scopes": [
            {"scope": s.name, "domain": s.domain, "since": s.since, "why": s.why}
            for s in status.scopes
        ],
        "findings": [
            {
                "severity": f.severity,
                "vm": f.vm,
                "message": f.message,
                "fix": f.fix,
                "code": f.code,
                "steps": list(f.steps),
            }
            for f in status.findings
        ],
    }


# --- ksmpolicy pages ------------------------------------------------------------------------


def pages_text(sharing: Sharing, *, top: int = 10) -> str:
    """Per-VM exact savings, the group x group matrix and the pairs that share most."""
    vms = sorted(sharing.vms, key=lambda v: (v.group is None, v.group or "", v.name))
    lines = [
        f"{'VM':<20} {'GROUP':<12} {'SAVED':>8} {'KSM PAGES':>10} {'WITH GROUP':>10} {'ZERO':>7}",
        f"{'':<20} {'':<12} {'MiB':>8} {'':>10} {'MiB':>10} {'MiB':>7}",
    ]
    for vm in vms:
        lines.append(
            f"{_cut(vm.name, 20):<20} {_cut(vm.group or '-', 12):<12} {mib(vm.saved_bytes):>8} "
            f"{vm.ksm_pages:>10} {amount(vm.shared_with_group_pages):>10} "
            f"{mib(vm.zero_bytes):>7}"
        )
    total = sum(v.saved_bytes for v in sharing.vms)
    kernel = ((sharing.pages_sharing or 0) + (sharing.ksm_zero_pages or 0)) * PAGE_SIZE
    lines.append(
        f"Saved in all: {mib(total)} MiB; the kernel's pages_sharing + ksm_zero_pages: "
        f"{mib(kernel)} MiB (walk: {sharing.seconds:.2f} s)"
    )
    groups = sorted({g for p in sharing.group_pairs for g in (p.a, p.b)})
    if groups:
        lines += ["", "Shared between groups, MiB of content, + zero pages (p: pages):"]
        width = max(8, *(min(len(g), 12) for g in groups))
        lines.append(" " * 14 + " ".join(f"{_cut(g, width):>{width}}" for g in groups))
        cells = {(p.a, p.b): p for p in sharing.group_pairs}
        for row in groups:
            values = []
            for column in groups:
                pair = cells.get((row, column)) or cells.get((column, row))
                values.append(f"{_cell(pair):>{width}}")
            lines.append(f"{_cut(row, 13):<13} " + " ".join(values))
    shared = sorted(sharing.pairs, key=lambda p: -p.shared_pages)[:top]
    if shared:
        lines += ["", f"VM pairs that share most (of {len(sharing.pairs)}):"]
        for pair in shared:
            zero = f" (+{amount(pair.zero_pages)} zero)" if pair.zero_pages else ""
            lines.append(
                f"  {_cut(pair.a, 24)} ~ {_cut(pair.b, 24)}: {amount(pair.shared_pages)}{zero}"
            )
    if sharing.findings:
        lines += ["", "Findings:"]
        for finding in sharing.findings:
            who = f"{one_line(finding.vm)}: " if finding.vm else ""
            lines += _finding_text(finding, who)
    return printable("\n".join(lines))


def amount(pages: int) -> str:
    """Pages as MiB, or as a page count when that would round to nothing."""
    size = pages * PAGE_SIZE / 2**20
    return f"{size:.1f}" if size >= 0.1 or not pages else f"{pages}p"


def _cell(pair: PairShare | None) -> str:
    if pair is None:
        return "-"
    zero = f"+{amount(pair.zero_pages)}" if pair.zero_pages else ""
    return amount(pair.shared_pages) + zero


def pages_json(sharing: Sharing) -> dict[str, object]:
    """The documented JSON of `ksmpolicy pages` (keys are only ever added)."""

    def pair(p: PairShare) -> dict[str, object]:
        found: dict[str, object] = {
            "a": p.a,
            "b": p.b,
            "shared_pages": p.shared_pages,
            "zero_pages": p.zero_pages,
            "saved_bytes": p.saved_bytes,
        }
        if p.a_pid is not None:  # VM pairs: names need not be unique
            found.update(a_pid=p.a_pid, b_pid=p.b_pid)
        return found

    return {
        "version": JSON_VERSION,
        "page_size": PAGE_SIZE,
        "pages_sharing": sharing.pages_sharing,
        "ksm_zero_pages": sharing.ksm_zero_pages,
        "seconds": round(sharing.seconds, 3),
        "vms": [
            {
                "name": v.name,
                "pid": v.pid,
                "group": v.group,
                "domain": v.domain,
                "kind": v.kind,
                "saved_bytes": v.saved_bytes,
                "ksm_saved_bytes": v.ksm_saved_bytes,
                "zero_bytes": v.zero_bytes,
                "ksm_pages": v.ksm_pages,
                "present_pages": v.present_pages,
                "shared_with_group_pages": v.shared_with_group_pages,
            }
            for v in sharing.vms
        ],
        "pairs": [pair(p) for p in sharing.pairs],
        "group_pairs": [pair(p) for p in sharing.group_pairs],
        "findings": [
            {"severity": f.severity, "vm": f.vm, "message": f.message, "fix": f.fix}
            for f in sharing.findings
        ],
        "exited_pids": list(sharing.exited),
    }


# --- ksmpolicy estimate ---------------------------------------------------------------------


def estimate_text(found: Estimate) -> str:
    volatile = sum(v.volatile_pages for v in found.vms)
    lines = [
        f"Read {found.read_bytes / 2**30:.2f} GiB of guest RAM in {found.seconds:.1f} s "
        f"(twice; {volatile} pages changed in between and are left out).",
        f"Predicted saving: {mib(found.predicted_saved_bytes)} MiB "
        f"(max_page_sharing {found.max_page_sharing}, "
        f"use_zero_pages {int(found.use_zero_pages)})",
        *(
            [
                f"Splitting huge pages frees another {mib(found.split_zero_bytes)} MiB of zero "
                "pages (the kernel does not count it as KSM's saving)."
            ]
            if found.split_zero_bytes
            else []
        ),
        "",
        f"{'VM':<20} {'GROUP':<12} {'MERGES':<6} {'PRESENT':>9} {'PREDICTED':>9}",
        f"{'':<20} {'':<12} {'':<6} {'MiB':>9} {'MiB':>9}",
    ]
    for vm in sorted(found.vms, key=lambda v: (v.group is None, v.group or "", v.name)):
        lines.append(
            f"{_cut(vm.name, 20):<20} {_cut(vm.group or '-', 12):<12} "
            f"{'yes' if vm.merges else 'no':<6} {mib(vm.present_bytes):>9} "
            f"{mib(vm.predicted_saved_bytes):>9}"
        )
        if not vm.merges and vm.if_merged_saved_bytes:
            best = vm.shares_with[0] if vm.shares_with else None
            also = f": it shares {mib(best[1])} MiB with group {best[0]}" if best else ""
            lines += _wrap(
                "    ", f"merging it would save {mib(vm.if_merged_saved_bytes)} MiB{also}".split()
            )
    if found.groups:
        lines += ["", f"{'GROUP':<24} {'PREDICTED MiB':>14}"]
        lines += [f"{_cut(g, 24):<24} {mib(b):>14}" for g, b in found.groups]
    if found.suggested:
        lines += [
            "",
            "Suggested groups (VMs whose content overlaps; `ksmpolicy check` accepts it):",
        ]
        lines.append(yaml_snippet(found.suggested).rstrip())
    return printable("\n".join(lines))


def estimate_json(found: Estimate) -> dict[str, object]:
    """The documented JSON of `ksmpolicy estimate` (keys are only ever added)."""
    return {
        "version": JSON_VERSION,
        "predicted_saved_bytes": found.predicted_saved_bytes,
        "split_zero_bytes": found.split_zero_bytes,
        "max_page_sharing": found.max_page_sharing,
        "use_zero_pages": found.use_zero_pages,
        "read_bytes": found.read_bytes,
        "seconds": round(found.seconds, 3),
        "vms": [
            {
                "name": v.name,
                "group": v.group,
                "merges": v.merges,
                "present_bytes": v.present_bytes,
                "volatile_pages": v.volatile_pages,
                "predicted_saved_bytes": v.predicted_saved_bytes,
                "split_zero_bytes": v.split_zero_bytes,
                "if_merged_saved_bytes": v.if_merged_saved_bytes,
                "shares_with": [{"group": g, "bytes": b} for g, b in v.shares_with],
            }
            for v in found.vms
        ],
        "groups": [{"name": g, "predicted_saved_bytes": b} for g, b in found.groups],
        "suggested_groups": [
            {
                "name": s.name,
                "vms": list(s.vms),
                "shared_bytes": s.shared_bytes,
                "extends": s.extends,
            }
            for s in found.suggested
        ],
        "suggested_yaml": yaml_snippet(found.suggested),
    }


def yaml_snippet(suggested: Sequence[SuggestedGroup]) -> str:
    """The suggested groups as a `groups:` section that `ksmpolicy check` accepts."""
    new = [g for g in suggested if not g.extends]
    lines = ["groups:"] if new else []
    for group in new:
        names = ", ".join(_yaml_name(n) for n in group.vms)
        lines.append(
            f"  {group.name}:  # {len(group.vms)} VMs, {group.shared_bytes / 2**20:.1f} MiB alike"
        )
        lines.append(f"    names: [{names}]")
    for group in suggested:  # to the policy's own groups: the operator edits them
        if group.extends:
            names = ", ".join(_yaml_name(n) for n in group.vms)
            lines.append(f"# add to your group {one_line(group.name)}'s names: {names}")
    return "\n".join(lines) + "\n" if lines else ""


def _yaml_name(name: str) -> str:
    """A VM name as a glob that matches it, as a double-quoted YAML string that PyYAML reads
    back exactly. Wildcards are put in brackets (literal); a character no name glob may hold
    (`/`, a newline, NUL) or YAML cannot carry (a lone surrogate) becomes `?`, which matches
    it (and any one other character)."""
    glob = "".join(
        f"[{c}]" if c in "*?[" else "?" if c in "/\n\0" or "\ud800" <= c <= "\udfff" else c
        for c in name
    )
    return '"' + "".join(_yaml_char(c) for c in glob) + '"'


def _yaml_char(char: str) -> str:
    """One character inside a YAML double-quoted scalar: printable ASCII as it is, the rest
    escaped (\\xXX, \\uXXXX, \\UXXXXXXXX), so the snippet is plain ASCII whatever the name."""
    if char in '"\\':
        return "\\" + char
    if " " <= char <= "~":
        return char
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


# --- ksmpolicy fleet ------------------------------------------------------------------------


def fleet_text(rows: Sequence[HostRow]) -> str:
    lines = [_fleet_row("HOST", "SAVED MiB", "KSMD CPU", "VMS", "KSM", "FINDINGS")]
    for r in rows:
        cpu = "-" if r.ksmd_cpu_percent is None else f"{r.ksmd_cpu_percent:.1f} %"
        ksm = "passive" if r.passive else ("running" if r.running else "stopped")
        found = f"{r.errors} error(s), {r.warnings} warning(s)" if r.errors or r.warnings else "-"
        lines.append(_fleet_row(_cut(r.host, 24), mib(r.saved_bytes), cpu, str(r.vms), ksm, found))
    total = sum(r.saved_bytes for r in rows)
    lines.append(f"{len(rows)} host(s), {mib(total)} MiB saved")
    needing = [(r.host, f) for r in rows for f in r.findings if f[0] in NEEDS_OPERATOR]
    if needing:
        lines += ["", "Needs an operator:"]
        for host, (severity, vm, message, fix) in needing:  # each the host's word: one line
            said = ": ".join(one_line(str(part)) for part in (host, severity, vm, message))
            lines.append(f"  {said}")
            if fix:
                lines.append(f"    fix: {one_line(str(fix))}")
    return printable("\n".join(lines))


def _fleet_row(host: str, saved: str, cpu: str, vms: str, ksm: str, found: str) -> str:
    return f"{host:<24} {saved:>9} {cpu:>8} {vms:>4} {ksm:<8} {found}".rstrip()


def fleet_json(rows: Sequence[HostRow]) -> dict[str, object]:
    return {
        "version": JSON_VERSION,
        "saved_bytes": sum(r.saved_bytes for r in rows),
        "hosts": [
            {
                "host": r.host,
                "saved_bytes": r.saved_bytes,
                "ksmd_cpu_percent": r.ksmd_cpu_percent,
                "vms": r.vms,
                "running": r.running,
                "controller": r.controller,
                "passive": r.passive,
                "errors": r.errors,
                "warnings": r.warnings,
                "needs_operator": [
                    {"severity": s, "vm": v, "message": m, "fix": f}
                    for s, v, m, f in r.findings
                    if s in NEEDS_OPERATOR
                ],
            }
            for r in rows
        ],
    }
