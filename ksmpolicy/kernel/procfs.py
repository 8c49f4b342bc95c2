"""Processes in /proc: ksmd's CPU time, processes by name, and the host's memory."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ksmpolicy.errors import HostError
from ksmpolicy.paths import HostPaths

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def read_meminfo(paths: HostPaths) -> dict[str, int]:
    """/proc/meminfo in bytes, keyed by its field names (MemTotal, MemAvailable, ...)."""
    try:
        text = paths.meminfo.read_text()
    except OSError as exc:
        raise HostError(f"cannot read {paths.meminfo}: {exc.strerror}") from exc
    result = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            scale = 1024 if fields[1:2] == ["kB"] else 1
            result[key] = int(fields[0]) * scale
    return result


def ksmd_pid(paths: HostPaths) -> int | None:
    """The PID of the ksmd kernel thread, or None (no KSM, or /proc not mounted)."""
    for entry in _pids(paths):
        try:
            if (entry / "comm").read_text().strip() == "ksmd":
                return int(entry.name)
        except OSError:
            continue
    return None


def process_cpu_seconds(paths: HostPaths, pid: int) -> float | None:
    """CPU time of a process in seconds: /proc/PID/schedstat (nanoseconds) where the kernel has
    it, else utime + stime (fields 14 and 15 of /proc/PID/stat, in clock ticks)."""
    try:
        return int((paths.proc / str(pid) / "schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        text = (paths.proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def processes_named(paths: HostPaths, names: Iterable[str]) -> list[int]:
    """PIDs whose comm is one of `names` (e.g. to warn that ksmtuned runs alongside)."""
    wanted = set(names)
    found = []
    for entry in _pids(paths):
        try:
            if (entry / "comm").read_text().strip() in wanted:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _pids(paths: HostPaths) -> Iterator[Path]:
    try:
        entries = list(os.scandir(paths.proc))
    except OSError:
        return
    for entry in entries:
        if entry.name.isdigit():
            yield Path(entry.path)
