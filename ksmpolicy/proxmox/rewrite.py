"""A Proxmox config as the policy wants it: KSM allowed or not (proxmox/conf.py) and, for a
trust domain bound to NUMA nodes, `numaN` bound to them (proxmox/numa.py). One code path for
the hookscript, `rewrite` and `apply`."""

from __future__ import annotations

from ksmpolicy.proxmox.conf import PveFacts, facts, parse, set_merging, with_pending
from ksmpolicy.proxmox.numa import set_numa

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ksmpolicy.policy.decide import Decider, Decision


def apply_policy(
    text: str, vmid: str, decider: Decider, *, use_allow_ksm: bool = True
) -> tuple[str, PveFacts, Decision, str | None]:
    """The config as the policy wants it, facts, decision, and a note when a pending change
    would change the decision. One code path for the hookscript, `rewrite` and `apply`."""
    config = parse(text)
    found = facts(config, vmid, use_allow_ksm=use_allow_ksm)
    decision = decider.decide(found.vm)
    note = None
    pending = with_pending(config)
    if pending is not None:
        later = decider.decide(facts(config, vmid, pending, use_allow_ksm=use_allow_ksm).vm)
        if later.action is not decision.action:
            note = (
                f"a pending change would make the decision {later.action.value} "
                f"({later.reason}); it applies at the next start"
            )
    new = set_merging(text, decision.definition_merges, use_allow_ksm=use_allow_ksm)
    if decision.bind_nodes and found.vm.ram_can_merge:
        new = set_numa(new, decision.bind_nodes)
    return new, found, decision, note
