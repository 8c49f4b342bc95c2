"""The kernel's process events (the netlink proc connector): a new VMM or service is seen the
moment it execs, without a hook and without waiting for the daemon's next look. Root only
(CAP_NET_ADMIN), and the kernel needs CONFIG_PROC_EVENTS; `open_events` says why when not.

The wire format (include/uapi/linux/connector.h, cn_proc.h): a netlink header, a connector
message (idx CN_IDX_PROC, val CN_VAL_PROC), then a proc_event: what, cpu, timestamp, and for
exec (pid, tgid), for exit (pid, tgid, exit code, signal, ...).
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from ksmpolicy.kernel.vmm import is_vmm_binary

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
NLMSG_DONE = 3
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_EVENT = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_PIDS = struct.Struct("=II")  # pid, tgid (exec and exit start with these)


@dataclass(frozen=True)
class ProcEvent:
    kind: str  # exec | exit
    pid: int  # the thread group (process) id


class ProcEvents:
    """A subscription to exec and exit events; `read` returns what arrived (non-blocking)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[ProcEvent]:
        events: list[ProcEvent] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return events
            except OSError:  # ENOBUFS: events were lost; the next look catches up
                return events
            events += parse(data)

    def close(self) -> None:
        self.sock.close()


def open_events() -> ProcEvents:
    """Subscribe; raises OSError (EPERM without CAP_NET_ADMIN, EPROTONOSUPPORT or ECONNREFUSED
    without the connector) when the kernel will not tell."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    try:
        sock.bind((os.getpid(), CN_IDX_PROC))
        op = struct.pack("=I", PROC_CN_MCAST_LISTEN)
        cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(op), 0) + op
        sock.send(_NLMSG.pack(_NLMSG.size + len(cn), NLMSG_DONE, 0, 0, os.getpid()) + cn)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return ProcEvents(sock)


def parse(data: bytes) -> list[ProcEvent]:
    """The exec and exit events of one netlink datagram (other events, and threads' exits,
    are skipped)."""
    events = []
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length = _NLMSG.unpack_from(data, offset)[0]
        if length < _NLMSG.size:
            break
        body = offset + _NLMSG.size
        if body + _CN_MSG.size + _EVENT.size + _PIDS.size <= offset + length:
            idx, val = _CN_MSG.unpack_from(data, body)[:2]
            if (idx, val) == (CN_IDX_PROC, CN_VAL_PROC):
                event = body + _CN_MSG.size
                what = _EVENT.unpack_from(data, event)[0]
                pid, tgid = _PIDS.unpack_from(data, event + _EVENT.size)
                if what == PROC_EVENT_EXEC:
                    events.append(ProcEvent("exec", tgid))
                elif what == PROC_EVENT_EXIT and pid == tgid:
                    events.append(ProcEvent("exit", tgid))
        offset += (length + 3) & ~3
    return events


def starts_unmergeable(proc: str, pid: int) -> bool:
    """A QEMU whose command line says `-machine mem-merge=off` (libvirt's <nosharepages/>,
    Proxmox's allow-ksm 0): none of its memory will ever be mergeable, so its start is no
    reason for ksmd to sprint."""
    from ksmpolicy.kernel.qemuopts import machine_mem_merge  # noqa: PLC0415

    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as handle:  # noqa: PTH123
            raw = handle.read(1 << 20)
    except OSError:
        return False
    argv = [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]
    return machine_mem_merge(argv) is False


def worth_a_look(proc: str, pid: int) -> str | None:
    """What a just-exec'd process is, if the daemon should look at once: a VMM by its binary's
    name, or a process exec'd mergeable (prctl, e.g. by `ksmpolicy exec`). None otherwise."""
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as handle:  # noqa: PTH123
            argv0 = handle.read(4096).split(b"\0", 1)[0]
    except OSError:
        return None
    binary = os.path.basename(argv0)  # noqa: PTH119
    if is_vmm_binary(binary.decode("utf-8", "replace")):
        return binary.decode("utf-8", "replace")
    try:
        with open(f"{proc}/{pid}/ksm_stat", "rb") as handle:  # noqa: PTH123
            if b"ksm_merge_any: yes" in handle.read(4096):
                return f"{binary.decode('utf-8', 'replace')} (mergeable)"
    except OSError:
        pass
    return None
