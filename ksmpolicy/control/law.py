"""The reconciler's control law: how hard ksmd should work, from what the host shows. Pure.

The law, in short (README "The reconciler" has the reasons):

* Nothing mergeable: `run=0`. Merged pages stay merged; ksmd burns nothing.
* Calm: scan the whole mergeable footprint F once per `target_scan_seconds` (rate F/T).
* Sprint: when the footprint grows or a hook says a VM started, scan as fast as the CPU budget
  allows for as long as the merges need (`_track_sprint`; docs/daemon.md "Sprint"): up to 3
  full scans (the rest of the current round, as a new VM is queued just behind ksmd's cursor,
  and the two scans new memory needs before it can merge); 2 when the second saw (almost) no
  page for the first time; more while the last still changed sharing (booting guests settle
  their contents late), up to MAX_SPRINT_FULL_SCANS; and between full scans once ksmd visited
  twice the footprint and sharing held still. It re-plans every half second on the newest
  cost per page (checksumming and merging differ several times over). A sprint whose end
  changed almost no sharing counts as a scan that added none (Slow).
* Settle: a sprint waits while the footprint is still growing (by more than SETTLE_MIN_PAGES or
  SETTLE_FRACTION of it over SETTLE_SECONDS): scanning a guest whole at every filling step would
  take the CPU the guests fill with. Meanwhile ksmd scans at the pace the memory appears (at
  least calm, at most the budget). A footprint that keeps growing gets its sprint after
  MAX_SETTLE_SECONDS all the same.
* Slow: each full scan that adds almost no sharing halves the calm pace, down to 1/8; but
  not while memory that became mergeable since has not been scanned twice (a page merges only
  on its second scan): a guest that fills its memory over a minute, or a VM switched on while
  its partners still boot, would otherwise wait behind a pace slowed on scans that could not
  have merged it (smart_scan skipping pages scanned alone makes that worse).
* Pressure: as MemAvailable falls below `memory_pressure_percent` of MemTotal, the pace rises
  from calm towards the CPU budget, in proportion, but only while merges remain: while the
  last full scan added sharing. Once a full scan under pressure found nothing left to merge,
  the pace goes back to calm or slow (pressure cannot buy what is not there), and one full
  scan at the pressure pace probes again every `target_scan_seconds x max_slowdown`.
* Budget: ksmd's CPU share is rate x cost-per-page; the cost is measured (ksmd CPU seconds per
  page scanned) and the rate never planned above `max_ksmd_cpu_percent`.
* Kernel advisor (optional): hand pacing to `advisor_mode=scan-time` and never write
  `pages_to_scan` while it is on. It is judged by its rate, not by "any progress": once a whole
  re-plan interval ran under it, if it scanned less than ADVISOR_SHORTFALL of what the law would
  scan now (a sprint for new memory: the CPU budget; calm: the footprint per target period),
  pacing is taken back at once and kept. Enabled on a host where ksmd already ran, the advisor
  charges ksmd's past CPU to its first short scan and clamps `pages_to_scan` to its minimum
  (measured here: 10 pages, the first merge after 160 s), so this is the usual outcome.

A rate r becomes knobs: ksmd scans `pages_to_scan` (P) pages, then sleeps `sleep_millisecs`
(S), so r = P / (P*c + S/1000) for a cost c CPU-seconds per page, and P = r*S/1000 / (1 - r*c).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ksmpolicy.paths import PAGE_SIZE
from ksmpolicy.policy.model import ReconcilerSettings

# CPU-seconds per scanned page. Measured here: first passes 0.8-1.5 M pages per CPU-second,
# merging passes 110-160 k. Until ksmd's own cost is measured, assume the expensive end.
DEFAULT_COST_PER_PAGE = 1 / 150_000
MIN_COST_PER_PAGE = 1 / 5_000_000
MAX_COST_PER_PAGE = 1 / 20_000
# The footprint must grow by this much (pages, and a fraction) to count as new memory.
GROWTH_MIN_PAGES = 2048
MIN_COST_WINDOW_CPU_SECONDS = 0.02  # ksmd CPU time before its cost per page is trusted
GROWTH_FRACTION = 0.02
# Memory that grew by this much (pages) since the last full scan is new: not judged yet.
FRESH_MIN_PAGES = 512
HYSTERESIS = 0.10  # keep pages_to_scan when the new plan differs by less than this
# Settle: the footprint still grows when it rose by more than this (pages, and a fraction of it)
# over the last SETTLE_SECONDS; a sprint waits for it, at most MAX_SETTLE_SECONDS.
SETTLE_SECONDS = 0.5
SETTLE_MIN_PAGES = 512
SETTLE_FRACTION = 0.005
MAX_SETTLE_SECONDS = 30.0
MAX_SPRINT_FULL_SCANS = 8  # a sprint whose full scans keep changing sharing runs at most this
VISIT_WINDOW_DIVISOR = 4  # after 2 F visits a sprint judges windows of F / this (`_track_window`)
MIN_GROWTH_WINDOW_SECONDS = 0.1  # a growth rate is measured over at least this long
PAGE_MIB = PAGE_SIZE / 2**20

# The advisor is kept while it scans at least this share of what the law would (see above).
ADVISOR_SHORTFALL = 0.5


@dataclass(frozen=True)
class LawSettings:
    target_scan_seconds: float = 120.0
    max_ksmd_cpu_percent: float = 20.0
    memory_pressure_percent: float = 20.0
    kernel_advisor: bool = False
    use_zero_pages: bool | None = None  # None: leave the knob alone
    sleep_millisecs: int = 20
    max_sleep_millisecs: int = 2000
    min_pages_to_scan: int = 32
    max_pages_to_scan: int = 200_000
    sprint_full_scans: int = 3
    unproductive_fraction: float = 0.005  # a full scan adding less sharing than this x F
    max_slowdown: int = 8

    @classmethod
    def from_policy(cls, settings: ReconcilerSettings) -> LawSettings:
        return cls(
            target_scan_seconds=settings.target_scan_seconds,
            max_ksmd_cpu_percent=settings.max_ksmd_cpu_percent,
            memory_pressure_percent=settings.memory_pressure_percent,
            kernel_advisor=settings.kernel_advisor,
            use_zero_pages=settings.use_zero_pages,
        )


@dataclass(frozen=True)
class Observation:
    """One look at the host."""

    time: float  # monotonic seconds
    footprint_pages: int  # resident mergeable memory of every process, in pages
    full_scans: int
    saved_pages: int  # pages_sharing + ksm_zero_pages
    mem_total: int  # bytes
    mem_available: int  # bytes
    ksmd_cpu_seconds: float | None = None
    pages_scanned: int | None = None  # cumulative; None on kernels without the counter
    pages_skipped: int | None = None  # cumulative pages smart_scan passed over; None: no counter
    # Pages ksmd has seen (scanned at least once and still tracks: its rmap items, the sum of
    # pages_shared, pages_sharing, pages_unshared and pages_volatile). None when unknown.
    pages_seen: int | None = None
    notes: int = 0  # hook notes (VM started or stopped) since the last plan
    has_advisor: bool = False
    advisor_on: bool = False
    has_use_zero_pages: bool = True


@dataclass(frozen=True)
class History:
    """What the law remembers from one plan to the next. `History()` before the first."""

    time: float | None = None
    ksmd_cpu_seconds: float | None = None
    pages_scanned: int | None = None
    planned_rate: float = 0.0
    footprint_pages: int = 0
    sprint_until_full_scans: int | None = None
    # The full scan count when the sprint began, and the full scan count and saved pages when
    # one of its full scans last ended.
    sprint_began_scans: int = 0
    sprint_mark_scans: int = 0
    sprint_mark_saved: int = 0
    sprint_mark_seen: int | None = None
    # Pages ksmd visited when the sprint began (None: no counter); where the window after 2 F
    # visits began: (visits, saved pages, footprint).
    sprint_began_visits: int | None = None
    sprint_window: tuple[int, int, int] | None = None
    sprint_ended_quiet: bool = False  # its end added almost no sharing: the pace starts slowed
    # Settle: when the pending sprint was asked for (None: none pending or under way), whether
    # the footprint still grows, and the (time, footprint) it is compared with.
    sprint_wanted_at: float | None = None
    growing: bool = False
    growth_rate: float = 0.0  # pages per second the footprint grew by, over the last window
    settle_ref_time: float | None = None
    settle_ref_pages: int = 0
    last_full_scans: int | None = None
    saved_at_last_full_scan: int = 0
    unproductive_scans: int = 0
    # The footprint when the last full scan ended, and the full scan count until which new
    # memory seen then is still unjudged (a page merges only on its second scan).
    footprint_at_last_full_scan: int = 0
    fresh_until_full_scans: int | None = None
    cost_per_page: float = DEFAULT_COST_PER_PAGE
    cpu_percent: float | None = None  # ksmd's measured share of one core since the last plan
    # Start of the window over which the cost per page is measured: it grows until ksmd has
    # used enough CPU to tell, then restarts.
    cost_window_cpu: float | None = None
    cost_window_pages: float = 0.0
    advisor_since: float | None = None
    advisor_scans_at_start: int = 0
    advisor_failed: bool = False
    # Pressure probes: the full scan count that ends the one under way (None: none), and when
    # the last one began.
    probe_until_full_scans: int | None = None
    probe_at: float | None = None
    # ksmd's scan rate over the last re-plan interval (pages/s), and when that interval began
    scan_rate: float | None = None
    scan_rate_since: float | None = None
    # The knobs planned last, for hysteresis: a change of under 10 % in the same mode is noise.
    last_mode: str | None = None
    last_pages: int = 0
    last_sleep_ms: int = 0


@dataclass(frozen=True)
class Plan:
    knobs: tuple[tuple[str, int | str], ...]  # to be written in this order
    mode: str  # stopped | settle | sprint | calm | slow | pressure | advisor
    reason: str
    pages_per_second: float
    history: History


def plan(obs: Observation, settings: LawSettings, history: History) -> Plan:
    """Decide ksmd's knobs for the next interval."""
    result = _plan(obs, settings, history)
    if settings.use_zero_pages is None or not obs.has_use_zero_pages:
        return result
    zero: tuple[str, int | str] = ("use_zero_pages", int(settings.use_zero_pages))
    return replace(result, knobs=(zero, *result.knobs))


