"""Binding a domain's memory to NUMA nodes: golden rewrites on libvirt's test domains and ours,
each valid against libvirt's own schema (KSMPOLICY_REGENERATE=1 rewrites the golden files).
This machine has one NUMA node: the bindings are checked as text and schema, not run."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from ksmpolicy.libvirt.numatune import bound_to, nodeset_text, set_numatune
from ksmpolicy.libvirt.rewrite import apply_policy
from ksmpolicy.policy.decide import Decider
from ksmpolicy.policy.load import parse_policy
from tests.libvirt.test_domain import (
    DATA,
    GOLDEN,
    REGENERATE,
    outside_memory_backing,
    schema,
    valid,
)

__all__ = ["schema"]  # the fixture, shared with test_domain
CASES = {
    "numatune-memnode.xml": (1,),  # <memory> and <memnode>s, one preferred
    "cpu-numa-memshared.xml": (0, 1),  # guest NUMA cells, no numatune
    "q35.xml": (0, 2, 3),  # no numatune; <vcpu cpuset>
    "ksm-one-line.xml": (2,),  # everything on one line
    "memtune.xml": (3,),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bound_domain_matches_golden_and_the_schema(name: str, schema: etree.RelaxNG) -> None:
    nodes = CASES[name]
    text = (DATA / name).read_text()
    out = set_numatune(text, nodes)
    golden = GOLDEN / f"{Path(name).stem}.numa.xml"
    if REGENERATE:
        golden.write_text(out)
    assert out == golden.read_text()
    assert valid(schema, out), schema.error_log
    assert set_numatune(out, nodes) == out  # already bound: unchanged
    assert bound_to(out) == ("strict", nodeset_text(nodes))
    root = etree.fromstring(out.encode())
    assert all(
        m.get("mode") == "strict" and m.get("nodeset") == nodeset_text(nodes)
        for m in root.iterfind("numatune/memnode")
    )
    assert outside_memory_backing(out, "numatune") == outside_memory_backing(text, "numatune")


def test_nodeset_syntax() -> None:
    assert nodeset_text((0, 1, 2, 5)) == "0-2,5"
    assert nodeset_text((4,)) == "4"


POLICY = """version: 1
domains:
  provider: {priority: 10, nodes: [0]}
  tenant-b: {nodes: [1]}
groups:
  web: {names: ["QEMUGuest*"], domain: provider}
isolation: {merge_across_nodes: false}
"""


def test_the_policy_binds_and_switches_merging_off(schema: etree.RelaxNG) -> None:
    out, _facts, decision = apply_policy(
        (DATA / "numatune-memnode.xml").read_text(), Decider(parse_policy(POLICY))
    )
    assert (decision.domain, decision.bind_nodes) == ("provider", (0,))
    assert "<nosharepages/>" in out
    assert bound_to(out) == ("strict", "0")
    assert valid(schema, out), schema.error_log


def test_hugepage_domains_are_not_bound() -> None:
    text = (DATA / "hugepages-default.xml").read_text()
    policy = parse_policy(POLICY.replace('["QEMUGuest*"]', '["*"]'))
    out, facts, _decision = apply_policy(text, Decider(policy))
    assert not facts.vm.ram_can_merge
    assert "<numatune>" not in out or bound_to(out) == bound_to(text)
