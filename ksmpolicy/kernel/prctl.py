"""prctl(PR_SET_MEMORY_MERGE): a whole process mergeable (Linux 6.4+), kept across fork and
exec. Only the process itself can set or clear it, which is why `ksmpolicy exec` sets it and
then execs the command: Firecracker's seccomp filter, for one, would refuse a later madvise."""

from __future__ import annotations

import ctypes
import errno
import os

from ksmpolicy.errors import KsmPolicyError

PR_SET_MEMORY_MERGE = 67
PR_GET_MEMORY_MERGE = 68


def _prctl(option: int, value: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    result = int(libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0))
    if result < 0:
        code = ctypes.get_errno()
        if code == errno.EINVAL:
            raise KsmPolicyError(
                f"this kernel ({os.uname().release}) has no PR_SET_MEMORY_MERGE: it came with "
                "Linux 6.4 (and needs CONFIG_KSM)"
            )
        if code == errno.EPERM:
            raise KsmPolicyError(
                "PR_SET_MEMORY_MERGE needs CAP_SYS_RESOURCE: run as root, or give the service "
                "that capability (AmbientCapabilities=CAP_SYS_RESOURCE)"
            )
        raise KsmPolicyError(f"prctl(PR_SET_MEMORY_MERGE): {os.strerror(code)}")
    return result


def set_memory_merge(merge: bool) -> None:
    """Make this process's memory (and that of whatever it execs or forks) mergeable, or not."""
    _prctl(PR_SET_MEMORY_MERGE, int(merge))


def memory_merge() -> bool:
    """Whether this process is mergeable as a whole."""
    return bool(_prctl(PR_GET_MEMORY_MERGE))
