"""The page map and the sharing map on the real kernel (root): guest-like processes with known
content, merged by the real ksmd, then measured page by page."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ksmpolicy.kernel.ksm import KsmState, read_ksm
from ksmpolicy.kernel.pagemap import PageMapReader, PageMapUnavailable
from ksmpolicy.paths import PAGE_SIZE, HostPaths
from ksmpolicy.report.sharing import Party, Sharing, measure
from ksmpolicy.report.status import collect
from lab.ksmd import converge as run_to_convergence
from lab.simguest import page_plan, spawn
from tests.conftest import AS_NOBODY, RealKsm

MIB = 32
IMAGE_PERCENT = 60.0
ZERO_PERCENT = 10.0
PAGES = MIB * 2**20 // PAGE_SIZE
IMAGE_PAGES, ZERO_PAGES, _ = page_plan(PAGES, IMAGE_PERCENT, ZERO_PERCENT)
# Two groups booting two images, and a VM of a third image in no group.
WORKLOAD = {"a-0": "alpha", "a-1": "alpha", "a-2": "alpha", "b-0": "beta", "b-1": "beta"}
WORKLOAD["lone"] = "gamma"
GROUP = {"alpha": "alpha", "beta": "beta", "gamma": None}


def start(real_ksm: RealKsm, workload: dict[str, str]) -> dict[str, int]:
    pids = {}
    for name, image in workload.items():
        guest = spawn(
            name, mib=MIB, image=image, image_percent=IMAGE_PERCENT, zero_percent=ZERO_PERCENT
        )
        pids[name] = real_ksm.track(guest).pid
    return pids


def converge(real_ksm: RealKsm, timeout: float = 90) -> None:
    """Run ksmd fast until its savings stop growing (exactly, for 3 s)."""
    run_to_convergence(real_ksm, timeout, noise_pages=0, steady_seconds=3)


def parties(pids: dict[str, int], workload: dict[str, str]) -> list[Party]:
    return [Party(pid, name, GROUP[workload[name]]) for name, pid in pids.items()]


def measure_workload(pids: dict[str, int]) -> tuple[Sharing, KsmState]:
    """The page map's sharing of the workload's guests, and the kernel's counters beside it."""
    state = read_ksm(HostPaths())
    assert state is not None
    sharing = measure(
        HostPaths(),
        parties(pids, WORKLOAD),
        zero_pages=zero_pages_of(pids),
        ksm_zero_pages=state.get("ksm_zero_pages"),
    )
    return sharing, state


def zero_pages_of(pids: dict[str, int]) -> dict[int, int]:
    from ksmpolicy.kernel.scan import read_ksm_stat

    found = {}
    for pid in pids.values():
        stat = read_ksm_stat(Path(f"/proc/{pid}/ksm_stat"))
        found[pid] = (stat.zero_pages or 0) if stat else 0
    return found


@pytest.fixture(params=[0, 1], ids=["use_zero_pages=0", "use_zero_pages=1"])
def merged(
    request: pytest.FixtureRequest, real_ksm: RealKsm
) -> Iterator[tuple[dict[str, int], int]]:
    real_ksm.write("use_zero_pages", request.param)
    pids = start(real_ksm, WORKLOAD)
    converge(real_ksm)
    yield pids, request.param


@pytest.mark.kernel
@pytest.mark.root
def test_exact_savings_add_up_to_the_kernels(merged: tuple[dict[str, int], int]) -> None:
    pids, _zero = merged
    sharing, state = measure_workload(pids)
    kernel = state.saved_pages * PAGE_SIZE
    ours = sum(vm.saved_bytes for vm in sharing.vms)
    assert kernel > 0
    assert abs(ours - kernel) <= 0.005 * kernel, (ours, kernel)
    # ksm_stat's profit over-counts: its per-process figures add up to more than the saving.
    from ksmpolicy.kernel.scan import read_ksm_stat

    stats = [read_ksm_stat(Path(f"/proc/{pid}/ksm_stat")) for pid in pids.values()]
    profits = sum(s.process_profit or 0 for s in stats if s is not None)
    assert profits > ours


@pytest.mark.kernel
@pytest.mark.root
def test_the_sharing_map_shows_what_the_workload_built(merged: tuple[dict[str, int], int]) -> None:
    pids, zero = merged
    sharing = measure(HostPaths(), parties(pids, WORKLOAD), zero_pages=zero_pages_of(pids))
    within = {(p.a, p.b): p for p in sharing.group_pairs}
    for group in ("alpha", "beta"):
        shared = within[(group, group)].shared_pages
        assert abs(shared - IMAGE_PAGES) <= 0.02 * IMAGE_PAGES, (group, shared, IMAGE_PAGES)
    for pair in sharing.group_pairs:
        if pair.a != pair.b:
            assert pair.shared_pages == 0, pair  # no content crosses a group
            if not zero:
                assert pair.zero_pages > 0  # zero pages merge across every group
    for pair in sharing.pairs:
        same = GROUP[WORKLOAD[pair.a]] == GROUP[WORKLOAD[pair.b]] is not None
        assert (pair.shared_pages > 0) == same, pair
    assert not [f for f in sharing.findings if "share" in f.message and f.vm is None]