def _plan(obs: Observation, settings: LawSettings, history: History) -> Plan:
    history = _measure(obs, history)
    history = _track_growth(obs, settings, history)
    history = _track_settling(obs, history)
    history = _track_productivity(obs, settings, history)
    footprint = obs.footprint_pages
    if footprint <= 0:
        history = replace(history, planned_rate=0.0, advisor_since=None, last_mode="stopped")
        knobs: tuple[tuple[str, int | str], ...] = (("run", 0),)
        return Plan(knobs, "stopped", "nothing mergeable: ksmd stopped", 0.0, history)

    if settings.kernel_advisor and obs.has_advisor and not history.advisor_failed:
        return _advisor_plan(obs, settings, history)

    budget = min(settings.max_ksmd_cpu_percent, 95.0) / 100
    cost = history.cost_per_page
    max_rate = budget / cost
    calm_rate = footprint / settings.target_scan_seconds
    slowdown = min(2**history.unproductive_scans, settings.max_slowdown)
    severity = _pressure(obs, settings)
    sprinting = history.sprint_until_full_scans is not None

    if sprinting:
        history, rate, mode, why = _new_memory(obs, settings, history, calm_rate, max_rate)
    else:
        rate, mode = calm_rate / slowdown, "calm" if slowdown == 1 else "slow"
        why = f"one full scan per {settings.target_scan_seconds * slowdown:g} s"
        if slowdown > 1:
            why += f" (the last {history.unproductive_scans} full scan(s) added no sharing)"
        pressure_rate = calm_rate + severity * (max_rate - calm_rate)
        history, merges_remain = _merges_remain(obs, settings, history, severity)
        if severity > 0 and pressure_rate > rate and merges_remain:
            rate, mode = pressure_rate, "pressure"
            why = f"memory pressure {severity:.0%}: pace raised towards the CPU budget"
        elif severity > 0:
            why += (
                f"; memory pressure {severity:.0%}, but the last full scan found nothing left "
                "to merge: a faster pace would buy nothing"
            )
    capped = rate > max_rate
    rate = min(rate, max_rate)
    pages, sleep_ms = _knobs_for_rate(rate, cost, settings)
    if (
        mode == history.last_mode
        and sleep_ms == history.last_sleep_ms
        and abs(pages - history.last_pages) <= HYSTERESIS * history.last_pages
    ):
        pages = history.last_pages
    actual_rate = pages / (pages * cost + sleep_ms / 1000)
    if capped:
        why += f" (capped by max_ksmd_cpu_percent={settings.max_ksmd_cpu_percent:g})"
    # advisor_mode=none must come first: pages_to_scan is EINVAL while the advisor is on.
    off: tuple[tuple[str, int | str], ...] = (("advisor_mode", "none"),) if obs.advisor_on else ()
    knobs = (*off, ("sleep_millisecs", sleep_ms), ("pages_to_scan", pages), ("run", 1))
    history = replace(
        history,
        planned_rate=actual_rate,
        advisor_since=None,
        last_mode=mode,
        last_pages=pages,
        last_sleep_ms=sleep_ms,
    )
    return Plan(knobs, mode, why, actual_rate, history)


