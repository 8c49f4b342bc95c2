"""Live migration and restore between two libvirt hosts on this machine: the destination's hook
rewrites the incoming domain XML to the destination's policy (`migrate begin`, `restore
begin`), so a VM arrives under B's policy before its first instruction runs on B.

Host A is the machine's libvirtd (lab.libvirtd), host B a second libvirtd in its own mount
namespace with its own hook and policy (lab.twohosts). The two share one kernel and one ksmd:
KSM is global, so every check is per VM, on the QEMU process B runs (its PID file on B):
the live XML on B, QEMU's command line (`mem-merge=off`), the `mg` flag of the guest RAM's
mapping in /proc/PID/smaps, and /proc/PID/ksm_stat.

Needs root, libvirtd, QEMU (TCG) and the real ksmd (CI runs as root). About two minutes here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ksmpolicy.kernel import smaps
from ksmpolicy.libvirt.domain import domain_facts
from lab.libvirtd import GUEST, PREFIX, Lab, two_domains_policy, wait_for
from lab.twohosts import HostB, two_hosts
from tests.conftest import IS_ROOT, RealKsm, free_port

pytestmark = [pytest.mark.root, pytest.mark.kernel]
RAM_BYTES = 256 * 2**20  # lab.libvirtd's guests
PATTERN_PAGES = 48 * 256  # the image every test guest holds (scripts/build-guest)
VIR_DOMAIN_XML_INACTIVE = 2
KSMPOLICY = str(Path(sys.executable).parent / "ksmpolicy")

# A lets `to-off` and `saved-off` merge and keeps `to-on` and `saved-on` apart; B the reverse.
A_POLICY = """\
version: 1
enforcement: warn
rules:
  - name: apart on A
    match: {names: ['*-to-on', '*-saved-on', '*-ta-*']}
    action: exclude
"""
B_POLICY = """\
version: 1
enforcement: warn
rules:
  - name: apart on B
    match: {names: ['*-to-off', '*-saved-off']}
    action: exclude
