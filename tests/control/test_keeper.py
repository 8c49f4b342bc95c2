"""Trust domains on the real kernel (root): guest-like processes of two domains that boot the
same image, merged by the real ksmd, with the daemon keeping one domain mergeable per scope
and the page-map audit proving it page by page."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ksmpolicy.kernel.scan import read_ksm_stat
from ksmpolicy.paths import HostPaths
from ksmpolicy.policy.load import parse_policy
from ksmpolicy.report.audit import audit
from lab.simguest import page_plan, spawn
from tests.conftest import RealKsm
from tests.control.test_daemon import KSMPOLICY, DaemonProcess, wait_for

pytestmark = [pytest.mark.root, pytest.mark.kernel]
MIB = 32
IMAGE_PAGES = page_plan(MIB * 256, 60, 10)[0]
POLICY = """version: 1
domains:
  alpha: {{priority: {alpha}}}
  beta: {{priority: {beta}}}
groups:
  ga: {{names: ["dom-a-*"], domain: alpha}}
  gb: {{names: ["dom-b-*"], domain: beta}}
reconciler: {{interval_seconds: 1, target_scan_seconds: 10, max_ksmd_cpu_percent: 60}}
isolation: {{min_hold_seconds: 0{extra}}}
"""


def policy_text(alpha: int = 0, beta: int = 0, extra: str = "") -> str:
    return POLICY.format(alpha=alpha, beta=beta, extra=extra)


def start_guests(real_ksm: RealKsm, tmp_path: Path, *, merge: bool) -> dict[str, int]:
    pids = {}
    for name in ("dom-a-0", "dom-a-1", "dom-b-0", "dom-b-1"):
        guest = spawn(
            name,
            mib=MIB,
            image="shared-base",
            no_merge=not merge,
            qmp=str(tmp_path / f"{name}.qmp"),
        )
        pids[name] = real_ksm.track(guest).pid
    return pids


def merging(pid: int) -> int:
    stat = read_ksm_stat(Path(f"/proc/{pid}/ksm_stat"))
    return (stat.merging_pages or 0) if stat else 0


def domain_merged(pids: dict[str, int], prefix: str) -> bool:
    """Every VM of the domain maps its image's pages to KSM pages (90 %)."""
    return all(
        merging(pid) >= 0.9 * IMAGE_PAGES for name, pid in pids.items() if name.startswith(prefix)
    )


def domain_unmerged(pids: dict[str, int], prefix: str) -> bool:
    return all(merging(pid) == 0 for name, pid in pids.items() if name.startswith(prefix))


def cross_pages(policy: str) -> int:
    found = audit(HostPaths(), parse_policy(policy))
    return found.cross_domain_pages + found.cross_domain_zero_pages