def _new_memory(
    obs: Observation, settings: LawSettings, history: History, calm_rate: float, max_rate: float
) -> tuple[History, float, str, str]:
    """A sprint is wanted: settle while the footprint grows, then sprint. The sprint's full
    scans count from when it starts."""
    if _settling(obs, history):
        waited = obs.time - history.sprint_wanted_at  # type: ignore[operator]
        why = (
            f"new memory still growing ({history.growth_rate * PAGE_MIB:.0f} MiB/s): scanning "
            f"at that pace; the sprint waits until it settles "
            f"({waited:.1f} of at most {MAX_SETTLE_SECONDS:g} s)"
        )
        history = _begin_sprint(obs, settings, history)
        return history, max(calm_rate, history.growth_rate), "settle", why
    if history.last_mode == "settle":  # settled: the sprint's full scans count from here
        history = _begin_sprint(obs, settings, history)
    left = history.sprint_until_full_scans - obs.full_scans  # type: ignore[operator]
    why = f"new memory: scanning at the CPU budget for {left} more full scan(s)"
    if obs.full_scans - history.sprint_began_scans >= settings.sprint_full_scans:
        why += " (the last one still changed sharing)"
    return history, max_rate, "sprint", why


def promised_merge_seconds(footprint_pages: int, settings: LawSettings) -> float:
    """How long the law gives new memory to merge: the sprint's full scans at the CPU budget,
    with ksmd's cost per page at the pessimistic default."""
    budget = min(settings.max_ksmd_cpu_percent, 95.0) / 100
    return settings.sprint_full_scans * footprint_pages * DEFAULT_COST_PER_PAGE / budget


