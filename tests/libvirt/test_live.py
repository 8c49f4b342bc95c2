"""The libvirt side end to end: a real libvirtd, real QEMU guests (TCG), real ksmd.

Needs root (CI runs as root). The module starts libvirtd if none runs and stops it after,
installs its own hook (qemu.d/ksmpolicy-test) and removes it, and undefines its guests.
The tests run in order and share the guests: booting one takes ~15 s under TCG.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ksmpolicy.libvirt.domain import domain_facts
from ksmpolicy.libvirt.host import live_merge
from ksmpolicy.paths import HostPaths
from lab.libvirtd import PREFIX, Lab, wait_for
from tests.conftest import RealKsm

pytestmark = [pytest.mark.root, pytest.mark.kernel]
KSMPOLICY = str(Path(sys.executable).parent / "ksmpolicy")

POLICY = """\
version: 1
enforcement: {mode}
live: true
rules:
  - name: databases
    match: {{tags: [database]}}
    action: exclude
{extra}"""


def policy(mode: str = "block", extra: str = "") -> str:
    return POLICY.format(mode=mode, extra=extra)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KSMPOLICY, *args], capture_output=True, text=True, timeout=120, check=False
    )


def start_daemon(lab: Lab, real_ksm: RealKsm, tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    """The daemon on the lab's policy and libvirt, its log in tmp_path (stopped with the
    test's other processes)."""
    log_path = tmp_path / "daemon.log"
    with log_path.open("w") as log:
        daemon = real_ksm.track(
            subprocess.Popen(
                [
                    KSMPOLICY,
                    "-p",
                    str(lab.policy),
                    "daemon",
                    "-c",
                    "qemu:///system",
                    "--restore-on-exit",
                    "--run-dir",
                    str(tmp_path / "run"),
                    "--state-dir",
                    str(tmp_path / "state"),
                ],
                stderr=log,
                text=True,
            )
        )
    return daemon, log_path


@contextlib.contextmanager
def syslog_sink() -> Iterator[socket.socket | None]:
    """Receive what is sent to syslog, when no syslog daemon owns /dev/log (as in CI)."""
    if os.path.exists("/dev/log"):  # noqa: PTH110 - a real syslog: leave it alone
        yield None
        return
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind("/dev/log")
    sink.settimeout(5)
    try:
        yield sink
    finally:
        sink.close()
        os.unlink("/dev/log")  # noqa: PTH108


ESTIMATE_RESULTS: dict[str, object] = {}


def test_the_estimate_of_two_guests_from_one_image(lab: Lab, real_ksm: RealKsm) -> None:
    """Predicted before ksmd runs, then compared with what it saves (within 10 %). First in
    the module: no other guest runs yet to share their pages."""
    from ksmpolicy.report.estimate import Guest, estimate
    from ksmpolicy.report.sharing import Party, measure

    real_ksm.write("run", 0)
    for name in ("est-1", "est-2"):
        lab.define(name)
        lab.start(name)
    for name in ("est-1", "est-2"):
        lab.wait_ready(name)
    time.sleep(3)  # the guests settle after printing "ready"
    guests = [Guest(lab.pid(n), n, "est", True, 256 * 2**20) for n in ("est-1", "est-2")]
    predicted = estimate(
        HostPaths(),
        guests,
        interval=3.0,
        max_page_sharing=int(real_ksm.read("max_page_sharing")),
        use_zero_pages=bool(real_ksm.read("use_zero_pages")),
    )
    real_ksm.write("pages_to_scan", 5000)
    real_ksm.write("sleep_millisecs", 10)
    real_ksm.write("run", 1)
    last, steady = -1, 0
    for _ in range(120):
        time.sleep(1)
        now = sum(lab.merging(n) for n in ("est-1", "est-2"))
        steady = steady + 1 if abs(now - last) <= 16 and now else 0
        last = now
        if steady >= 5:
            break
    real_ksm.write("run", 0)
    zeros = {g.pid: int(lab.ksm_stat(g.name)["ksm_zero_pages"]) for g in guests}
    measured = measure(HostPaths(), [Party(g.pid, g.name, "est") for g in guests], zero_pages=zeros)
    real = {vm.name: vm.saved_bytes for vm in measured.vms}
    for vm in predicted.vms:
        ESTIMATE_RESULTS[vm.name] = (vm.predicted_saved_bytes, real[vm.name])
        assert abs(vm.predicted_saved_bytes - real[vm.name]) <= 0.10 * real[vm.name], (
            vm.name,
            vm.predicted_saved_bytes,
            real[vm.name],
        )
    total = sum(real.values())
    assert abs(predicted.predicted_saved_bytes - total) <= 0.10 * total
    print(f"TCG estimate: predicted {predicted.predicted_saved_bytes}, measured {total}")
    for name in ("est-1", "est-2"):
        lab.stop(name)


