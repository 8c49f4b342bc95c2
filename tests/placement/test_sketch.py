"""Sketches of real guest-like processes (lab/simguest.py: "web" and "database" images of known
size), read from /proc/PID/mem as the estimate reads guests: identical content gives identical
samples, a second sketch of an idle VM is the same, volatile pages are left out, the sketch is
small, and `place` predicts the shared image within 15 %. Root (reads other processes' memory);
serialised with the KSM tests through the `real_ksm` fixture (it changes no knob)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ksmpolicy.paths import PAGE_SIZE, HostPaths
from ksmpolicy.placement.document import to_json
from ksmpolicy.placement.plan import place
from ksmpolicy.placement.sketch import DEFAULT_K, FleetKey, HostSketch, Subject, take
from lab.simguest import page_plan, spawn
from tests.conftest import RealKsm

pytestmark = [pytest.mark.root, pytest.mark.kernel]
MIB = 256
KEY = FleetKey(os.urandom(32))


def subject(pid: int, name: str) -> Subject:
    return Subject(pid, name, None, None, "libvirt", "default", None, True, True, MIB * 2**20)


def host(name: str, vms: list) -> HostSketch:  # type: ignore[type-arg]
    return HostSketch(name, KEY.key_id, DEFAULT_K, True, 256, 2**34, 2**33, 0.0, None, tuple(vms))


def test_sketches_of_guests_compare_between_hosts(real_ksm: RealKsm) -> None:
    paths = HostPaths()
    guests = {
        name: real_ksm.track(spawn(name, mib=MIB, image=image, image_percent=60, zero_percent=10))
        for name, image in (("sk-web-1", "web"), ("sk-web-2", "web"), ("sk-db-1", "database"))
    }
    churning = real_ksm.track(
        spawn("sk-busy", mib=64, image="web", image_percent=60, churn_pages_per_second=2000)
    )
    subjects = [subject(p.pid, name) for name, p in guests.items()]
    first = {s.name: s for s in take(paths, subjects, KEY, interval=0.5)}
    again = {s.name: s for s in take(paths, subjects, KEY, interval=0.5)}

    image, zero, _unique = page_plan(MIB * 256, 60, 10)
    for name, sketch in first.items():
        # idle: the same samples twice; zero pages counted apart, none volatile
        assert np.array_equal(sketch.values, again[name].values), name
        assert sketch.zero_pages == zero and sketch.volatile_pages == 0, sketch
        # small: at most 64 KiB per GiB of guest RAM as it travels (JSON)
        size = len(json.dumps(to_json(host("h", [sketch]), KEY)))
        assert size <= 64 * 1024 * MIB / 1024, size
    web_1, web_2, db_1 = first["sk-web-1"], first["sk-web-2"], first["sk-db-1"]
    both = np.intersect1d(web_1.values, web_2.values).size
    assert abs(both * DEFAULT_K - image) <= 0.15 * image, (both, image)
    assert np.intersect1d(web_1.values, db_1.values).size == 0

    # web-2 on its own host; where would it share most?
    hosts = [host("a", [web_1]), host("b", [db_1]), host("c", [web_2])]
    _vm, ranked = place(hosts, "sk-web-2")
    assert ranked[0].host == "a", ranked
    assert abs(ranked[0].shared_bytes - image * PAGE_SIZE) <= 0.15 * image * PAGE_SIZE, ranked
    assert next(p for p in ranked if p.host == "b").shared_bytes == 0

    # a guest at work: the pages it rewrote between the two reads are left out
    (busy,) = take(paths, [subject(churning.pid, "sk-busy")], KEY, interval=2.0)
    assert busy.volatile_pages > 0, busy
