"""Rendering for the commands: decisions and apply results as text and JSON."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ksmpolicy.apply import Outcome
from ksmpolicy.policy.decide import Decision
from ksmpolicy.policy.model import Policy
from ksmpolicy.quoting import one_line


def verdict_text(decision: Decision) -> str:
    return "never (memory)" if decision.verdict == "never" else decision.verdict


def decision_table(decisions: Sequence[Decision]) -> str:
    rows = [("VM", "GROUP", "DECISION", "RULE")]
    for d in decisions:
        rule = d.rule or "(default)"
        rows.append((one_line(d.vm), one_line(d.group or "-"), verdict_text(d), one_line(rule)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    )


def decision_text(decision: Decision, policy: Policy) -> str:
    return "\n".join(  # each line on one line, whatever the names in it hold
        one_line(line)
        for line in (
            f"VM:       {decision.vm}",
            f"decision: {verdict_text(decision)}",
            f"group:    {decision.group or '-'}",
            f"rule:     {decision.rule or '(default)'}",
            f"tags:     {', '.join(decision.tags) or '-'}",
            f"reason:   {decision.reason}",
            *(
                (f"domain:   {decision.domain} ({decision.domain_reason}){_bound(decision)}",)
                if policy.uses_domains
                else ()
            ),
            f"policy:   {policy.source}",
        )
    )


def _bound(decision: Decision) -> str:
    if not decision.bind_nodes:
        return ""
    return f"; memory bound to NUMA nodes {','.join(map(str, decision.bind_nodes))}"


def decision_json(decision: Decision) -> dict[str, Any]:
    return {
        "vm": decision.vm,
        "action": decision.action.value,
        "merge": decision.merge,
        "group": decision.group,
        "rule": decision.rule,
        "reason": decision.reason,
        "tags": list(decision.tags),
        "domain": decision.domain,
        "domain_reason": decision.domain_reason,
        "bind_nodes": list(decision.bind_nodes),
    }


def outcome_line(outcome: Outcome, *, proxmox: bool) -> str:
    line = f"{outcome.key} ({outcome.name}): " if proxmox else f"{outcome.key}: "
    line += outcome.status
    if outcome.backup:
        line += f" (backup {outcome.backup})"
    if outcome.error:
        line += f": {outcome.error}"
    return one_line(line)


def outcome_summary(outcomes: Sequence[Outcome], noun: str) -> str:
    changed = sum(o.status == "changed" for o in outcomes)
    would = sum(o.status == "would change" for o in outcomes)
    failed = [o.key for o in outcomes if o.status == "failed"]
    return (
        f"{len(outcomes)} {noun}: {changed} changed, {would} would change, {len(failed)} failed"
        + (f" ({', '.join(failed)})" if failed else "")
    )
