"""Which trust domain merges in a scope: pure, so that every rule can be tested on its own.

In order:

1. A scope whose active domain still has running VMs that want to merge keeps it, unless
2. a domain of higher `priority` has such VMs: it takes the scope over (priority is the
   operator's word, so no margin applies), or
3. a domain of the same priority would save more by `stickiness_percent` (the savings of every
   domain of that priority estimated the same way, from its VMs' pages: control/rivals.py,
   since only the active domain merges and a rival's savings cannot be measured), and the
   active one has held the scope for
   `min_hold_seconds`: the choice does not flap on noise, and a tenant who fills its guests
   with duplicate pages to win a scope can force a switch at most once per hold time.
4. A scope with no active domain goes to the highest priority, then the largest savings known,
   then the domain whose VM started first.
"""

from __future__ import annotations

from collections.abc import Sequence

from ksmpolicy.policy.model import IsolationSettings
from ksmpolicy.records import dataclass


@dataclass(frozen=True)
class Candidate:
    """A domain with running VMs in a scope that want to merge."""

    domain: str
    priority: int
    savings_bytes: int | None  # estimated (control/rivals.py); None: not known
    first_started: float  # when its earliest running VM in the scope started


@dataclass(frozen=True)
class Claim:
    domain: str
    since: float
    why: str


def choose(
    candidates: Sequence[Candidate],
    current: Claim | None,
    now: float,
    settings: IsolationSettings,
) -> Claim | None:
    """The claim on a scope after this look: the current one kept, a new one, or None (idle)."""
    if not candidates:
        return None
    by_name = {c.domain: c for c in candidates}
    incumbent = by_name.get(current.domain) if current is not None else None
    if current is None or incumbent is None:
        best = max(candidates, key=_rank)
        return Claim(best.domain, now, _why_first(best, candidates))
    top = max(c.priority for c in candidates)
    if top > incumbent.priority:
        best = max((c for c in candidates if c.priority == top), key=_rank)
        why = f"priority {best.priority} over {incumbent.domain}'s {incumbent.priority}"
        return Claim(best.domain, now, why)
    rivals = [c for c in candidates if c.priority == incumbent.priority and c is not incumbent]
    known = [c for c in rivals if c.savings_bytes is not None]
    if not known or incumbent.savings_bytes is None:
        return current
    best = max(known, key=lambda c: c.savings_bytes or 0)
    margin = 1 + settings.stickiness_percent / 100
    held = now - current.since
    if (best.savings_bytes or 0) > incumbent.savings_bytes * margin and (
        held >= settings.min_hold_seconds
    ):
        why = (
            f"saves {_mib(best.savings_bytes)} against {incumbent.domain}'s "
            f"{_mib(incumbent.savings_bytes)} (more than {settings.stickiness_percent:g} % more, "
            f"after {held:.0f} s)"
        )
        return Claim(best.domain, now, why)
    return current


def _rank(candidate: Candidate) -> tuple[int, int, float]:
    savings = candidate.savings_bytes if candidate.savings_bytes is not None else -1
    return (candidate.priority, savings, -candidate.first_started)


def _why_first(best: Candidate, candidates: Sequence[Candidate]) -> str:
    if len(candidates) == 1:
        return "the only domain with VMs that merge here"
    others = [c for c in candidates if c is not best]
    if all(best.priority > c.priority for c in others):
        return f"highest priority ({best.priority})"
    if best.savings_bytes is not None and all(
        c.savings_bytes is None or best.savings_bytes > c.savings_bytes for c in others
    ):
        return f"largest savings ({_mib(best.savings_bytes)})"
    return "its VM started first"


def _mib(value: int | None) -> str:
    return f"{(value or 0) / 2**20:.0f} MiB"
