"""Reading another process's memory (kernel/guestmem.py): the digests are those of its pages;
every file is read through one handle on its /proc/PID, so a process reaped meanwhile reads as
gone even when its PID has been taken over; reading never unshares a shared page; `distinct`
numbers contents as a sort by both words would (root for the reads: they need ptrace access
to another process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import xxhash

from ksmpolicy.kernel import guestmem
from ksmpolicy.kernel.pagemap import PM_EXCLUSIVE, PM_PFN
from ksmpolicy.paths import PAGE_SIZE, HostPaths

PAGES = 96

# a child that maps PAGES pages, writes page i as b"page i" padded, prints the address, waits
CHILD = f"""
import mmap, sys
m = mmap.mmap(-1, {PAGES} * {PAGE_SIZE})
for i in range({PAGES}):
    m[i * {PAGE_SIZE}:(i + 1) * {PAGE_SIZE}] = (b"page %d" % (i % 40)).ljust({PAGE_SIZE}, b".")
import ctypes
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
sys.stdin.read()
"""


def needs_root(test: Callable[..., None]) -> Callable[..., None]:
    """Marked `root` (CI runs it as root) and skipped without root: it reads another process."""
    skip = pytest.mark.skipif(os.geteuid() != 0, reason="reads another process's memory: root")
    marked: Callable[..., None] = pytest.mark.root(skip(test))
    return marked


@pytest.fixture
def child() -> Iterator[tuple[subprocess.Popen[str], int]]:
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        address = int(process.stdout.readline())
        yield process, address
    finally:
        process.kill()
        process.wait()


def expected(first: int, count: int) -> np.ndarray:
    pages = [(b"page %d" % (i % 40)).ljust(PAGE_SIZE, b".") for i in range(first, first + count)]
    data = b"".join(xxhash.xxh3_128_digest(page) for page in pages)
    return np.frombuffer(data, dtype=np.uint64).reshape(-1, 2)


def runs(address: int, *pieces: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    starts = np.array([address + first * PAGE_SIZE for first, _ in pieces], dtype=np.uint64)
    lengths = np.array([count for _, count in pieces], dtype=np.int64)
    return starts, lengths


def hashed(pid: int, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    with guestmem.Process(HostPaths(), pid) as process:
        return guestmem.hash_runs(process, starts, lengths, guestmem.RateLimit(None))


@needs_root
def test_the_digests_are_those_of_the_pages(
    child: tuple[subprocess.Popen[str], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    process, address = child
    monkeypatch.setattr(guestmem, "READ_PAGES", 16)  # runs longer than one read, and shorter
    got = hashed(process.pid, *runs(address, (0, 40), (50, 3), (60, 36)))
    want = np.concatenate([expected(0, 40), expected(50, 3), expected(60, 36)])
    assert np.array_equal(got, want)


@needs_root
def test_hash_pages_reads_the_pages_it_is_given(child: tuple[subprocess.Popen[str], int]) -> None:
    process, address = child
    present = guestmem.Runs(*runs(address, (0, 10), (20, 30)))  # 40 pages, in two runs
    indices = np.array([0, 1, 2, 9, 10, 11, 39], dtype=np.int64)  # one crosses the gap
    pages = [0, 1, 2, 9, 20, 21, 49]
    with guestmem.Process(HostPaths(), process.pid) as held:
        got = guestmem.hash_pages(held, present, indices, guestmem.RateLimit(None))
    assert np.array_equal(got, np.concatenate([expected(p, 1) for p in pages]))


@needs_root
def test_a_page_unmapped_meanwhile_gets_a_digest_no_page_has(
    child: tuple[subprocess.Popen[str], int],
) -> None:
    process, address = child
    got = hashed(process.pid, *runs(address, (PAGES - 2, 4)))  # two pages past the mapping
    assert np.array_equal(got[:2], expected(PAGES - 2, 2))
    assert not np.array_equal(got[2], got[3])  # each of its own address
    assert not (got[2:] == expected(0, PAGES)[:, None, :]).all(axis=2).any()


@needs_root
def test_a_process_gone_before_the_read_reads_as_gone() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    with pytest.raises(OSError):
        guestmem.Process(HostPaths(), process.pid)


@needs_root
def test_a_process_that_is_not_the_one_found_is_refused(
    child: tuple[subprocess.Popen[str], int],
) -> None:
    process, _address = child
    started = guestmem.Process(HostPaths(), process.pid).start()
    assert started is not None
    with guestmem.Process(HostPaths(), process.pid, started):
        pass  # the one the inventory found
    with pytest.raises(ProcessLookupError):
        guestmem.Process(HostPaths(), process.pid, started - 1)


TOO_MANY = """
import contextlib, os, resource, sys
from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.kernel import guestmem
from ksmpolicy.paths import HostPaths
resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))  # for this process only
with contextlib.ExitStack() as stack:
    try:
        guestmem.hold(HostPaths(), [(os.getpid(), None)] * 40, stack)
    except KsmPolicyError as error:
        print(error)
        sys.exit(0)
print("held them all")
sys.exit(1)
"""


@needs_root
def test_too_many_vms_to_hold_is_an_error_not_vms_gone() -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", TOO_MANY],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "40 VMs" in done.stdout
    assert "LimitNOFILE" in done.stdout


# Run in a PID namespace of its own (`unshare --pid --fork --mount-proc`), where the test can
# hand a reaped process's PID to the next one (ns_last_pid): the "VM" is held, read, reaped;
# an impostor takes its PID and maps other bytes at the same address; every read through the
# handle taken for the VM must fail, never return the impostor's pages.
TAKEOVER = r"""
import ctypes, os, subprocess, sys
import numpy as np
from ksmpolicy.kernel import guestmem
from ksmpolicy.paths import HostPaths, PAGE_SIZE

