"""Guests that hold a real OS (scripts/build-guest-real) on two real libvirt hosts: host A runs a
"web" guest, host B a "database" guest and a second "web" guest.

1. What merges (lab/realguests.py): the two "web" guests share far more with each other than
   with the "database" guest, and the estimate made before ksmd runs comes within 5 % of what
   ksmd then saves, per VM and host-wide.
2. Placement by sharing: sketched on each host, `place` ranks A first for B's "web" guest; the
   guest then migrates live from B to A, ksmd merges, and what the guest saves on A, measured
   by the page walk over A's processes only, matches the prediction within 15 %.

One kernel and one ksmd serve both hosts (lab.twohosts), so a page of the arriving guest may
also merge with B's database guest: the measurement counts a merged page of the guest as saved
on A only when one of A's other guests maps the same KSM page (else only its own duplicates).
Sketches hash page contents, which merging does not change.

Needs root, libvirtd, QEMU (TCG) and the real ksmd (CI runs as root). Builds the images when
missing (cached in .cache/guest-real; a cold build downloads about 100 MiB of Debian packages).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from ksmpolicy.kernel.pagemap import PageMapReader
from ksmpolicy.kernel.procfs import read_meminfo
from ksmpolicy.paths import PAGE_SIZE, HostPaths
from ksmpolicy.placement.document import from_json, to_json
from ksmpolicy.placement.plan import place
from ksmpolicy.placement.sketch import FleetKey, HostSketch, Subject, take
from lab import realguests
from lab.ksmd import converge
from lab.libvirtd import PREFIX, Lab
from lab.twohosts import two_hosts
from tests.conftest import RealKsm, free_port
from tests.libvirt.conftest import need_guests

pytestmark = [pytest.mark.root, pytest.mark.kernel, pytest.mark.slow]
MIB = realguests.MEMORY_MIB
KEY = FleetKey(bytes(range(32)))
# Within an image the guests share their whole userspace; across images the kernel, libc and
# the base packages: 117.6 MiB against 74.6 MiB in the first run here (1.58x).
WITHIN_OVER_ACROSS = 1.25
ESTIMATE_TOLERANCE = 0.05  # issue 24's target; measured within 0.1 % (idle guests)
PLACEMENT_TOLERANCE = 0.15  # issue 26's
ON = {"web-1": "a", "db-1": "b", "web-2": "b"}
IMAGE = {"web-1": "web", "db-1": "database", "web-2": "web"}


@dataclass
class Hosts:
    a: Lab
    b: Lab

    def lab(self, name: str) -> Lab:
        return self.a if ON[name] == "a" else self.b


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    need_guests(real=True)
    with two_hosts(tmp_path_factory.mktemp("placement")) as (a, b, _hostb):
        found = Hosts(a, b)
        for name, image in IMAGE.items():
            found.lab(name).define(name, image=image, memory_mib=MIB)
        yield found


def test_real_guests_share_within_an_image_and_the_estimate_holds(
    hosts: Hosts, real_ksm: RealKsm
) -> None:
    real_ksm.write("run", 0)
    real_ksm.write("use_zero_pages", 1)
    for name in IMAGE:
        hosts.lab(name).start(name)
    for name in IMAGE:
        hosts.lab(name).wait_ready(name, timeout=300)
    time.sleep(5)  # the programs settle after answering
    pids = {name: hosts.lab(name).pid(name) for name in IMAGE}
    found = realguests.observe(pids, IMAGE, real_ksm, {})
    within = found["images"]["web+web"]["shared_mib"]
    across = found["images"]["database+web"]["shared_mib"]
    assert within >= 32, found  # the web image's userspace alone is larger than this
    assert within >= WITHIN_OVER_ACROSS * across, found
    assert across > 0, found  # the kernel and libc are the same in both images
    for vm in [*found["vms"], found["host"]]:
        assert vm["measured_saved_mib"] > 0, vm
        error = vm["predicted_saved_mib"] - vm["measured_saved_mib"]
        assert abs(error) <= ESTIMATE_TOLERANCE * vm["measured_saved_mib"], vm


def sketch(hosts: Hosts, host: str) -> HostSketch:
    names = [n for n, on in ON.items() if on == host]
    subjects = [
        Subject(
            hosts.lab(n).pid(n), n, None, None, "libvirt", "default", None, True, True, MIB * 2**20
        )
        for n in names
    ]
    memory = read_meminfo(HostPaths())
    vms = tuple(take(HostPaths(), subjects, KEY, interval=3.0))
    assert [vm.name for vm in vms] == names
    taken = HostSketch(
        host, KEY.key_id, 64, True, 256, memory["MemTotal"], memory["MemAvailable"], 0.0, None, vms
    )
    # as it travels between hosts: sealed JSON, read back with every field checked
    return from_json(json.loads(json.dumps(to_json(taken, KEY))), host, KEY)


def saved_on(pid: int, others: list[int]) -> int:
    """Pages the process's merging saves among `others` (the page walk): a KSM page it maps c
    times saves c pages when one of the others maps it too, else c - 1 (its own duplicates)."""
    with PageMapReader(HostPaths()) as reader:
        walk = reader.walk([pid, *others])
    mine = walk.processes[pid]
    theirs = [walk.processes[o].ksm_pfns for o in others if o in walk.processes]
    held = np.isin(mine.ksm_pfns, np.concatenate(theirs)) if theirs else np.zeros(0, bool)
    copies = mine.mappings.astype(np.int64)
    return int(np.sum(np.where(held, copies, copies - 1)))


def test_place_ranks_the_host_of_its_kind_first_and_the_migration_proves_it(
    hosts: Hosts, real_ksm: RealKsm
) -> None:
    for name in IMAGE:
        if not hosts.lab(name).domain(name).isActive():
            pytest.skip("the guests did not start (see the test before)")
    real_ksm.write("use_zero_pages", 1)
    subject, ranked = place([sketch(hosts, "a"), sketch(hosts, "b")], "web-2")
    assert [p.host for p in ranked] == ["a", "b"], ranked
    assert ranked[0].shared_bytes > 32 * 2**20, ranked  # the whole userspace of the image
    # what it saves with A's web guest and by its own duplicates; its zero pages apart: a live
    # migration does not send them, so they are not present on A after it
    predicted = ranked[0].saved_bytes // PAGE_SIZE - subject.zero_pages

    command = ["virsh", "-c", hosts.b.uri, "migrate", "--live", PREFIX + "web-2", hosts.a.uri]
    command += ["--migrateuri", f"tcp://127.0.0.1:{free_port()}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    converge(real_ksm)
    measured = saved_on(hosts.a.pid("web-2"), [hosts.a.pid("web-1")])
    print(f"placement: predicted {predicted / 256:.1f} MiB, measured {measured / 256:.1f} MiB on A")
    why = (predicted, measured, subject.zero_pages, int(subject.exact.sum()), ranked[0])
    assert abs(measured - predicted) <= PLACEMENT_TOLERANCE * measured, (
        why,
        hosts.a.ksm_stat("web-2"),
    )
