"""A finding: something on the host worth acting on, with what to do about it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Finding:
    severity: str  # info | warning
    vm: str | None
    message: str
    fix: str
