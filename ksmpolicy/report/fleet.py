"""One table over many hosts: `ksmpolicy fleet FILE...` reads what `ksmpolicy status --json`
printed on each host (gathered by ssh, Ansible or cron; see docs/status-and-metrics.md) and
puts the hosts side by side, most saved first, with the findings that need an operator.

It reads only the files it is given; the hosts' JSON is their word (names and messages are
printed escaped), and a file that is not status JSON is an error that names it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.files import read_regular

MAX_STATUS_BYTES = 64 * 2**20
NEEDS_OPERATOR = ("error", "warning")


@dataclass(frozen=True)
class HostRow:
    host: str
    saved_bytes: int
    ksmd_cpu_percent: float | None
    vms: int
    running: bool
    controller: str
    passive: str | None
    errors: int
    warnings: int
    findings: tuple[tuple[str, str, str, str | None], ...]  # (severity, vm, message, fix)


def read_host(path: Path) -> HostRow:
    """One host's row from its `status --json`; the host is named by the JSON's `hostname`
    (status prints it) or, for older output, by the file's name."""
    try:
        raw = read_regular(path, MAX_STATUS_BYTES)
        data = json.loads(raw)
    except OSError as exc:
        raise KsmPolicyError(f"{path}: cannot read it: {exc.strerror}") from None
    except ValueError as exc:
        raise KsmPolicyError(f"{path}: not JSON ({exc}): give `ksmpolicy status --json`") from None
    if not isinstance(data, dict) or not isinstance(data.get("host"), dict):
        raise KsmPolicyError(f"{path}: not the JSON of `ksmpolicy status --json` (no host)")
    host: dict[str, Any] = data["host"]
    findings = tuple(
        (str(f.get("severity")), str(f.get("vm") or "host"), str(f.get("message")), f.get("fix"))
        for f in data.get("findings") or ()
        if isinstance(f, dict)
    )
    cpu = host.get("ksmd_cpu_percent")
    return HostRow(
        host=str(data.get("hostname") or path.stem),
        saved_bytes=int(host.get("saved_bytes") or 0),
        ksmd_cpu_percent=float(cpu) if isinstance(cpu, int | float) else None,
        vms=len(data.get("vms") or ()),
        running=bool(host.get("running")),
        controller=str(host.get("controller") or "-"),
        passive=None if host.get("passive") is None else str(host["passive"]),
        errors=sum(f[0] == "error" for f in findings),
        warnings=sum(f[0] == "warning" for f in findings),
        findings=findings,
    )


def fleet(paths: Sequence[Path]) -> list[HostRow]:
    """The hosts, most saved first."""
    return sorted((read_host(p) for p in paths), key=lambda r: (-r.saved_bytes, r.host))