def test_without_the_boundary_kept_the_audit_finds_cross_domain_pages(
    real_ksm: RealKsm, tmp_path: Path, write_policy: Callable[..., Path]
) -> None:
    """VMs of two domains, mergeable as if defined without <nosharepages/> and no daemon
    running: their identical image pages merge across the boundary, and the audit says so."""
    real_ksm.write("use_zero_pages", 1)
    pids = start_guests(real_ksm, tmp_path, merge=True)
    real_ksm.write("sleep_millisecs", 10)
    real_ksm.write("pages_to_scan", 5000)
    real_ksm.write("run", 1)
    assert wait_for(lambda: domain_merged(pids, "dom-"), 60, 0.5) is not None
    real_ksm.write("run", 0)
    policy = write_policy(policy_text())
    done = subprocess.run(
        [KSMPOLICY, "-p", str(policy), "audit", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    found = json.loads(done.stdout)
    assert found["cross_domain_pages"] >= 0.9 * IMAGE_PAGES
    crossing = {frozenset((v["a_domain"], v["b_domain"])) for v in found["violations"]}
    assert crossing == {frozenset(("alpha", "beta"))}
    assert {(v["a"][:5], v["b"][:5]) for v in found["violations"]} <= {
        ("dom-a", "dom-b"),
        ("dom-b", "dom-a"),
    }


def test_the_daemon_keeps_one_domain_merging_and_hands_over_cleanly(
    real_ksm: RealKsm, tmp_path: Path
) -> None:
    real_ksm.write("use_zero_pages", 1)
    pids = start_guests(real_ksm, tmp_path, merge=False)  # defined unmergeable
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(policy_text())
    policy_path.chmod(0o644)
    daemon = DaemonProcess(policy_path, tmp_path / "run", "--restore-on-exit")
    try:
        # The first domain to start (alpha) gets the host's one scope; beta stays off.
        took = wait_for(lambda: domain_merged(pids, "dom-a"), 90, 0.5)
        assert took is not None, daemon.output()
        assert domain_unmerged(pids, "dom-b"), daemon.output()
        assert cross_pages(policy_text()) == 0
        state = json.loads((tmp_path / "run/domains.json").read_text())
        assert state["scopes"]["host"]["domain"] == "alpha"

        # beta gets the higher priority: alpha is unmerged first, then beta merges, and no
        # audit along the way finds a page mapped by both.
        policy_path.write_text(policy_text(beta=10))
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGHUP)
        audits = []
        unmerged_after = merged_after = None
        while time.monotonic() - started < 120:
            audits.append(cross_pages(policy_text(beta=10)))
            if unmerged_after is None and domain_unmerged(pids, "dom-a"):
                unmerged_after = time.monotonic() - started
            if merged_after is None and domain_merged(pids, "dom-b"):
                merged_after = time.monotonic() - started
            if unmerged_after is not None and merged_after is not None:
                break
            time.sleep(0.3)
        print(
            f"hand-over: alpha unmerged after {unmerged_after} s, beta 90 % merged after "
            f"{merged_after} s, {len(audits)} audits"
        )
        assert unmerged_after is not None and unmerged_after <= 10, daemon.output()
        assert merged_after is not None, daemon.output()
        assert audits and max(audits) == 0, audits
        assert "trust domain beta takes over from alpha (priority 10 over alpha's 0)" in (
            daemon.output()
        )
        for _ in range(3):  # and it stays so
            time.sleep(1)
            assert cross_pages(policy_text(beta=10)) == 0
    finally:
        assert daemon.stop() == 0, daemon.output()


def test_a_hand_over_the_host_cannot_absorb_is_refused(real_ksm: RealKsm, tmp_path: Path) -> None:
    """The memory guard, on the real kernel: a reserve above what the host has free."""
    real_ksm.write("use_zero_pages", 1)
    pids = start_guests(real_ksm, tmp_path, merge=False)
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(policy_text())
    policy_path.chmod(0o644)
    daemon = DaemonProcess(policy_path, tmp_path / "run", "--restore-on-exit")
    try:
        assert wait_for(lambda: domain_merged(pids, "dom-a"), 90, 0.5) is not None, daemon.output()
        too_much = ", unmerge_reserve_mib: 1000000000"  # far above MemAvailable + SwapFree
        policy_path.write_text(policy_text(beta=10, extra=too_much))
        daemon.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "refused" in daemon.output(), 15) is not None, daemon.output()
        assert "beta would take over from alpha" in daemon.output()
        time.sleep(2)
        assert domain_merged(pids, "dom-a") and domain_unmerged(pids, "dom-b")
        assert cross_pages(policy_text(beta=10)) == 0
    finally:
        assert daemon.stop() == 0, daemon.output()


