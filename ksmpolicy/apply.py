"""Bringing VM definitions in line with the policy: one loop for libvirt and Proxmox VE.

For each VM the platform gives a `Target`: how to read its definition, how the policy rewrites
it (pure), and how to write it back (libvirt `defineXML`, Proxmox `qm set`). The loop is the
same everywhere:

1. read and rewrite, against a deadline per VM, so one VM whose disk sits on a hung NFS mount
   does not stop the others;
2. no change: done; a dry run: the unified diff;
3. save the old definition in the backup directory (root-only, written atomically);
4. read the definition again and write only if it is still what was rewritten: an edit made
   in between is reported as a conflict, never overwritten.

A VM that fails is reported and the others go on.
"""

from __future__ import annotations

import difflib
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ksmpolicy.deadline import DeadlineExceeded, call_with_deadline
from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.files import make_private_dir, write_atomic
from ksmpolicy.policy.decide import Decision
from ksmpolicy.quoting import one_line

DEADLINE_SECONDS = 30.0  # per VM: reading its definition and following its disks' chains


@dataclass(frozen=True)
class Planned:
    """A definition as the policy wants it."""

    new: str
    name: str  # the VM's name, for messages
    decision: Decision | None  # None: not the policy's (a restore)
    note: str | None = None


class Target(Protocol):
    """One VM definition on one platform."""

    key: str  # how the user names it: a domain name, a VMID
    suffix: str  # of its backup file: ".xml", ".conf"

    def read(self) -> str: ...
    def plan(self, text: str) -> Planned: ...
    def write(self, old: str, new: str) -> None: ...
    def labels(self, name: str) -> tuple[str, str]: ...
    def backup_stem(self, name: str) -> str: ...


@dataclass(frozen=True)
class Outcome:
    key: str
    name: str
    status: str  # unchanged | changed | would change | failed
    decision: Decision | None = None
    diff: str = ""
    backup: str | None = None
    note: str | None = None
    error: str | None = None


class ApplyError(KsmPolicyError):
    """A VM's definition could not be brought in line (reported per VM, never fatal)."""


def apply_targets(
    targets: Iterable[Target],
    *,
    backup_dir: Path | None,
    dry_run: bool = False,
    deadline_seconds: float = DEADLINE_SECONDS,
) -> list[Outcome]:
    return [_apply_one(t, backup_dir, dry_run, deadline_seconds) for t in targets]


def _apply_one(
    target: Target, backup_dir: Path | None, dry_run: bool, deadline_seconds: float
) -> Outcome:
    def read_and_plan() -> tuple[str, Planned]:
        text = target.read()
        return text, target.plan(text)

    try:
        old, planned = call_with_deadline(read_and_plan, deadline_seconds, f"reading {target.key}")
    except (KsmPolicyError, OSError, ValueError, DeadlineExceeded) as exc:
        return Outcome(target.key, "?", "failed", error=one_line(str(exc)))
    name, decision, note = planned.name, planned.decision, planned.note
    if planned.new == old:
        return Outcome(target.key, name, "unchanged", decision, note=note)
    before, after = target.labels(name)
    diff = "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True), planned.new.splitlines(keepends=True), before, after
        )
    )
    if dry_run:
        return Outcome(target.key, name, "would change", decision, diff, note=note)
    try:
        backup = (
            str(write_backup(backup_dir, target.backup_stem(name), target.suffix, old))
            if backup_dir is not None
            else None
        )
        current = call_with_deadline(target.read, deadline_seconds, f"re-reading {target.key}")
        if current != old:
            raise ApplyError(
                "its definition changed while ksmpolicy was working on it; nothing written "
                "(run apply again)"
            )
        target.write(old, planned.new)
    except (KsmPolicyError, OSError, DeadlineExceeded) as exc:
        return Outcome(
            target.key, name, "failed", decision, diff, note=note, error=one_line(str(exc))
        )
    return Outcome(target.key, name, "changed", decision, diff, backup, note)


def write_backup(directory: Path, stem: str, suffix: str, text: str) -> Path:
    """Save a definition as DIR/STEM.TIMESTAMP.SUFFIX, root-only, written atomically. A backup
    directory that others can write to is refused."""
    try:
        make_private_dir(directory)
    except PermissionError as exc:
        raise ApplyError(f"refusing backup directory {directory}: {exc}") from None
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:100]
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}"
    path = directory / f"{safe}.{stamp}{suffix}"
    write_atomic(path, text.encode("utf-8"), 0o600, private_dir=True)
    return path
