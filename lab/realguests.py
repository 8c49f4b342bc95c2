"""Guests that hold a real OS on real libvirtd and real ksmd: how much of their RAM merges
within an image and between images, how volatile it is, and how close `estimate` comes.

"web" and "database" guests (scripts/build-guest-real, 512 MiB each; the test boots two and one,
the benchmark four and two) boot with ksmd stopped. The estimate reads them first; then ksmd
runs at a fixed fast pace until its savings hold still, and the page map (report/sharing.py)
says who shares what. Shared by tests/libvirt/test_placement.py (which asserts) and
bench/bench_real_guests.py (which records bench/results/real-guests.json).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

from ksmpolicy.paths import PAGE_SIZE, HostPaths
from ksmpolicy.report.estimate import Guest, estimate
from ksmpolicy.report.sharing import Party, measure
from lab.ksmd import Knobs, converge
from lab.libvirtd import REAL_GUEST, REAL_IMAGES, REPO, Lab

Guests = tuple[tuple[str, str], ...]  # (name, image)
SMALL: Guests = (("web-1", "web"), ("web-2", "web"), ("db-1", "database"))
FULL: Guests = (
    *((f"web-{i}", "web") for i in range(1, 5)),
    ("db-1", "database"),
    ("db-2", "database"),
)
MEMORY_MIB = 512
MIB = 2**20
_NOTHING = {"shared_mib": 0.0, "shared_share_of_ram": 0.0, "zero_mib": 0.0}
# what the guest says once its program answers (scripts/build-guest-real's init)
READY = re.compile(rb"ksmpolicy-guest: ready, .* up ([0-9.]+) s")


def build_images(timeout: float = 1800) -> float:
    """Build the images when they are missing or stale (cached; see the script); seconds spent."""
    started = time.monotonic()
    subprocess.run([str(REPO / "scripts/build-guest-real")], check=True, timeout=timeout)
    for image in REAL_IMAGES:
        if not (REAL_GUEST / f"{image}.img").exists():
            raise RuntimeError(f"scripts/build-guest-real made no {image}.img")
    return time.monotonic() - started


def boot(lab: Lab, guests: Guests) -> dict[str, float]:
    """Define and start the guests together; each one's seconds from boot to ready, by its
    own clock (the guest prints its uptime with the ready line)."""
    for name, image in guests:
        lab.define(name, image=image, memory_mib=MEMORY_MIB)
        lab.start(name)
    seconds = {}
    for name, _image in guests:
        lab.wait_ready(name, timeout=300)
        found = READY.search(lab.console(lab.prefix + name).read_bytes())
        assert found is not None, name
        seconds[name] = float(found[1])
    return seconds


def run(lab: Lab, ksm: Knobs, guests: Guests = SMALL) -> dict[str, Any]:
    """The whole scenario on a lab with no guests running; ksmd is left stopped."""
    ksm.write("run", 0)
    started = time.monotonic()
    ready = boot(lab, guests)
    all_ready = time.monotonic() - started
    time.sleep(5)  # the programs settle after answering
    pids = {name: lab.pid(name) for name, _image in guests}
    return {"seconds_to_all_ready": round(all_ready, 1), **observe(pids, dict(guests), ksm, ready)}


def observe(
    pids: dict[str, int], image: dict[str, str], ksm: Knobs, ready: dict[str, float]
) -> dict[str, Any]:
    """Running guests (name: pid, name: image; ksmd stopped): the estimate, then ksmd run to
    convergence and the page map. `ready`: each one's seconds from boot to ready."""
    running = [Guest(pid, name, image[name], True, MEMORY_MIB * MIB) for name, pid in pids.items()]
    predicted = estimate(
        HostPaths(),
        running,
        interval=3.0,
        max_page_sharing=int(ksm.read("max_page_sharing")),
        use_zero_pages=bool(ksm.read("use_zero_pages")),
    )
    ksmd_seconds = converge(ksm)
    zeros = {g.pid: _zero_pages(g.pid) for g in running}
    sharing = measure(
        HostPaths(), [Party(g.pid, g.name, g.group) for g in running], zero_pages=zeros
    )
    guest_bytes = MEMORY_MIB * MIB
    vms = []
    for vm in predicted.vms:
        real = next(v for v in sharing.vms if v.name == vm.name)
        vms.append(
            {
                "vm": vm.name,
                "image": image[vm.name],
                "boot_to_ready_seconds": ready.get(vm.name),
                "present_mib": round(real.present_pages * PAGE_SIZE / MIB, 1),
                "volatile_mib": round(vm.volatile_pages * PAGE_SIZE / MIB, 1),
                "predicted_saved_mib": round(vm.predicted_saved_bytes / MIB, 1),
                "measured_saved_mib": round(real.saved_bytes / MIB, 1),
                "error_percent": _error(vm.predicted_saved_bytes, real.saved_bytes),
                "saved_share_of_ram": round(real.saved_bytes / guest_bytes, 3),
                "shared_with_own_image_mib": round(
                    real.shared_with_group_pages * PAGE_SIZE / MIB, 1
                ),
            }
        )
    measured_total = sum(v.saved_bytes for v in sharing.vms)
    images = sorted(set(image.values()))
    pairs = {f"{a}+{b}": _NOTHING for a in images for b in images if a <= b}
    for pair in sharing.group_pairs:
        pairs["+".join(sorted((pair.a, pair.b)))] = {
            "shared_mib": round(pair.shared_pages * PAGE_SIZE / MIB, 1),
            "shared_share_of_ram": round(pair.shared_pages * PAGE_SIZE / guest_bytes, 3),
            "zero_mib": round(pair.zero_pages * PAGE_SIZE / MIB, 1),
        }
    return {
        "guests": len(pids),
        "guest_ram_mib": MEMORY_MIB,
        "ksmd_seconds_to_converge": round(ksmd_seconds, 1),
        "use_zero_pages": int(ksm.read("use_zero_pages")),
        "vms": vms,
        "images": pairs,
        "host": {
            "predicted_saved_mib": round(predicted.predicted_saved_bytes / MIB, 1),
            "measured_saved_mib": round(measured_total / MIB, 1),
            "error_percent": _error(predicted.predicted_saved_bytes, measured_total),
        },
    }


def _zero_pages(pid: int) -> int:
    for line in Path(f"/proc/{pid}/ksm_stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "ksm_zero_pages":
            return int(value)
    return 0


def _error(predicted: int, measured: int) -> float | None:
    return round(100 * (predicted - measured) / measured, 2) if measured else None
