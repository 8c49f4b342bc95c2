"""The live merge toggle: QEMU's `merge` property on each guest-RAM backend, over QMP.

`set_merge(execute, merge)` is the one toggle: it lists `/objects`, reads `merge` on every
memory backend (`pc.ram`; `ram-node<N>` with guest NUMA; `mem-dimm<N>` for hotplugged memory)
and sets it where it differs. QEMU then madvises the backend's RAM (MADV_MERGEABLE or
MADV_UNMERGEABLE). `execute(command, arguments)` is how one QMP command reaches QEMU:

* libvirt owns its monitor: `ksmpolicy.libvirt.host` passes virDomainQemuMonitorCommand;
* Proxmox VE leaves the QMP socket free between commands: `QmpSocket` below talks to it.

QEMU's other RAM blocks (ROMs, video RAM) have no `merge` property and stay as they started:
only `-machine mem-merge=off` at start makes every block unmergeable.

`QmpSocket` is a small synchronous client with a deadline on every step, so a hook never waits
on a QEMU that does not answer. QEMU serves one QMP client at a time; a second connection waits
in the listen queue without a greeting, which the deadline turns into a retry.
"""

from __future__ import annotations

import itertools
import json
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.kernel.qemuopts import option_map, qemu_bool

Execute = Callable[[str, dict[str, Any] | None], Any]
MEMORY_BACKEND = "child<memory-backend-"
MAX_REPLY_BYTES = 16 * 2**20


class QmpError(KsmPolicyError):
    """QEMU answered with an error, or could not be reached in time."""


def memory_backends(execute: Execute) -> list[str]:
    """QOM paths of the guest's RAM backends."""
    objects = execute("qom-list", {"path": "/objects"})
    return [
        f"/objects/{entry['name']}"
        for entry in (objects if isinstance(objects, list) else [])
        if isinstance(entry, dict) and str(entry.get("type", "")).startswith(MEMORY_BACKEND)
    ]


def merge_state(execute: Execute) -> dict[str, bool]:
    """Each RAM backend and whether it is mergeable now."""
    return {
        path: bool(execute("qom-get", {"path": path, "property": "merge"}))
        for path in memory_backends(execute)
    }


def set_merge(execute: Execute, merge: bool) -> list[str]:
    """Make every RAM backend (un)mergeable now; return the backends that changed."""
    changed = []
    for path, current in merge_state(execute).items():
        if current != merge:
            execute("qom-set", {"path": path, "property": "merge", "value": merge})
            changed.append(path)
    return changed


class QmpSocket:
    """One QMP session on a UNIX socket, every step bounded by `deadline` (monotonic time)."""

    def __init__(self, path: str, deadline: float, *, expect_pid: int | None = None) -> None:
        self.path = path
        self.deadline = deadline
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.buffer = b""
        try:
            self._settimeout()
            self.sock.connect(path)
            if expect_pid is not None:
                self._check_peer(expect_pid)
            greeting = self._message()
            if "QMP" not in greeting:
                raise QmpError(f"{path}: not a QMP socket (no greeting)")
            self.execute("qmp_capabilities", None)
        except BaseException:
            self.sock.close()
            raise

    def execute(self, command: str, arguments: dict[str, Any] | None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._settimeout()
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._message()
            if "event" in reply:
                continue  # asynchronous events may come between a command and its reply
            if "error" in reply:
                error = reply["error"]
                desc = error.get("desc") if isinstance(error, dict) else error
                raise QmpError(f"QMP {command} on {self.path}: {desc}")
            return reply.get("return")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> QmpSocket:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _check_peer(self, pid: int) -> None:
        """The process at the other end must be the one we decided about: a socket path named
        on a command line, or left behind by a VM that stopped, could be anyone's."""
        creds = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer, uid, _gid = struct.unpack("3i", creds)
        if peer != pid:
            raise QmpError(f"{self.path} is served by PID {peer} (uid {uid}), not by PID {pid}")

    def _settimeout(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{self.path}: no answer from QEMU in time")
        self.sock.settimeout(left)

    def _message(self) -> dict[str, Any]:
        if b"\n" not in self.buffer:
            parts = [self.buffer]  # joined once: a long reply costs linear time, not quadratic
            size = len(self.buffer)
            while True:
                self._settimeout()
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise QmpError(f"{self.path}: QEMU closed the connection")
                parts.append(chunk)
                size += len(chunk)
                if size > MAX_REPLY_BYTES:
                    raise QmpError(f"{self.path}: QMP reply larger than 16 MiB")
                if b"\n" in chunk:
                    break
            self.buffer = b"".join(parts)
        line, _, self.buffer = self.buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            raise QmpError(f"{self.path}: QEMU sent something that is not JSON") from None
        if not isinstance(message, dict):
            raise QmpError(f"{self.path}: QEMU sent something that is not a QMP message")
        return message


def set_merge_on_socket(
    path: str, merge: bool, *, timeout: float = 10.0, expect_pid: int | None = None
) -> list[str]:
    """`set_merge` over a QMP socket (Proxmox VE), retrying while another client holds it,
    all within `timeout` seconds. `expect_pid`: refuse a socket another process serves."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            step = min(deadline, time.monotonic() + 2.0)
            with QmpSocket(path, step, expect_pid=expect_pid) as qmp:
                return set_merge(qmp.execute, merge)
        except QmpError as exc:
            if "closed the connection" not in str(exc):
                raise
            last = exc
        except (OSError, TimeoutError) as exc:  # busy, not yet listening, or gone
            last = exc
        time.sleep(0.1)
    raise QmpError(f"QMP on {path}: no usable answer within {timeout:g} s ({last})")


def socket_of(argv: list[str]) -> str | None:
    """The QMP UNIX socket a QEMU command line serves: `-qmp unix:PATH,server...`, or a
    `-chardev socket,id=ID,path=PATH,server...` that a `-mon chardev=ID,mode=control` uses
    (how Proxmox VE starts QEMU). libvirt passes its monitor as a file descriptor: None."""
    chardevs: dict[str, str] = {}
    monitors: list[str] = []
    for flag, value in itertools.pairwise(argv):
        options = option_map(value)
        if flag in ("-qmp", "-qmp-pretty") and value.startswith("unix:"):
            return value[5:].split(",", 1)[0]
        server = qemu_bool(options.get("server")) is True
        named = "path" in options and "id" in options
        if flag == "-chardev" and value.startswith("socket,") and server and named:
            chardevs[options["id"]] = options["path"]
        if flag == "-mon" and options.get("mode") == "control" and "chardev" in options:
            monitors.append(options["chardev"])
    return next((chardevs[m] for m in monitors if m in chardevs), None)
