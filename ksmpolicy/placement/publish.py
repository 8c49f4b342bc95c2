"""The host's current sketch for the daemon's /sketch page (beside /metrics, same address).

Sketching reads every VM's guest RAM, so it is not done per request: a background thread takes
the sketch every `every` seconds (at most `read_mib_per_second` of guest RAM read, so that it
never competes with the guests), and each request gets the last one. When a sketch cannot be
taken (no fleet key, a policy that does not load), the page has none (503) and says only that
the daemon's log tells why: a reader of /sketch learns nothing of the host's set-up, and never
gets an old sketch for a current one. The daemon serves /sketch only when asked
(`--sketch-every`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.paths import HostPaths
from ksmpolicy.placement.document import to_json
from ksmpolicy.placement.sketch import load_key, sketch_host
from ksmpolicy.policy.model import Policy
from ksmpolicy.quoting import one_line

log = logging.getLogger(__name__)
JSON = "application/json"
TEXT = "text/plain; charset=utf-8"


class Published:
    def __init__(
        self,
        paths: HostPaths,
        policy: Callable[[], Policy | None],
        *,
        every: float = 600.0,
        read_mib_per_second: float = 64.0,
    ) -> None:
        self.paths = paths
        self.policy = policy
        self.every = every
        self.rate = read_mib_per_second * 2**20
        self._lock = threading.Lock()
        self._body: bytes | None = None
        self._problem: str | None = None

    def start(self) -> None:
        threading.Thread(target=self._run, name="sketch", daemon=True).start()

    @classmethod
    def routes(
        cls, paths: HostPaths, policy: Callable[[], Policy | None], every: float | None
    ) -> dict[str, Callable[[], tuple[str, str, bytes]]]:
        """The daemon's pages beside /metrics: /sketch, taken every `every` s (None: none)."""
        if not every:
            return {}
        published = cls(paths, policy, every=every)
        published.start()
        return {"/sketch": published.route}

    def _run(self) -> None:
        while True:
            started = time.monotonic()
            self.refresh()
            time.sleep(max(0.0, self.every - (time.monotonic() - started)))

    def refresh(self) -> None:
        """Take the sketch now (the thread's step; tests call it directly)."""
        try:
            key, _made = load_key(self.paths)
            found = sketch_host(self.paths, self.policy(), key, limit_bytes_per_second=self.rate)
            body = (json.dumps(to_json(found, key)) + "\n").encode()
        except KsmPolicyError as exc:
            self._fail(str(exc))
            return
        except Exception:  # a bug here must not end the daemon: say it, serve none
            log.exception("taking the host's sketch failed")
            self._fail("internal error (logged above)")
            return
        with self._lock:
            self._body, self._problem = body, None

    def _fail(self, reason: str) -> None:
        """No sketch until the next one is taken; the reason goes to the log (once a change)."""
        with self._lock:
            said = self._problem
            self._body, self._problem = None, reason
        if reason != said:
            log.warning("no sketch at /sketch: %s", one_line(reason))

    def route(self) -> tuple[str, str, bytes]:
        with self._lock:
            body, problem = self._body, self._problem
        if problem is not None:
            return "503 Service Unavailable", TEXT, b"no sketch now: the daemon's log says why\n"
        if body is None:
            return "503 Service Unavailable", TEXT, b"the first sketch is being taken\n"
        return "200 OK", JSON, body
