"""rebalance's bookkeeping (what it caches between moves, what a move changes) against a plain
greedy that recomputes everything from fresh host sketches at every step, on random small
fleets: shared image contents, two trust domains, hosts with and without a merging domain,
VMs the policy excludes, tight memory. Both must propose the same moves with the same gains."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ksmpolicy.paths import PAGE_SIZE
from ksmpolicy.placement.holders import DamagedHolders
from ksmpolicy.placement.plan import place, saving
from ksmpolicy.placement.rebalance import Fleet, Planner, rebalance
from ksmpolicy.placement.sketch import HostSketch, VmSketch
from tests.placement.test_plan import WEB, K, host, vm

MIB = 2**20


def _saving_on(one: VmSketch, k: int, host: HostSketch, *, member: bool) -> tuple[int, int]:
    """The plain model: (saved, shared) pages of `one` on `host`, from the host's union of its
    domain, where it runs (`member`) or if it moved there."""
    merging = one.active if member else host.would_merge(one) is None
    if not merging:
        return 0, 0
    return saving(one, k, host, host.union(one.domain).there(one, member=member))


def plain_greedy(
    hosts: list[HostSketch], max_moves: int, reserve: int, min_gain: int
) -> list[tuple[str, str, str, int]]:
    available = {h.host: h.mem_available_bytes for h in hosts}
    moved: set[str] = set()
    moves: list[tuple[str, str, str, int]] = []
    while len(moves) < max_moves:
        best: tuple[int, VmSketch, HostSketch, HostSketch, int] | None = None
        for source in hosts:
            for one in source.vms:
                if one.name in moved or not one.merges:
                    continue
                here = _saving_on(one, K, source, member=True)[0]
                for target in hosts:
                    if target is source:
                        continue
                    there = _saving_on(one, K, target, member=False)[0]
                    cost = (one.present_pages - there) * PAGE_SIZE
                    gain = (there - here) * PAGE_SIZE
                    if available[target.host] - cost < reserve or gain < min_gain:
                        continue
                    if best is None or gain > best[0]:
                        best = (gain, one, source, target, here)
        if best is None:
            return moves
        gain, one, source, target, here = best
        there = _saving_on(one, K, target, member=False)[0]
        available[target.host] -= (one.present_pages - there) * PAGE_SIZE
        available[source.host] += (one.present_pages - here) * PAGE_SIZE
        arrived = dataclasses.replace(one, active=target.would_merge(one) is None)
        domains = target.active_domains
        if domains == () and arrived.active:
            domains = (one.domain,)
        fresh = {
            source.host: dataclasses.replace(
                source, vms=tuple(v for v in source.vms if v is not one)
            ),
            target.host: dataclasses.replace(
                target, vms=(*target.vms, arrived), active_domains=domains
            ),
        }
        hosts = [fresh.get(h.host, h) for h in hosts]
        moved.add(one.name)
        moves.append((one.name, source.host, target.host, gain))
    return moves


def random_fleet(rng: np.random.Generator) -> list[HostSketch]:
    images = [list(range(i * 1000, i * 1000 + int(rng.integers(20, 200)))) for i in range(3)]
    hosts = []
    count = 0
    for h in range(int(rng.integers(2, 5))):
        vms = []
        for _ in range(int(rng.integers(0, 5))):
            image = images[int(rng.integers(0, 3))]
            keep = rng.random(len(image)) < 0.8
            own = list(
                range(100_000 + count * 500, 100_000 + count * 500 + int(rng.integers(0, 50)))
            )
            domain = str(rng.choice(["a", "b"]))
            merges = bool(rng.random() < 0.85)
            vms.append(
                vm(
                    f"vm-{count}",
                    [v for v, k in zip(image, keep, strict=True) if k] + own,
                    domain=domain,
                    merges=merges,
                    active=merges and bool(rng.random() < 0.8),
                    zero=int(rng.integers(0, 500)),
                    present=int(rng.integers(20_000, 60_000)),
                )
            )
            count += 1
        active: tuple[str, ...] | None = [None, (), ("a",), ("b",), ("a", "b")][
            int(rng.integers(0, 5))
        ]
        hosts.append(
            host(
                f"h{h}",
                *vms,
                available_mib=int(rng.integers(50, 600)),
                zero_page=bool(rng.random() < 0.5),
                active_domains=active,
            )
        )
    return hosts


def test_rebalance_matches_a_plain_greedy_on_random_fleets() -> None:
    rng = np.random.default_rng(26)
    plans: list[int] = []
    for _ in range(400):
        fleet = random_fleet(rng)
        reserve = int(rng.integers(0, 100)) * MIB
        min_gain = int(rng.integers(1, 20)) * MIB
        got = [
            (m.vm.name, m.source, m.target, m.gain_bytes)
            for m in rebalance(fleet, max_moves=4, reserve_bytes=reserve, min_gain_bytes=min_gain)
        ]
        assert got == plain_greedy(fleet, 4, reserve, min_gain), fleet
        plans.append(len(got))
    # the fleets do move, several times: the comparison is not of empty plans
    assert sum(n > 0 for n in plans) > 100 and sum(n > 1 for n in plans) > 40, plans


def test_place_matches_each_hosts_union_on_random_fleets() -> None:
    """place filters each host's values through the VM's own instead of building each host's
    union: the same figures as the union's, for every VM of random fleets on every host."""
    rng = np.random.default_rng(2026)
    compared = shared = 0
    for _ in range(150):
        fleet = random_fleet(rng)
        for home in fleet:
            for one in home.vms:
                _vm, ranked = place(fleet, one.name)
                got = {p.host: (p.saved_bytes, p.shared_bytes) for p in ranked}
                for target in fleet:
                    saved, with_others = _saving_on(one, K, target, member=target is home)
                    assert got[target.host] == (saved * PAGE_SIZE, with_others * PAGE_SIZE)
                    compared += 1
                    shared += with_others > 0
    assert compared > 1000 and shared > 300, (compared, shared)


