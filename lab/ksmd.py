"""ksmd run to convergence, for tests and benchmarks that compare a prediction with what ksmd
then saves (root; the caller records and restores the knobs, see tests/conftest.py)."""

from __future__ import annotations

import time
from typing import Protocol

from ksmpolicy.kernel.ksm import read_ksm
from ksmpolicy.paths import HostPaths


class Knobs(Protocol):
    def read(self, name: str) -> int | str: ...
    def write(self, name: str, value: int | str) -> None: ...


def converge(
    ksm: Knobs, timeout: float = 120, *, noise_pages: int = 64, steady_seconds: int = 5
) -> float:
    """ksmd at a fixed fast pace (5000 pages per 10 ms) until its savings change by at most
    `noise_pages` for `steady_seconds` seconds in a row; stopped after, so that the counters
    hold still while the page map is read. Returns the seconds it ran."""
    ksm.write("sleep_millisecs", 10)
    ksm.write("pages_to_scan", 5000)
    ksm.write("run", 1)
    started = time.monotonic()
    last, steady = -1, 0
    while time.monotonic() - started < timeout:
        time.sleep(1.0)
        state = read_ksm(HostPaths())
        assert state is not None
        now = state.saved_pages
        steady = steady + 1 if abs(now - last) <= noise_pages and now > 0 else 0
        last = now
        if steady >= steady_seconds:
            break
    ksm.write("run", 0)
    return time.monotonic() - started