def planned_cpu_fraction(plan: Plan) -> float:
    """ksmd's CPU share the plan expects, from its rate and the measured cost per page."""
    return plan.pages_per_second * plan.history.cost_per_page


def _knobs_for_rate(rate: float, cost: float, settings: LawSettings) -> tuple[int, int]:
    """pages_to_scan and sleep_millisecs that scan `rate` pages per second."""
    sleep_ms = settings.sleep_millisecs
    busy = min(rate * cost, 0.99)
    pages = rate * sleep_ms / 1000 / (1 - busy)
    if pages < settings.min_pages_to_scan:
        pages = settings.min_pages_to_scan
        if rate > 0:
            sleep_ms = math.ceil(1000 * pages * (1 / rate - cost))
        sleep_ms = max(settings.sleep_millisecs, min(sleep_ms, settings.max_sleep_millisecs))
    pages = min(max(settings.min_pages_to_scan, math.floor(pages)), settings.max_pages_to_scan)
    return int(pages), int(sleep_ms)


def _measure(obs: Observation, history: History) -> History:
    """ksmd's CPU share since the last plan, and its cost per scanned page."""
    first = history.time is None or history.ksmd_cpu_seconds is None
    if first or obs.ksmd_cpu_seconds is None:
        return replace(
            history,
            time=obs.time,
            ksmd_cpu_seconds=obs.ksmd_cpu_seconds,
            pages_scanned=obs.pages_scanned,
            cost_window_cpu=obs.ksmd_cpu_seconds,
            cost_window_pages=0.0,
        )
    elapsed = obs.time - history.time  # type: ignore[operator]
    if elapsed <= 0:
        return history
    cpu = max(0.0, obs.ksmd_cpu_seconds - history.ksmd_cpu_seconds)  # type: ignore[operator]
    if obs.pages_scanned is not None and history.pages_scanned is not None:
        scanned = float(max(0, obs.pages_scanned - history.pages_scanned))
    else:
        scanned = history.planned_rate * elapsed  # older kernels: trust the plan
    window_start = history.cost_window_cpu
    if window_start is None:
        window_start = history.ksmd_cpu_seconds
    window_cpu = obs.ksmd_cpu_seconds - window_start  # type: ignore[operator]
    window_pages = history.cost_window_pages + scanned
    cost = history.cost_per_page
    if window_pages >= 5_000 and window_cpu >= MIN_COST_WINDOW_CPU_SECONDS:
        measured = min(max(window_cpu / window_pages, MIN_COST_PER_PAGE), MAX_COST_PER_PAGE)
        # A sprint follows the newest window: the cost per page changes several times over as
        # ksmd moves from checksumming new memory to merging it, and a sprint lasts seconds.
        # At a calm pace, an average smooths the noise of small windows.
        weight = 1.0 if history.sprint_until_full_scans is not None else 0.5
        cost = (1 - weight) * cost + weight * measured
        window_start, window_pages = obs.ksmd_cpu_seconds, 0.0
    return replace(
        history,
        time=obs.time,
        ksmd_cpu_seconds=obs.ksmd_cpu_seconds,
        pages_scanned=obs.pages_scanned,
        cost_per_page=cost,
        cpu_percent=100 * cpu / elapsed,
        cost_window_cpu=window_start,
        cost_window_pages=window_pages,
        scan_rate=scanned / elapsed if obs.pages_scanned is not None else None,
        scan_rate_since=history.time,
    )


