"""Processes in /proc: ksmd's CPU time, processes by name, and the host's memory."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ksmpolicy.errors import HostError
from ksmpolicy.files import read_regular
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
    """The PID of the ksmd kernel thread, or None (no KSM, or /proc not mounted). Any process
    can call itself ksmd; only a kernel thread is it."""
    for entry in _pids(paths):
        try:
            if (entry / "comm").read_text().strip() == "ksmd" and kernel_thread(entry):
                return int(entry.name)
        except OSError:
            continue
    return None


def stat_fields(proc: Path) -> list[str] | None:
    """The fields of /proc/PID/stat after `PID (comm)`, from the state on (field 3 of
    proc(5) is index 0 here); None when the process is gone."""
    found = read_stat(proc)
    return found[1] if found is not None else None


def read_stat(proc: Path) -> tuple[str, list[str]] | None:
    """/proc/PID/stat as (comm, the fields from the state on); None when the process is gone.
    The name may hold spaces and parentheses, so the fields start after the last ")"."""
    try:
        text = (proc / "stat").read_text(errors="replace")
    except OSError:
        return None
    return parse_stat(text)


def parse_stat(text: str) -> tuple[str, list[str]] | None:
    """A stat file's text as `read_stat` gives it (None: not one)."""
    begin, end = text.find("("), text.rfind(")")
    if begin < 0 or end < begin:
        return None
    return text[begin + 1 : end], text[end + 2 :].split()


PF_KTHREAD = 0x00200000  # include/linux/sched.h


def kernel_thread(proc: Path) -> bool:
    """Whether /proc/PID is a kernel thread (PF_KTHREAD in the flags of /proc/PID/stat)."""
    fields = stat_fields(proc)
    try:
        return fields is not None and bool(int(fields[6]) & PF_KTHREAD)
    except (ValueError, IndexError):
        return False


def process_uids(proc: Path) -> tuple[int, ...] | None:
    """(real, effective, saved, filesystem) uid of a process, from /proc/PID/status. Not the
    owner of /proc/PID: a process that makes itself non-dumpable shows as root's there,
    whoever runs it."""
    try:
        text = (proc / "status").read_text()
    except OSError:
        return None
    for line in text.split("\n"):  # the kernel escapes a newline in a process's name here
        if line.startswith("Uid:"):
            try:
                return tuple(int(field) for field in line.split()[1:])
            except ValueError:
                return None
    return None


def effective_uid(proc: Path) -> int | None:
    """Who runs a process, as the kernel checks it: its effective uid (see `process_uids`)."""
    uids = process_uids(proc)
    return uids[1] if uids and len(uids) > 1 else None


def run_by_root(proc: Path) -> bool:
    """Whether every uid of the process is root: what anything that writes the KSM knobs or
    runs libvirt is. Any user can start a process named ksmtuned or libvirtd."""
    uids = process_uids(proc)
    return bool(uids) and not any(uids)  # type: ignore[arg-type]


def start_of(stat: tuple[str, list[str]] | None) -> int | None:
    """The start time in `read_stat`'s result: clock ticks since boot (field 22 of stat)."""
    fields = stat[1] if stat is not None else None
    try:
        return int(fields[19]) if fields is not None and len(fields) > 19 else None
    except ValueError:
        return None


def start_ticks(paths: HostPaths, pid: int) -> int | None:
    """A process's start time in clock ticks since boot, or None when it is gone: with the
    PID it names one process (a reused PID has another)."""
    return start_of(read_stat(paths.proc / str(pid)))


def started_at(paths: HostPaths, pid: int) -> float | None:
    """A process's start, in wall-clock seconds: boot time + /proc/PID/stat's starttime."""
    ticks = start_ticks(paths, pid)
    if ticks is None:
        return None
    try:
        since_boot = ticks / CLOCK_TICKS
        for line in read_regular(paths.proc / "stat", 1 << 20).decode().splitlines():
            if line.startswith("btime "):
                return int(line.split()[1]) + since_boot
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_cpu_seconds(paths: HostPaths, pid: int) -> float | None:
    """CPU time of a process in seconds: /proc/PID/schedstat (nanoseconds) where the kernel has
    it, else utime + stime (fields 14 and 15 of /proc/PID/stat, in clock ticks)."""
    try:
        return int((paths.proc / str(pid) / "schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    fields = stat_fields(paths.proc / str(pid))
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def processes_named(paths: HostPaths, names: Iterable[str]) -> list[int]:
    """PIDs of root's processes whose comm is one of `names` (ksmtuned, libvirtd: daemons that
    run as root). A process another user starts under such a name is not one of them."""
    wanted = set(names)
    found = []
    for entry in _pids(paths):
        try:
            if (entry / "comm").read_text().strip() in wanted and run_by_root(entry):
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
