"""The estimate on the real kernel (root): predicted before ksmd runs, then compared with what
ksmd really saves, measured page by page."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ksmpolicy.kernel.ksm import read_ksm
from ksmpolicy.paths import PAGE_SIZE, HostPaths
from ksmpolicy.policy.load import parse_policy
from ksmpolicy.report.estimate import Guest, estimate
from ksmpolicy.report.render import yaml_snippet
from lab.simguest import spawn
from tests.conftest import RealKsm
from tests.report.test_sharing import (
    GROUP,
    WORKLOAD,
    converge,
    measure_workload,
    start,
)

pytestmark = [pytest.mark.kernel, pytest.mark.root]


@pytest.mark.parametrize("zero", [0, 1], ids=["use_zero_pages=0", "use_zero_pages=1"])
def test_the_estimate_predicts_what_ksmd_then_saves(real_ksm: RealKsm, zero: int) -> None:
    real_ksm.write("use_zero_pages", zero)
    pids = start(real_ksm, WORKLOAD)
    before = read_ksm(HostPaths())
    guests = [Guest(pid, name, GROUP[WORKLOAD[name]], True) for name, pid in pids.items()]
    predicted = estimate(
        HostPaths(),
        guests,
        interval=1.0,
        max_page_sharing=int(real_ksm.read("max_page_sharing")),
        use_zero_pages=bool(zero),
    )
    after = read_ksm(HostPaths())
    assert before is not None and after is not None
    assert after.values == before.values  # it ran no ksmd and wrote no knob
    converge(real_ksm)
    measured, _state = measure_workload(pids)
    real = {vm.name: vm.saved_bytes for vm in measured.vms}
    for vm in predicted.vms:
        assert abs(vm.predicted_saved_bytes - real[vm.name]) <= 0.05 * real[vm.name], (
            vm.name,
            vm.predicted_saved_bytes,
            real[vm.name],
        )
    total = sum(real.values())
    assert abs(predicted.predicted_saved_bytes - total) <= 0.05 * total
    assert predicted.read_bytes >= len(pids) * 32 * 2**20  # every present page, twice for some


def test_suggested_groups_recover_the_images(real_ksm: RealKsm) -> None:
    workload = {f"{image}-{i}": image for image in ("deb", "rhel", "win") for i in range(3)}
    pids = start(real_ksm, workload)
    guests = [Guest(pid, name, None, True) for name, pid in pids.items()]
    found = estimate(HostPaths(), guests, interval=0.5)
    assert {s.vms for s in found.suggested} == {
        tuple(f"{image}-{i}" for i in range(3)) for image in ("deb", "rhel", "win")
    }
    assert {s.name for s in found.suggested} == {"deb", "rhel", "win"}
    policy = parse_policy("version: 1\n" + yaml_snippet(found.suggested))  # check accepts it
    assert len(policy.groups) == 3


def test_suggestions_leave_excluded_vms_out_and_extend_existing_groups(
    real_ksm: RealKsm,
) -> None:
    """Three images: deb-0/1 already in the policy's group `debian` with deb-2 ungrouped;
    rhel-0/1/2 ungrouped, rhel-2 excluded; win-0/1 in two different groups. Suggested: deb-2
    joins `debian`, a new group of rhel-0 and rhel-1 (not the excluded rhel-2), nothing for
    the win VMs (already grouped, by the operator's choice)."""
    workload = {f"deb-{i}": "deb" for i in range(3)}
    workload |= {f"rhel-{i}": "rhel" for i in range(3)}
    workload |= {f"win-{i}": "win" for i in range(2)}
    pids = start(real_ksm, workload)
    group = {"deb-0": "debian", "deb-1": "debian", "win-0": "w1", "win-1": "w2"}
    guests = [Guest(pid, name, group.get(name), name != "rhel-2") for name, pid in pids.items()]
    found = estimate(HostPaths(), guests, interval=0.5)
    got = {(s.name, s.vms, s.extends) for s in found.suggested}
    assert got == {("debian", ("deb-2",), True), ("rhel", ("rhel-0", "rhel-1"), False)}, got
    snippet = yaml_snippet(found.suggested)
    assert '# add to your group debian\'s names: "deb-2"' in snippet
    policy = parse_policy("version: 1\n" + snippet)  # check accepts it
    assert [g.name for g in policy.groups] == ["rhel"]


def test_what_merging_an_excluded_vm_would_save(real_ksm: RealKsm) -> None:
    pids = start(real_ksm, {"web-0": "web", "web-1": "web", "db-1": "web"})
    guests = [
        Guest(pids["web-0"], "web-0", "web", True),
        Guest(pids["web-1"], "web-1", "web", True),
        Guest(pids["db-1"], "db-1", None, False),  # the policy excludes it today
    ]
    found = estimate(HostPaths(), guests, interval=0.5)
    db = next(v for v in found.vms if v.name == "db-1")
    assert db.predicted_saved_bytes == 0
    image, zero = int(32 * 2**20 * 0.6), int(32 * 2**20 * 0.1)
    # Its image pages join the group's, and its zero pages the pool of zero pages.
    assert abs(db.if_merged_saved_bytes - (image + zero)) <= 0.02 * (image + zero)
    assert db.shares_with[0][0] == "web" and db.shares_with[0][1] >= image * 0.98


def test_pages_that_change_are_left_out(real_ksm: RealKsm) -> None:
    """ksmd never merges a page that changes between its scans: neither does the estimate."""
    image_pages = int(16 * 2**20 * 0.6 / PAGE_SIZE)
    quiet = [
        real_ksm.track(spawn(f"quiet-{i}", mib=16, image="same", zero_percent=0)) for i in range(2)
    ]
    guests = [Guest(g.pid, f"quiet-{i}", None, True) for i, g in enumerate(quiet)]
    calm = estimate(HostPaths(), guests, interval=1.0)
    assert {v.volatile_pages for v in calm.vms} == {0}
    assert (
        abs(calm.predicted_saved_bytes - image_pages * PAGE_SIZE) <= 0.01 * image_pages * PAGE_SIZE
    )
    busy = real_ksm.track(
        spawn(
            "busy",
            mib=16,
            image="same",
            zero_percent=0,
            churn_pages_per_second=3000,
            churn_region="image",
        )
    )
    guests.append(Guest(busy.pid, "busy", None, True))
    found = estimate(HostPaths(), guests, interval=1.0)
    volatile = {v.name: v.volatile_pages for v in found.vms}
    assert volatile["busy"] > image_pages // 4  # its image pages were rewritten meanwhile
    assert volatile["quiet-0"] == volatile["quiet-1"] == 0
    busy_estimate = next(v for v in found.vms if v.name == "busy")
    stable = image_pages - volatile["busy"]
    # Its stable image pages join the quiet pair's; the rewritten ones count for nothing.
    assert busy_estimate.predicted_saved_bytes <= (stable * 2 / 3 + 8) * PAGE_SIZE


def test_the_command_prints_json_and_text(real_ksm: RealKsm, tmp_path: Path) -> None:
    pids = start(real_ksm, {"a-0": "alpha", "a-1": "alpha"})
    assert pids
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\ngroups:\n  alpha: {names: ['a-*']}\n")
    policy.chmod(0o644)
    exe = str(Path(sys.executable).with_name("ksmpolicy"))
    result = subprocess.run(
        [
            exe,
            "-p",
            str(policy),
            "estimate",
            "--json",
            "--interval",
            "0.2",
            "--vm",
            "a-0",
            "--vm",
            "a-1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"vms", "predicted_saved_bytes", "suggested_groups", "suggested_yaml"} <= set(data)
    assert {v["name"] for v in data["vms"]} == {"a-0", "a-1"}
    assert all({"name", "predicted_saved_bytes"} <= set(v) for v in data["vms"])
    text = subprocess.run(
        [exe, "-p", str(policy), "estimate", "--interval", "0.2", "--limit-mib", "200"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert text.returncode == 0, text.stderr
    assert "Predicted saving:" in text.stdout and "alpha" in text.stdout
