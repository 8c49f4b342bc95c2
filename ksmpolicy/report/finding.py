"""A finding: something on the host worth acting on, with what to do. The record every report
makes (report/findings.py, the sharing map, trust domains) and status shows; a module of its
own, so that the sharing map, which status's model holds, need not import that model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    """Something on the host worth acting on, with what to do (see report/findings.py)."""

    severity: str  # error | warning | info
    vm: str | None  # the VM's name, or None for the host
    message: str
    fix: str
    code: str = ""  # what kind of finding: stable, for scripts and tests
    steps: tuple[str, ...] = ()  # the fix's commands, one by one (empty: no command fixes it)
