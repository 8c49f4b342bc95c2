"""A guest-like process for demos, tests and benchmarks: "guest RAM" the way QEMU maps it.

It maps anonymous memory, marks it MADV_MERGEABLE like QEMU does (unless told not to, like
`mem-merge=off`), fills it from an image model and waits. Pages are of three kinds:

* image pages, identical in every guest started with the same `--image` seed (the OS image);
* zero pages;
* unique pages, different in every guest.

Only the standard library is used, so it runs under any Python with `argv[0]` set to a QEMU
binary name (`qemu-system-x86_64 simguest.py -name guest=web-1 ...`), which is how the tests
make it look like a VM in /proc. It prints `ready` once its memory is filled.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

PAGE = mmap.PAGESIZE  # the kernel's page size, which KSM merges in


def page_plan(pages: int, image_percent: float, zero_percent: float) -> tuple[int, int, int]:
    """(image, zero, unique) page counts for a guest of `pages` pages."""
    image = int(pages * image_percent / 100)
    zero = int(pages * zero_percent / 100)
    return image, zero, pages - image - zero


def fill(
    memory: mmap.mmap | memoryview, image_seed: str, image: int, zero: int, unique_token: bytes
) -> None:
    pad = b"\xa5" * (PAGE - 64)
    view = memoryview(memory)
    chunk = 256  # pages per write
    pages = len(memory) // PAGE
    for first in range(0, pages, chunk):
        parts = []
        for index in range(first, min(first + chunk, pages)):
            if index < image:
                head = f"image {image_seed} page {index}".encode()
            elif index < image + zero:
                parts.append(bytes(PAGE))
                continue
            else:
                head = b"unique " + unique_token + f" page {index}".encode()
            parts.append(head.ljust(64, b"\0") + pad)
        data = b"".join(parts)
        view[first * PAGE : first * PAGE + len(data)] = data


def churn_tick(
    memory: mmap.mmap,
    image: int,
    zero: int,
    pages: int,
    rng: random.Random,
    region: str = "unique",
) -> None:
    """Rewrite `pages` random pages of a region (unique pages, like a guest at work; or image
    pages, like a guest that rewrites what it booted from)."""
    chosen = range(0, image) if region == "image" else range(image + zero, len(memory) // PAGE)
    if not chosen:
        return
    for _ in range(pages):
        index = rng.choice(chosen)
        memory[index * PAGE : index * PAGE + 16] = rng.randbytes(16)


def serve_qmp(path: str, memory: mmap.mmap, mergeable: list[bool]) -> None:
    """A QMP server like QEMU's for the live toggle: one backend, /objects/pc.ram, whose
    `merge` property madvises the guest RAM (the rest of QMP is not there)."""
    Path(path).unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def answer(request: dict[str, object]) -> dict[str, object]:
        command = request.get("execute")
        arguments = request.get("arguments") or {}
        assert isinstance(arguments, dict)
        if command == "qmp_capabilities":
            return {"return": {}}
        if command == "qom-list" and arguments.get("path") == "/objects":
            return {"return": [{"name": "pc.ram", "type": "child<memory-backend-ram>"}]}
        if command in ("qom-get", "qom-set") and arguments.get("path") == "/objects/pc.ram":
            if arguments.get("property") != "merge":
                return {"error": {"class": "GenericError", "desc": "no such property"}}
            if command == "qom-get":
                return {"return": mergeable[0]}
            want = bool(arguments.get("value"))
            memory.madvise(mmap.MADV_MERGEABLE if want else mmap.MADV_UNMERGEABLE)
            mergeable[0] = want
            return {"return": {}}
        return {"error": {"class": "CommandNotFound", "desc": f"{command} is not here"}}

    def run() -> None:
        while True:
            connection, _ = server.accept()
            try:
                with connection, connection.makefile("rwb") as stream:
                    stream.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
                    stream.flush()
                    for line in stream:
                        stream.write(json.dumps(answer(json.loads(line))).encode() + b"\n")
                        stream.flush()
            except (OSError, ValueError):
                continue  # the client went away, or sent something that is not JSON

    threading.Thread(target=run, daemon=True).start()


def set_process_name(name: str) -> None:
    """prctl(PR_SET_NAME): what /proc/PID/comm shows, as QEMU's would."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--mib", type=int, default=64, help="guest RAM in MiB")
    parser.add_argument("--image", default="debian-12", help="image seed shared by a group")
    parser.add_argument("--image-percent", type=float, default=60.0)
    parser.add_argument("--zero-percent", type=float, default=10.0)
    parser.add_argument("--no-merge", action="store_true", help="like mem-merge=off")
    parser.add_argument(
        "--touch-mib", type=int, default=None, help="fill only this much (an idle guest)"
    )
    parser.add_argument("--churn", type=float, default=0.0, help="unique pages rewritten per s")
    parser.add_argument(
        "--churn-on-signal", action="store_true", help="start churning on SIGUSR1 only"
    )
    parser.add_argument("--churn-region", choices=("unique", "image"), default="unique")
    parser.add_argument("--comm", default="qemu-system-x86")
    # QEMU-style identity options are accepted and ignored: they are for /proc/PID/cmdline.
    args, _qemu_args = parser.parse_known_args(argv)
    set_process_name(args.comm)
    signal.signal(signal.SIGTERM, _exit)
    pages = args.mib * 1024 * 1024 // PAGE
    memory = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if not args.no_merge:
        memory.madvise(mmap.MADV_MERGEABLE)
    if "-qmp" in _qemu_args:
        where = _qemu_args[_qemu_args.index("-qmp") + 1]
        serve_qmp(where.removeprefix("unix:").split(",")[0], memory, [not args.no_merge])
    touched = pages if args.touch_mib is None else min(pages, args.touch_mib * 2**20 // PAGE)
    image, zero, _unique = page_plan(touched, args.image_percent, args.zero_percent)
    filled = memory if touched == pages else memoryview(memory)[: touched * PAGE]
    fill(filled, args.image, image, zero, os.urandom(8).hex().encode())
    churning = [args.churn > 0 and not args.churn_on_signal]

    def start_churning(_signum: int, _frame: FrameType | None) -> None:
        churning[0] = args.churn > 0

    signal.signal(signal.SIGUSR1, start_churning)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    rng = random.Random()
    interval = 0.1
    while True:
        if churning[0]:
            pages_now = max(1, round(args.churn * interval))
            churn_tick(memory, image, zero, pages_now, rng, args.churn_region)
            time.sleep(interval)
        else:
            signal.pause()


def spawn(
    name: str,
    *,
    mib: int = 64,
    image: str = "debian-12",
    image_percent: float = 60.0,
    zero_percent: float = 10.0,
    no_merge: bool = False,
    churn_pages_per_second: float = 0.0,
    vmid: str | None = None,
    churn_on_signal: bool = False,
    extra_args: tuple[str, ...] = (),
    binary: str = "qemu-system-x86_64",
    touch_mib: int | None = None,
    churn_region: str = "unique",
    python: str = sys.executable,
    timeout: float = 60.0,
    qmp: str | None = None,
) -> subprocess.Popen[str]:
    """Start a guest-like process that /proc shows as QEMU; return once its memory is filled.

    `vmid` makes it look like a Proxmox guest (`kvm -id VMID`), else like a libvirt one. `qmp`:
    serve QMP's live merge toggle on this UNIX socket, named on the command line as QEMU's is.
    """
    identity = (
        ["-id", vmid, "-name", f"{name},debug-threads=on"]
        if vmid
        else [
            "-name",
            f"guest={name},debug-threads=on",
        ]
    )
    argv = [binary, __file__, *identity, "-m", f"{mib}M", *extra_args]
    argv += [f"--mib={mib}", f"--image={image}", f"--image-percent={image_percent}"]
    argv += [f"--zero-percent={zero_percent}", f"--churn={churn_pages_per_second}"]
    if no_merge:
        argv += ["-machine", "pc,mem-merge=off", "--no-merge"]
    if churn_on_signal:
        argv.append("--churn-on-signal")
    if touch_mib is not None:
        argv.append(f"--touch-mib={touch_mib}")
    if churn_region != "unique":
        argv.append(f"--churn-region={churn_region}")
    if qmp is not None:
        argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    # argv[0] is the QEMU name; the interpreter is given as the executable.
    process = subprocess.Popen(
        argv, executable=python, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline and process.poll() is None:
        line = process.stdout.readline()
        if line.strip() == "ready":
            return process
    process.kill()
    process.wait()
    raise RuntimeError(f"guest-like process {name} did not start: {line!r}")


def _exit(_signum: int, _frame: FrameType | None) -> None:
    sys.exit(0)


if __name__ == "__main__":
    sys.exit(main())