"""
ON_A = {"to-off": False, "to-on": True, "saved-off": False, "saved-on": True}  # nosharepages
TIMES: dict[str, float] = {}


class Hosts:
    def __init__(self, a: Lab, b: Lab, hostb: HostB, workdir: Path) -> None:
        self.a, self.b, self.hostb, self.workdir = a, b, hostb, workdir


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    """Both hosts, each with its hook and policy, B's peer guest and A's four guests running."""
    if not IS_ROOT:
        pytest.skip("needs root to run libvirtd and QEMU (CI runs as root)")
    if not (GUEST / "initrd.img").exists():
        pytest.skip("the test guest is not built (scripts/build-guest; make test builds it)")
    pytest.importorskip("libvirt")
    workdir = tmp_path_factory.mktemp("twohosts")
    started = time.monotonic()
    with two_hosts(workdir) as (a, b, hostb):
        TIMES["hosts up"] = time.monotonic() - started
        a.write_policy(A_POLICY)
        a.install_hook()
        b.write_policy(B_POLICY)
        b.install_hook()
        b.define("peer")  # B's own guest from the same image: what an arriving VM merges with
        b.start("peer")
        for name, apart in ON_A.items():
            a.define(name, nosharepages=apart)
            a.start(name)
        for lab, name in [(b, "peer"), *((a, n) for n in ON_A)]:
            lab.wait_ready(name)
        yield Hosts(a, b, hostb, workdir)
    print("two hosts, seconds:", {k: round(v, 2) for k, v in TIMES.items()})


def virsh(uri: str, *args: str) -> float:
    """Runs virsh; the seconds it took."""
    started = time.monotonic()
    done = subprocess.run(
        ["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return time.monotonic() - started


def merging_now(lab: Lab, name: str) -> int:
    """The guest's merged pages on `lab`'s host; 0 while its QEMU does not run there yet."""
    try:
        return lab.merging(name)
    except (OSError, ValueError, KeyError):
        return 0


@dataclass
class Migration:
    """Seconds `virsh migrate` took, and seconds into it when the guest's QEMU on B first had
    its RAM mergeable and a merged page (None: not before it returned), sampled every 0.1 s."""

    seconds: float
    mergeable_at: float | None = None
    merged_at: float | None = None


def migrate(hosts: Hosts, name: str) -> Migration:
    """`virsh migrate --live` from A to B."""
    command = ["virsh", "-c", hosts.a.uri, "migrate", "--live", PREFIX + name]
    command += [hosts.hostb.migrate_uri, "--migrateuri", f"tcp://127.0.0.1:{free_port()}"]
    started = time.monotonic()
    found = Migration(0.0)
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    while process.poll() is None:
        into = time.monotonic() - started
        if found.mergeable_at is None and mergeable_now(hosts.b, name):
            found.mergeable_at = into
        if found.merged_at is None and merging_now(hosts.b, name) > 0:
            found.merged_at = into
        time.sleep(0.1)
    found.seconds = time.monotonic() - started
    assert process.returncode == 0, process.communicate(timeout=5)[1]
    return found


def mergeable_now(lab: Lab, name: str) -> bool:
    try:
        return ram_mergeable(lab, name) is True
    except (OSError, ValueError):
        return False


def ram_mergeable(lab: Lab, name: str) -> bool | None:
    """Whether the guest RAM's mapping carries `mg` (MADV_MERGEABLE) in QEMU's smaps."""
    data = Path(f"/proc/{lab.pid(name)}/smaps").read_bytes()
    return smaps.parse(data).ram_mergeable(RAM_BYTES)


def assert_merge_off(lab: Lab, name: str) -> None:
    assert domain_facts(lab.domain(name).XMLDesc(0)).nosharepages
    assert "mem-merge=off" in lab.cmdline(name)
    assert ram_mergeable(lab, name) is False
    assert lab.ksm_stat(name)["ksm_mergeable"] == "no"


def assert_merge_on(lab: Lab, name: str) -> None:
    assert not domain_facts(lab.domain(name).XMLDesc(0)).nosharepages
    assert "mem-merge=off" not in lab.cmdline(name)
    assert ram_mergeable(lab, name) is True


def test_each_guest_runs_under_a_policy_on_a(hosts: Hosts) -> None:
    for name, apart in ON_A.items():
        (assert_merge_off if apart else assert_merge_on)(hosts.a, name)
    assert hosts.hostb.qemu_pids() == [hosts.b.pid("peer")]  # B runs only its own guest
    assert hosts.hostb.host_uuid in hosts.b.conn.getCapabilities()


def test_a_guest_a_lets_merge_arrives_on_b_with_nosharepages(
    hosts: Hosts, real_ksm: RealKsm
) -> None:
    a, b = hosts.a, hosts.b
    real_ksm.write("pages_to_scan", 5000)  # ksmd scanning hard the whole time: nothing of
    real_ksm.write("sleep_millisecs", 10)  # the arriving guest may merge on B
    real_ksm.write("run", 1)
    migration = migrate(hosts, "to-off")
    TIMES["migrate to-off"] = migration.seconds
    # on B, not mergeable and not a page merged at any time during the migration
    assert migration.mergeable_at is None and migration.merged_at is None, migration
    assert not a.domain("to-off").isActive()
    assert b.domain("to-off").isActive()
    assert_merge_off(b, "to-off")
    # B's hook did it: A's definition is as A's policy wants it.
    assert not domain_facts(a.domain("to-off").XMLDesc(VIR_DOMAIN_XML_INACTIVE)).nosharepages
    # B's peer merges (with whatever shares its pages, on either host); the arrival never does.
    assert wait_for(lambda: b.merging("peer") > PATTERN_PAGES * 0.8, 60, step=0.5)
    assert b.merging("to-off") == 0


def test_a_guest_a_keeps_apart_arrives_on_b_mergeable_and_merges(
    hosts: Hosts, real_ksm: RealKsm
) -> None:
    a, b = hosts.a, hosts.b
    real_ksm.write("pages_to_scan", 5000)
    real_ksm.write("sleep_millisecs", 10)
    real_ksm.write("run", 1)
    assert a.merging("to-on") == 0
    migration = migrate(hosts, "to-on")
    arrived = time.monotonic()
    TIMES["migrate to-on"] = migration.seconds
    # B's QEMU marks the RAM mergeable before the pages arrive: ksmd merges them as they come.
    TIMES["to-on: pages merged on arrival"] = merging_now(b, "to-on")
    if migration.merged_at is not None:
        TIMES["to-on: first merged page, seconds into the migration"] = migration.merged_at
    assert_merge_on(b, "to-on")
    assert domain_facts(a.domain("to-on").XMLDesc(VIR_DOMAIN_XML_INACTIVE)).nosharepages
    assert wait_for(lambda: b.merging("to-on") > 0, 30, step=0.1)
    TIMES["to-on: arrival to a merged page"] = time.monotonic() - arrived
    assert wait_for(lambda: b.merging("to-on") > PATTERN_PAGES * 0.8, 60, step=0.2), b.ksm_stat(
        "to-on"
    )
    TIMES["to-on: arrival to 80 % of the image merged"] = time.monotonic() - arrived


@pytest.mark.parametrize(("name", "merges_on_b"), [("saved-off", False), ("saved-on", True)])
def test_save_on_a_and_restore_on_b_follows_b_policy(
    hosts: Hosts, name: str, merges_on_b: bool
) -> None:
    a, b = hosts.a, hosts.b
    image = hosts.workdir / f"{name}.save"
    TIMES[f"save {name}"] = virsh(a.uri, "save", PREFIX + name, str(image))
    assert not a.domain(name).isActive()
    TIMES[f"restore {name}"] = virsh(b.uri, "restore", str(image))
    (assert_merge_on if merges_on_b else assert_merge_off)(b, name)
    merged_on_a = not domain_facts(a.domain(name).XMLDesc(VIR_DOMAIN_XML_INACTIVE)).nosharepages
    assert merged_on_a is not merges_on_b  # A's definition is untouched: B's hook rewrote it
    image.unlink()


B_DOMAINS = two_domains_policy(f"{PREFIX}ta-*", f"{PREFIX}tb-*")


def audit_on_b(hosts: Hosts) -> dict[str, object]:
    """`ksmpolicy audit` in B's mount namespace (B's page walk, B's view of its domains)."""
    command = [KSMPOLICY, "-p", str(hosts.b.policy), "audit", "--json"]
    done = subprocess.run(
        hosts.hostb.command(command), capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode in (0, 1), done.stderr
    return dict(json.loads(done.stdout))


def test_under_trust_domains_b_daemon_places_the_arrival_and_nothing_crosses(
    hosts: Hosts, real_ksm: RealKsm
) -> None:
    """B runs its daemon under trust domains (tenant-a active, tenant-b kept apart); a guest
    of tenant-a arrives from A, where it merged nothing. B's hook makes it arrive
    unmergeable, B's daemon switches it on and sprints, and B's page walk finds no page mapped
    across the domains before, during or after the migration."""
    a, b = hosts.a, hosts.b
    hosts.hostb.destroy_all()  # the earlier tests' guests: they would compete for the scope
    b.write_policy(B_DOMAINS)
    for name in ("ta-1", "tb-1"):
        b.define(name, nosharepages=True)
        b.start(name)
    a.define("ta-2", nosharepages=True)
    a.start("ta-2")
    for lab, name in ((b, "ta-1"), (b, "tb-1"), (a, "ta-2")):
        lab.wait_ready(name)
    real_ksm.write("use_zero_pages", 1)
    log_path = hosts.workdir / "b" / "daemon.log"
    daemon_args = [KSMPOLICY, "-p", str(b.policy), "daemon", "-c", "qemu:///system"]
    daemon_args += ["--restore-on-exit", "--run-dir", str(b.workdir / "run")]
    daemon_args += ["--state-dir", str(hosts.workdir / "b" / "state")]
    with log_path.open("w") as log:
        daemon = real_ksm.track(
            subprocess.Popen(hosts.hostb.command(daemon_args), stderr=log, text=True)
        )
    try:
        switched = f"{PREFIX}ta-1 (trust domain tenant-a): merging switched on live"
        assert wait_for(lambda: switched in log_path.read_text(), 60), log_path.read_text()
        assert audit_on_b(hosts)["ok"] is True
        before = len(log_path.read_text())
        audits: list[dict[str, object]] = []
        migrated = threading.Event()

        def walk() -> None:  # B's page walks, one after the other, while the pages arrive
            while not migrated.is_set():
                audits.append(audit_on_b(hosts))

        walker = threading.Thread(target=walk)
        walker.start()
        migration = migrate(hosts, "ta-2")
        arrived = time.monotonic()
        migrated.set()
        walker.join()
        TIMES["migrate ta-2 (trust domains)"] = migration.seconds
        if migration.mergeable_at is not None:  # switched on by B's daemon as its QEMU started
            TIMES["ta-2: switched on, seconds into the migration"] = migration.mergeable_at
        if migration.merged_at is not None:
            TIMES["ta-2: first merged page, seconds into the migration"] = migration.merged_at
        TIMES["ta-2: B's page walks during the migration"] = len(audits)
        # B's hook made it arrive unmergeable (its RAM is B's daemon's to switch on: it may
        # have done so already)
        assert domain_facts(b.domain("ta-2").XMLDesc(0)).nosharepages
        assert "mem-merge=off" in b.cmdline("ta-2")
        arrival = f"{PREFIX}ta-2 (trust domain tenant-a): merging switched on live"
        assert wait_for(lambda: arrival in log_path.read_text(), 30), log_path.read_text()
        TIMES["ta-2: arrival to the daemon's switch logged"] = time.monotonic() - arrived
        assert wait_for(lambda: b.merging("ta-2") > PATTERN_PAGES * 0.8, 60, step=0.2), (
            log_path.read_text()[before:]
        )
        TIMES["ta-2: arrival to 80 % of the image merged"] = time.monotonic() - arrived
        # the migration's memory settles, then B's daemon sprints (it may merge much before)
        assert wait_for(lambda: "sprint:" in log_path.read_text()[before:], 30), (
            log_path.read_text()[before:]
        )
        assert b.merging("tb-1") == 0
        audits.append(audit_on_b(hosts))
        for found in audits:
            assert found["ok"] is True, found
            assert found["cross_domain_pages"] == found["cross_domain_zero_pages"] == 0, found
        assert "tenant-a" in audits[-1]["domains"]  # type: ignore[operator]
    finally:
        real_ksm.stop(daemon)


def test_a_daemon_sees_its_guest_leave(hosts: Hosts, real_ksm: RealKsm) -> None:
    """A's daemon (real, A's policy) counts a guest A lets merge; the guest migrates live to B;
    A's daemon hears A's hook (`stopped`) and its QEMU's exit, re-plans at once, and counts
    none of its memory any more (a plan with footprint 0: nothing else on A may merge, and the
    arrival on B is unmergeable under B's trust domains). B runs no daemon here: one kernel,
    one controller of the knobs."""
    a = hosts.a
    hosts.hostb.destroy_all()
    a.write_policy(A_POLICY)
    a.define("leaver")
    a.start("leaver")
    a.wait_ready("leaver")
    log_path = hosts.workdir / "a" / "daemon.log"
    daemon_args = [KSMPOLICY, "-p", str(a.policy), "daemon", "--restore-on-exit", "--no-libvirt"]
    daemon_args += ["--run-dir", str(a.workdir / "run")]
    daemon_args += ["--state-dir", str(hosts.workdir / "a" / "state")]
    with log_path.open("w") as log:
        daemon = real_ksm.track(subprocess.Popen(daemon_args, stderr=log, text=True))
    try:
        counted = re.compile(r"footprint ([1-9][0-9]*) MiB")
        assert wait_for(lambda: bool(counted.search(log_path.read_text())), 30), (
            log_path.read_text()
        )
        before = len(log_path.read_text())
        migrate(hosts, "leaver")
        left = time.monotonic()
        heard = f"hook: {PREFIX}leaver stopped"

        def seen() -> bool:  # the hook's note, and a plan that counts none of its memory
            since = log_path.read_text()[before:]
            return heard in since and "footprint 0 MiB" in since

        assert wait_for(seen, 10), log_path.read_text()[before:]
        TIMES["leaver: departure to A's daemon re-planned"] = time.monotonic() - left
        assert hosts.b.domain("leaver").isActive()
    finally:
        real_ksm.stop(daemon)
