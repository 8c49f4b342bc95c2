"""The VMs in the inventory: each process the scan found, its platform's facts (its identity),
the policy's decision, and whether it runs as decided."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ksmpolicy.files import read_regular
from ksmpolicy.hookcore import said_path
from ksmpolicy.inventory.model import VmStatus
from ksmpolicy.kernel.procfs import started_at
from ksmpolicy.kernel.scan import VmProcess
from ksmpolicy.paths import PAGE_SIZE, HostPaths
from ksmpolicy.platforms.base import Platform
from ksmpolicy.policy.decide import Decider, Decision, VmFacts
from ksmpolicy.policy.model import Action
from ksmpolicy.quoting import one_line


def vm_status(
    paths: HostPaths, process: VmProcess, decider: Decider | None, platforms: Sequence[Platform]
) -> VmStatus:
    """One process as the inventory holds it; `platforms` are asked in order for its facts."""
    facts, source = _facts(paths, process, platforms)
    decision = decider.decide(facts) if decider is not None else None
    ksm = process.ksm
    return VmStatus(
        pid=process.pid,
        name=facts.name,
        vmid=process.vmid,
        uuid=facts.uuid or process.uuid,
        kind=process.kind,
        source=source,
        group=decision.group if decision else None,
        decision=decision.verdict if decision else None,
        rule=decision.rule if decision else None,
        compliant=_compliant(process, decision),
        ram_bytes=process.ram_bytes,
        mergeable_bytes=process.mergeable_bytes,
        merged_bytes=(ksm.merging_pages or 0) * PAGE_SIZE if ksm else 0,
        zero_bytes=(ksm.zero_pages or 0) * PAGE_SIZE if ksm else 0,
        profit_bytes=ksm.process_profit if ksm else None,
        saved_bytes=((ksm.merging_pages or 0) + (ksm.zero_pages or 0)) * PAGE_SIZE if ksm else 0,
        domain=decision.domain if decision else None,
        domain_reason=decision.domain_reason if decision else None,
        merging_now=_merging_now(process),
        mergeable_vmas=process.mergeable_vmas,
        trusted=process.trusted,
        start=process.start,
        unit=process.unit,
        reason=decision.reason if decision else None,
        residue_vmas=process.mergeable_vmas if process.ram_mergeable is False else 0,
        mergeable_size=process.mergeable_size,
        ram_unmergeable=process.ram_unmergeable,
        mem_merge=process.mem_merge,
        hook_said=_hook_said(paths, process, facts),
    )


# The hook runs before QEMU starts (libvirt's prepare, Proxmox's pre-start): what it said counts
# for the running process when it is at most this much older.
HOOK_BEFORE_START_SECONDS = 300.0


def _hook_said(paths: HostPaths, process: VmProcess, facts: VmFacts) -> tuple[str, ...]:
    """What the hook said about this VM at the start of its running process (hookcore keeps
    it in the run directory), or () when it said nothing or the note is older."""
    if process.kind != "qemu" or not process.trusted:
        return ()
    key = process.vmid or facts.name
    note = Path(said_path(str(paths.run_dir), key))
    started = started_at(paths, process.pid) or 0.0
    try:
        if note.stat().st_mtime < started - HOOK_BEFORE_START_SECONDS:
            return ()
        lines = read_regular(note, 65536).decode("utf-8", "replace").splitlines()
    except OSError:
        return ()
    if not lines or lines[0] != one_line(key):
        return ()
    return tuple(line.partition("\t")[2] for line in lines[1:] if "\t" in line)


def _merging_now(process: VmProcess) -> bool | None:
    if process.ram_mergeable is not None:
        return process.ram_mergeable
    return process.mergeable_bytes > 0 if process.kind == "qemu" else None


def _facts(
    paths: HostPaths, process: VmProcess, platforms: Sequence[Platform]
) -> tuple[VmFacts, str]:
    """The facts of the first platform that knows the process, and that platform's name."""
    for platform in platforms:
        found = platform.facts(paths, process)
        if found is not None:
            return found, platform.name
    raise AssertionError("the process platform knows every process")


def _compliant(process: VmProcess, decision: Decision | None) -> bool | None:
    """Whether the running process merges as decided: an excluded VM has nothing mergeable at
    all (neither guest RAM nor QEMU's ROMs and video RAM, which keep their start-time setting);
    one that may merge has its guest RAM mergeable; one whose RAM never merges complies."""
    if decision is None:
        return None
    if decision.action is Action.EXCLUDE:
        return process.mergeable_vmas == 0
    if not decision.merge:
        return True
    mergeable = process.ram_mergeable
    if mergeable is None:
        mergeable = process.mergeable_bytes > 0
    return mergeable
