"""First-run truth on a real libvirt host: `status`, `doctor` and the metrics say the same
about each VM, and every fix they print, run as printed, makes its finding go away.

The walk of issue 22: a database VM already running when the policy came, mergeable; `apply`
and the live switch turn its guest RAM off, but QEMU's ROMs and video RAM keep the setting it
started with until it restarts. Needs root (CI runs as root): a real libvirtd and QEMU (TCG).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lab.libvirtd import Lab, wait_for

pytestmark = [pytest.mark.root]
KSMPOLICY = str(Path(sys.executable).parent / "ksmpolicy")
POLICY = """\
version: 1
enforcement: warn
live: true
rules:
  - name: databases
    match: {tags: [database]}
    action: exclude
"""


@pytest.fixture(scope="module")
def lab(lab: Lab) -> Lab:
    lab.write_policy(POLICY)
    return lab


def ksmpolicy(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KSMPOLICY, "-p", str(lab.policy), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def verdicts(lab: Lab, name: str) -> dict[str, Any]:
    """What status, doctor and the metrics each say about one VM."""
    status = json.loads(ksmpolicy(lab, "status", "--json", "--sample", "0").stdout)
    findings = [f for f in status["findings"] if f["vm"] == name]
    vm = next(v for v in status["vms"] if v["name"] == name)
    doctor = json.loads(ksmpolicy(lab, "doctor", "--json").stdout)
    checks = [c for c in doctor["checks"] if c["subject"] == name]
    metrics = ksmpolicy(lab, "metrics").stdout.splitlines()
    compliant = [m for m in metrics if m.startswith("ksmpolicy_vm_compliant{") and name in m]
    residue = next(m for m in metrics if m.startswith("ksmpolicy_residue_vms "))
    return {
        "findings": findings,
        "compliant": vm["compliant"],
        "doctor": checks,
        "metric_compliant": [float(m.rsplit(" ", 1)[1]) for m in compliant],
        "metric_residue": float(residue.rsplit(" ", 1)[1]),
    }


def agree(found: dict[str, Any], code: str | None) -> dict[str, Any] | None:
    """Assert the three views agree on one VM: one finding of `code` (or none), the same
    line in doctor at the matching level, the same compliance in the metrics."""
    levels = {"error": "fail", "warning": "warn", "info": "info"}
    if code is None:
        assert found["findings"] == [], found
        assert [c["level"] for c in found["doctor"]] == ["ok"], found
        assert found["compliant"] is True and found["metric_compliant"] == [1.0], found
        return None
    (finding,) = found["findings"]
    assert finding["code"] == code, found
    (check,) = found["doctor"]
    assert (check["level"], check["what"], check["fix"]) == (
        levels[finding["severity"]],
        finding["message"],
        finding["fix"],
    ), found
    assert found["compliant"] is False and found["metric_compliant"] == [0.0], found
    assert found["metric_residue"] == (1.0 if code == "residue" else 0.0), found
    return dict(finding)


def run_fix(lab: Lab, finding: dict[str, Any]) -> str:
    """Run a fix's steps as printed; `virsh start` waits until its VM is off (the fix says
    'once it is off'). Returns what the steps printed."""
    assert finding["steps"], finding
    printed = ""
    for step in finding["steps"]:
        argv = shlex.split(step)
        if argv[0] == "ksmpolicy":
            # as printed, with the backups of definitions kept out of the host's /var/lib
            argv = [KSMPOLICY, "-p", str(lab.policy), *argv[1:], "--root", str(lab.workdir)]
        if argv[:2] == ["virsh", "start"]:
            domain = lab.conn.lookupByName(argv[2])

            def off(domain: Any = domain) -> bool:
                return not domain.isActive()

            assert wait_for(off, 60), "it did not power off"
        if argv[0] == "virsh":
            argv = ["virsh", "-c", "qemu:///system", *argv[1:]]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, (step, result.stdout, result.stderr)
        printed += result.stdout
    return printed


def test_a_running_database_vm_agrees_everywhere_until_its_restart(lab: Lab) -> None:
    """Excluded, started mergeable: an error with the live switch as its fix; after it, the
    residue of ROMs and video RAM, with a restart as its fix; after that, nothing."""
    name = lab.prefix + "db"
    lab.define("db", tags=("database",))  # no <nosharepages/>: the policy came later
    lab.start("db")
    lab.wait_ready("db")
    first = agree(verdicts(lab, name), "excluded-mergeable")
    assert first is not None
    printed = run_fix(lab, first)
    # apply says which running VM needs a restart, and how
    assert f"{name}: note: it runs with the setting it started with until it restarts" in printed
    assert f"virsh shutdown {name}, then virsh start {name} once it is off" in printed
    second = agree(verdicts(lab, name), "residue")
    assert second is not None and "virsh shutdown" in second["fix"]
    run_fix(lab, second)
    lab.wait_ready("db")
    agree(verdicts(lab, name), None)
    lab.stop("db")


def test_status_shows_what_the_hook_said_at_a_start(lab: Lab) -> None:
    """Under `warn` the hook exits 0, and libvirt then drops what it wrote to stderr: status
    shows it instead."""
    name = lab.prefix + "db2"
    lab.install_hook()
    try:
        lab.define("db2", tags=("database",))
        lab.start("db2")
        result = ksmpolicy(lab, "status", "--run-dir", str(lab.workdir / "run"), "--sample", "0")
        assert (
            f"ksmpolicy: \"{name}\" must not share memory (rule 'databases') but its definition "
            "lacks <memoryBacking><nosharepages/>." in result.stdout
        ), result.stdout
        shown = json.loads(
            ksmpolicy(lab, "status", "--json", "--run-dir", str(lab.workdir / "run")).stdout
        )
        (vm,) = [v for v in shown["vms"] if v["name"] == name]
        assert len(vm["hook_said"]) == 1 and "lacks <memoryBacking>" in vm["hook_said"][0]
    finally:
        lab.stop("db2")
        lab.uninstall_hook()


def test_a_vm_started_unmergeable_that_may_merge(lab: Lab) -> None:
    name = lab.prefix + "web"
    lab.define("web", nosharepages=True)
    lab.start("web")
    lab.wait_ready("web")
    finding = agree(verdicts(lab, name), "merge-off")
    assert finding is not None and finding["severity"] == "warning"
    assert "(QEMU started with mem-merge=off)" in finding["message"]
    run_fix(lab, finding)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and verdicts(lab, name)["findings"]:
        time.sleep(0.5)
    agree(verdicts(lab, name), None)
    lab.stop("web")