def test_a_tie_goes_to_the_vm_first_in_the_sketches_even_when_its_bound_is_lower() -> None:
    """`a` could gain at most 200 samples' worth (X and Y are held elsewhere) and is weighed
    first, but gains 100 (X and Y are on two hosts); `b`, first in the sketches, gains 100 too
    and its bound is exactly that: it must still be weighed, and win the tie."""
    x, y = list(range(100)), list(range(1000, 1100))
    fleet = [
        host("h0", vm("b", x)),
        host("h1", vm("a", x + y)),
        host("h2", vm("c", x)),
        host("h3", vm("d", y)),
    ]
    (move,) = rebalance(fleet, max_moves=1, min_gain_bytes=MIB)
    assert (move.vm.name, move.target, move.gain_bytes) == ("b", "h1", 100 * K * PAGE_SIZE)
    assert [(move.vm.name, move.source, move.target, move.gain_bytes)] == plain_greedy(
        fleet, 1, 0, MIB
    )


def test_a_plan_weighs_only_the_vms_whose_bound_can_win() -> None:
    """On a fleet of similar VMs, most VMs already save where they run all that they could
    anywhere: a step weighs only those that do not (and the plan is still the plain one)."""
    rng = np.random.default_rng(3)
    images = [list(range(i * 10_000, i * 10_000 + 300)) for i in range(4)]
    hosts, count = [], 0
    for h in range(12):
        vms = []
        for _ in range(8):
            image = images[int(rng.integers(0, 4))] if h else images[h % 4]
            own = list(range(1_000_000 + count * 100, 1_000_000 + count * 100 + 50))
            vms.append(vm(f"vm-{count}", image + own))
            count += 1
        hosts.append(host(f"h{h}", *vms, available_mib=65536))
    planner = Planner(Fleet.of(hosts))
    moves: list[tuple[str, str, str, int]] = []
    while (move := planner.best_move(0, MIB)) is not None and len(moves) < 3:
        moves.append((move.vm.name, move.source, move.target, move.gain_bytes))
    assert moves == plain_greedy(hosts, 3, 0, MIB)
    assert moves and planner.weighed < count // 4, (planner.weighed, count)


def test_a_plan_refuses_figures_that_do_not_match_the_contents() -> None:
    """What a VM saves where it runs is known twice when the plan weighs it: from the bounds
    it began with (a fleet index stores them) and from the contents it looks up. They must
    agree; a plan on figures that do not is refused, not made."""
    fleet = Fleet.of([host("a", vm("web-1", WEB)), host("b", vm("web-2", WEB))])
    assert rebalance(fleet, min_gain_bytes=MIB)
    wrong = dataclasses.replace(fleet, here=fleet.here + 1)
    with pytest.raises(DamagedHolders, match="web-1"):
        rebalance(wrong, min_gain_bytes=MIB)