def _track_growth(obs: Observation, settings: LawSettings, history: History) -> History:
    grown = obs.footprint_pages - history.footprint_pages
    grew = grown >= max(GROWTH_MIN_PAGES, GROWTH_FRACTION * history.footprint_pages)
    wanted_at = history.sprint_wanted_at
    if grew or obs.notes:
        # Always the rest of a round too, even when nothing was mergeable before: ksmd keeps
        # the slots of exited processes in its list until its scan reaches them, so a round
        # can be under way (a sprint of two scans left new guests a third merged, in a test).
        history = _begin_sprint(obs, settings, history)
        wanted_at = obs.time if wanted_at is None else wanted_at
    elif history.sprint_until_full_scans is not None:
        history = _track_sprint(obs, settings, history)
        if history.sprint_until_full_scans is None:
            wanted_at = None
    return replace(history, footprint_pages=obs.footprint_pages, sprint_wanted_at=wanted_at)


def _begin_sprint(obs: Observation, settings: LawSettings, history: History) -> History:
    """A sprint's full scans count from here."""
    return replace(
        history,
        sprint_until_full_scans=obs.full_scans + settings.sprint_full_scans,
        sprint_began_scans=obs.full_scans,
        sprint_mark_scans=obs.full_scans,
        sprint_mark_saved=obs.saved_pages,
        sprint_mark_seen=obs.pages_seen,
        sprint_began_visits=_visits(obs),
        sprint_window=None,
        sprint_ended_quiet=False,
    )


def _visits(obs: Observation) -> int | None:
    """Pages ksmd has visited: scanned, or passed over by smart_scan (the cursor moved on)."""
    if obs.pages_scanned is None:
        return None
    return obs.pages_scanned + (obs.pages_skipped or 0)


def _track_sprint(obs: Observation, settings: LawSettings, history: History) -> History:
    """Where a sprint under way stands (sprint_until_full_scans None: it is over). It runs
    `sprint_full_scans` full scans, but ends after two when the last saw almost no page for the
    first time (every page then had its second scan, on which a page merges, and the second of
    a pair finds the first in that scan); runs one more while its last changed sharing (a loss
    too: booting guests write merged pages, and a net gain near zero hid merges to come,
    measured), up to MAX_SPRINT_FULL_SCANS; ends between full scans by `_track_window`. Ended
    quiet (almost no change), it says so (`sprint_ended_quiet`)."""
    until = history.sprint_until_full_scans
    assert until is not None
    if history.last_mode != "sprint":  # waiting to settle: `_new_memory` moves the start
        return replace(history, sprint_until_full_scans=None if obs.full_scans >= until else until)
    history = _track_window(obs, settings, history)
    if history.sprint_until_full_scans is None or obs.full_scans <= history.sprint_mark_scans:
        return history
    # a full scan ended: what it (they, if several ended since the last plan) added and saw
    scans = obs.full_scans - history.sprint_mark_scans
    gain = (obs.saved_pages - history.sprint_mark_saved) / scans
    little = _noticeable(obs, settings)
    marked = replace(
        history,
        sprint_mark_scans=obs.full_scans,
        sprint_mark_saved=obs.saved_pages,
        sprint_mark_seen=obs.pages_seen,
    )
    done = obs.full_scans - history.sprint_began_scans
    seen, seen_before = obs.pages_seen, history.sprint_mark_seen
    changed = abs(gain) > little  # sharing grew, or fell: guests still write what merged
    over = replace(marked, sprint_until_full_scans=None, sprint_ended_quiet=not changed)
    if done >= 2 and seen is not None and seen_before is not None and seen - seen_before <= little:
        return over
    if obs.full_scans < until:
        return marked
    if changed and done < MAX_SPRINT_FULL_SCANS:
        return replace(marked, sprint_until_full_scans=obs.full_scans + 1)
    return over


