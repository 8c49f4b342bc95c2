"""A filesystem that hangs, like an NFS server that stopped answering (FUSE, root).

`python -m lab.slowfs MOUNTPOINT` serves, until killed:

* `slow.qcow2`: a regular file whose every read blocks (the server never answers);
* `stuck.qcow2`: a name whose lookup blocks (even `stat` never returns);
* `policy.yaml`: a regular file whose reads block.

`mounted(directory)` runs it for a test and takes it down afterwards: killing the server
aborts the requests still waiting, so nothing stays blocked.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HANG_SECONDS = 3600
FILES = {"slow.qcow2": 65536, "policy.yaml": 4096}


def serve(mountpoint: str) -> None:
    from fuse import FUSE, FuseOSError, Operations  # fusepy, a test dependency

    class Hanging(Operations):  # type: ignore[misc]
        def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
            name = path.lstrip("/")
            if not name:
                return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_uid": 0}
            if name == "stuck.qcow2":
                time.sleep(HANG_SECONDS)
            if name in FILES:
                return {
                    "st_mode": stat.S_IFREG | 0o644,
                    "st_nlink": 1,
                    "st_size": FILES[name],
                    "st_uid": 0,
                    "st_gid": 0,
                }
            raise FuseOSError(errno.ENOENT)

        def readdir(self, path: str, fh: Any) -> list[str]:
            return [".", "..", *FILES, "stuck.qcow2"]

        def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
            time.sleep(HANG_SECONDS)
            return b""

    FUSE(Hanging(), mountpoint, foreground=True, allow_other=True, nothreads=False)


@contextmanager
def mounted(directory: Path) -> Iterator[Path]:
    """A hanging filesystem at `directory` for the length of the block."""
    directory.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "lab.slowfs", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        deadline = time.monotonic() + 10
        while not _is_mounted(directory):
            if server.poll() is not None or time.monotonic() > deadline:
                error = server.stderr.read().decode() if server.stderr else ""
                raise RuntimeError(f"the hanging filesystem did not mount: {error}")
            time.sleep(0.05)
        yield directory
    finally:
        server.send_signal(signal.SIGKILL)  # aborts every request still waiting on it
        server.wait()
        subprocess.run(["umount", "-l", str(directory)], capture_output=True, check=False)


def _is_mounted(directory: Path) -> bool:
    target = os.path.realpath(directory)
    with open("/proc/self/mounts", encoding="utf-8") as mounts:  # noqa: PTH123
        return any(line.split()[1] == target for line in mounts)


if __name__ == "__main__":
    serve(sys.argv[1])
