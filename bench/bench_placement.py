"""Placement by sharing (ksmpolicy/placement): the sketch's size and sampling error against K,
the cost of sketching a guest, and of `place` and `rebalance` over many hosts.

1. Error against K: a VM of 1 GiB whose pages are distinct contents (random 128-bit digests,
   which is what a good hash makes of real contents), sharing a known number of them with a
   host; `place`'s prediction of the shared pages against the truth, over 40 draws per K.
2. Size: the JSON sketch of that VM, per GiB of guest RAM, at each K.
3. Sketching a 1 GiB guest-like process (lab/simguest.py; root): CPU-seconds.
4. `place` of one VM over 1,000 host sketches of 50 VMs each, and `rebalance` over hosts of 50
   VMs (all from 10 "images" of 2,048 samples, 512 MiB at K = 64, plus unique samples).
5. The fleet index over those 1,000 hosts: `ksmpolicy index` over their sealed documents (a
   fresh process, from its exec), and `place --index` in a fresh process, from its exec to its
   exit (Python's start, the imports, loading the index and the question), beside `place
   --host` over the same documents in a fresh process.

Writes bench/results/placement.{json,md}.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.ksm_bench import machine_name
from ksmpolicy.paths import FLEET_KEY, PAGE_SIZE, HostPaths
from ksmpolicy.placement.document import from_json, to_json
from ksmpolicy.placement.fleetindex import load_index, write_index
from ksmpolicy.placement.plan import place, saving
from ksmpolicy.placement.rebalance import Fleet, Move, Planner, rebalance
from ksmpolicy.placement.sketch import FleetKey, HostSketch, Subject, VmSketch, take

RESULTS = Path(__file__).resolve().parent / "results"
KS = (1, 4, 16, 64, 256, 1024)
GIB_PAGES = 2**30 // PAGE_SIZE
SHARED_PAGES = (2**14, 2**16)  # 64 MiB and 256 MiB shared with the host
DRAWS = 40
KEY = FleetKey(b"bench" * 8)
COLD_RUNS = 5  # fresh processes of `place --index` and of `rebalance --index`
MIB = 2**20


def vm_sketch(name: str, values: np.ndarray, domain: str = "default") -> VmSketch:
    values = np.unique(values.astype(np.uint64))
    return VmSketch(
        name=name,
        uuid=None,
        vmid=None,
        platform="libvirt",
        domain=domain,
        group=None,
        merges=True,
        active=True,
        ram_bytes=2**30,
        present_pages=GIB_PAGES,
        zero_pages=0,
        volatile_pages=0,
        values=values,
        counts=np.ones(values.size, dtype=np.uint32),
        exact=np.zeros(values.size, dtype=bool),
    )


def host_sketch(name: str, vms: list[VmSketch], k: int, available: int = 2**36) -> HostSketch:
    return HostSketch(name, KEY.key_id, k, True, 256, 2**39, available, 0.0, None, tuple(vms))


def error_against_k() -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    rows = []
    for k in KS:
        for shared in SHARED_PAGES:
            errors = []
            size = 0
            for _ in range(DRAWS if k > 1 else 1):
                digests = rng.integers(0, 2**63, size=(GIB_PAGES, 2), dtype=np.int64).astype(
                    np.uint64
                )
                sampled = digests[digests[:, 0] % np.uint64(k) == 0]
                theirs = digests[:shared][digests[:shared, 0] % np.uint64(k) == 0]
                mine = vm_sketch("vm", sampled[:, 1])
                host = host_sketch("h", [vm_sketch("other", theirs[:, 1])], k)
                there = np.isin(mine.values, theirs[:, 1])
                _saved, predicted = saving(mine, k, host, there)
                errors.append((predicted - shared) / shared)
                size = size or len(json.dumps(to_json(host_sketch("h", [mine], k), KEY)))
            rms = float(np.sqrt(np.mean(np.square(errors))))
            rows.append(
                {
                    "k": k,
                    "shared_mib": shared * PAGE_SIZE // 2**20,
                    "rms_error_percent": round(100 * rms, 2),
                    "max_error_percent": round(100 * float(np.max(np.abs(errors))), 2),
                    "theory_percent": round(100 * (k / shared) ** 0.5, 2) if k > 1 else 0.0,
                    "sketch_kib_per_gib": round(size / 1024, 1),
                }
            )
    return rows


def fleet(hosts: int, vms_per_host: int, k: int = 64) -> list[HostSketch]:
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 2**63, 2048, dtype=np.int64) for _ in range(10)]
    out = []
    for h in range(hosts):
        vms = []
        for v in range(vms_per_host):
            image = images[int(rng.integers(0, 10))]
            unique = rng.integers(0, 2**63, 1024, dtype=np.int64)
            vms.append(vm_sketch(f"h{h}-vm{v}", np.concatenate([image, unique])))
        out.append(host_sketch(f"host-{h}", vms, k, available=2**38))
    return out


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(action: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def sketching_cost(runs: int = 5) -> dict[str, Any] | None:
    """CPU-seconds to sketch a fresh 1 GiB guest-like process, for `runs` guests one after
    another (each started, filled and sketched once, as a host sketches a VM): the median and
    every run. The first 1 GiB that this VM's host backs after a pause can read up to twice as
    slowly (seen with the old reader too), which is why one run is not the figure."""
    if os.geteuid() != 0:
        return None
    from lab.simguest import spawn

    spent, walls, samples = [], [], 0
    for run in range(runs):
        guest = spawn(f"bench-sketch-{run}", mib=1024, image="web", zero_percent=10)
        try:
            subjects = [
                Subject(
                    guest.pid, "sketched", None, None, "libvirt", "default", None, True, True, 2**30
                )
            ]
            before = cpu()
            wall, (sketch,) = timed(
                lambda given=subjects: take(HostPaths(), given, KEY, interval=0.0)
            )
            spent.append(round(cpu() - before, 3))
            walls.append(round(wall, 3))
            samples = int(sketch.values.size)
        finally:
            guest.terminate()
            guest.wait()
    return {
        "guest_mib": 1024,
        "cpu_seconds": statistics.median(spent),
        "cpu_seconds_runs": spent,
        "cpu_seconds_max": max(spent),
        "wall_seconds": statistics.median(walls),
        "samples": samples,
    }


def loading(hosts: list[HostSketch]) -> float:
    """Seconds to read one host's sealed sketch document back (JSON, seal, every field), as
    `place` and `rebalance` do for each --host before they compute anything."""
    documents = [json.dumps(to_json(h, KEY)) for h in hosts]
    spent, _ = timed(lambda: [from_json(json.loads(d), "bench", KEY) for d in documents])
    return spent / len(documents)


def command(*args: str) -> float:
    """Seconds from a fresh `ksmpolicy` process's exec to its exit (it must succeed)."""
    argv = [sys.executable, "-m", "ksmpolicy", *args]
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def with_index(hosts: list[HostSketch]) -> dict[str, Any]:
    """The fleet index of `hosts`: built by `ksmpolicy index` from their sealed documents and
    by write_index from the sketches in memory; `place` from it in fresh processes, beside
    `place` over the documents."""
    now = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-index-") as work:
        root = Path(work)
        key = root / FLEET_KEY.lstrip("/")
        key.parent.mkdir(parents=True)
        key.write_text(KEY.secret.hex() + "\n")
        key.chmod(0o600)
        given = []
        for host in hosts:
            path = root / f"{host.host}.json"
            path.write_text(json.dumps(to_json(dataclasses.replace(host, taken_at=now), KEY)))
            given += ["--host", str(path)]
        where = ["--root", str(root)]
        index_command = command("index", *given, *where, "--out", str(root / "index"))
        build, size = timed(lambda: write_index(root / "again", hosts, built_at=now))
        load, index = timed(
            lambda: load_index(root / "again", KEY.key_id, check_owner=os.geteuid() == 0)
        )
        question, (_vm, ranked) = timed(lambda: index.place("h2-vm0"))
        expected = place(hosts, "h2-vm0")[1]
        assert ranked == expected, "the index does not predict what place does"
        runs = [
            command("place", f"h{3 + n}-vm0", *where, "--index", str(root / "index"), "--json")
            for n in range(COLD_RUNS)
        ]
        plan, (moves, weighed) = timed(lambda: planned(index.fleet()))
        sketches_plan, expected = timed(lambda: rebalance(hosts, max_moves=5, min_gain_bytes=MIB))
        assert [(m.vm.name, m.target, m.gain_bytes) for m in moves] == [
            (m.vm.name, m.target, m.gain_bytes) for m in expected
        ], "the index does not plan what rebalance does on the sketches"
        rebalance_runs = [
            command("rebalance", *where, "--index", str(root / "index"), "--min-gain-mib", "1")
            for _ in range(COLD_RUNS)
        ]
        documents = command("place", "h2-vm0", *where, *given, "--json")
        start = command("--version")
    return {
        "index_command_seconds": round(index_command, 1),
        "index_build_seconds": round(build, 1),
        "index_mib": round(size / 2**20),
        "index_load_seconds": round(load, 3),
        "index_question_seconds": round(question, 3),
        "place_index_cold_seconds": round(statistics.median(runs), 3),
        "place_index_cold_max_seconds": round(max(runs), 3),
        "place_index_cold_runs": COLD_RUNS,
        "place_documents_cold_seconds": round(documents, 1),
        "rebalance_index_cold_seconds": round(statistics.median(rebalance_runs), 3),
        "rebalance_index_cold_max_seconds": round(max(rebalance_runs), 3),
        "rebalance_index_plan_seconds": round(plan, 3),
        "rebalance_sketches_seconds": round(sketches_plan, 1),
        "rebalance_index_moves": len(moves),
        "rebalance_index_gain_mib": sum(m.gain_bytes for m in moves) // MIB,
        "rebalance_index_weighed": weighed,
        "rebalance_index_vms": sum(len(h.vms) for h in hosts),
        "cli_start_seconds": round(start, 3),
    }


