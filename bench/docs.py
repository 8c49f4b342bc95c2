"""Benchmark figures in the README and docs/, generated from bench/results/*.json.

A figure in a document stands between two markers, and is what the results say:

    <!-- bench:libvirt.json#hook_prepare_ms|.1f -->17.6<!-- /bench -->    one value
    <!-- bench:ksm-headline -->...<!-- /bench -->                        a named block

A value's address is FILE#PATH|FORMAT: PATH walks the JSON by keys (`a.b.c`), a list by the
item whose key has a value (`runs[contender=ksmpolicy].figures.seconds_to_90_a`), and FORMAT
is Python's (`.1f`, `,`; none: as it is; `never` where the JSON has null). Named blocks are the
tables and sentences below.

`python -m bench.docs --check` (what `make docs-check` runs, and `make test` with it) renders
every marker and fails on any that differs from the document, naming the file and line: a
figure changed by hand, or results re-run without the docs. `--write` rewrites the documents
from the results.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench/results"
MARK = re.compile(r"<!-- bench:(?P<name>[^ ]+) -->(?P<body>.*?)<!-- /bench -->", re.S)
_STEP = re.compile(r"(?P<key>[^.\[]+)(?:\[(?P<field>[^=\]]+)=(?P<value>[^\]]*)\])?")


class DocsError(Exception):
    """A marker that names no result, or a result that is not there."""


@cache
def results(name: str) -> Any:
    path = RESULTS / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DocsError(f"no results file {path.relative_to(REPO)}") from None


def lookup(data: Any, path: str) -> Any:
    """The value at PATH (see the module docstring)."""
    for step in path.split("."):
        found = _STEP.fullmatch(step)
        if found is None or not isinstance(data, dict) or found["key"] not in data:
            raise DocsError(f"no {step!r} in the results (at {path!r})")
        data = data[found["key"]]
        if found["field"] is not None:
            items = [i for i in data if str(i.get(found["field"])) == found["value"]]
            if len(items) != 1:
                raise DocsError(f"{len(items)} items with {found['field']}={found['value']}")
            data = items[0]
    return data


def value(address: str) -> str:
    """A single figure: FILE#PATH|FORMAT."""
    file, _, rest = address.partition("#")
    path, _, spec = rest.partition("|")
    found = lookup(results(file), path)
    if found is None:
        return "never"
    return format(found, spec)


# --- named blocks ------------------------------------------------------------------------------


def _ksm_runs(name: str) -> list[dict[str, Any]]:
    return [r for r in results(name)["runs"] if not r.get("skipped")]


def _seconds(figure: Any) -> str:
    return "never" if figure is None else f"{figure}"


def ksm_headline() -> str:
    """The README's table: time to 90 % after each group, ksmd CPU, quiet CPU."""
    lines = [
        "| contender | 90 % after group A (s) | 90 % after group B (s) | ksmd CPU-s | quiet ksmd "
        "CPU % |",
        "|---|---|---|---|---|",
    ]
    for run in _ksm_runs("ksm.json"):
        f = run["figures"]
        lines.append(
            f"| {run['contender']} | {_seconds(f['seconds_to_90_a'])} | "
            f"{_seconds(f['seconds_to_90_b'])} | {f['ksmd_cpu_seconds']} | "
            f"{f['quiet_ksmd_cpu_percent']} |"
        )
    return "\n".join(lines) + "\n\n" + ksm_bound("ksm.json", "group A")


def ksm_bound(name: str, what: str) -> str:
    """The physical bound and ksmpolicy's time as a multiple of it, on the fastest guests of
    the run and on ksmpolicy's own."""
    data = results(name)
    bound = data["physical_bound_seconds"]
    ours = next(r for r in data["runs"] if r["contender"] == "ksmpolicy")["figures"]
    own = round(bound - earliest_ready(data) + ours["ready_after_seconds"], 1)
    return (
        f"Physical bound for {what}: {bound} s on the fastest guests of the run (ksmpolicy: "
        f"{ours['seconds_to_90_a'] / bound:.2f}× it), {own} s on ksmpolicy's own guests, which "
        f"were ready after {ours['ready_after_seconds']} s (ksmpolicy: "
        f"{ours['seconds_to_90_a'] / own:.2f}× it)."
    )


def earliest_ready(data: dict[str, Any]) -> float:
    """The earliest any contender's guests were ready, as the bound counts it."""
    return min(
        float(ready)
        for run in data["runs"]
        if (ready := run["figures"].get("ready_after_seconds")) is not None
    )


def ksm_table(name: str) -> str:
    """The full table of one pacing run, as bench/ksm_bench.py writes it into NAME.md."""
    text = (RESULTS / name.replace(".json", ".md")).read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    return "\n".join(table)