ADDRESS = 0x7E0000000000

def program(text):
    return (
        "import ctypes, sys\n"
        "libc = ctypes.CDLL(None); libc.mmap.restype = ctypes.c_void_p\n"
        "libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,"
        " ctypes.c_int, ctypes.c_long)\n"
        f"a = libc.mmap({ADDRESS}, 4 * PAGE_SIZE, 3, 0x22 | 0x100000, -1, 0)\n"
        f"assert a == {ADDRESS}, a\n"
        f"ctypes.memmove(a, {text!r}.ljust(4 * PAGE_SIZE, b'.'), 4 * PAGE_SIZE)\n"
        "print('ready', flush=True); sys.stdin.read()\n"
    ).replace("PAGE_SIZE", str(PAGE_SIZE))

def start(text):
    process = subprocess.Popen([sys.executable, "-c", program(text)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE)
    assert process.stdout.readline() == b"ready\n"
    return process

vm = start(b"the VM's own page")
held = guestmem.Process(HostPaths(), vm.pid)
present = guestmem.present_runs(held, [(ADDRESS, ADDRESS + 4 * PAGE_SIZE)])
assert present.pages == 4, present
first = guestmem.hash_runs(held, present.starts, present.lengths, guestmem.RateLimit(None))
vm.kill()
vm.wait()  # reaped: its PID is free
with open("/proc/sys/kernel/ns_last_pid", "w") as last:
    last.write(str(vm.pid - 1))
impostor = start(b"an impostor's page")
assert impostor.pid == vm.pid, (impostor.pid, vm.pid)
outcomes = []
for name, read in [
    ("hash_runs", lambda: guestmem.hash_runs(held, present.starts, present.lengths,
                                             guestmem.RateLimit(None))),
    ("hash_pages", lambda: guestmem.hash_pages(held, present, np.arange(4),
                                               guestmem.RateLimit(None))),
    ("guest_runs", lambda: guestmem.guest_runs(held, None, None)),
    ("present_runs", lambda: guestmem.present_runs(held, [(ADDRESS, ADDRESS + PAGE_SIZE)])),
]:
    try:
        read()
        outcomes.append(f"{name}: read the impostor")
    except OSError:
        outcomes.append(f"{name}: gone")
impostor.kill()
impostor.wait()
print(";".join(outcomes))
"""


@needs_root
def test_a_pid_taken_over_is_never_read_as_the_vm(tmp_path: Path) -> None:
    script = tmp_path / "takeover.py"
    script.write_text(textwrap.dedent(TAKEOVER))
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().split(";") == [
        "hash_runs: gone",
        "hash_pages: gone",
        "guest_runs: gone",
        "present_runs: gone",
    ]


# a process whose pages its child shares after fork (copy-on-write, as KSM pages are shared):
# it prints its child's PID and the address, and both wait
SHARED = f"""
import ctypes, mmap, os, sys, time
m = mmap.mmap(-1, 8 * {PAGE_SIZE}, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(8):
    m[i * {PAGE_SIZE}:(i + 1) * {PAGE_SIZE}] = (b"shared %d" % i).ljust({PAGE_SIZE}, b"x")
address = ctypes.addressof(ctypes.c_char.from_buffer(m))
pid = os.fork()
if pid == 0:
    time.sleep(120)
    os._exit(0)
print(pid, address, flush=True)
try:
    sys.stdin.read()
finally:
    os.kill(pid, 9)
"""


def frames(pid: int, address: int, count: int) -> list[tuple[int, bool]]:
    with Path(f"/proc/{pid}/pagemap").open("rb") as pagemap:
        pagemap.seek(address // PAGE_SIZE * 8)
        entries = np.frombuffer(pagemap.read(8 * count), dtype=np.uint64)
    return [(int(e & PM_PFN), bool(e & PM_EXCLUSIVE)) for e in entries]


@needs_root
def test_reading_a_shared_page_does_not_unshare_it() -> None:
    """A page that two processes share (as KSM's merged pages are) stays one page after it
    is read: a reader that pins pages (process_vm_readv) would give each its own copy."""
    parent = subprocess.Popen(
        [sys.executable, "-c", SHARED], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        forked, address = map(int, parent.stdout.readline().split())
        before = frames(forked, address, 8)
        assert before == frames(parent.pid, address, 8)  # shared: the same frames
        assert not any(exclusive for _frame, exclusive in before)
        got = hashed(forked, *runs(address, (0, 8)))
        want = [(b"shared %d" % i).ljust(PAGE_SIZE, b"x") for i in range(8)]
        assert np.array_equal(
            got,
            np.frombuffer(b"".join(map(xxhash.xxh3_128_digest, want)), np.uint64).reshape(-1, 2),
        )
        assert frames(forked, address, 8) == before
    finally:
        assert parent.stdin is not None
        parent.stdin.close()  # it kills its child and exits
        parent.wait(timeout=30)


def reference(digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    contents, ids = np.unique(digests, axis=0, return_inverse=True)
    return contents, ids.reshape(-1)


@pytest.mark.parametrize("seed", range(20))
def test_distinct_numbers_contents_as_a_sort_by_both_words_does(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 2**64, size=(int(rng.integers(1, 50)), 2), dtype=np.uint64)
    if seed % 2:  # digests that share their first word and differ in the second
        pool[: pool.shape[0] // 2, 0] = pool[0, 0]
    digests = pool[rng.integers(0, pool.shape[0], size=int(rng.integers(0, 400)))]
    contents, ids = guestmem.distinct(digests)
    want_contents, want_ids = reference(digests)
    assert np.array_equal(contents, want_contents)
    assert np.array_equal(ids, want_ids)
    assert np.array_equal(contents[ids], digests)