def _track_window(obs: Observation, settings: LawSettings, history: History) -> History:
    """A new VM's memory is queued just behind ksmd's cursor, so its pages get their second
    scan, and merge, once ksmd visited about twice the footprint since they came: the rest of
    the third round would re-read merged and partnerless pages. So after 2 F visits the sprint
    ends at the first window of F / VISIT_WINDOW_DIVISOR visits that changed almost no sharing
    and added no memory (the noticeable share of F, pro rata, each); else the next one starts.
    Booting guests merge in bursts and grow as they go: a shorter window ended their sprint
    with a tenth of their savings to find (measured)."""
    began, visits = history.sprint_began_visits, _visits(obs)
    footprint = obs.footprint_pages
    if began is None or visits is None or footprint <= 0 or visits - began < 2 * footprint:
        return history
    start = history.sprint_window
    if start is not None and visits >= start[0]:  # else: a first window, or counters reset
        window = visits - start[0]
        if window < footprint / VISIT_WINDOW_DIVISOR:
            return history
        little = _noticeable(obs, settings) * window / footprint
        if abs(obs.saved_pages - start[1]) <= little and footprint - start[2] <= little:
            return replace(history, sprint_until_full_scans=None, sprint_ended_quiet=True)
    return replace(history, sprint_window=(visits, obs.saved_pages, footprint))


def _noticeable(obs: Observation, settings: LawSettings) -> float:
    """Pages that count as something: new memory (grown or first seen) or a full scan's gain
    above this is not "almost none" (FRESH_MIN_PAGES, or the unproductive share of F)."""
    return max(FRESH_MIN_PAGES, settings.unproductive_fraction * obs.footprint_pages)


def _track_settling(obs: Observation, history: History) -> History:
    """Whether the footprint still grows: compared with a reference at least SETTLE_SECONDS
    old (or at once, when it already grew past the limit). The footprint found at the first
    look (no reference yet) is not growth: it was there before."""
    if history.settle_ref_time is None:
        return replace(
            history, growing=False, settle_ref_time=obs.time, settle_ref_pages=obs.footprint_pages
        )
    grown = obs.footprint_pages - history.settle_ref_pages
    limit = max(SETTLE_MIN_PAGES, SETTLE_FRACTION * obs.footprint_pages)
    elapsed = obs.time - history.settle_ref_time
    if grown <= limit and elapsed < SETTLE_SECONDS:
        return history
    # a window closes: the footprint grew past the limit, or SETTLE_SECONDS went by
    rate = max(grown, 0) / max(elapsed, MIN_GROWTH_WINDOW_SECONDS)
    return replace(
        history,
        growing=grown > limit,
        growth_rate=rate if grown > limit else 0.0,
        settle_ref_time=obs.time,
        settle_ref_pages=obs.footprint_pages,
    )


def _settling(obs: Observation, history: History) -> bool:
    """A wanted sprint waits: the footprint still grows, and not for too long yet."""
    wanted_at = history.sprint_wanted_at
    waited = 0.0 if wanted_at is None else obs.time - wanted_at
    return history.growing and waited < MAX_SETTLE_SECONDS