def ksm_real_bound() -> str:
    """The measured bound of the real-guest pacing run and each contender's multiple of it."""
    data = results("ksm-real.json")
    bound = data["physical_bound_seconds"]
    if bound is None:
        return "No bound was measured (the contender `flat-out` did not reach 90 %)."
    multiples = ", ".join(
        f"{run['contender']} {seconds / bound:.2f}×"
        if (seconds := run["figures"].get("seconds_to_90_a")) is not None
        else f"{run['contender']} never"
        for run in _ksm_runs("ksm-real.json")
        if run["contender"] != "flat-out"
    )
    return f"ksmd flat out from the first start reached 90 % in {bound} s; {multiples}."


def zero_pages_sentence() -> str:
    """What use_zero_pages did on guests that zero half their memory."""
    windows = results("zero-pages.json")["results"]["windows"]
    off, on = windows["use_zero_pages=0"], windows["use_zero_pages=1"]
    metadata = (off["saved_mib"] - off["general_profit_mib"]) - (
        on["saved_mib"] - on["general_profit_mib"]
    )
    return (
        f"`use_zero_pages=1` reached 90 % of the savings in {on['seconds_to_90']} s instead of "
        f"{off['seconds_to_90']} s, for {on['cpu_seconds_to_90']} ksmd CPU-seconds instead of "
        f"{off['cpu_seconds_to_90']}, and KSM's own metadata took {metadata:.0f} MiB less; at "
        f"that fixed fast pace it cost more CPU afterwards ({on['cpu_seconds_total']} against "
        f"{off['cpu_seconds_total']} CPU-seconds over 60 s)"
    )


def estimate_sentence() -> str:
    """The estimate's worst error, per kind of workload."""
    found = results("estimate.json")["results"]
    processes = max(
        abs(v["error_percent"])
        for name, vms in found.items()
        if "guest-like" in name
        for v in vms
        if "error_percent" in v
    )
    guests = max(
        abs(v["error_percent"])
        for name, vms in found.items()
        if "TCG" in name
        for v in vms
        if "error_percent" in v
    )
    return (
        f"within {processes} % per VM and host-wide on guest-like processes in three groups, "
        f"with `use_zero_pages` 0 and 1 (target 5 %), and within {guests} % on two TCG guests "
        "booted from one image (target 10 %)"
    )


BLOCKS: dict[str, Callable[[], str]] = {
    "zero-pages": zero_pages_sentence,
    "estimate-accuracy": estimate_sentence,
    "ksm-headline": ksm_headline,
    "ksm-table": lambda: ksm_table("ksm.json"),
    "ksm-bound": lambda: ksm_bound("ksm.json", "group A"),
    "ksm-all-at-once-table": lambda: ksm_table("ksm-all-at-once.json"),
    "ksm-all-at-once-bound": lambda: ksm_bound("ksm-all-at-once.json", "all at once"),
    "ksm-real-table": lambda: ksm_table("ksm-real.json"),
    "ksm-real-law-table": lambda: ksm_table("ksm-real-law.json"),
    "ksm-real-bound": ksm_real_bound,
}


def render(name: str) -> str:
    """A value, or a named block: a table on lines of its own, a sentence inline."""
    if "#" in name:
        return value(name)
    if name not in BLOCKS:
        raise DocsError(f"unknown block {name!r} (known: {', '.join(sorted(BLOCKS))})")
    text = BLOCKS[name]().strip("\n")
    return "\n" + text + "\n" if "\n" in text or text.startswith("|") else text


# --- documents ---------------------------------------------------------------------------------


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def check(path: Path, *, write: bool) -> list[str]:
    """Problems with the markers of one document, as FILE:LINE: message; rewrites it with
    `write`."""
    text = path.read_text()
    problems = []
    pieces = []
    at = 0
    for found in MARK.finditer(text):
        line = text.count("\n", 0, found.start()) + 1
        where = f"{path.relative_to(REPO)}:{line}"
        try:
            wanted = render(found["name"])
        except DocsError as exc:
            problems.append(f"{where}: {found['name']}: {exc}")
            continue
        if found["body"] != wanted:
            shown = found["body"].strip() if "\n" not in wanted else "(the block)"
            problems.append(
                f"{where}: {found['name']}: the document says {shown!r}, the results "
                f"{wanted.strip()!r}"[:400]
            )
        pieces.append(text[at : found.start("body")])
        pieces.append(wanted)
        at = found.end("body")
    pieces.append(text[at:])
    if write:
        path.write_text("".join(pieces))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the documents' figures")
    parser.add_argument("files", nargs="*", type=Path, help="documents (default: all)")
    args = parser.parse_args(argv)
    problems = []
    files = [f.resolve() for f in args.files] or documents()
    for path in files:
        problems += check(path, write=args.write)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems and not args.write:
        print(
            f"docs-check: {len(problems)} figures differ from bench/results "
            "(python -m bench.docs --write regenerates them)",
            file=sys.stderr,
        )
        return 1
    return 0 if not problems or args.write else 1


if __name__ == "__main__":
    sys.exit(main())
