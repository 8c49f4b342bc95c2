"""The choice of one trust domain per merge scope: every rule on its own."""

from __future__ import annotations

from ksmpolicy.policy.model import IsolationSettings
from ksmpolicy.trust.choose import Candidate, Claim, choose

SETTINGS = IsolationSettings(stickiness_percent=25, min_hold_seconds=600)
MIB = 2**20


def test_an_empty_scope_is_idle() -> None:
    assert choose([], Claim("a", 0, "x"), 1000, SETTINGS) is None


def test_the_only_domain_takes_an_idle_scope() -> None:
    claim = choose([Candidate("a", 0, None, 5.0)], None, 100, SETTINGS)
    assert claim == Claim("a", 100, "the only domain with VMs that merge here")


def test_an_idle_scope_goes_to_priority_then_savings_then_the_first_start() -> None:
    cands = [Candidate("late", 0, None, 9.0), Candidate("early", 0, None, 1.0)]
    assert choose(cands, None, 0, SETTINGS).domain == "early"  # type: ignore[union-attr]
    cands.append(Candidate("rich", 0, 900 * MIB, 5.0))
    found = choose(cands, None, 0, SETTINGS)
    assert found is not None and (found.domain, found.why) == ("rich", "largest savings (900 MiB)")
    cands.append(Candidate("boss", 5, None, 9.9))
    found = choose(cands, None, 0, SETTINGS)
    assert found is not None and (found.domain, found.why) == ("boss", "highest priority (5)")


def test_higher_priority_takes_over_at_once() -> None:
    current = Claim("tenant", 10.0, "first")
    cands = [Candidate("tenant", 0, 500 * MIB, 1.0), Candidate("provider", 10, 1 * MIB, 2.0)]
    found = choose(cands, current, 11.0, SETTINGS)  # no hold time for priority
    assert found is not None and found.domain == "provider"
    assert found.why == "priority 10 over tenant's 0"


def test_lower_priority_never_takes_over() -> None:
    current = Claim("provider", 0.0, "x")
    cands = [Candidate("provider", 10, 1 * MIB, 1.0), Candidate("tenant", 0, 900 * MIB, 2.0)]
    assert choose(cands, current, 10**6, SETTINGS) is current


def test_savings_switch_needs_the_margin_and_the_hold_time() -> None:
    current = Claim("a", 0.0, "x")
    a = Candidate("a", 0, 100 * MIB, 1.0)
    assert choose([a, Candidate("b", 0, 124 * MIB, 2.0)], current, 10_000, SETTINGS) is current
    richer = Candidate("b", 0, 126 * MIB, 2.0)
    assert choose([a, richer], current, 599, SETTINGS) is current  # held too briefly
    found = choose([a, richer], current, 601, SETTINGS)
    assert found is not None and found.domain == "b" and found.since == 601
    assert "saves 126 MiB against a's 100 MiB" in found.why


def test_unknown_savings_never_move_a_scope() -> None:
    current = Claim("a", 0.0, "x")
    cands = [Candidate("a", 0, None, 1.0), Candidate("b", 0, 10**12, 2.0)]
    assert choose(cands, current, 10**6, SETTINGS) is current
    cands = [Candidate("a", 0, 1, 1.0), Candidate("b", 0, None, 2.0)]
    assert choose(cands, current, 10**6, SETTINGS) is current


def test_a_claim_whose_domain_left_is_handed_on() -> None:
    current = Claim("gone", 0.0, "x")
    found = choose([Candidate("b", 0, None, 2.0)], current, 50, SETTINGS)
    assert found is not None and found.domain == "b" and found.since == 50