def _track_productivity(obs: Observation, settings: LawSettings, history: History) -> History:
    """Count consecutive full scans that added (almost) no sharing. A sprint's scans are not
    judged here, nor the one that ends it: the baseline moves at every plan of a sprint (half a
    second apart), so its last scan would be judged on half a second's merges. The sprint
    judges its own (`_track_sprint`): one that ended quiet counts as one scan that added none."""
    sprinted = history.last_mode in ("sprint", "settle")
    if history.last_full_scans is None or history.sprint_until_full_scans is not None or sprinted:
        # a sprint that ended on a scan adding almost no sharing counts as one such scan
        quiet = history.sprint_until_full_scans is None and history.sprint_ended_quiet
        return replace(
            history,
            last_full_scans=obs.full_scans,
            saved_at_last_full_scan=obs.saved_pages,
            footprint_at_last_full_scan=obs.footprint_pages,
            unproductive_scans=1 if quiet else 0,
        )
    if obs.full_scans <= history.last_full_scans:
        return history
    gain = obs.saved_pages - history.saved_at_last_full_scan
    productive = gain > settings.unproductive_fraction * obs.footprint_pages
    fresh = history.fresh_until_full_scans
    grown = obs.footprint_pages - history.footprint_at_last_full_scan
    if grown > _noticeable(obs, settings):
        fresh = obs.full_scans + 2  # new memory: two more scans before it can merge
    unjudged = fresh is not None and obs.full_scans <= fresh
    return replace(
        history,
        last_full_scans=obs.full_scans,
        saved_at_last_full_scan=obs.saved_pages,
        footprint_at_last_full_scan=obs.footprint_pages,
        fresh_until_full_scans=fresh if unjudged else None,
        unproductive_scans=0 if productive or unjudged else history.unproductive_scans + 1,
    )


def _merges_remain(
    obs: Observation, settings: LawSettings, history: History, severity: float
) -> tuple[History, bool]:
    """Whether pressure may raise the pace: the last full scan added sharing, or a probe (one
    full scan at the pressure pace, at most every target period x max_slowdown) is under way
    or due. ksmd's counters cannot say how many duplicates are left unmerged; the scan that
    just looked at every mergeable page can."""
    if severity <= 0:
        return replace(history, probe_until_full_scans=None), False
    if history.unproductive_scans == 0:
        return history, True
    until = history.probe_until_full_scans
    if until is not None and obs.full_scans < until:
        return history, True
    every = settings.target_scan_seconds * settings.max_slowdown
    if until is None and (history.probe_at is None or obs.time - history.probe_at >= every):
        # the rest of the current round, then one whole scan
        return replace(history, probe_until_full_scans=obs.full_scans + 2, probe_at=obs.time), True
    return replace(history, probe_until_full_scans=None), False


def _pressure(obs: Observation, settings: LawSettings) -> float:
    """0 with MemAvailable at or above the threshold, rising to 1 with nothing available."""
    if obs.mem_total <= 0 or settings.memory_pressure_percent <= 0:
        return 0.0
    available = 100 * obs.mem_available / obs.mem_total
    threshold = settings.memory_pressure_percent
    return min(max((threshold - available) / threshold, 0.0), 1.0)


def _advisor_plan(obs: Observation, settings: LawSettings, history: History) -> Plan:
    since = history.advisor_since
    scans_at_start = history.advisor_scans_at_start
    if since is None or not obs.advisor_on:
        since, scans_at_start = obs.time, obs.full_scans
    else:
        law = replace(settings, kernel_advisor=False)
        wanted = _plan(obs, law, history).pages_per_second  # what the law would scan now
        measured = history.scan_rate
        judged = history.scan_rate_since is not None and history.scan_rate_since >= since
        short = judged and measured is not None and measured < ADVISOR_SHORTFALL * wanted
        stuck = (
            obs.time - since > 3 * settings.target_scan_seconds and obs.full_scans == scans_at_start
        )
        if short or stuck:
            failed = replace(history, advisor_failed=True, advisor_since=None)
            result = _plan(obs, law, failed)
            if short:
                reason = (
                    f"kernel advisor scanned {measured:.0f} pages/s where the law scans "
                    f"{wanted:.0f}; pacing taken back: "
                )
            else:
                reason = "kernel advisor made no progress in 3 target periods; pacing taken back: "
            return replace(result, reason=reason + result.reason)
    knobs: tuple[tuple[str, int | str], ...] = (
        ("advisor_target_scan_time", max(1, round(settings.target_scan_seconds))),
        ("advisor_max_cpu", max(1, min(100, round(settings.max_ksmd_cpu_percent)))),
        ("advisor_mode", "scan-time"),
        ("run", 1),
    )
    history = replace(history, advisor_since=since, advisor_scans_at_start=scans_at_start)
    why = f"kernel scan-time advisor: target {settings.target_scan_seconds:g} s per full scan"
    return Plan(knobs, "advisor", why, history.planned_rate, history)