def test_a_domain_of_equal_priority_that_saves_more_takes_the_scope_over(
    real_ksm: RealKsm, tmp_path: Path
) -> None:
    """Equal priority: alpha starts first and merges; beta, whose VMs hold three times as
    much of the same image, is kept unmergeable, so the kernel measures nothing for it. The
    daemon estimates both from their pages (control/rivals.py) and hands the scope over, off
    before on, with no page mapped by both domains along the way."""
    real_ksm.write("use_zero_pages", 1)
    pids = {}
    for name in ("dom-a-0", "dom-a-1"):
        guest = spawn(name, mib=MIB, image="shared-base", no_merge=True, qmp=str(tmp_path / name))
        pids[name] = real_ksm.track(guest).pid
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(policy_text())
    policy_path.chmod(0o644)
    daemon = DaemonProcess(policy_path, tmp_path / "run", "--restore-on-exit")
    try:
        assert wait_for(lambda: domain_merged(pids, "dom-a"), 90, 0.5) is not None, daemon.output()
        for name in ("dom-b-0", "dom-b-1"):
            guest = spawn(
                name,
                mib=3 * MIB,
                image="shared-base",
                image_percent=80,
                no_merge=True,
                qmp=str(tmp_path / name),
            )
            pids[name] = real_ksm.track(guest).pid
        audits = []
        started = time.monotonic()
        while time.monotonic() - started < 120 and not (
            domain_unmerged(pids, "dom-a") and domain_merged(pids, "dom-b")
        ):
            audits.append(cross_pages(policy_text()))
            time.sleep(0.3)
        took = time.monotonic() - started
        output = daemon.output()
        print(f"equal-priority hand-over: {took:.1f} s, {len(audits)} audits")
        assert domain_unmerged(pids, "dom-a") and domain_merged(pids, "dom-b"), output
        assert "trust domain beta takes over from alpha (saves" in output, output
        assert "trust domain alpha would save" in output, output
        assert "trust domain beta would save" in output, output
        assert audits and max(audits) == 0, audits
    finally:
        assert daemon.stop() == 0, daemon.output()


@pytest.mark.parametrize("zero", [1, 0], ids=["use_zero_pages=1", "use_zero_pages=0"])
def test_zero_pages_of_two_domains_share_a_ksm_page_only_without_use_zero_pages(
    real_ksm: RealKsm, zero: int
) -> None:
    """Both domains mergeable at once (what the keeper never allows in one scope), guests
    45 % zero pages: with use_zero_pages=1 their zero pages map the kernel's zero page and no
    KSM page is mapped by both domains; with 0 they form zero-filled KSM pages of up to
    max_page_sharing (256) mappings, and the one the first guest leaves part-full takes the
    second guest's zero pages too (a count that is a multiple of 256 would hide this)."""
    real_ksm.write("use_zero_pages", zero)
    pids = {}
    for name in ("dom-a-0", "dom-b-0"):
        guest = spawn(name, mib=MIB, image=name, image_percent=0, zero_percent=45)
        pids[name] = real_ksm.track(guest).pid
    real_ksm.write("sleep_millisecs", 10)
    real_ksm.write("pages_to_scan", 5000)
    real_ksm.write("run", 1)
    zero_pages = page_plan(MIB * 256, 0, 45)[1]

    def settled() -> bool:
        stats = [read_ksm_stat(Path(f"/proc/{pid}/ksm_stat")) for pid in pids.values()]
        done = [(s.zero_pages or 0) + (s.merging_pages or 0) for s in stats if s is not None]
        return len(done) == 2 and min(done) >= 0.95 * zero_pages

    assert wait_for(settled, 60, 0.5) is not None
    real_ksm.write("run", 0)
    found = audit(HostPaths(), parse_policy(policy_text()))
    print(
        f"use_zero_pages={zero}: cross-domain KSM pages {found.cross_domain_pages} content, "
        f"{found.cross_domain_zero_pages} zero-filled, for {2 * zero_pages} zero pages"
    )
    assert found.cross_domain_pages == 0  # the images differ: no content in common
    if zero:
        assert found.cross_domain_zero_pages == 0
    else:
        assert zero_pages % 256
        assert found.cross_domain_zero_pages >= 1
