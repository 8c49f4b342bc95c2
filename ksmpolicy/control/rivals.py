"""What each trust domain would save, for hand-overs between domains of equal priority.

Only the active domain of a scope is mergeable, so the kernel measures nothing for its rivals.
When two or more domains of the same priority want one scope, the keeper asks this module for
each one's savings, and every one of them is estimated the same way: by reading its VMs' guest
RAM and counting the copies of each page (report/estimate.py, the `estimate` command's reader).
The active domain is estimated too, not measured: a measured figure (pages KSM merged) and a
predicted one do not compare.

The estimate runs in a background thread, at most `EVERY_SECONDS` apart per domain (sooner,
but not before `MIN_SECONDS`, when its VMs changed) and reading at most
`READ_BYTES_PER_SECOND`, so the daemon's loop never waits for it and a tenant that starts and
stops VMs cannot make it read all the time. Until a domain's first estimate is in, its savings
are unknown and the active domain keeps the scope.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ksmpolicy.inventory.model import VmStatus
from ksmpolicy.paths import HostPaths

log = logging.getLogger(__name__)
EVERY_SECONDS = 120.0
MIN_SECONDS = 30.0
READ_BYTES_PER_SECOND = 256 * 2**20


@dataclass(frozen=True)
class Estimated:
    when: float
    pids: frozenset[int]
    saved_bytes: int


class Rivals:
    def __init__(
        self,
        paths: HostPaths,
        *,
        use_zero_pages: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.paths = paths
        self.use_zero_pages = use_zero_pages
        self.clock = clock
        self.known: dict[str, Estimated] = {}
        self._lock = threading.Lock()
        self._running: threading.Thread | None = None

    def savings(self, contested: Mapping[str, Sequence[VmStatus]]) -> dict[str, int]:
        """The latest estimate of each contested domain (domain -> its wanting VMs); starts a
        new one in the background for those that are due."""
        now = self.clock()
        with self._lock:
            known = dict(self.known)
        due = {
            domain: vms
            for domain, vms in contested.items()
            if self._due(known.get(domain), frozenset(v.pid for v in vms), now)
        }
        if due and (self._running is None or not self._running.is_alive()):
            self._running = threading.Thread(
                target=self._estimate, args=(due,), name="ksmpolicy-rivals", daemon=True
            )
            self._running.start()
        return {domain: known[domain].saved_bytes for domain in contested if domain in known}

    @staticmethod
    def _due(known: Estimated | None, pids: frozenset[int], now: float) -> bool:
        if known is None:
            return True
        age = now - known.when
        return age >= EVERY_SECONDS or (known.pids != pids and age >= MIN_SECONDS)

    def _estimate(self, due: Mapping[str, Sequence[VmStatus]]) -> None:
        from ksmpolicy.report.estimate import Guest, estimate  # noqa: PLC0415

        for domain, vms in due.items():
            guests = [Guest(v.pid, v.name, domain, True, v.ram_bytes, v.start) for v in vms]
            try:
                found = estimate(
                    self.paths,
                    guests,
                    interval=0.0,
                    limit_bytes_per_second=READ_BYTES_PER_SECOND,
                    use_zero_pages=self.use_zero_pages(),
                )
            except (OSError, ValueError) as exc:
                log.warning("trust domain %s: cannot estimate its savings: %s", domain, exc)
                continue
            with self._lock:
                self.known[domain] = Estimated(
                    self.clock(), frozenset(v.pid for v in vms), found.predicted_saved_bytes
                )
            log.info(
                "trust domain %s would save %.0f MiB (estimated from %d VM(s))",
                domain,
                found.predicted_saved_bytes / 2**20,
                len(guests),
            )

    def wait(self, timeout: float | None = None) -> None:
        """Until the estimate under way is done (tests)."""
        if self._running is not None:
            self._running.join(timeout)
