"""`ksmpolicy doctor` and the daemon beside other controllers: fake host trees for kernels
and files, the real ksmtuned script (Debian's package, unpacked) on the real kernel."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.ksm_bench import fetch_ksmtuned
from ksmpolicy.paths import HostPaths
from ksmpolicy.policy.load import parse_policy
from ksmpolicy.report.doctor import diagnose
from lab.simguest import spawn
from tests.conftest import RealKsm
from tests.control.test_daemon import KSMPOLICY, DaemonProcess, wait_for
from tests.fakehost import FakeHost

POLICY = parse_policy("version: 1\n", "p.yaml")


def fake(root: Path, knobs: dict[str, str]) -> HostPaths:
    return FakeHost(root).ksm(**knobs).kernel("5.15.0-old").meminfo().paths


def levels(paths: HostPaths, policy: object = POLICY) -> dict[str, str]:
    file = paths.root / "policy.yaml"  # what the policy was loaded from: its trust is checked
    file.write_text("version: 1\n")
    found = diagnose(paths, policy, str(file), None)  # type: ignore[arg-type]
    return {c.what: c.level for c in found.checks if c.subject == "host"}


def test_an_old_kernel_says_what_it_lacks(tmp_path: Path) -> None:
    paths = fake(tmp_path, {"run": "1", "pages_to_scan": "100", "use_zero_pages": "0"})
    found = levels(paths)
    lacks = [w for w in found if w.startswith("this kernel lacks")]
    assert len(lacks) == 1, found
    for feature in ("prctl PR_SET_MEMORY_MERGE (6.4)", "smart_scan (6.7)", "advisor (6.8)"):
        assert feature in lacks[0]
    assert "use_zero_pages" not in lacks[0]
    assert found["KSM in kernel 5.15.0-old; has use_zero_pages (4.x)"] == "ok"


def test_a_kernel_without_ksm_fails(tmp_path: Path) -> None:
    paths = fake(tmp_path, {})
    (paths.ksm_dir).rmdir()
    found = diagnose(paths, POLICY, "/etc/ksmpolicy/policy.yaml", None)
    assert found.failed
    assert any("has no KSM" in c.what and c.level == "fail" for c in found.checks)


def test_boot_time_controllers_and_thp_always_are_warnings(tmp_path: Path) -> None:
    paths = fake(tmp_path, {"run": "0", "advisor_mode": "[none] scan-time"})
    (tmp_path / "etc/default").mkdir(parents=True)
    (tmp_path / "etc/default/qemu-kvm").write_text("# Ubuntu\nKSM_ENABLED=1\nSLEEP_MILLISECS=200\n")
    (tmp_path / "lib/systemd/system").mkdir(parents=True)
    (tmp_path / "lib/systemd/system/qemu-kvm.service").write_text("[Service]\n")
    wants = tmp_path / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "ksmtuned.service").symlink_to("/lib/systemd/system/ksmtuned.service")
    (wants / "ksm.service").symlink_to("/lib/systemd/system/ksm.service")
    thp = tmp_path / "sys/kernel/mm/transparent_hugepage"
    thp.mkdir(parents=True)
    (thp / "enabled").write_text("[always] madvise never\n")
    found = levels(paths)
    warned = {w for w, level in found.items() if level == "warn"}
    assert any(w.startswith("qemu-kvm.service: KSM_ENABLED=1") for w in warned), found
    assert any(w.startswith("ksmtuned: enabled") for w in warned), found
    assert any(w.startswith("ksm.service: enabled") for w in warned), found
    assert any(w.startswith("transparent hugepages: enabled=always") for w in warned), found
    # KSM_ENABLED=0 is no controller
    (tmp_path / "etc/default/qemu-kvm").write_text("KSM_ENABLED=0\n")
    assert not any(w.startswith("qemu-kvm.service") for w in levels(paths))


def test_an_advisor_left_on_is_a_running_controller_unless_the_policy_wants_it(
    tmp_path: Path,
) -> None:
    paths = fake(tmp_path, {"run": "1", "advisor_mode": "none [scan-time]"})
    assert any(
        w.startswith("kernel advisor") and level == "fail" for w, level in levels(paths).items()
    )
    wants = parse_policy("version: 1\nreconciler: {kernel_advisor: true}\n", "p.yaml")
    assert not any(w.startswith("kernel advisor") for w in levels(paths, wants))


def test_the_builtin_default_and_no_daemon_are_reported_with_fixes(tmp_path: Path) -> None:
    from ksmpolicy.policy.load import builtin_policy

    paths = fake(tmp_path, {"run": "0"})
    found = diagnose(paths, builtin_policy(), "/etc/ksmpolicy/policy.yaml", None)
    by_level = {(c.level, c.what.split(":")[0]): c.fix for c in found.checks}
    assert ("warn", "policy") in by_level
    assert "--print-default" in str(by_level["warn", "policy"])
    assert by_level["fail", "the ksmpolicy daemon is not running"] == (
        "systemctl enable --now ksmpolicy"
    )
    assert found.failed


def test_a_hook_whose_installation_moved_is_a_fail_with_the_fix(tmp_path: Path) -> None:
    import sys

    from ksmpolicy.libvirt.install import install

    paths = fake(tmp_path, {"run": "0"})
    (tmp_path / "etc/libvirt").mkdir(parents=True)
    python = str(tmp_path / "usr/bin/python3")  # the interpreter the hook names: it exists
    Path(python).parent.mkdir(parents=True)
    Path(python).symlink_to(sys.executable)
    moved = tmp_path / "opt/old-venv/site-packages"  # ksmpolicy is no longer there
    install(paths, python="/usr/bin/python3", import_paths=["/opt/old-venv/site-packages"])

    def hook_check() -> tuple[str, str | None]:
        found = diagnose(paths, POLICY, str(paths.root / "p.yaml"), None)
        (check,) = [
            c for c in found.checks if "hook" in c.what and "libvirt" in c.what + str(c.fix)
        ]
        return check.level, check.fix

    level, fix = hook_check()
    assert level == "fail"
    assert fix == "ksmpolicy install libvirt (writes where this installation is)"
    (moved / "ksmpolicy").mkdir(parents=True)
    (moved / "ksmpolicy/hook.py").write_text("")
    assert hook_check()[0] == "ok"
    moved.chmod(0o777)  # anyone could now put code there that libvirt runs as root
    level, fix = hook_check()
    assert level == "fail"
    assert str(fix).startswith("install ksmpolicy where only root can write")


# --- the real ksmtuned ---------------------------------------------------------------------


@pytest.fixture
def ksmtuned(tmp_path: Path) -> Iterator[Callable[[], int]]:
    """Starts Debian's real ksmtuned script (its loop sleeps 600 s before it first touches a
    knob); returns the PID of its loop. Ended by process group afterwards."""
    groups: list[int] = []

    def start() -> int:
        conf = tmp_path / "ksmtuned.conf"
        conf.write_text(f"KSM_MONITOR_INTERVAL=600\nPIDFILE={tmp_path / 'ksmtuned.pid'}\n")
        script = tmp_path / "ksmtuned"
        script.write_text(
            fetch_ksmtuned(tmp_path).read_text().replace("/etc/ksmtuned.conf", str(conf))
        )
        script.chmod(0o755)
        first = subprocess.Popen([str(script)], start_new_session=True)
        groups.append(first.pid)
        first.wait()  # it forks its loop and exits
        assert wait_for((tmp_path / "ksmtuned.pid").exists, 10)
        return int((tmp_path / "ksmtuned.pid").read_text())

    yield start
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)


def doctor_json(run_dir: Path, policy: Path) -> dict[str, object]:
    result = subprocess.run(
        [KSMPOLICY, "-p", str(policy), "doctor", "--json", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return dict(json.loads(result.stdout))


def beside_ksmtuned(
    real_ksm: RealKsm, ksmtuned: Callable[[], int], tmp_path: Path
) -> tuple[Path, int]:
    """KSM stopped, a guest with mergeable memory (the daemon would start KSM for it), and
    the real ksmtuned running: (the policy, ksmtuned's PID)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nreconciler: {interval_seconds: 1}\n")
    policy.chmod(0o644)
    real_ksm.write("run", 0)
    real_ksm.track(spawn("doctor-guest", mib=64))
    pid = ksmtuned()
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "ksmtuned"
    return policy, pid


@pytest.mark.root
@pytest.mark.kernel
def test_the_daemon_stays_passive_beside_ksmtuned_and_doctor_says_so(
    real_ksm: RealKsm, ksmtuned: Callable[[], int], tmp_path: Path
) -> None:
    policy, pid = beside_ksmtuned(real_ksm, ksmtuned, tmp_path)
    daemon = DaemonProcess(policy, tmp_path / "run")
    try:
        assert wait_for(lambda: "passive:" in daemon.output(), 15), daemon.output()
        assert f"ksmtuned (pid {pid})" in daemon.output()
        time.sleep(3)
        assert real_ksm.read("run") == 0, "a passive daemon wrote the knobs"
        found = doctor_json(tmp_path / "run", policy)
        fails = [c for c in found["checks"] if c["level"] == "fail"]  # type: ignore[attr-defined]
        assert any(f"ksmtuned (pid {pid}) also sets the KSM knobs" in c["what"] for c in fails)
        assert found["ok"] is False
        os.kill(pid, signal.SIGTERM)  # ksmtuned goes: the daemon takes the knobs
        assert wait_for(lambda: real_ksm.read("run") == 1, 15), daemon.output()
        assert "no other controller of the KSM knobs now" in daemon.output()
    finally:
        daemon.stop()


@pytest.mark.root
@pytest.mark.kernel
def test_take_over_stops_ksmtuned(
    real_ksm: RealKsm, ksmtuned: Callable[[], int], tmp_path: Path
) -> None:
    policy, pid = beside_ksmtuned(real_ksm, ksmtuned, tmp_path)
    daemon = DaemonProcess(policy, tmp_path / "run", "--take-over")
    try:
        assert wait_for(lambda: not Path(f"/proc/{pid}").exists(), 15), daemon.output()
        assert f"--take-over: ksmtuned (pid {pid})" in daemon.output()
        assert wait_for(lambda: real_ksm.read("run") == 1, 15), daemon.output()
    finally:
        daemon.stop()


# --- each VM: why it is or is not merging ---------------------------------------------------

GIB = 2**30


def ram_vma(
    perms: str = "rw-p",
    flags: str = "rd wr mr mw me ac sd mg",
    path: str = "",
    size: int = 2 * GIB,
    rss_kib: int = 200_000,
) -> bytes:
    start = 0x7F0000000000
    return (
        f"{start:x}-{start + size:x} {perms} 00000000 00:00 0    {path}\n"
        f"Size: {size >> 10} kB\nRss: {rss_kib} kB\nVmFlags: {flags}\n"
    ).encode()


QEMU = ["/usr/bin/kvm", "-id", "101", "-name", "vm-1", "-m", "2048", "-machine", "type=pc"]
STAT_MERGING = (
    "ksm_rmap_items 100\nksm_zero_pages 0\nksm_merging_pages 5000\nksm_process_profit 1\n"
    "ksm_merge_any: no\nksm_mergeable: yes\n"
)
STAT_IDLE = STAT_MERGING.replace("ksm_merging_pages 5000", "ksm_merging_pages 0")


@pytest.mark.parametrize(
    ("case", "argv", "smaps", "run", "level", "says"),
    [
        ("merging", QEMU, ram_vma(), 1, "ok", "merging: 19 MiB"),
        ("idle", QEMU, ram_vma(), 1, "ok", "nothing merged yet"),
        ("stopped", QEMU, ram_vma(), 0, "ok", "nothing merged yet"),  # the host's finding
        ("hugepages", QEMU, ram_vma(flags="rd wr mr mw me ac sd ht"), 1, "info", "hugepage"),
        (
            "memfd shared",
            QEMU,
            ram_vma(perms="rw-s", flags="rd wr sh mr mw me ms sd", path="/memfd:pc.ram (deleted)"),
            1,
            "info",
            "shared memory",
        ),
        (
            "confidential",
            [*QEMU[:-1], "type=pc,confidential-guest-support=sev0"],
            ram_vma(flags="rd wr mr mw me ac sd"),
            1,
            "info",
            "confidential",
        ),
        (
            "mem-merge=off",
            [*QEMU[:-1], "type=pc,mem-merge=off"],
            ram_vma(flags="rd wr mr mw me ac sd"),
            1,
            "warn",
            "(QEMU started with mem-merge=off)",
        ),
        (
            "RAM not mergeable",
            QEMU,
            ram_vma(flags="rd wr mr mw me ac sd"),
            1,
            "warn",
            "its guest RAM is not mergeable",
        ),
        (
            "sparse",
            [*QEMU[:5], "-m", "65536", *QEMU[7:]],
            ram_vma(size=64 * GIB, rss_kib=100_000),
            1,
            "warn",
            "mergeable areas of 64 GiB with 97 MiB resident",
        ),
    ],
)
def test_why_a_vm_merges_or_not(
    tmp_path: Path, case: str, argv: list[str], smaps: bytes, run: int, level: str, says: str
) -> None:
    from tests.kernel.test_scan import write_process

    paths = fake(tmp_path, {"run": str(run), "pages_to_scan": "100"})
    stat = STAT_MERGING if case == "merging" else STAT_IDLE
    write_process(paths.proc, 4242, argv, "kvm", smaps, stat)
    found = diagnose(paths, POLICY, str(tmp_path / "policy.yaml"), None)
    vm = [c for c in found.checks if c.subject == "vm-1"]
    assert len(vm) == 1, found.checks
    assert (vm[0].level, says in vm[0].what) == (level, True), vm[0]
    assert vm[0].level == "ok" or vm[0].fix
    # a stopped ksmd is the host's finding, said once (as status says it), and fails doctor
    stopped = [c for c in found.checks if c.subject == "host" and "KSM is stopped" in c.what]
    assert [c.level for c in stopped] == (["fail"] if run == 0 else [])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (  # libvirt's guest (it has libvirt's status file): the name, quoted for a shell
            ["/usr/bin/qemu-system-x86_64", "-name", "guest=db-$(touch PWNED),debug-threads=on"],
            "ksmpolicy enforce --live --domain 'db-$(touch PWNED)'; and for its next start: "
            "ksmpolicy apply --domain 'db-$(touch PWNED)'",
        ),
        (QEMU[:5], "ksmpolicy apply --proxmox --vmid 101, then qm reboot 101"),  # Proxmox's
    ],
)
def test_a_fix_names_the_vm_safely(tmp_path: Path, argv: list[str], expected: str) -> None:
    from tests.kernel.test_scan import write_process

    paths = fake(tmp_path, {"run": "1", "pages_to_scan": "100"})
    argv = [*argv, "-m", "2048", "-machine", "type=pc,mem-merge=off"]
    write_process(paths.proc, 4242, argv, "kvm", ram_vma(flags="rd wr mr mw me ac sd"), STAT_IDLE)
    if "-name" in argv:  # libvirt runs it: its status file names the same domain
        paths.libvirt_run.mkdir(parents=True)
        status = "<domstatus><domain type='kvm'><name>db-$(touch PWNED)</name></domain></domstatus>"
        (paths.libvirt_run / "db-$(touch PWNED).xml").write_text(status)
    found = diagnose(paths, POLICY, str(tmp_path / "policy.yaml"), None)
    (vm,) = [c for c in found.checks if c.subject != "host"]
    assert vm.level == "warn"  # merging the policy allows is lost: no safety problem
    assert vm.fix == expected, vm
