"""The memory guard: unmerging must never run the host out of memory.

Unmerging turns every page a VM shares back into a private copy. Before a switch (another
domain takes a scope, or merge_across_nodes changes) the pages it will re-materialise are
compared with what the host can absorb: MemAvailable plus free swap, minus the policy's
reserve (`isolation.unmerge_reserve_mib`). If they do not fit, the switch is refused and said
so (a "copy-on-write storm" is a known way to lose a host; Linux's KSM documentation warns
about it for MADV_UNMERGEABLE).
"""

from __future__ import annotations

from ksmpolicy.paths import HostPaths
from ksmpolicy.records import dataclass

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ksmpolicy.policy.model import Policy


@dataclass(frozen=True)
class Verdict:
    ok: bool
    need_bytes: int
    available_bytes: int  # MemAvailable + SwapFree - reserve
    reserve_bytes: int

    @property
    def message(self) -> str:
        need, have = self.need_bytes / 2**20, self.available_bytes / 2**20
        reserve = self.reserve_bytes / 2**20
        if self.ok:
            return f"unmerging {need:.0f} MiB fits: {have:.0f} MiB available above the reserve"
        return (
            f"unmerging would need {need:.0f} MiB but only {have:.0f} MiB is available above "
            f"the {reserve:.0f} MiB reserve (MemAvailable + SwapFree - isolation."
            "unmerge_reserve_mib): refused"
        )


def available_bytes(paths: HostPaths) -> int | None:
    """MemAvailable + SwapFree, or None when /proc/meminfo cannot be read."""
    from ksmpolicy.errors import HostError  # noqa: PLC0415
    from ksmpolicy.kernel.procfs import read_meminfo  # noqa: PLC0415

    try:
        values = read_meminfo(paths)
    except HostError:
        return None
    if "MemAvailable" not in values:
        return None
    return values["MemAvailable"] + values.get("SwapFree", 0)


def check(paths: HostPaths, need_bytes: int, reserve_mib: float) -> Verdict:
    """May `need_bytes` of pages be re-materialised now? Unknown memory counts as none."""
    reserve = int(reserve_mib * 2**20)
    have = available_bytes(paths)
    spare = (have - reserve) if have is not None else 0
    return Verdict(need_bytes <= max(spare, 0) or need_bytes == 0, need_bytes, spare, reserve)


def start_refusal(
    paths: HostPaths, policy: Policy, domain: str, nodes: tuple[int, ...]
) -> str | None:
    """For a VM about to start under trust domains: a reason to refuse it when its domain
    outranks the one active in a scope it will count in (its start would force a hand-over)
    and unmerging that domain does not fit above the reserve; else None. Uses what the daemon
    last measured for each scope (state file)."""
    from ksmpolicy.trust.scopes import read_host  # noqa: PLC0415
    from ksmpolicy.trust.state import load  # noqa: PLC0415

    state = load(paths)
    live = state.live_domains(paths)
    mine = policy.domain(domain).priority
    for scope in read_host(paths).scopes_of(nodes or None):
        owner = live.get(scope)
        if owner is None or owner == domain or policy.domain(owner).priority >= mine:
            continue
        verdict = check(
            paths, state.unmerge_bytes.get(scope, 0), policy.isolation.unmerge_reserve_mib
        )
        if not verdict.ok:
            return (
                f"its trust domain {domain!r} outranks {owner!r}, which merges in scope {scope}: "
                f"starting it would unmerge {owner!r}, and {verdict.message}"
            )
    return None
