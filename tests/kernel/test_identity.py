"""Every KSM user gets an identity the policy can match: QEMU, Firecracker (--id), Cloud
Hypervisor (--api-socket), crosvm, kata sandboxes, systemd services (from /proc/PID/cgroup),
plain processes; on fake /proc trees, and on real processes (root)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ksmpolicy.kernel.scan import ProcessScanner, systemd_unit
from ksmpolicy.kernel.vmm import vmm_identity
from ksmpolicy.paths import HostPaths
from ksmpolicy.policy.load import parse_policy
from ksmpolicy.report.status import collect
from lab.simguest import spawn
from tests.conftest import IS_ROOT
from tests.kernel.test_scan import SMAPS, write_process

MERGE_ANY = (
    "ksm_rmap_items 10\nksm_zero_pages 0\nksm_merging_pages 0\nksm_process_profit 0\n"
    "ksm_merge_any: yes\nksm_mergeable: yes\n"
)
POLICY = parse_policy(
    """version: 1
rules:
  - {name: no kata, match: {kinds: [kata]}, action: exclude}
  - {name: ci runners, match: {units: ["jenkins*.service"]}, action: exclude}
  - {name: microvms, match: {kinds: [firecracker, cloud-hypervisor]}, action: merge}
default: exclude
""",
    "p.yaml",
)


@pytest.mark.parametrize(
    ("argv", "identity"),
    [
        (
            ["/usr/bin/firecracker", "--id", "fc-7", "--api-sock", "/run/fc.sock"],
            ("firecracker", "fc-7"),
        ),
        (["firecracker", "--id=fc-8"], ("firecracker", "fc-8")),
        (["cloud-hypervisor", "--api-socket", "/run/ch/web-2.sock"], ("cloud-hypervisor", "web-2")),
        (
            ["cloud-hypervisor", "--api-socket", "path=/run/ch/db-1.sock"],
            ("cloud-hypervisor", "db-1"),
        ),
        (
            ["/opt/kata/bin/cloud-hypervisor", "--api-socket", "/run/vc/vm/4f2a9c/clh-api.sock"],
            ("kata", "kata-4f2a9c"),
        ),
        (["crosvm", "run", "--socket", "/run/crosvm/vm3.sock"], ("crosvm", "vm3")),
        (["/usr/bin/redis-server"], (None, None)),
    ],
)
def test_vmm_identities_from_command_lines(
    argv: list[str], identity: tuple[str | None, str | None]
) -> None:
    assert vmm_identity(Path(argv[0]).name, argv) == identity


@pytest.mark.parametrize(
    ("cgroup", "unit"),
    [
        ("0::/system.slice/jenkins.service\n", "jenkins.service"),
        ("12:pids:/\n1:name=systemd:/system.slice/nginx.service\n0::/\n", "nginx.service"),
        ("0::/user.slice/user-0.slice/session-3.scope\n", "session-3.scope"),
        (
            "0::/machine.slice/machine-qemu\\x2d1\\x2dweb.scope/libvirt/emulator\n",
            "machine-qemu\\x2d1\\x2dweb.scope",
        ),
        ("0::/\n", None),
        # A user's own units, though named like the system's:
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/postgresql.service\n", None),
        # A cgroup named with a newline forges a line: the hierarchy shows up twice.
        ("0::/user.slice/user-1000.slice/x\n0::/system.slice/postgresql.service\n", None),
        (
            "1:name=systemd:/user.slice/user-1000.slice/user@1000.service/x\n"
            "1:name=systemd:/system.slice/postgresql.service\n0::/\n",
            None,
        ),
    ],
)
def test_systemd_unit_from_cgroup(tmp_path: Path, cgroup: str, unit: str | None) -> None:
    (tmp_path / "cgroup").write_text(cgroup)
    assert systemd_unit(tmp_path) == unit


def test_each_ksm_user_gets_its_identity_and_its_decision(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    users = {
        201: (["/usr/bin/firecracker", "--id", "fc-7"], "firecracker"),
        202: (["cloud-hypervisor", "--api-socket", "/run/ch/web-2.sock"], "cloud-hyperviso"),
        203: (
            ["cloud-hypervisor", "--api-socket", "/run/vc/vm/4f2a9c/clh-api.sock"],
            "cloud-hyperviso",
        ),
        204: (["/usr/bin/java", "-jar", "agent.jar"], "java"),
        205: (["/usr/bin/python3", "job.py"], "python3"),
    }
    for pid, (argv, comm) in users.items():
        write_process(proc, pid, argv, comm, SMAPS, MERGE_ANY)
    (proc / "204/cgroup").write_text("0::/system.slice/jenkins-agent.service\n")
    ksm = tmp_path / "sys/kernel/mm/ksm"
    ksm.mkdir(parents=True)
    (ksm / "run").write_text("1\n")
    (proc / "meminfo").write_text("MemTotal: 1000 kB\nMemAvailable: 900 kB\n")
    paths = HostPaths(tmp_path)
    found = {p.pid: (p.kind, p.name, p.unit) for p in ProcessScanner(paths).scan()}
    assert found == {
        201: ("firecracker", "fc-7", None),
        202: ("cloud-hypervisor", "web-2", None),
        203: ("kata", "kata-4f2a9c", None),
        204: ("service", "jenkins-agent", "jenkins-agent.service"),
        205: ("process", "python3[205]", None),
    }
    status = collect(paths, POLICY, sample_seconds=0, pagemap=False)
    decided = {vm.name: (vm.decision, vm.rule) for vm in status.vms}
    assert decided == {
        "fc-7": ("merge", "microvms"),
        "web-2": ("merge", "microvms"),
        "kata-4f2a9c": ("exclude", "no kata"),
        "jenkins-agent": ("exclude", "ci runners"),
        "python3[205]": ("exclude", None),
    }
    # an excluded process stays mergeable until it restarts: status says so, with the way out
    findings = {f.vm: f for f in status.findings}
    assert "only the process itself can switch that off" in findings["jenkins-agent"].message
    assert findings["jenkins-agent"].fix == (
        "ksmpolicy systemd-dropin jenkins-agent.service (MemoryKSM=no), then restart it"
    )
    assert "ksmpolicy exec" in str(findings["kata-4f2a9c"].fix)


@contextlib.contextmanager
def transient_unit(name: str) -> Iterator[Path]:
    """A cgroup that looks like a systemd unit's (no systemd runs here as PID 1)."""
    base = Path("/sys/fs/cgroup/systemd")  # cgroup v1's name=systemd hierarchy
    if not (base / "cgroup.procs").exists():
        base = Path("/sys/fs/cgroup")  # the unified hierarchy (cgroup v2)
    group = base / "ksmpolicy-test.slice" / name
    group.mkdir(parents=True, exist_ok=True)
    try:
        yield group
    finally:
        for directory in (group, group.parent):
            for _ in range(50):
                with contextlib.suppress(OSError):
                    directory.rmdir()
                    break
                time.sleep(0.1)