def planned(fleet: Fleet) -> tuple[list[Move], int]:
    """`rebalance`'s five moves (1 MiB the least gain) and how many VMs it weighed for them."""
    planner = Planner(fleet)
    moves: list[Move] = []
    while len(moves) < 5 and (move := planner.best_move(0, MIB)) is not None:
        moves.append(move)
    return moves, planner.weighed


def scale() -> dict[str, Any]:
    hosts = fleet(1000, 50)
    cold, (_vm, ranked) = timed(lambda: place(hosts, "h0-vm0"))
    warm, _ = timed(lambda: place(hosts, "h1-vm0"))  # nothing is kept between the two
    per_document = loading(hosts[:20])
    small = fleet(20, 50)
    rebalance_seconds, moves = timed(lambda: rebalance(small, max_moves=5, min_gain_bytes=2**20))
    return {
        "place_hosts": 1000,
        "place_vms_per_host": 50,
        "place_first_seconds": round(cold, 3),
        "place_seconds": round(warm, 3),
        "place_best": ranked[0].host,
        "document_seconds": round(per_document, 4),
        "document_mib": round(len(json.dumps(to_json(hosts[0], KEY))) / 2**20, 2),
        "documents_1000_seconds": round(1000 * per_document, 1),
        "rebalance_hosts": 20,
        "rebalance_vms_per_host": 50,
        "rebalance_seconds": round(rebalance_seconds, 3),
        "rebalance_moves": len(moves),
        **with_index(hosts),
    }


