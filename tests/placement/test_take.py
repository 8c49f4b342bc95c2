"""`sketch.take`'s timing, on a fake clock and a fake reader (no root): each VM's pages are read
again a whole interval after its own first read, however long the VMs before it took."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from ksmpolicy.kernel import guestmem
from ksmpolicy.kernel.pagemap import PageMapUnavailable
from ksmpolicy.paths import HostPaths
from ksmpolicy.placement import sketch
from ksmpolicy.placement.sketch import FleetKey, Subject, take


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def test_every_vm_gets_the_whole_interval_between_its_two_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    first_read: dict[int, float] = {}
    second_read: dict[int, float] = {}

    def no_reader(_paths: HostPaths) -> Any:
        raise PageMapUnavailable("fake")

    def hold(_paths: HostPaths, wanted: list[tuple[int, int | None]], _stack: Any) -> Any:
        return [SimpleNamespace(pid=pid) for pid, _start in wanted]

    def guest_runs(process: Any, *_args: Any) -> Any:
        clock.now += 5.0  # reading a big guest takes longer than the interval
        first_read[process.pid] = clock.now
        return SimpleNamespace(starts=None, lengths=None)

    def hash_runs(*_args: Any) -> np.ndarray:
        return np.zeros((1, 2), dtype=np.uint64)

    def sample(_process: Any, subject: Subject, *_args: Any) -> None:
        second_read[subject.pid] = clock.now
        clock.now += 0.2

    monkeypatch.setattr(guestmem, "PageMapReader", no_reader)
    monkeypatch.setattr(guestmem, "hold", hold)
    monkeypatch.setattr(guestmem, "guest_runs", guest_runs)
    monkeypatch.setattr(guestmem, "hash_runs", hash_runs)
    monkeypatch.setattr(sketch, "_sample", sample)
    monkeypatch.setattr(time, "monotonic", clock.monotonic)  # sketch looks them up at each call
    monkeypatch.setattr(time, "sleep", clock.sleep)
    subjects = [
        Subject(pid, f"vm{pid}", None, None, "libvirt", "default", None, True, True, 2**30)
        for pid in (11, 12, 13)
    ]
    take(HostPaths(), subjects, FleetKey(b"k" * 32), interval=3.0)
    assert sorted(second_read) == [11, 12, 13]
    for pid in subjects:
        waited = second_read[pid.pid] - first_read[pid.pid]
        assert waited >= 3.0, (pid.pid, waited)
