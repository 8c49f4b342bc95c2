"""Run a piece of work against a deadline: a stuck read (a hung NFS mount, a FIFO) cannot hold
up a VM start or the other VMs of an `apply`.

The work runs in a daemon thread; the caller waits at most `seconds` and then goes on without
it. A thread blocked in the kernel cannot be stopped from Python, but a process that exits
takes it along (the kernel's waits for NFS and FUSE are killable). Only `_thread` is imported:
the hook uses this on every VM start.
"""

from __future__ import annotations

import _thread

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    T = TypeVar("T")


class DeadlineExceeded(TimeoutError):
    """The work did not finish in time; it may still be running in its thread."""


def call_with_deadline(func: Callable[[], T], seconds: float, what: str) -> T:
    """`func()`, or DeadlineExceeded after `seconds`. Exceptions from `func` are re-raised."""
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
