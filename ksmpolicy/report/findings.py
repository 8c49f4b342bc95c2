"""Findings: what on the host is not as the policy says, each once, with the fix that works.

`status`, `doctor` and the metrics all show these findings: one verdict per fact, computed
here. Severity:

* `error`: the host is not as the policy says; memory that must not merge can, or nothing
  merges although the policy says it should (`doctor` fails);
* `warning`: worth acting on: merging the policy allows is lost, something needs a look;
* `info`: how things are, and what would change them.

Every fix is a command to paste, with every name quoted for a shell, and its `steps` are those
commands one by one (a step that starts a VM waits until the VM is off); tests run the steps of
each fix and check that its finding goes away.
"""

from __future__ import annotations

from ksmpolicy.inventory import platform_named
from ksmpolicy.inventory.model import VmStatus
from ksmpolicy.quoting import shell_word
from ksmpolicy.report.finding import Finding

SEVERITIES = ("error", "warning", "info")

# A VM that merges nothing after this many full scans costs scan CPU for no gain.
USELESS_AFTER_FULL_SCANS = 3
# Mergeable areas far larger than what is resident: kernels before the late-2025 fix walk
# every empty page-table entry of them.
SPARSE_RATIO, SPARSE_MIN_BYTES = 16, 4 << 30


def redefine(vm: VmStatus) -> str:
    """The command that rewrites the VM's definition for the policy (its platform's)."""
    return platform_named(vm.source).redefine(vm.ref)


def restart(vm: VmStatus) -> tuple[str, tuple[str, ...]]:
    """(fix, steps) that restart a VM so that QEMU starts again from its definition."""
    return platform_named(vm.source).restart(vm.ref)


def switch_now(vm: VmStatus) -> tuple[str, tuple[str, ...]]:
    """(fix, steps) that bring the running VM's guest RAM in line now and its definition for
    the next start."""
    return platform_named(vm.source).switch_now(vm.ref)


def vm_findings(
    vm: VmStatus, *, ksm_running: bool, full_scans: int, domains: bool = False
) -> list[Finding]:
    """What is wrong with one VM (or other KSM user), judged from its running state against
    its decision. Under trust domains (`domains`) whether its RAM should be mergeable now is
    judged by report/trust.py, which knows the active domain."""
    if vm.kind == "qemu" and not vm.trusted:
        what = (
            f"pid {vm.pid} calls itself this VM but is not run by root or the hypervisor's QEMU "
            "user: its name is its own word (it counts in no trust domain)"
        )
        return [Finding("warning", vm.name, what, impostor_fix(vm), "impostor")]
    if vm.kind != "qemu":
        return _other_findings(vm)
    found = []
    if vm.ram_unmergeable == "confidential" and vm.decision != "exclude":
        found.append(
            Finding(
                "info",
                vm.name,
                "confidential guest (guest_memfd or SEV/TDX memory is private to it): its "
                "memory is not the host's to merge",
                "nothing: exclude it in the policy to say so",
                "confidential",
            )
        )
    elif not domains:
        found += _merge_state(vm)
    if vm.mergeable_size >= SPARSE_MIN_BYTES and vm.mergeable_size > SPARSE_RATIO * max(
        vm.mergeable_bytes, 1
    ):
        found.append(
            Finding(
                "warning",
                vm.name,
                f"mergeable areas of {vm.mergeable_size >> 30} GiB with "
                f"{vm.mergeable_bytes >> 20} MiB resident: kernels before the late-2025 fix "
                "walk every empty page-table entry of them and ksmd can sit at 100 % CPU",
                "a kernel with the fix (6.18, or a stable kernel from late 2025), or less "
                "memory given to the VM",
                "sparse",
            )
        )
    if (
        vm.decision == "merge"
        and ksm_running
        and full_scans >= USELESS_AFTER_FULL_SCANS
        and vm.mergeable_bytes > 0
        and vm.merged_bytes == 0
        and vm.zero_bytes == 0
    ):
        found.append(
            Finding(
                "info",
                vm.name,
                f"merges nothing after {full_scans} full scans: it costs scan CPU for no gain",
                "exclude it in the policy (e.g. tag it and add a rule)",
                "useless",
            )
        )
    return found


def residue_finding(vm: VmStatus, why: str) -> Finding:
    """A VM whose ROMs and video RAM stay mergeable though its guest RAM is not: only a new
    QEMU process, started from a definition that says so, makes them unmergeable."""
    text, steps = restart(vm)
    return Finding(
        "error",
        vm.name,
        f"{why}, but {vm.residue_vmas} of its memory areas (ROMs, video RAM) stay mergeable: "
        "QEMU keeps the setting it started with, which a live switch cannot reach",
        f"{redefine(vm)} (if it has not run), then restart it: {text}",
        "residue",
        (redefine(vm), *steps),
    )


def impostor_fix(vm: VmStatus) -> str:
    """Look at the process, never act on the VM it names (anyone may call a process so)."""
    return f"look at it: ps -o user,args -p {vm.pid}"


def _merge_state(vm: VmStatus) -> list[Finding]:
    """Whether a VM merges as decided (outside trust domains)."""
    if vm.decision == "exclude":
        return _excluded_state(vm)
    if vm.decision == "never":
        why = vm.reason or "hugepage or shared memory never merges"
        return [_never(vm, f"the policy wants it merged, but its guest RAM never merges ({why})")]
    if vm.decision != "merge" or vm.merging_now is not False:
        return []
    if vm.ram_unmergeable in ("hugetlb", "shared"):
        backing = "hugepage-backed" if vm.ram_unmergeable == "hugetlb" else "shared memory"
        return [_never(vm, f"its guest RAM is {backing}: KSM never merges it")]
    fix, steps = switch_now(vm)
    started_off = " (QEMU started with mem-merge=off)" if vm.mem_merge is False else ""
    what = f"the policy lets it merge but its guest RAM is not mergeable{started_off}"
    return [Finding("warning", vm.name, what, fix, "merge-off", steps)]


def _excluded_state(vm: VmStatus) -> list[Finding]:
    """An excluded VM complies when nothing of it is mergeable."""
    if vm.merging_now:
        fix, steps = switch_now(vm)
        what = "excluded by the policy but its guest RAM is mergeable"
        return [Finding("error", vm.name, what, fix, "excluded-mergeable", steps)]
    if vm.residue_vmas:
        return [residue_finding(vm, "excluded by the policy and its guest RAM is off")]
    return []


def _never(vm: VmStatus, what: str) -> Finding:
    """A VM the policy wants merged whose RAM can never merge: said, not an error."""
    fix = "exclude it in the policy, or drop hugepages/shared memory if merging matters more"
    return Finding("info", vm.name, what, fix, "never")


def _other_findings(vm: VmStatus) -> list[Finding]:
    """A VMM other than QEMU, a service or a process: listed only because its memory is
    mergeable, which only the process itself can switch off."""
    if vm.decision != "exclude":
        return []
    restart_it = (
        f"ksmpolicy systemd-dropin {shell_word(vm.unit) or 'UNIT'} (MemoryKSM=no), then restart it"
        if vm.unit and vm.unit.endswith(".service")
        else "restart it under `ksmpolicy exec` (which leaves it unmergeable)"
    )
    return [
        Finding(
            "warning",
            vm.name,
            f"excluded by the policy but mergeable ({vm.kind}); only the process itself can "
            "switch that off (prctl, madvise)",
            restart_it,
            "excluded-mergeable",
        )
    ]
