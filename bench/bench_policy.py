"""Benchmark: `ksmpolicy check` on a large policy, and deciding 10,000 VMs against it.

Targets (issue 2): check of 10,000 `vms:` entries and 500 rules <= 1 s; 10,000 decisions
<= 0.5 s. The baseline is the plain first-match loop (no index), measured in the same run.
Writes bench/results/policy.json and bench/results/policy.md.
"""

from __future__ import annotations

import fnmatch
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ksmpolicy.policy.decide import Decider, VmFacts
from ksmpolicy.policy.load import load_policy
from ksmpolicy.policy.model import Policy, Rule

RESULTS = Path(__file__).resolve().parent / "results"
TAGS = [f"tag{i}" for i in range(300)]


def make_policy(vms: int, rules: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    lines = ["version: 1", "enforcement: warn", "default: merge", "groups:"]
    for g in range(20):
        lines.append(f"  img{g}: {{images: ['/var/lib/libvirt/images/base-{g}-*.qcow2']}}")
    lines.append("rules:")
    for r in range(rules):
        kind = r % 4
        if kind == 0:
            match = f"{{tags: [{rng.choice(TAGS)}, {rng.choice(TAGS)}]}}"
        elif kind == 1:
            match = f"{{names: ['svc{r}-*', 'app{r}-?']}}"
        elif kind == 2:
            match = f"{{groups: [img{r % 20}], tags: [{rng.choice(TAGS)}]}}"
        else:
            match = f"{{names: ['host-{r}'], images: ['/srv/images/{r}/*']}}"
        action = "exclude" if r % 3 else "merge"
        lines += [f"  - name: rule {r}", f"    match: {match}", f"    action: {action}"]
    lines.append("vms:")
    for v in range(vms):
        lines.append(f"  vm-{v}: {{tags: [{rng.choice(TAGS)}]}}")
    return "\n".join(lines) + "\n"


def make_vms(count: int, seed: int = 2) -> list[VmFacts]:
    rng = random.Random(seed)
    vms = []
    for v in range(count):
        name = rng.choice([f"vm-{v}", f"svc{rng.randrange(500)}-x", f"host-{rng.randrange(500)}"])
        images = (f"/var/lib/libvirt/images/base-{rng.randrange(30)}-a.qcow2",)
        vms.append(VmFacts(name=name, tags=frozenset(rng.sample(TAGS, 2)), images=images))
    return vms


def naive_rule(policy: Policy, vm: VmFacts) -> Rule | None:
    """The baseline: what a straightforward loop over rules and fnmatch would do."""
    tags = set(vm.tags) | set(policy.vms.get(vm.name, ()))
    group = next(
        (
            g.name
            for g in policy.groups
            if any(fnmatch.fnmatchcase(i, p) for i in vm.images for p in g.images)
        ),
        None,
    )
    for rule in policy.rules:
        m = rule.match
        if (
            (not m.names or any(fnmatch.fnmatchcase(vm.name, p) for p in m.names))
            and (not m.tags or set(m.tags) & tags)
            and (not m.groups or group in m.groups)
            and (
                not m.images or any(fnmatch.fnmatchcase(i, p) for i in vm.images for p in m.images)
            )
        ):
            return rule
    return None


def best_of(runs: int, func: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    text = make_policy(10_000, 500)
    vms = make_vms(10_000)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "policy.yaml"
        path.write_text(text)
        path.chmod(0o644)
        load_seconds = best_of(3, lambda: load_policy(path))
        exe = Path(sys.executable).parent / "ksmpolicy"

        def run_check() -> None:
            subprocess.run([str(exe), "check", str(path)], check=True, capture_output=True)

        check_seconds = best_of(3, run_check)
        policy = load_policy(path)
    decider = Decider(policy)
    decide_seconds = best_of(3, lambda: [decider.decide(vm) for vm in vms])
    naive_vms = vms[:1000]
    naive_seconds = best_of(1, lambda: [naive_rule(policy, vm) for vm in naive_vms]) * 10
    agree = all(
        (decider.decide(vm).rule) == (r.name if (r := naive_rule(policy, vm)) else None)
        for vm in naive_vms
    )
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    results = {
        "machine": f"{machine}, Python {platform.python_version()}",
        "policy": {"vms_entries": 10_000, "rules": 500, "bytes": len(text)},
        "load_policy_seconds": round(load_seconds, 4),
        "ksmpolicy_check_wall_seconds": round(check_seconds, 4),
        "decide_10000_seconds": round(decide_seconds, 4),
        "naive_loop_10000_seconds_extrapolated": round(naive_seconds, 4),
        "speedup_vs_naive": round(naive_seconds / decide_seconds, 1),
        "agrees_with_naive_on_1000": agree,
        "targets": {"check_seconds": 1.0, "decide_10000_seconds": 0.5},
        "met": check_seconds <= 1.0 and decide_seconds <= 0.5 and agree,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "policy.json").write_text(json.dumps(results, indent=2) + "\n")
    table = [
        "| measure | seconds | target |",
        "|---|---|---|",
        f"| load + validate (in process) | {load_seconds:.3f} | |",
        f"| `ksmpolicy check` (whole process) | {check_seconds:.3f} | ≤ 1.0 |",
        f"| decide 10,000 VMs (indexed) | {decide_seconds:.3f} | ≤ 0.5 |",
        f"| decide 10,000 VMs (plain loop, baseline) | {naive_seconds:.3f} | |",
        "",
        f"Indexed decisions are {naive_seconds / decide_seconds:.0f}× faster than the plain loop "
        f"and agree with it on 1,000 sampled VMs: {agree}. Machine: {results['machine']}. "
        "Reproduce: `make bench-policy`.",
    ]
    (RESULTS / "policy.md").write_text(
        "# Policy engine benchmark\n\n10,000 `vms:` entries, 500 rules.\n\n"
        + "\n".join(table)
        + "\n"
    )
    print("\n".join(table))
    return 0 if results["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