@pytest.mark.root
def test_real_processes_shaped_like_vmms_and_a_service(tmp_path: Path) -> None:
    if not IS_ROOT:
        pytest.skip("needs root to create a cgroup (CI runs as root)")
    # comm as the real binaries would have it (simguest names itself qemu-system-x86 else)
    fc = spawn(
        "fc", mib=16, binary="firecracker", extra_args=("--id", "fc-real", "--comm=firecracker")
    )
    ch = spawn(
        "ch",
        mib=16,
        binary="cloud-hypervisor",
        extra_args=("--api-socket", "/run/ch/ch-real.sock", "--comm=cloud-hyperviso"),
    )
    service = None
    try:
        with transient_unit("demo-agent.service") as group:
            service = spawn("svc", mib=16, binary="demo-agent", extra_args=("--comm=demo-agent",))
            (group / "cgroup.procs").write_text(f"{service.pid}\n")
            scanner = ProcessScanner(HostPaths())
            found = {p.pid: (p.kind, p.name, p.unit) for p in scanner.scan()}
            assert found[fc.pid][:2] == ("firecracker", "fc-real")
            assert found[ch.pid][:2] == ("cloud-hypervisor", "ch-real")
            assert found[service.pid] == ("service", "demo-agent", "demo-agent.service")
            policy = parse_policy(
                "version: 1\nrules:\n  - {name: agents, match: {units: ['demo-*.service']}, "
                "action: exclude}\n",
                "p.yaml",
            )
            status = collect(HostPaths(), policy, sample_seconds=0, pagemap=False)
            decided = {vm.pid: vm.decision for vm in status.vms}
            assert decided[service.pid] == "exclude"
            assert decided[fc.pid] == decided[ch.pid] == "merge"
            service.terminate()
            service.wait()
    finally:
        for process in (fc, ch, service):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait()
