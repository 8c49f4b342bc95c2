"""What merges in guests that hold a real OS (root, real ksmd and libvirtd): four "web" guests and
two "database" guests (scripts/build-guest-real), the estimate before ksmd runs against what it
then saves, and how much merges within an image and between images. The scenario is
lab/realguests.py, which tests/libvirt/test_placement.py asserts on with two "web" guests and
one "database" guest. Writes bench/results/real-guests.{json,md}.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any

from bench.ksm_bench import machine_name
from lab import realguests
from lab.libvirtd import temporary_lab
from tests.conftest import KSM_LOCK, RealKsm, restore_knobs, saved_knobs

RESULTS = Path(__file__).resolve().parent / "results"


def scenario() -> dict[str, Any]:
    with temporary_lab() as lab:
        return realguests.run(lab, RealKsm(), realguests.FULL)


def markdown(machine: str, found: dict[str, Any]) -> list[str]:
    lines = [
        "# Guests that hold a real OS: what merges, and the estimate",
        "",
        f"Machine: {machine}. Reproduce: `make bench-real-guests` (root). "
        f"{found['guests']} TCG guests of {found['guest_ram_mib']} MiB (scripts/build-guest-real), "
        f"all ready {found['seconds_to_all_ready']} s after their start; ksmd at 5000 pages per "
        f"10 ms converged in {found['ksmd_seconds_to_converge']} s.",
        "",
        "| VM | image | boot to ready s | present MiB | volatile MiB | predicted MiB "
        "| measured MiB | error | saved / RAM | shared with own image MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for vm in found["vms"]:
        lines.append(
            f"| {vm['vm']} | {vm['image']} | {vm['boot_to_ready_seconds']} | {vm['present_mib']} "
            f"| {vm['volatile_mib']} | {vm['predicted_saved_mib']} | {vm['measured_saved_mib']} "
            f"| {vm['error_percent']:+.2f} % | {vm['saved_share_of_ram']:.1%} "
            f"| {vm['shared_with_own_image_mib']} |"
        )
    host = found["host"]
    lines += [
        f"| (host) | | | | | {host['predicted_saved_mib']} | {host['measured_saved_mib']} "
        f"| {host['error_percent']:+.2f} % | | |",
        "",
        "Between images, KSM pages that hold only zeros are counted apart (shared zero-page MiB);",
        "within one image they count as content.",
        "",
        "| images | shared content MiB | share of a guest's RAM | shared zero-page MiB |",
        "|---|---|---|---|",
    ]
    for pair, entry in found["images"].items():
        lines.append(
            f"| {pair} | {entry['shared_mib']} | {entry['shared_share_of_ram']:.1%} "
            f"| {entry['zero_mib']} |"
        )
    return lines


def main() -> int:
    if os.geteuid() != 0:
        print("needs root (the page map, ksmd, libvirtd)", file=sys.stderr)
        return 1
    realguests.build_images()
    with KSM_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        knobs = saved_knobs()
        try:
            found = scenario()
        finally:
            (Path("/sys/kernel/mm/ksm") / "run").write_text("0\n")
            restore_knobs(knobs)
    machine = machine_name()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "real-guests.json").write_text(
        json.dumps({"machine": machine, **found}, indent=2) + "\n"
    )
    lines = markdown(machine, found)
    (RESULTS / "real-guests.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
