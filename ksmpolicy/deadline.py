"""Run a piece of work against a deadline, so that a stuck read cannot hold up a VM start or
the other VMs of an `apply`.

Two ways, for two kinds of caller:

* `run_in_child` (the hooks): the work runs in a forked child whose stdout and stderr are
  /dev/null, and its stdin too unless the work reads it (then a stdin that never ends is cut
  off by the deadline like any other read), and sends its results back over a pipe. When
  the deadline passes, the hook process goes on and exits; the child is left behind. This
  is the only way that holds for every filesystem: a process blocked on a FUSE request that
  its server has already read (a hung pmxcfs, for one) is not even released by SIGKILL until
  the server answers, so a hook that waited for such a thread, or exited with one, would
  leave libvirt or Proxmox waiting.
* `call_with_deadline` (`apply`, in a long-running or interactive process): a daemon thread;
  the caller reports the VM and goes on to the next. The thread may stay blocked in the
  kernel until the filesystem answers.

Only `os`, `marshal`, `select` and `_thread` are imported: the hooks use this on every start.
"""

from __future__ import annotations

import _thread
import marshal
import os
import select

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    T = TypeVar("T")


class DeadlineExceeded(TimeoutError):
    """The work did not finish in time; it may still be running."""


def call_with_deadline(func: Callable[[], T], seconds: float, what: str) -> T:
    """`func()` on a thread, or DeadlineExceeded after `seconds`. Its exceptions re-raise."""
    done = _thread.allocate_lock()
    done.acquire()
    results: list[T] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(func())
        except BaseException as exc:  # handed to the caller's thread as it is
            errors.append(exc)
        finally:
            done.release()

    _thread.start_new_thread(work, ())
    if not done.acquire(timeout=max(seconds, 0.001)):
        raise DeadlineExceeded(f"{what} took longer than {seconds:g} s")
    if errors:
        raise errors[0]
    return results[0]


class ChildRun:
    """What came back from `run_in_child`: the progress messages the child sent in order,
    its result (when it finished), and whether the deadline passed first."""

    def __init__(self) -> None:
        self.progress: list[object] = []
        self.result: object = None
        self.error: str | None = None
        self.finished = False


def run_in_child(
    work: Callable[[Callable[[object], None]], object], seconds: float, *, keep_stdin: bool = False
) -> ChildRun:
    """Run `work(send)` in a forked child for at most `seconds`.

    `send(value)` passes a progress message to the parent at once (a value marshal can
    write); the value `work` returns is the result. An exception in the child comes back as
    `error`. The child never writes to the parent's stdout or stderr; it reads the parent's
    stdin only with `keep_stdin`.
    """
    run = ChildRun()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 0
        try:
            os.close(read_end)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (1, 2) if keep_stdin else (0, 1, 2):
                os.dup2(null, fd)

            def send(value: object) -> None:
                _write_frame(write_end, ("progress", value))

            _write_frame(write_end, ("done", work(send)))
        except BaseException as exc:  # report it, whatever it is, then leave
            try:
                _write_frame(write_end, ("error", f"{type(exc).__name__}: {exc}"))
            except BaseException:
                status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        _collect(read_end, run, seconds)
    finally:
        os.close(read_end)
    if run.finished or run.error is not None:
        try:  # noqa: SIM105 - contextlib is one more import for the hooks
            os.waitpid(pid, 0)  # it has written its last frame and is leaving: reap it
        except ChildProcessError:
            pass
    return run


def _write_frame(fd: int, value: object) -> None:
    data = marshal.dumps(value)  # type: ignore[arg-type]
    frame = len(data).to_bytes(4, "big") + data
    view = memoryview(frame)
    while view:
        view = view[os.write(fd, view) :]


def _collect(fd: int, run: ChildRun, seconds: float) -> None:
    """Read frames until the child's last one, its end of the pipe closing, or the deadline."""
    from time import monotonic  # noqa: PLC0415 - time is already loaded by the interpreter

    deadline = monotonic() + seconds
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    buffer = b""
    while True:
        left = deadline - monotonic()
        if left <= 0 or not poller.poll(max(1, int(left * 1000))):
            if monotonic() >= deadline:
                return  # the deadline passed: run.finished stays False
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            if not run.finished and run.error is None:
                run.error = "the check ended without an answer"
            return
        buffer += chunk
        while len(buffer) >= 4:
            size = int.from_bytes(buffer[:4], "big")
            if len(buffer) < 4 + size:
                break
            kind, value = marshal.loads(buffer[4 : 4 + size])
            buffer = buffer[4 + size :]
            if kind == "progress":
                run.progress.append(value)
            elif kind == "done":
                run.result, run.finished = value, True
                return
            else:
                run.error = str(value)
                return