def markdown(machine: str, found: dict[str, Any]) -> list[str]:
    lines = [
        "# Placement by sharing: sketch size and error against K, and what it costs",
        "",
        f"Machine: {machine}. Reproduce: `make bench-placement` (the sketching cost needs root).",
        "",
        "Error of the predicted shared memory (a 1 GiB VM of distinct contents, "
        f"{DRAWS} draws per row) and the sketch's size as JSON:",
        "",
        "| K | shared MiB | RMS error | max error | sqrt(K / shared pages) | sketch KiB per GiB |",
        "|---|---|---|---|---|---|",
    ]
    for row in found["error_against_k"]:
        lines.append(
            f"| {row['k']} | {row['shared_mib']} | {row['rms_error_percent']} % "
            f"| {row['max_error_percent']} % | {row['theory_percent']} % "
            f"| {row['sketch_kib_per_gib']} |"
        )
    cost = found["sketching"]
    lines += [""]
    if cost:
        lines.append(
            f"Sketching a {cost['guest_mib']} MiB guest: {cost['cpu_seconds']} CPU-s, the median "
            f"of {len(cost['cpu_seconds_runs'])} fresh guests ({cost['cpu_seconds_runs']}; "
            f"{cost['wall_seconds']} s, {cost['samples']} samples; target 0.5 CPU-s)."
        )
    at = found["scale"]
    lines += [
        "",
        f"`place` over {at['place_hosts']} hosts of {at['place_vms_per_host']} VMs, on sketches "
        f"already read: {at['place_first_seconds']} s for a first VM, {at['place_seconds']} s "
        "for another (target 1 s; nothing is built or kept between them). Reading the "
        f"sketches first costs more: one host's sealed document ({at['document_mib']} MiB) "
        f"takes {at['document_seconds']} s to read back (JSON, seal, every field; measured on "
        f"20), so {at['documents_1000_seconds']} s for 1,000 hosts. "
        f"`rebalance` over {at['rebalance_hosts']} hosts of {at['rebalance_vms_per_host']} "
        f"VMs, on sketches already read: {at['rebalance_seconds']} s for "
        f"{at['rebalance_moves']} moves.",
        "",
        f"The fleet index of those {at['place_hosts']} hosts: `ksmpolicy index` over their "
        f"sealed documents took {at['index_command_seconds']} s in a fresh process (reading "
        f"them, then {at['index_build_seconds']} s to build and write the "
        f"{at['index_mib']} MiB index from the sketches in memory). `place --index` in a fresh "
        f"process, from its exec to its exit: {at['place_index_cold_seconds']} s (median of "
        f"{at['place_index_cold_runs']}, the slowest {at['place_index_cold_max_seconds']} s; "
        f"target 1 s), of which loading the index {at['index_load_seconds']} s and the "
        f"question {at['index_question_seconds']} s (in-process); Python's start with the "
        f"command line alone (`--version`, no numpy) takes {at['cli_start_seconds']} s. "
        f"`place --host` over the same documents, for comparison: "
        f"{at['place_documents_cold_seconds']} s.",
        "",
        f"`rebalance --index` over the same index (five moves, 1 MiB the least gain) in a "
        f"fresh process: {at['rebalance_index_cold_seconds']} s (median of {COLD_RUNS}, the "
        f"slowest {at['rebalance_index_cold_max_seconds']} s; target 10 s); the plan alone, "
        f"in-process: {at['rebalance_index_plan_seconds']} s, for "
        f"{at['rebalance_index_moves']} moves gaining {at['rebalance_index_gain_mib']} MiB, "
        f"having weighed {at['rebalance_index_weighed']} of the {at['rebalance_index_vms']} "
        "VMs on every host (the others' bound could not beat the best move found). The same "
        f"plan on the sketches in memory, bounds computed first: "
        f"{at['rebalance_sketches_seconds']} s.",
    ]
    return lines


PARTS: dict[str, Callable[[], Any]] = {
    "error_against_k": error_against_k,
    "sketching": sketching_cost,
    "scale": scale,
}


def main() -> int:
    """Every part, or (`--only PART ...`) those parts again and the rest as stored."""
    arguments = sys.argv[1:]
    names = arguments[1:] if arguments[:1] == ["--only"] else list(PARTS)
    if (arguments and arguments[0] != "--only") or not names or not set(names) <= set(PARTS):
        print(f"usage: bench_placement [--only {'|'.join(PARTS)} ...]", file=sys.stderr)
        return 2
    again = set(names) != set(PARTS)
    stored = json.loads((RESULTS / "placement.json").read_text()) if again else {}
    found = {name: PARTS[name]() if name in names else stored[name] for name in PARTS}
    machine = machine_name()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "placement.json").write_text(
        json.dumps({"machine": machine, **found}, indent=2) + "\n"
    )
    lines = markdown(machine, found)
    (RESULTS / "placement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