@pytest.mark.kernel
@pytest.mark.root
def test_two_tenants_on_one_image_show_up_in_the_map(real_ksm: RealKsm) -> None:
    """The map can fail: two groups whose guests hold the same image share content."""
    workload = {"t1-a": "same", "t1-b": "same", "t2-a": "same", "t2-b": "same"}
    pids = start(real_ksm, workload)
    converge(real_ksm)
    labelled = [Party(pid, name, name.split("-")[0]) for name, pid in pids.items()]
    sharing = measure(HostPaths(), labelled)
    across = next(p for p in sharing.group_pairs if {p.a, p.b} == {"t1", "t2"})
    assert abs(across.shared_pages - IMAGE_PAGES) <= 0.02 * IMAGE_PAGES
    assert any("groups t1 and t2 share" in f.message for f in sharing.findings)
    tenants = [Party(p.pid, p.name, p.group, domain=p.group or "") for p in labelled]
    warned = measure(HostPaths(), tenants).findings
    assert any("across trust domains" in f.message for f in warned)


@pytest.mark.kernel
@pytest.mark.root
def test_a_vm_that_exits_mid_walk_is_left_out(real_ksm: RealKsm) -> None:
    pids = start(real_ksm, {"x-0": "x", "x-1": "x", "x-2": "x"})
    converge(real_ksm)
    leaving = real_ksm.processes[1]

    class Interrupted(PageMapReader):
        def _candidates(self, pid: int, ranges=None):  # type: ignore[no-untyped-def]
            if pid == pids["x-0"] and leaving.poll() is None:
                real_ksm.stop(leaving)  # it exits while the walk is under way
            return super()._candidates(pid, ranges)

    with Interrupted(HostPaths()) as reader:
        pagemap = reader.walk(list(pids.values()))
    assert pagemap.exited == [pids["x-1"]]
    assert set(pagemap.processes) == {pids["x-0"], pids["x-2"]}
    assert pagemap.saved_pages(pids["x-0"]) > 0


def test_a_kernel_without_kpageflags_gets_the_ksm_stat_fallback(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    with pytest.raises(PageMapUnavailable, match="kpageflags does not exist"):
        PageMapReader(HostPaths(tmp_path))
    (tmp_path / "sys/kernel/mm/ksm").mkdir(parents=True)
    (tmp_path / "sys/kernel/mm/ksm/run").write_text("1\n")
    status = collect(HostPaths(tmp_path), None, sample_seconds=0)
    assert status.sharing is None
    assert "kpageflags does not exist" in (status.savings_note or "")


@pytest.mark.kernel
@pytest.mark.root
def test_without_root_the_map_says_why_and_status_falls_back(
    real_ksm: RealKsm, tmp_path: Path
) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing")
    command = str(Path(sys.executable).with_name("ksmpolicy"))
    guest = subprocess.Popen(
        [*AS_NOBODY, sys.executable, "-c", "import time; time.sleep(60)"], cwd=tmp_path
    )
    real_ksm.processes.append(guest)  # type: ignore[arg-type]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}

    def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*AS_NOBODY, command, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,
            check=False,
        )

    pages = as_nobody("pages")
    assert pages.returncode == 1
    assert pages.stderr.splitlines() == [
        "ksmpolicy: error: the page map cannot be read: cannot read /proc/kpageflags: permission "
        "denied (run as root): per-VM savings come from ksm_stat"
    ]
    status = as_nobody("status", "--json", "--sample", "0")
    assert status.returncode == 0, status.stderr
    assert '"savings_note": "cannot read /proc/kpageflags: permission denied' in status.stdout


@pytest.mark.kernel
@pytest.mark.root
def test_the_commands_json_keeps_its_promised_keys(
    real_ksm: RealKsm, write_policy: Callable[..., Path]
) -> None:
    """`pages --json` and `status --json` as scripts read them (README, "For scripts")."""
    import json

    policy = write_policy(
        "version: 1\ngroups:\n  alpha: {names: ['a-*']}\n  beta: {names: ['b-*']}\n"
    )
    real_ksm.write("use_zero_pages", 1)
    pids = start(real_ksm, WORKLOAD)
    converge(real_ksm)
    command = str(Path(sys.executable).with_name("ksmpolicy"))

    def run(*args: str) -> dict[str, Any]:
        done = subprocess.run(
            [command, "-p", str(policy), *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        found: dict[str, Any] = json.loads(done.stdout)
        return found

    pages = run("pages", "--json")
    state = read_ksm(HostPaths())
    assert state is not None
    ours = {vm["name"]: vm for vm in pages["vms"] if vm["name"] in pids}
    assert set(ours) == set(pids)
    assert {ours[n]["group"] for n in ("a-0", "a-1", "a-2")} == {"alpha"}
    assert ours["lone"]["group"] is None
    total = sum(vm["saved_bytes"] for vm in pages["vms"])
    assert abs(total - state.saved_pages * PAGE_SIZE) <= 0.005 * state.saved_pages * PAGE_SIZE
    assert pages["pages_sharing"] == state.get("pages_sharing")
    pair = {(p["a"], p["b"]): p["shared_pages"] for p in pages["pairs"]}
    alike = pair.get(("a-0", "a-1"), pair.get(("a-1", "a-0"), 0))
    assert abs(alike - IMAGE_PAGES) <= 0.02 * IMAGE_PAGES  # the image both boot
    assert not any({p["a"], p["b"]} & {"lone"} for p in pages["pairs"] if p["shared_pages"])

    status = run("status", "--json", "--sample", "0")
    mine = [vm for vm in status["vms"] if vm["name"] in pids]
    assert {vm["savings_source"] for vm in mine} == {"pagemap"}
    by_name = {vm["name"]: vm["saved_bytes"] for vm in mine}
    for name, vm in ours.items():
        assert abs(by_name[name] - vm["saved_bytes"]) <= 0.01 * max(vm["saved_bytes"], PAGE_SIZE)
