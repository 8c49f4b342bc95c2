"""A domain definition as the policy wants it: `<nosharepages/>` (libvirt/domain.py) and, for
a trust domain bound to NUMA nodes, `<numatune>` (libvirt/numatune.py). One code path for the
hook (migrate, restore), `xml rewrite` and `apply`."""

from __future__ import annotations

from ksmpolicy.libvirt.domain import DomainFacts, domain_facts
from ksmpolicy.libvirt.nosharepages import set_nosharepages
from ksmpolicy.libvirt.numatune import set_numatune

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ksmpolicy.libvirt.domain import BackingProbe
    from ksmpolicy.policy.decide import Decider, Decision


def apply_policy(
    data: str | bytes, decider: Decider, probe: BackingProbe | None = None
) -> tuple[str, DomainFacts, Decision]:
    """The definition as the policy wants it (the input text if it complies), with the facts
    and decision behind it. One code path for the hook, `xml rewrite` and `apply`."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    facts = domain_facts(text, probe)
    decision = decider.decide(facts.vm)
    text = set_nosharepages(text, not decision.definition_merges)
    if decision.bind_nodes and facts.vm.ram_can_merge:
        text = set_numatune(text, decision.bind_nodes)
    return text, facts, decision
