"""Every shipped policy passes `ksmpolicy check`; the demo's sample VMs load."""

from __future__ import annotations

from pathlib import Path

import pytest

from ksmpolicy.cli.main import main
from ksmpolicy.policy.decide import Decider
from ksmpolicy.policy.factsfile import load_facts
from ksmpolicy.policy.load import load_policy
from ksmpolicy.policy.model import Action
from tests.conftest import REPO

POLICIES = sorted((REPO / "policies").glob("*.yaml"))


def test_there_are_shipped_policies() -> None:
    assert {p.name for p in POLICIES} >= {
        "default.yaml",
        "homelab.yaml",
        "vps-multitenant.yaml",
        "vps-domains.yaml",
        "proxmox-cluster.yaml",
    }


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_shipped_policy_passes_check(path: Path) -> None:
    assert main(["check", str(path)]) == 0


def test_default_policy_excludes_databases_and_latency_sensitive() -> None:
    decider = Decider(load_policy(REPO / "policies/default.yaml"))
    facts = {vm.name: vm for vm in load_facts(str(REPO / "demo/vms.yaml"))}
    assert decider.decide(facts["pg-primary"]).action is Action.EXCLUDE
    assert decider.decide(facts["web-1"]).merge is True
    assert decider.decide(facts["hugepage-dpdk"]).merge is False


def test_vps_policy_treats_unknown_vms_as_tenants() -> None:
    decider = Decider(load_policy(REPO / "policies/vps-multitenant.yaml"))
    facts = {vm.name: vm for vm in load_facts(str(REPO / "demo/vms.yaml"))}
    assert not any(decider.decide(vm).merge for vm in facts.values())


def test_vps_domains_policy_keeps_customers_apart() -> None:
    from ksmpolicy.policy.decide import VmFacts

    decider = Decider(load_policy(REPO / "policies/vps-domains.yaml"))
    acme = decider.decide(VmFacts("shop", uuid="3F1C2A9E-5B7D-4E1A-9C3B-2D4F6A8B0C11"))
    globex = decider.decide(VmFacts("shop", vmid="4107"))
    provider = decider.decide(
        VmFacts("dns-1", images=("/srv/images/provider/debian-12-base.qcow2",))
    )
    stranger = decider.decide(VmFacts("shop", tags=frozenset({"customer"})))
    assert (acme.domain, acme.merge) == ("acme", True)
    assert (globex.domain, globex.merge) == ("globex", True)
    assert (provider.domain, provider.merge) == ("provider", True)
    assert (stranger.domain, stranger.merge) == ("default", False)  # its own tag: nothing
    assert not any(d.definition_merges for d in (acme, globex, provider, stranger))
