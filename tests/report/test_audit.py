"""The audit's verdicts: violations per process, and three exits (clean 0, violation 1, cannot
audit 3) that cron and monitoring can tell apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ksmpolicy.cli.main import cli
from ksmpolicy.kernel.pagemap import PageMap, ProcessPages
from ksmpolicy.report import audit as auditing
from ksmpolicy.report.audit import Audit, audit_json, audit_text, crossing_pairs
from ksmpolicy.report.sharing import Party, share
from tests.report.test_status import fake_host

DOMAINS = "version: 1\ndomains:\n  blue: {}\n  red: {}\n"


def page_map(pages: dict[int, list[int]]) -> PageMap:
    """A walk in which each pid maps the given KSM pages once."""
    processes = {
        pid: ProcessPages(
            pid, np.array(sorted(pfns), np.uint64), np.ones(len(pfns), np.uint32), len(pfns)
        )
        for pid, pfns in pages.items()
    }
    every = np.array(sorted({p for pfns in pages.values() for p in pfns}), np.uint64)
    counts = [sum(int(pfn) in pfns for pfns in pages.values()) for pfn in every]
    return PageMap(processes, every, np.array(counts, np.int64))


def test_two_vms_of_one_name_in_two_domains_are_a_listed_violation() -> None:
    walk = page_map({100: [1, 2, 3], 200: [1, 2, 3], 300: [9]})
    parties = [
        Party(100, "web", None, domain="blue"),
        Party(200, "web", None, domain="red"),
        Party(300, "web", None, domain="red"),
    ]
    sharing = share(walk, parties)
    assert sharing.cross_domain_pages == 3
    (violation,) = crossing_pairs(sharing)
    assert (violation.a_pid, violation.a_domain, violation.b_pid, violation.b_domain) == (
        100,
        "blue",
        200,
        "red",
    )
    assert violation.shared_pages == 3
    found = Audit(3, 0, (violation,), 3, ("blue", "red"), 0.1, 0.1, False)
    assert '"web" (pid 100, domain blue) ~ "web" (pid 200, domain red): 3 KSM pages' in (
        audit_text(found)
    )
    listed = audit_json(found)["violations"]
    assert isinstance(listed, list) and listed[0]["a_pid"] == 100 and listed[0]["b_pid"] == 200


def test_pages_within_one_domain_are_no_violation_whatever_the_names() -> None:
    walk = page_map({100: [1, 2], 200: [1, 2]})
    parties = [Party(100, "a", None, domain="blue"), Party(200, "b", None, domain="blue")]
    assert crossing_pairs(share(walk, parties)) == ()


def run_audit(root: Path, policy: Path, *extra: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["-p", str(policy), "audit", "--root", str(root), *extra])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("as_json", [False, True])
def test_no_page_map_is_cannot_audit_not_a_violation(tmp_path: Path, as_json: bool) -> None:
    fake_host(tmp_path)  # KSM files, no /proc/kpageflags: the page map cannot be read
    policy = tmp_path / "policy.yaml"
    policy.write_text(DOMAINS)
    status, out, err = run_audit(tmp_path, policy, *(["--json"] if as_json else []))
    assert status == auditing.EXIT_CANNOT_AUDIT == 3
    if as_json:
        said = json.loads(out)
        assert (said["ok"], said["status"]) == (None, "cannot-audit")
        assert said["reason"]
    else:
        assert out == ""
        assert err.startswith("CANNOT AUDIT: ")


def test_a_kernel_without_ksm_is_cannot_audit(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    policy = tmp_path / "policy.yaml"
    policy.write_text(DOMAINS)
    status, out, _err = run_audit(tmp_path, policy, "--json")
    assert status == 3
    assert json.loads(out)["reason"] == "this kernel has no KSM"


def test_a_policy_that_cannot_be_read_is_cannot_audit(tmp_path: Path) -> None:
    fake_host(tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ndomains: [oops]\n")
    status, out, _err = run_audit(tmp_path, policy, "--json")
    assert status == 3
    assert "policy.yaml:2: domains:" in json.loads(out)["reason"]


@pytest.mark.parametrize(
    ("crossing", "exit_status", "word"), [(0, 0, "clean"), (5, 1, "violation")]
)
def test_clean_and_violation_exit_0_and_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crossing: int, exit_status: int, word: str
) -> None:
    found = Audit(crossing, 0, (), 2, ("blue",), 0.1, 0.1, False)
    monkeypatch.setattr(auditing, "audit", lambda _paths, _policy: found)
    policy = tmp_path / "policy.yaml"
    policy.write_text(DOMAINS)
    status, out, _err = run_audit(tmp_path, policy, "--json")
    assert (status, json.loads(out)["status"]) == (exit_status, word)


@pytest.mark.root
def test_not_root_is_cannot_audit_on_this_host(tmp_path: Path) -> None:
    """As anyone but root the kernel hides page frame numbers: no verdict, exit 3."""
    import subprocess
    import sys

    from tests.conftest import AS_NOBODY, REPO

    policy = tmp_path / "policy.yaml"
    policy.write_text(DOMAINS)
    policy.chmod(0o644)
    tmp_path.chmod(0o755)
    result = subprocess.run(
        [*AS_NOBODY, sys.executable, "-m", "ksmpolicy", "-p", str(policy), "audit", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 3, result.stderr
    said = json.loads(result.stdout)
    assert (said["ok"], said["status"]) == (None, "cannot-audit"), said
