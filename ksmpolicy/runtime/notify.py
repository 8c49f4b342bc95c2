"""Hook -> daemon notes ("VM started", "VM stopped") over a root-only datagram socket.

Sending never waits: with no daemon listening, or a full queue, the note is dropped and the
daemon's next regular pass catches up.
"""

from __future__ import annotations

# _socket is the C module under `socket`: the same objects without `socket`'s imports (enum,
# selectors), which would double what a hook note costs.
import _socket
import os

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.files import make_private_dir
from ksmpolicy.records import dataclass

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from ksmpolicy.paths import HostPaths

EVENTS = ("started", "stopped", "release", "reconnect", "changed")
MAX_NOTE_BYTES = 4096
DATAGRAM = _socket.SOCK_DGRAM | _socket.SOCK_NONBLOCK  # a note never waits


@dataclass(frozen=True)
class Note:
    event: str
    vm: str


def send(paths: HostPaths, event: str, vm: str) -> bool:
    """Tell the daemon about a VM event; return whether the note was handed over."""
    return send_to(os.fspath(paths.notify_socket), event, vm)


def send_to(socket_path: str, event: str, vm: str) -> bool:
    """`send` to a socket given as a string (the libvirt hook spares itself pathlib).

    The note is `EVENT NUL NAME` in UTF-8 (VM names cannot contain NUL).
    """
    payload = f"{event}\0{vm}".encode(errors="replace")[:MAX_NOTE_BYTES]
    try:
        sock = _socket.socket(_socket.AF_UNIX, DATAGRAM)
        try:
            sock.sendto(payload, socket_path)
        finally:
            sock.close()
    except OSError:  # no daemon, not root, queue full: never the hook's problem
        return False
    return True


class Listener:
    """The daemon's end: a datagram socket in a root-only directory."""

    def __init__(self, paths: HostPaths) -> None:
        self.path = paths.notify_socket
        directory = paths.run_dir
        try:
            make_private_dir(directory)  # root-only, and never a symlink someone planted
            if self.path.exists() or self.path.is_symlink():
                self.path.unlink()
            self.socket = _socket.socket(_socket.AF_UNIX, DATAGRAM)
            self.socket.bind(os.fspath(self.path))
            self.path.chmod(0o600)
        except OSError as exc:
            raise KsmPolicyError(
                f"cannot listen on {self.path}: {exc.strerror or exc} (run as root)"
            ) from exc

    def fileno(self) -> int:
        return self.socket.fileno()

    def receive(self) -> list[Note]:
        """Every note queued now (never blocks)."""
        notes: list[Note] = []
        while True:
            try:
                data = self.socket.recv(MAX_NOTE_BYTES)
            except (BlockingIOError, InterruptedError):
                return notes
            event, sep, vm = data.decode(errors="replace").partition("\0")
            if sep and event in EVENTS:
                notes.append(Note(event, vm))
            else:
                import logging  # noqa: PLC0415

                logging.getLogger(__name__).warning("ignored a malformed note on %s", self.path)

    def close(self) -> None:
        self.socket.close()
        try:  # noqa: SIM105 - contextlib is one more import for the hook
            self.path.unlink()
        except OSError:
            pass
