"""The daemon's keeper of trust domains: in each merge scope, at most one domain mergeable.

Under trust domains every VM is defined unmergeable (libvirt `<nosharepages/>`, Proxmox
`allow-ksm 0`), so none of its memory is ever mergeable unless switched on; the keeper switches
on the guest RAM of the active domain's VMs, live, over QMP. Every look (each plan, and at once
when a VM starts or stops):

1. the running VMs, their trust domains and merge scopes (trust/scopes.py);
2. the active domain of each scope (trust/choose.py): kept, or handed to another;
3. a hand-over only when the memory guard lets it (trust/guard.py), measured on the page
   map: what unmerging the outgoing domain re-materialises;
4. each VM's guest RAM switched to match, every "off" before any "on", and no "on" in a scope
   where a VM of another domain could not be switched off;
5. the state saved for the hooks, `status` and `audit` (trust/state.py).

A VM whose merging was on when it started (its definition lacked `<nosharepages/>`) keeps its
ROMs and video RAM mergeable after a live switch: QEMU has no switch for them. Such VMs are
reported (`residue`) until they restart; the audit shows whether they share anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ksmpolicy.control.rivals import Rivals
from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.inventory.model import VmStatus
from ksmpolicy.paths import PAGE_SIZE, HostPaths
from ksmpolicy.policy.model import Policy
from ksmpolicy.trust import guard
from ksmpolicy.trust.choose import Candidate, Claim, choose
from ksmpolicy.trust.scopes import HostScopes, guest_ram_ranges, process_nodes
from ksmpolicy.trust.state import Member, load, locked

log = logging.getLogger(__name__)
Toggle = Callable[[VmStatus, bool], list[str]]
REFUSAL_REPEAT_SECONDS = 600.0  # say a refused hand-over again after this long
KNOWN_SECONDS = 60.0  # what a switch set is believed over smaps read before it, this long


@dataclass(frozen=True)
class Seat:
    """A running VM as the keeper sees it."""

    vm: VmStatus
    scopes: tuple[str, ...]
    wants: bool  # the policy lets it merge
    merging: bool | None  # its guest RAM is mergeable now

    @property
    def domain(self) -> str:
        return self.vm.domain or "default"


@dataclass
class Look:
    """What one look found and did."""

    claims: dict[str, Claim] = field(default_factory=dict)
    switched_on: list[str] = field(default_factory=list)
    switched_off: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "name: why"
    failed_pids: set[int] = field(default_factory=set)
    refused: list[str] = field(default_factory=list)  # hand-overs the guard refused
    residue: list[str] = field(default_factory=list)  # VMs off with ROMs still mergeable
    handovers: int = 0


class Keeper:
    def __init__(
        self,
        paths: HostPaths,
        toggle: Toggle,
        *,
        clock: Callable[[], float] = time.time,
        rivals: Rivals | None = None,
    ) -> None:
        self.paths = paths
        self.toggle = toggle
        self.clock = clock
        self.rivals = rivals  # estimates for domains of equal priority (None: none are made)
        self.last = Look()
        self.handovers = 0
        self.refusals = 0
        self._said: dict[tuple[str, str, str], float] = {}
        self._nodes: dict[tuple[int, int | None], tuple[int, ...] | None] = {}
        # (pid, start) -> (merging, when): what a switch set, newer than a cached smaps read
        self._known: dict[tuple[int, int | None], tuple[bool, float]] = {}

    def look(self, policy: Policy, vms: Sequence[VmStatus], host: HostScopes) -> Look:
        now = self.clock()
        seats = self._seats(vms, host)
        estimated = self._estimated(policy, seats)  # before the lock: the hooks wait on it
        needs = self._walk_outgoing(policy, seats, host, estimated)
        found = Look()
        # The state lock is held only to read and write the state: the hooks wait on it. The
        # claims are written first, so that a hook that starts a VM meanwhile follows them;
        # the switches (QMP, up to 5 s each) run without it; then who merges is written.
        with locked(self.paths) as state:
            state.prune(self.paths)
            for scope in host.names:
                here = [s for s in seats if scope in s.scopes]
                current = state.scopes.get(scope)
                claim = self._claim(policy, scope, here, current, now, found, estimated, needs)
                if claim is not None:
                    found.claims[scope] = claim
            for scope in host.names:
                state.scopes.pop(scope, None)
            state.scopes.update(found.claims)
            state.updated = now
        self._switch(seats, found)
        on = {
            s.vm.pid
            for s in seats
            if self._should_merge(s, found.claims) and s.vm.pid not in found.failed_pids
        }
        with locked(self.paths) as state:
            seated = {s.vm.pid for s in seats}
            # members a hook added meanwhile (a VM this look did not see) are kept
            state.members = {pid: m for pid, m in state.members.items() if pid not in seated}
            state.members.update(
                {
                    s.vm.pid: Member(s.vm.pid, s.vm.start or 0, s.vm.name, s.domain, s.scopes)
                    for s in seats
                    if s.vm.pid in on and s.vm.start is not None
                }
            )
            state.unmerge_bytes = {
                scope: self._bound(
                    s for s in seats if s.domain == claim.domain and scope in s.scopes
                )
                for scope, claim in found.claims.items()
            }
            state.updated = now
        found.residue = [
            s.vm.name
            for s in seats
            if s.vm.merging_now is False and s.vm.mergeable_vmas > 0 and s.vm.pid not in on
        ]
        self.last = found
        return found

    # --- the parts of a look

    def _seats(self, vms: Sequence[VmStatus], host: HostScopes) -> list[Seat]:
        seats = []
        for vm in vms:
            # A process not run by root or the hypervisor's user is no VM whatever it calls
            # itself: not switched, and the audit counts it apart from every domain.
            if vm.kind != "qemu" or vm.decision is None or not vm.trusted:
                continue
            nodes = None
            if host.per_node:
                key = (vm.pid, vm.start)
                if key not in self._nodes:
                    ram = guest_ram_ranges(self.paths, vm.pid, vm.ram_bytes)
                    self._nodes[key] = process_nodes(self.paths, vm.pid, ram)
                nodes = self._nodes[key]
            merging = vm.merging_now
            known = self._known.get((vm.pid, vm.start))
            if known is not None and self.clock() - known[1] < KNOWN_SECONDS:
                merging = known[0]
            seats.append(Seat(vm, host.scopes_of(nodes), vm.decision == "merge", merging))
        alive = {(s.vm.pid, s.vm.start) for s in seats}
        self._nodes = {k: v for k, v in self._nodes.items() if k in alive}
        self._known = {k: v for k, v in self._known.items() if k in alive}
        return seats

    def _estimated(self, policy: Policy, seats: Sequence[Seat]) -> dict[str, int]:
        """Estimated savings of the domains that share a priority with another domain that
        wants to merge (control/rivals.py): only between those do savings decide."""
        if self.rivals is None:
            return {}
        wanting: dict[str, list[VmStatus]] = {}
        for seat in seats:
            if seat.wants:
                wanting.setdefault(seat.domain, []).append(seat.vm)
        priorities = [policy.domain(d).priority for d in wanting]
        contested = {
            domain: vms
            for domain, vms in wanting.items()
            if priorities.count(policy.domain(domain).priority) > 1
        }
        return self.rivals.savings(contested) if contested else {}

    def _candidates(
        self, policy: Policy, seats: Sequence[Seat], estimated: dict[str, int]
    ) -> list[Candidate]:
        candidates = []
        for domain in sorted({s.domain for s in seats if s.wants}):
            mine = [s for s in seats if s.domain == domain and s.wants]
            merging = [s for s in mine if s.merging]
            measured = sum(s.vm.saved_bytes for s in merging) if merging else None
            candidates.append(
                Candidate(
                    domain,
                    policy.domain(domain).priority,
                    estimated.get(domain) if self.rivals is not None else measured,
                    min(float(s.vm.start or 0) for s in mine),
                )
            )
        return candidates

    def _walk_outgoing(
        self, policy: Policy, seats: Sequence[Seat], host: HostScopes, estimated: dict[str, int]
    ) -> dict[str, int]:
        """What unmerging each domain that may hand a scope over re-materialises, measured on
        the page map before the state lock is taken (a walk takes seconds on a large host):
        the claims as the state file says now (written atomically, read without the lock)."""
        state = load(self.paths)
        now = self.clock()
        needs: dict[str, int] = {}
        for scope in host.names:
            here = [s for s in seats if scope in s.scopes]
            current = state.scopes.get(scope)
            chosen = choose(
                self._candidates(policy, here, estimated), current, now, policy.isolation
            )
            if current is None or chosen is None or chosen.domain == current.domain:
                continue
            if current.domain not in needs:
                outgoing = [s for s in here if s.domain == current.domain and s.merging]
                needs[current.domain] = self._unmerge_bytes(outgoing)
        return needs

    def _claim(
        self,
        policy: Policy,
        scope: str,
        seats: list[Seat],
        current: Claim | None,
        now: float,
        found: Look,
        estimated: dict[str, int],
        needs: dict[str, int],
    ) -> Claim | None:
        chosen = choose(self._candidates(policy, seats, estimated), current, now, policy.isolation)
        if current is None or chosen is None or chosen.domain == current.domain:
            return chosen
        outgoing = [s for s in seats if s.domain == current.domain and s.merging]
        # walked before the lock; a hand-over the state did not show then: ksm_stat's bound
        need = needs[current.domain] if current.domain in needs else self._bound(outgoing)
        verdict = guard.check(self.paths, need, policy.isolation.unmerge_reserve_mib)
        if not verdict.ok:
            message = (
                f"scope {scope}: {chosen.domain} would take over from {current.domain} "
                f"({chosen.why}), but {verdict.message}"
            )
            found.refused.append(message)
            self.refusals += 1
            key = (scope, current.domain, chosen.domain)
            if now - self._said.get(key, -REFUSAL_REPEAT_SECONDS) >= REFUSAL_REPEAT_SECONDS:
                log.warning("%s", message)
                self._said[key] = now
            return current
        log.info(
            "scope %s: trust domain %s takes over from %s (%s); %s",
            scope,
            chosen.domain,
            current.domain,
            chosen.why,
            verdict.message,
        )
        found.handovers += 1
        self.handovers += 1
        return chosen

    def _unmerge_bytes(self, seats: Sequence[Seat]) -> int:
        """What unmerging these VMs re-materialises: exact from the page map, else the
        ksm_stat bound (every mapping of a KSM page counted as a whole page)."""
        if not seats:
            return 0
        zero = sum(s.vm.zero_bytes for s in seats)
        try:
            from ksmpolicy.kernel.pagemap import PageMapReader, PageMapUnavailable  # noqa: PLC0415

            with PageMapReader(self.paths) as reader:
                walked = reader.walk([s.vm.pid for s in seats])
            return walked.unmerge_pages() * PAGE_SIZE + zero
        except (PageMapUnavailable, OSError):
            return self._bound(seats)

    @staticmethod
    def _bound(seats: Any) -> int:
        return sum(s.vm.merged_bytes + s.vm.zero_bytes for s in seats)

    @staticmethod
    def _should_merge(seat: Seat, claims: dict[str, Claim]) -> bool:
        return seat.wants and all(
            scope in claims and claims[scope].domain == seat.domain for scope in seat.scopes
        )

    def _switch(self, seats: list[Seat], found: Look) -> None:
        """Every "off" first; then "on", except in scopes where an "off" failed."""
        blocked: set[str] = set()
        for seat in seats:
            if seat.merging is False or self._should_merge(seat, found.claims):
                continue
            if self._set(seat, False, found):
                found.switched_off.append(seat.vm.name)
            else:
                blocked.update(seat.scopes)
        for seat in seats:
            if seat.merging or not self._should_merge(seat, found.claims):
                continue
            if blocked & set(seat.scopes):
                found.failed_pids.add(seat.vm.pid)
                found.failed.append(
                    f"{seat.vm.name}: not switched on: a VM of another domain in "
                    f"{', '.join(sorted(blocked & set(seat.scopes)))} could not be switched off"
                )
                continue
            if self._set(seat, True, found):
                found.switched_on.append(seat.vm.name)

    def _set(self, seat: Seat, merge: bool, found: Look) -> bool:
        try:
            changed = self.toggle(seat.vm, merge)
        except (KsmPolicyError, OSError, TimeoutError) as exc:
            found.failed.append(f"{seat.vm.name}: {exc}")
            found.failed_pids.add(seat.vm.pid)
            log.warning("%s: cannot switch merging %s: %s", seat.vm.name, _word(merge), exc)
            return False
        self._known[(seat.vm.pid, seat.vm.start)] = (merge, self.clock())
        if changed:
            log.info(
                "%s (trust domain %s): merging switched %s live (%s)",
                seat.vm.name,
                seat.domain,
                _word(merge),
                ", ".join(changed),
            )
        return True


def _word(merge: bool) -> str:
    return "on" if merge else "off"


def toggle_vm(paths: HostPaths, libvirt_conn: Callable[[], Any]) -> Toggle:
    """The live switch of one VM's guest RAM, by the platform that runs it (libvirt through
    its monitor; Proxmox and plain QEMU over their QMP socket, checked to be served by that
    very process). A process not run by root or the hypervisor's user is left alone."""
    from ksmpolicy.inventory import platform_named, platforms  # noqa: PLC0415

    found = platforms(libvirt_conn)

    def toggle(vm: VmStatus, merge: bool) -> list[str]:
        if not vm.trusted:
            raise KsmPolicyError("not run by root or the hypervisor's user: left alone")
        return platform_named(vm.source, found).set_merge(paths, vm.ref, merge)

    return toggle


