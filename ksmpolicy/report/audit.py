"""The audit: no KSM page may be mapped by VMs of two trust domains, proven page by page.

One page-map walk over every process with mergeable memory, VMs or not (every mergeable VMA
is read: guest RAM, and the ROMs and video RAM a live switch leaves mergeable). Each VM counts
in its policy domain; a process that is no VM, or one not run by root or the hypervisor's user
(anyone can call a process qemu-system-x86_64), counts in domain `host`, apart from every
domain. A KSM page mapped by two domains is a violation; pages mapped to the kernel's zero
page (use_zero_pages) are no KSM page and are not counted.

Violations are pairs of processes (pid, name, domain): names need not be unique, and two VMs
of one name in two domains are two parties. Three outcomes, each with its exit status for cron
and monitoring: clean (0), a violation (1), and cannot audit (3: no page map, not root, a
kernel without KSM, a policy that cannot be read), which is never read as either.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ksmpolicy.kernel.ksm import read_ksm
from ksmpolicy.kernel.pagemap import PageMapUnavailable
from ksmpolicy.kernel.scan import ProcessScanner
from ksmpolicy.paths import HostPaths
from ksmpolicy.policy.model import Policy
from ksmpolicy.quoting import printable, quote
from ksmpolicy.report.sharing import Sharing
from ksmpolicy.report.status import collect

# Exit statuses of `ksmpolicy audit` (2 stays click's bad usage).
EXIT_CLEAN = 0
EXIT_VIOLATION = 1
EXIT_CANNOT_AUDIT = 3


@dataclass(frozen=True)
class Violation:
    a: str
    a_domain: str
    b: str
    b_domain: str
    shared_pages: int  # KSM pages with content both map
    zero_pages: int  # zero-filled KSM pages both map (use_zero_pages=0)
    a_pid: int = 0
    b_pid: int = 0


@dataclass(frozen=True)
class Audit:
    cross_domain_pages: int  # KSM pages mapped by two or more domains (content)
    cross_domain_zero_pages: int  # ... that hold only zeros
    violations: tuple[Violation, ...]  # the VM pairs behind them
    parties: int  # processes walked
    domains: tuple[str, ...]
    seconds: float  # wall time of the whole audit
    cpu_seconds: float  # this process's CPU time for it
    use_zero_pages: bool | None

    @property
    def ok(self) -> bool:
        return self.cross_domain_pages == 0 and self.cross_domain_zero_pages == 0


def audit(
    paths: HostPaths, policy: Policy | None, *, scanner: ProcessScanner | None = None
) -> Audit:
    """Walk the page map once and find every KSM page two trust domains map. Raises
    PageMapUnavailable (not root, no kpageflags)."""
    started, cpu_before = time.monotonic(), time.process_time()
    # status's walk: every process with mergeable memory, each in its domain (party_domain)
    status = collect(paths, policy, sample_seconds=0, scanner=scanner, pagemap=True)
    sharing = status.sharing
    if sharing is None:
        raise PageMapUnavailable(status.savings_note or "the page map cannot be read")
    violations = crossing_pairs(sharing)
    state = read_ksm(paths)
    zero_knob = state.get("use_zero_pages") if state is not None else None
    return Audit(
        cross_domain_pages=sharing.cross_domain_pages,
        cross_domain_zero_pages=sharing.cross_domain_zero_pages,
        violations=violations,
        parties=sum(vm.present_pages > 0 for vm in sharing.vms),
        domains=tuple(sorted({vm.domain for vm in sharing.vms if vm.ksm_pages})),
        seconds=time.monotonic() - started,
        cpu_seconds=time.process_time() - cpu_before,
        use_zero_pages=None if zero_knob is None else bool(zero_knob),
    )


def crossing_pairs(sharing: Sharing) -> tuple[Violation, ...]:
    """The pairs of processes of two domains that both map a KSM page, by pid: a name may be
    any number of VMs' (two VMs named alike in two domains are two parties)."""
    domain = {vm.pid: vm.domain for vm in sharing.vms}
    found = []
    for pair in sharing.pairs:
        a_pid, b_pid = pair.a_pid or 0, pair.b_pid or 0
        a_domain, b_domain = domain.get(a_pid, "?"), domain.get(b_pid, "?")
        if a_domain != b_domain:
            found.append(
                Violation(
                    pair.a,
                    a_domain,
                    pair.b,
                    b_domain,
                    pair.shared_pages,
                    pair.zero_pages,
                    a_pid,
                    b_pid,
                )
            )
    return tuple(found)


def audit_text(found: Audit) -> str:
    lines = []
    verdict = "OK" if found.ok else "VIOLATION"
    lines.append(
        f"{verdict}: {found.cross_domain_pages} KSM pages mapped across trust domains"
        + (
            f" (+{found.cross_domain_zero_pages} zero-filled)"
            if found.cross_domain_zero_pages
            else ""
        )
        + f"; {found.parties} processes walked in {found.seconds:.2f} s "
        f"({found.cpu_seconds:.2f} CPU-s), domains: {', '.join(found.domains) or '-'}"
    )
    for v in sorted(found.violations, key=lambda v: -(v.shared_pages + v.zero_pages)):
        zero = f" + {v.zero_pages} zero-filled" if v.zero_pages else ""
        lines.append(f"  {violation_line(v)}: {v.shared_pages} KSM pages{zero}")
    if not found.ok:
        lines.append(
            "  -> run the daemon (ksmpolicy daemon) so that one domain merges per scope; define "
            "the VMs unmergeable (ksmpolicy apply); restart VMs listed with residue in status"
        )
    return printable("\n".join(lines))


def violation_line(v: Violation) -> str:
    """The two processes of a violation, as every report of it names them."""
    return (
        f"{quote(v.a)} (pid {v.a_pid}, domain {v.a_domain}) ~ "
        f"{quote(v.b)} (pid {v.b_pid}, domain {v.b_domain})"
    )


def cannot_audit_text(reason: str) -> str:
    return printable(f"CANNOT AUDIT: {reason}")


def cannot_audit_json(reason: str) -> dict[str, object]:
    """Neither clean nor a violation: `ok` is null, and `reason` says why."""
    return {"ok": None, "status": "cannot-audit", "reason": reason}


def audit_json(found: Audit) -> dict[str, object]:
    return {
        "ok": found.ok,
        "status": "clean" if found.ok else "violation",
        "cross_domain_pages": found.cross_domain_pages,
        "cross_domain_zero_pages": found.cross_domain_zero_pages,
        "violations": [
            {
                "a": v.a,
                "a_pid": v.a_pid,
                "a_domain": v.a_domain,
                "b": v.b,
                "b_pid": v.b_pid,
                "b_domain": v.b_domain,
                "shared_pages": v.shared_pages,
                "zero_pages": v.zero_pages,
            }
            for v in found.violations
        ],
        "processes": found.parties,
        "domains": list(found.domains),
        "seconds": round(found.seconds, 3),
        "cpu_seconds": round(found.cpu_seconds, 3),
        "use_zero_pages": found.use_zero_pages,
    }
