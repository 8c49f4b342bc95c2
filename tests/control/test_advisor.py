"""`kernel_advisor: true` on the real kernel with guest-like processes that ksmd has not seen
(the advisor unwarmed): either the advisor keeps up, or the daemon takes pacing back within
one re-plan; the guests merge either way."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ksmpolicy.kernel.scan import read_ksm_stat
from lab.simguest import page_plan, spawn
from tests.conftest import KSM_DIR, RealKsm
from tests.control.test_daemon import DaemonProcess, wait_for

pytestmark = [pytest.mark.root, pytest.mark.kernel]
POLICY = """version: 1
reconciler:
  interval_seconds: 1
  target_scan_seconds: 20
  max_ksmd_cpu_percent: 50
  kernel_advisor: true
"""


def test_an_unwarmed_advisor_hands_pacing_back_within_one_replan(
    real_ksm: RealKsm, tmp_path: Path
) -> None:
    if not (KSM_DIR / "advisor_mode").exists():
        pytest.skip("this kernel has no scan-time advisor (Linux 6.9+)")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    policy.chmod(0o644)
    real_ksm.write("advisor_mode", "none")
    real_ksm.write("run", 0)
    daemon = DaemonProcess(policy, tmp_path / "run")
    try:
        guests = [real_ksm.track(spawn(f"adv-{i}", mib=256, image="adv")) for i in range(2)]
        ready = time.monotonic()
        image, zero, _unique = page_plan(256 * 256, 60, 10)

        def merged() -> int:
            total = 0
            for guest in guests:
                stat = read_ksm_stat(Path(f"/proc/{guest.pid}/ksm_stat"))
                total += ((stat.merging_pages or 0) + (stat.zero_pages or 0)) if stat else 0
            return total

        def advisor_off() -> bool:
            return real_ksm.read("advisor_mode") == "none" and "taken back" in daemon.output()

        # Either the advisor merges 90 % by itself as fast as the law would, or it is taken
        # off at the first re-plan that judges it: within two intervals of the guests' start.
        took_back = wait_for(advisor_off, 3.0, step=0.05)
        if took_back is None:
            assert wait_for(lambda: merged() >= 0.9 * 2 * (image + zero), 30), daemon.output()
            return
        assert "kernel advisor scanned" in daemon.output(), daemon.output()
        assert wait_for(lambda: merged() >= 0.9 * 2 * (image + zero), 60), daemon.output()
        assert time.monotonic() - ready < 60
    finally:
        daemon.stop()
