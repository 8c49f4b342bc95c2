"""The keeper's decisions with a fake toggle: no kernel, no QEMU. What it switches, in which
order, and that no switch runs under the state's lock (the hooks wait on it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ksmpolicy.control.keeper import Keeper, Seat
from ksmpolicy.inventory.model import VmStatus
from ksmpolicy.paths import HostPaths
from ksmpolicy.policy.load import parse_policy
from ksmpolicy.trust.scopes import HostScopes
from ksmpolicy.trust.state import load, locked
from tests.fakehost import FakeHost

POLICY = """version: 1
domains:
  alpha: {{priority: 0}}
  beta: {{priority: {beta}}}
groups:
  ga: {{names: ["a-*"], domain: alpha}}
  gb: {{names: ["b-*"], domain: beta}}
isolation: {{min_hold_seconds: 0, unmerge_reserve_mib: 1}}
"""
HOST = HostScopes(nodes=(0,), merge_across_nodes=None)


def vm(pid: int, name: str, domain: str, *, merging: bool) -> VmStatus:
    return VmStatus(
        pid=pid,
        name=name,
        vmid=None,
        uuid=None,
        kind="qemu",
        source="process",
        group=None,
        decision="merge",
        rule=None,
        compliant=None,
        ram_bytes=2**20,
        mergeable_bytes=2**20 if merging else 0,
        merged_bytes=4096 if merging else 0,
        zero_bytes=0,
        profit_bytes=None,
        domain=domain,
        merging_now=merging,
        start=1000 + pid,
    )


def fake_host(tmp_path: Path) -> HostPaths:
    """/proc with the VMs' processes (started 1000 + PID ticks after boot, as `vm` says) and
    memory to spare for a hand-over."""
    host = FakeHost(tmp_path).meminfo(8_000_000, 4_000_000)
    for pid in (1, 2, 3):
        host.process(pid, ["qemu-system-x86_64"], "qemu-system-x86")
    return host.paths


def test_a_hand_over_switches_off_before_on_and_never_under_the_lock(tmp_path: Path) -> None:
    paths = fake_host(tmp_path)
    calls: list[tuple[str, bool]] = []

    def toggle(status: VmStatus, merge: bool) -> list[str]:
        with locked(paths, timeout=0.0):  # raises TimeoutError if the look held the lock
            calls.append((status.name, merge))
        return ["/objects/pc.ram"]

    keeper = Keeper(paths, toggle, clock=lambda: 100.0)
    walked: list[list[str]] = []

    def walk(seats: Sequence[Seat]) -> int:  # the page walk: seconds on a large host
        with locked(paths, timeout=0.0):
            walked.append([s.vm.name for s in seats])
        return 0

    keeper._unmerge_bytes = walk  # type: ignore[method-assign]
    vms = [vm(1, "a-1", "alpha", merging=False), vm(2, "a-2", "alpha", merging=False)]
    look = keeper.look(parse_policy(POLICY.format(beta=0)), vms, HOST)
    assert sorted(calls) == [("a-1", True), ("a-2", True)] and not look.failed
    assert load(paths).scopes["host"].domain == "alpha"
    # beta starts with a higher priority: alpha off first, then beta on
    calls.clear()
    vms = [
        vm(1, "a-1", "alpha", merging=True),
        vm(2, "a-2", "alpha", merging=True),
        vm(3, "b-1", "beta", merging=False),
    ]
    look = keeper.look(parse_policy(POLICY.format(beta=10)), vms, HOST)
    assert calls == [("a-1", False), ("a-2", False), ("b-1", True)], look
    assert look.handovers == 1
    assert walked == [["a-1", "a-2"]]  # what unmerging alpha re-materialises, walked unlocked
    assert load(paths).scopes["host"].domain == "beta"


def test_a_vm_that_cannot_be_switched_off_keeps_the_other_domain_off(tmp_path: Path) -> None:
    paths = fake_host(tmp_path)
    calls: list[tuple[str, bool]] = []

    def toggle(status: VmStatus, merge: bool) -> list[str]:
        calls.append((status.name, merge))
        if not merge:
            raise TimeoutError("QEMU does not answer")
        return ["/objects/pc.ram"]

    keeper = Keeper(paths, toggle, clock=lambda: 100.0)
    keeper.look(parse_policy(POLICY.format(beta=0)), [vm(1, "a-1", "alpha", merging=True)], HOST)
    vms = [vm(1, "a-1", "alpha", merging=True), vm(3, "b-1", "beta", merging=False)]
    look = keeper.look(parse_policy(POLICY.format(beta=10)), vms, HOST)
    assert calls == [("a-1", False)]  # b-1 never switched on
    assert any("b-1: not switched on" in f for f in look.failed), look.failed
