"""Binding a Proxmox VM's memory to NUMA nodes: golden rewrites on qemu-server's own test
configs and ours (KSMPOLICY_REGENERATE=1 rewrites the golden files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ksmpolicy.policy.decide import Decider
from ksmpolicy.policy.load import parse_policy
from ksmpolicy.proxmox.conf import ConfError, parse
from ksmpolicy.proxmox.numa import hostnodes_text, set_numa
from ksmpolicy.proxmox.rewrite import apply_policy

DATA = Path(__file__).resolve().parent.parent / "data/proxmox"
GOLDEN = DATA / "golden"
REGENERATE = os.environ.get("KSMPOLICY_REGENERATE") == "1"
CASES = {  # input, nodes
    "qs-simple1.conf": (1,),  # numa: 0, one socket of three cores
    "qs-memory-hugepages-1g.conf": (2, 3),  # numa: 1, two sockets, no entries
    "qs-i440fx-win10-hostpci.conf": (0,),  # numa: 1, two sockets, default memory
    "pve-107-numa-nodes.conf": (0, 1, 3),  # entries, one bound by hand
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bound_config_matches_golden_file(name: str) -> None:
    nodes = CASES[name]
    text = (DATA / name).read_text()
    out = set_numa(text, nodes)
    golden = GOLDEN / f"{Path(name).stem}.numa.conf"
    if REGENERATE:
        golden.write_text(out)
    assert out == golden.read_text()
    assert set_numa(out, nodes) == out  # already bound: unchanged
    main = parse(out).main.values
    assert main["numa"] == "1"
    entries = [v for k, v in main.items() if k.startswith("numa") and k[4:].isdigit()]
    assert entries and all(f"hostnodes={hostnodes_text(nodes)}" in e for e in entries)
    assert all("policy=bind" in e for e in entries)
    # qemu-server's own rule: the entries' memory adds up to the VM's memory
    memory = int(main.get("memory", "512"))
    assert sum(int(e.split("memory=")[1].split(",")[0]) for e in entries) == memory
    # nothing outside the main section's numa lines changed
    before = [line for line in text.splitlines() if not line.startswith("numa")]
    after = [line for line in out.splitlines() if not line.startswith("numa")]
    assert before == after


def test_memory_hotplug_is_refused_with_what_to_do() -> None:
    text = (DATA / "qs-memory-hotplug.conf").read_text()
    with pytest.raises(ConfError, match="memory hotplug is on: bind its NUMA nodes by hand"):
        set_numa(text, (0,))


def test_hostnodes_syntax() -> None:
    assert hostnodes_text((0, 1, 2, 5)) == "0-2;5"
    assert hostnodes_text((3,)) == "3"


POLICY = """version: 1
domains:
  provider: {priority: 10, nodes: [0]}
  tenant-b: {nodes: [1]}
groups:
  web: {names: ["simple"], domain: provider}
vms:
  vmid:107: {domain: tenant-b}
isolation: {merge_across_nodes: false}
"""


def test_the_policy_binds_each_domain_to_its_nodes() -> None:
    decider = Decider(parse_policy(POLICY))
    new, _facts, decision, _note = apply_policy(
        (DATA / "qs-simple1.conf").read_text(), "8006", decider
    )
    assert (decision.domain, decision.bind_nodes) == ("provider", (0,))
    assert "allow-ksm: 0" in new  # under trust domains every config says off
    assert "numa0: cpus=0-2,hostnodes=0,memory=768,policy=bind" in new
    new, _facts, decision, _note = apply_policy(
        (DATA / "pve-107-numa-nodes.conf").read_text(), "107", decider
    )
    assert (decision.domain, decision.bind_nodes) == ("tenant-b", (1,))
    assert "numa1: cpus=4-7,hostnodes=1,memory=4096,policy=bind" in new


def test_no_binding_with_one_merge_scope() -> None:
    decider = Decider(
        parse_policy(POLICY.replace("merge_across_nodes: false", "unmerge_reserve_mib: 1"))
    )
    new, _facts, decision, _note = apply_policy(
        (DATA / "qs-simple1.conf").read_text(), "8006", decider
    )
    assert decision.bind_nodes == ()
    assert "numa0" not in new


def test_numbers_qemu_server_would_not_write_take_the_defaults() -> None:
    config = "cores: \u00b2\nmemory: " + "9" * 5000 + "\nsockets: 1234567\n"
    bound = set_numa(config, (1,))  # '²' is a digit to str.isdigit, not to int(): no crash
    assert "numa: 1\n" in bound
    assert "numa0: cpus=0,hostnodes=1,memory=512,policy=bind\n" in bound  # qemu-server's default