def keep_merge_scope(
    paths: HostPaths, knobs: Any, policy: Policy, host: HostScopes, said: dict[str, float]
) -> HostScopes:
    """Bring the kernel's merge_across_nodes to the policy's `isolation.merge_across_nodes`:
    unmerge everything, behind the memory guard, then switch. Returns the scopes now in force.
    A refusal is logged (again every REFUSAL_REPEAT_SECONDS) and leaves the knob as it is."""
    from ksmpolicy.kernel.ksm import read_ksm  # noqa: PLC0415

    want = policy.isolation.merge_across_nodes
    if want is None or host.merge_across_nodes is None or host.merge_across_nodes == want:
        return host
    state = read_ksm(paths)
    need = (state.saved_pages if state is not None else 0) * PAGE_SIZE
    verdict = guard.check(paths, need, policy.isolation.unmerge_reserve_mib)
    now = time.monotonic()
    if not verdict.ok:
        if now - said.get("merge_across_nodes", -REFUSAL_REPEAT_SECONDS) >= REFUSAL_REPEAT_SECONDS:
            log.warning(
                "merge_across_nodes stays %d (the policy asks for %d): switching needs every "
                "page unmerged first, and %s",
                int(bool(host.merge_across_nodes)),
                int(want),
                verdict.message,
            )
            said["merge_across_nodes"] = now
        return host
    started = time.monotonic()
    knobs.switch_merge_across_nodes(want)
    log.info(
        "merge_across_nodes %d -> %d: unmerged %.0f MiB in %.1f s first (%s)",
        int(bool(host.merge_across_nodes)),
        int(want),
        need / 2**20,
        time.monotonic() - started,
        "one merge scope per NUMA node" if not want else "one merge scope for the host",
    )
    return HostScopes(host.nodes, want)