def test_block_refuses_to_start_a_database_without_nosharepages(lab: Lab) -> None:
    lab.write_policy(policy("block"))
    lab.define("db", tags=("database",))
    lab.install_hook()
    with pytest.raises(lab.libvirt.libvirtError) as info:
        lab.start("db")
    message = str(info.value)
    assert f"ksmpolicy: \"{PREFIX}db\" must not share memory (rule 'databases')" in message
    assert f"Fix: ksmpolicy apply --domain {PREFIX}db" in message
    assert not lab.domain("db").isActive()


def test_warn_starts_it_and_logs_the_warning(lab: Lab) -> None:
    lab.write_policy(policy("warn"))
    with syslog_sink() as sink:
        lab.start("db")
        if sink is not None:
            logged = sink.recv(4096).decode()
            assert "ksmpolicy-hook" in logged
            assert f'"{PREFIX}db" must not share memory' in logged
    assert lab.domain("db").isActive()
    assert "mem-merge=off" not in lab.cmdline("db")
    lab.stop("db")


def test_apply_makes_qemu_run_with_mem_merge_off(lab: Lab, tmp_path: Path) -> None:
    lab.write_policy(policy("block"))
    result = cli(
        "-p",
        str(lab.policy),
        "apply",
        "-c",
        "qemu:///system",
        "-d",
        f"{PREFIX}db",
        "--root",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert f"{PREFIX}db: changed" in result.stdout
    lab.start("db")  # block mode: the hook now lets it start
    assert "mem-merge=off" in lab.cmdline("db")
    assert lab.ksm_stat("db")["ksm_mergeable"] == "no"
    assert len(list((tmp_path / "var/lib/ksmpolicy/backups").iterdir())) == 1


def test_identical_guests_merge_and_the_excluded_one_does_not(lab: Lab, real_ksm: RealKsm) -> None:
    lab.define("web-1")
    lab.define("web-2")
    lab.start("web-1")
    lab.start("web-2")
    lab.wait_ready("web-1")
    lab.wait_ready("web-2")
    lab.wait_ready("db")
    real_ksm.write("pages_to_scan", 5000)
    real_ksm.write("sleep_millisecs", 10)
    real_ksm.write("run", 1)
    image_pages = 48 * 256  # the initramfs image, the same in both guests
    merged = wait_for(
        lambda: (
            lab.merging("web-1") > image_pages * 0.8 and lab.merging("web-2") > image_pages * 0.8
        ),
        90,
        step=1,
    )
    assert merged, (lab.merging("web-1"), lab.merging("web-2"))
    assert lab.merging("db") == 0
    assert lab.ksm_stat("db")["ksm_mergeable"] == "no"


def test_live_toggle_unmerges_a_running_guest_and_merges_it_again(
    lab: Lab, real_ksm: RealKsm, tmp_path: Path
) -> None:
    real_ksm.write("pages_to_scan", 5000)
    real_ksm.write("sleep_millisecs", 10)
    real_ksm.write("run", 1)
    assert wait_for(lambda: lab.merging("web-1") > 48 * 256 * 0.8, 60, step=1)
    before = lab.merging("web-1")
    lab.write_policy(
        policy("warn", "  - name: web-1 off\n    match: {names: ['*web-1']}\n    action: exclude\n")
    )
    result = cli(
        "-p",
        str(lab.policy),
        "enforce",
        "--live",
        "-c",
        "qemu:///system",
        "-d",
        f"{PREFIX}web-1",
        "--root",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert f"{PREFIX}web-1: running toggled (merge off) /objects/pc.ram" in result.stdout
    # Guest RAM is unmerged; QEMU's small ROM regions (BIOS, option ROMs) stay mergeable.
    assert wait_for(lambda: lab.merging("web-1") < before * 0.02, 30), lab.merging("web-1")
    lab.write_policy(policy("warn"))
    result = cli(
        "-p",
        str(lab.policy),
        "enforce",
        "--live",
        "-c",
        "qemu:///system",
        "-d",
        f"{PREFIX}web-1",
        "--root",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "running toggled (merge on)" in result.stdout
    assert wait_for(lambda: lab.merging("web-1") > before * 0.8, 60, step=1), lab.merging("web-1")


def test_restore_follows_the_policy_of_the_moment(lab: Lab, tmp_path: Path) -> None:
    lab.write_policy(policy("warn"))
    domain = lab.domain("web-2")
    assert "mem-merge=off" not in lab.cmdline("web-2")
    image = tmp_path / "web-2.save"
    domain.save(str(image))
    lab.write_policy(
        policy(
            "warn",
            "  - name: web-2 now excluded\n    match: {names: ['*web-2']}\n    action: exclude\n",
        )
    )
    lab.conn.restore(str(image))
    assert "mem-merge=off" in lab.cmdline("web-2")
    assert lab.ksm_stat("web-2")["ksm_mergeable"] == "no"
    live = domain_facts(lab.domain("web-2").XMLDesc(0))
    assert live.nosharepages


def test_daemon_rewrites_new_definitions_and_switches_started_guests(
    lab: Lab, real_ksm: RealKsm, tmp_path: Path
) -> None:
    """The daemon's libvirt watcher; skipped where other domains exist (it would touch them)."""
    others = [d.name() for d in lab.conn.listAllDomains() if not d.name().startswith(PREFIX)]
    if others:
        pytest.skip(f"this host has other domains ({', '.join(others)}): the daemon acts on all")
    late = "  - name: late\n    match: {names: ['*late*']}\n    action: exclude\n"
    lab.write_policy(policy("warn", late))
    daemon, log_path = start_daemon(lab, real_ksm, tmp_path)
    assert wait_for(lambda: "watching libvirt events" in log_path.read_text(), 30), (
        log_path.read_text()
    )
    # DEFINED: a new definition the policy excludes is rewritten at once.
    lab.define("late-1")
    assert wait_for(lambda: domain_facts(lab.domain("late-1").XMLDesc(2)).nosharepages, 15), (
        log_path.read_text()
    )
    assert f"{PREFIX}late-1: definition rewritten for the policy" in log_path.read_text()
    # STARTED: with enforcement off nothing rewrites definitions, but `live` still switches
    # a started guest that the policy excludes.
    lab.write_policy(policy("off", late))
    daemon.send_signal(1)  # SIGHUP: reload
    assert wait_for(lambda: "reloaded policy" in log_path.read_text(), 15)
    lab.define("late-2")
    time.sleep(1)
    assert not domain_facts(lab.domain("late-2").XMLDesc(2)).nosharepages
    lab.start("late-2")
    assert "mem-merge=off" not in lab.cmdline("late-2")
    switched_off = {"/objects/pc.ram": False}
    assert wait_for(lambda: live_merge(lab.domain("late-2")) == switched_off, 20), (
        log_path.read_text()
    )
    assert f"{PREFIX}late-2: merging switched off live" in log_path.read_text()
    real_ksm.stop(daemon)
    lab.stop("late-2")


DOMAIN_POLICY = f"""\
version: 1
enforcement: {{mode}}
domains:
  tenant-a: {{{{}}}}
  tenant-b: {{{{}}}}
groups:
  a: {{{{names: ["{PREFIX}ta-*"], domain: tenant-a}}}}
  b: {{{{names: ["{PREFIX}tb-*"], domain: tenant-b}}}}
reconciler: {{{{interval_seconds: 1, target_scan_seconds: 10, max_ksmd_cpu_percent: 60}}}}
"""


def test_trust_domains_keep_two_tenants_guests_apart(
    lab: Lab, real_ksm: RealKsm, tmp_path: Path
) -> None:
    """Three guests from one image, two tenants: tenant-a's two guests merge with each other,
    tenant-b's never with them (the page-map audit finds no page mapped by both). The hook
    refuses a mergeable definition under block; under warn the daemon rewrites it."""
    others = [d.name() for d in lab.conn.listAllDomains() if not d.name().startswith(PREFIX)]
    if others:
        pytest.skip(f"this host has other domains ({', '.join(others)}): the daemon acts on all")
    from ksmpolicy.policy.load import parse_policy
    from ksmpolicy.report.audit import audit

    for domain in lab.conn.listAllDomains(1):  # the earlier tests' guests: domain `default`,
        domain.destroy()  # which would compete for the host's one merge scope
    lab.write_policy(DOMAIN_POLICY.format(mode="block"))
    lab.install_hook()
    lab.define("ta-1")  # merges from its start: it would share ROMs with any tenant
    with pytest.raises(lab.libvirt.libvirtError) as info:
        lab.start("ta-1")
    assert f"\"{PREFIX}ta-1\" is in trust domain 'tenant-a'" in str(info.value)
    lab.domain("ta-1").undefine()
    for name in ("ta-1", "ta-2", "tb-1"):
        lab.define(name, nosharepages=True)
        lab.start(name)
    for name in ("ta-1", "ta-2", "tb-1"):
        lab.wait_ready(name)
    real_ksm.write("use_zero_pages", 1)
    daemon, log_path = start_daemon(lab, real_ksm, tmp_path)
    image_pages = 48 * 256
    merged = wait_for(
        lambda: min(lab.merging("ta-1"), lab.merging("ta-2")) > image_pages * 0.8, 120, step=1
    )
    assert merged, log_path.read_text()
    assert lab.merging("tb-1") == 0, log_path.read_text()
    found = audit(HostPaths(), parse_policy(lab.policy.read_text()))
    assert found.cross_domain_pages == 0 and found.cross_domain_zero_pages == 0, found
    assert "tenant-a" in found.domains
    # Under warn the daemon rewrites a new definition that would merge from its start.
    lab.write_policy(DOMAIN_POLICY.format(mode="warn"))
    daemon.send_signal(1)
    assert wait_for(lambda: "reloaded policy" in log_path.read_text(), 15)
    lab.define("tb-2")
    assert wait_for(lambda: domain_facts(lab.domain("tb-2").XMLDesc(2)).nosharepages, 15), (
        log_path.read_text()
    )
    real_ksm.stop(daemon)
    for name in ("ta-1", "ta-2", "tb-1"):
        lab.stop(name)


def doctor(*args: str) -> dict[str, list[dict[str, str]]]:
    import json

    result = cli("doctor", "--json", *args)
    assert result.returncode in (0, 1), result.stderr
    return dict(json.loads(result.stdout))


def test_doctor_says_to_reload_libvirt_and_why_a_shared_memory_guest_cannot_merge(
    lab: Lab, tmp_path: Path
) -> None:
    """libvirtd started before the hook was installed (doctor: reload it); then a guest whose
    RAM is a shared memfd (virtiofs' setting): not mergeable, and doctor says why."""
    run_dir = tmp_path / "run"
    lab.write_policy(policy("warn"))
    lab.uninstall_hook()
    lab.install_hook(run_dir, reload=False)
    args = ("-p", str(lab.policy), "--run-dir", str(run_dir))
    hook = [c for c in doctor(*args)["checks"] if "hook" in c["what"]]
    assert [c["level"] for c in hook] == ["fail"], hook
    assert "installed after libvirt" in hook[0]["what"]
    assert "kill -HUP" in str(hook[0]["fix"])
    lab.daemon.reload()
    lab.define("shm", memory_backing="<source type='memfd'/><access mode='shared'/>")
    lab.start("shm")  # libvirt calls the hook: it has read it
    try:
        found = doctor(*args)["checks"]
        hook = [c for c in found if "hook" in c["what"]]
        assert [c["level"] for c in hook] == ["ok"], hook
        assert "seen by libvirt" in hook[0]["what"]
        shm = [c for c in found if c["subject"] == f"{PREFIX}shm"]
        assert len(shm) == 1, found
        assert "shared memory" in shm[0]["what"], shm
        assert shm[0]["level"] in ("info", "fail")
        stat = lab.ksm_stat("shm")
        assert stat.get("ksm_mergeable", "no").strip() == "no" or lab.merging("shm") == 0
    finally:
        lab.stop("shm")
        lab.domain("shm").undefine()
        lab.uninstall_hook()
