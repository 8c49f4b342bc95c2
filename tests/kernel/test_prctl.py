"""`ksmpolicy exec` and prctl(PR_SET_MEMORY_MERGE) on real processes and the real kernel."""

from __future__ import annotations

import ctypes
import errno
import subprocess
import sys
from pathlib import Path

import pytest

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.kernel import prctl
from tests.conftest import RealKsm
from tests.control.test_daemon import KSMPOLICY, DaemonProcess, wait_for

# A service-like process: 32 MiB of identical pages, no madvise of its own; it prints its
# ksm_stat's merge_any line and waits.
SERVICE = (
    "import mmap, sys, time\n"
    "m = mmap.mmap(-1, 32 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
    "for i in range(0, 32 << 20, 4096): m[i:i + 4096] = bytes([7]) * 4096\n"
    "line = [l for l in open('/proc/self/ksm_stat') if 'merge_any' in l]\n"
    "print(line[0].strip(), flush=True)\n"
    "time.sleep(120)\n"
)
POLICY = """version: 1
rules:
  - {name: databases, match: {tags: [database]}, action: exclude}
reconciler: {interval_seconds: 1, target_scan_seconds: 5, max_ksmd_cpu_percent: 50}
"""


def start(policy: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [KSMPOLICY, "-p", str(policy), "exec", *args, "--", sys.executable, "-c", SERVICE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.root
@pytest.mark.kernel
def test_exec_makes_a_service_mergeable_and_the_daemon_merges_it(
    real_ksm: RealKsm, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    policy.chmod(0o644)
    real_ksm.write("run", 0)
    daemon = DaemonProcess(policy, tmp_path / "run")
    try:
        merged = real_ksm.track(
            start(policy, "--name", "svc-1", "--run-dir", str(tmp_path / "run"))
        )
        excluded = real_ksm.track(start(policy, "--name", "pg-1", "--tag", "database"))
        assert merged.stdout is not None and excluded.stdout is not None
        assert merged.stdout.readline().strip() == "ksm_merge_any: yes"
        assert excluded.stdout.readline().strip() == "ksm_merge_any: no"

        def merging(pid: int) -> int:
            for line in Path(f"/proc/{pid}/ksm_stat").read_text().splitlines():
                if line.startswith("ksm_merging_pages"):
                    return int(line.split()[1])
            return 0

        assert wait_for(lambda: merging(merged.pid) > 4000, 60, step=0.5), daemon.output()
        assert merging(excluded.pid) == 0
        assert "hook: svc-1 started" in daemon.output()  # exec told the daemon
    finally:
        daemon.stop()


def test_exec_says_why_it_does_not_merge(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    result = subprocess.run(
        [KSMPOLICY, "-p", str(policy), "exec", "-n", "pg-1", "-t", "database", "--", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert result.stderr.startswith("ksmpolicy: pg-1: not mergeable (rule 'databases'")


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (errno.EINVAL, "has no PR_SET_MEMORY_MERGE: it came with Linux 6.4"),
        (errno.EPERM, "needs CAP_SYS_RESOURCE"),
    ],
)
def test_a_kernel_without_the_prctl_or_the_capability_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, code: int, says: str
) -> None:
    class Libc:
        def prctl(self, *_args: object) -> int:
            return -1

    monkeypatch.setattr(ctypes, "CDLL", lambda *_a, **_k: Libc())
    monkeypatch.setattr(ctypes, "get_errno", lambda: code)
    with pytest.raises(KsmPolicyError, match=says):
        prctl.set_memory_merge(True)
