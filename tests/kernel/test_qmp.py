"""The QMP client against a peer that misbehaves: replies cut into small pieces, a reply with
no end, and the merge toggle on what it reads. The real QEMU is in tests/proxmox/test_live.py."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ksmpolicy.kernel.qmp import MAX_REPLY_BYTES, QmpError, QmpSocket, set_merge, socket_of

Serve = Callable[[socket.socket], None]


@pytest.fixture
def qmp_server(tmp_path: Path) -> Iterator[Callable[[Serve], str]]:
    """A UNIX socket served once by `serve` on a thread; yields a function that starts it."""
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(serve: Serve) -> str:
        path = str(tmp_path / f"qmp-{len(listeners)}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        listeners.append(listener)

        def run() -> None:
            connection, _ = listener.accept()
            with connection, contextlib.suppress(OSError):  # the client gave up: as wanted
                serve(connection)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return path

    yield start
    for listener in listeners:
        listener.close()
    for thread in threads:
        thread.join(timeout=5)


def greet(connection: socket.socket) -> None:
    connection.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
    connection.recv(4096)  # qmp_capabilities
    connection.sendall(b'{"return": {}}\n')


def test_a_reply_in_small_pieces_is_read_whole(
    qmp_server: Callable[[Serve], str],
) -> None:
    names = [{"name": f"ram-node{i}", "type": "child<memory-backend-ram>"} for i in range(4)]
    names += [{"name": "x" * 100, "type": "child<other>"} for _ in range(40_000)]  # ~4 MiB
    reply = json.dumps({"return": names}).encode() + b"\n"

    def serve(connection: socket.socket) -> None:
        greet(connection)
        connection.recv(4096)
        for at in range(0, len(reply), 1000):  # 1 kB pieces, as a slow peer sends them
            connection.sendall(reply[at : at + 1000])
        for _ in range(4):  # qom-get merge: every backend merges already
            connection.recv(4096)
            connection.sendall(b'{"return": true}\n')

    path = qmp_server(serve)
    started = time.monotonic()
    with QmpSocket(path, time.monotonic() + 20) as qmp:
        assert set_merge(qmp.execute, True) == []
    assert time.monotonic() - started < 5


def test_a_reply_without_end_is_refused_at_its_limit(qmp_server: Callable[[Serve], str]) -> None:
    def serve(connection: socket.socket) -> None:
        greet(connection)
        connection.recv(4096)
        piece = b"x" * 65536
        for _ in range(MAX_REPLY_BYTES // len(piece) + 2):
            connection.sendall(piece)

    path = qmp_server(serve)
    with QmpSocket(path, time.monotonic() + 20) as qmp, pytest.raises(QmpError, match="16 MiB"):
        qmp.execute("qom-list", {"path": "/objects"})


def test_a_silent_peer_is_cut_off_by_the_deadline(qmp_server: Callable[[Serve], str]) -> None:
    stop = threading.Event()

    def serve(_connection: socket.socket) -> None:
        stop.wait(10)  # never greets

    path = qmp_server(serve)
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            QmpSocket(path, time.monotonic() + 0.5)
    finally:
        stop.set()
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-qmp", "unix:/run/q.sock,server=on,wait=off"], "/run/q.sock"),
        (["-qmp-pretty", "unix:/run/p.sock,server"], "/run/p.sock"),
        (  # Proxmox VE: a chardev that a control monitor uses
            [
                "-chardev",
                "socket,id=qmp,path=/var/run/qemu-server/101.qmp,server=on,wait=off",
                "-mon",
                "chardev=qmp,mode=control",
            ],
            "/var/run/qemu-server/101.qmp",
        ),
        (  # libvirt: the monitor is a file descriptor it holds
            [
                "-chardev",
                "socket,id=charmonitor,fd=23,server=on,wait=off",
                "-mon",
                "chardev=charmonitor,id=monitor,mode=control",
            ],
            None,
        ),
        (  # a socket chardev no control monitor uses (a serial console): not QMP
            [
                "-chardev",
                "socket,id=serial0,path=/run/s.sock,server=on",
                "-serial",
                "chardev:serial0",
            ],
            None,
        ),
        (  # a client socket (server=off) is QEMU connecting out, not serving
            [
                "-chardev",
                "socket,id=m,path=/run/c.sock,server=off",
                "-mon",
                "chardev=m,mode=control",
            ],
            None,
        ),
        (["-qmp", "tcp:127.0.0.1:4444,server"], None),  # not a UNIX socket
        ([], None),
    ],
)
def test_the_qmp_socket_a_command_line_serves(argv: list[str], expected: str | None) -> None:
    assert socket_of(["qemu-system-x86_64", *argv]) == expected
