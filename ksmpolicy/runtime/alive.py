"""The daemon's sign of life: /run/ksmpolicy/daemon.json, rewritten at every plan (at most
every ALIVE_EVERY seconds). `doctor` and `status` read it: is the daemon alive, on which
policy, and is it passive because another controller holds the KSM knobs?"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass

from ksmpolicy.files import read_regular, write_atomic
from ksmpolicy.paths import HostPaths

ALIVE_FILE = "daemon.json"
ALIVE_EVERY = 2.0


@dataclass(frozen=True)
class Alive:
    pid: int
    time: float  # wall clock (time.time()) of the last plan
    interval: float  # the policy's interval_seconds: a fresh file is younger than a few
    policy: str  # the policy file, or the built-in default's description
    passive: str | None = None  # why it writes no knob: another controller, named with its fix
    discovery: str = "polling"  # how new VMs are found: process events, or polling and why
    pace: str | None = None  # the last plan: its mode and why ("slow: one full scan per ...")
    version: str = ""  # of the code it runs (an upgrade not yet restarted shows the old one)

    def fresh(self, now: float | None = None) -> bool:
        """Written within three intervals (and at least 30 s): the loop is turning."""
        age = (time.time() if now is None else now) - self.time
        return -5 <= age <= max(3 * self.interval, 30.0)


def alive_path(paths: HostPaths) -> str:
    return os.fspath(paths.run_dir / ALIVE_FILE)


def write_alive(paths: HostPaths, alive: Alive) -> None:
    write_atomic(alive_path(paths), json.dumps(asdict(alive)).encode(), 0o600, private_dir=True)


def read_alive(paths: HostPaths) -> Alive | None:
    """The daemon's last sign of life, or None (no daemon ever ran, or the file is bad)."""
    try:
        record = json.loads(read_regular(alive_path(paths), 65536))
        return Alive(
            pid=int(record["pid"]),
            time=float(record["time"]),
            interval=float(record["interval"]),
            policy=str(record["policy"]),
            passive=None if record.get("passive") is None else str(record["passive"]),
            discovery=str(record.get("discovery", "polling")),
            pace=None if record.get("pace") is None else str(record["pace"]),
            version=str(record.get("version", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_alive(paths: HostPaths) -> None:
    with contextlib.suppress(OSError):
        os.unlink(alive_path(paths))  # noqa: PTH108
