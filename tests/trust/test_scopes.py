"""Merge scopes on fake sysfs and /proc trees: 1-, 2- and 4-node hosts (this machine has one
NUMA node: multi-node hosts are only tested this way)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ksmpolicy.paths import HostPaths
from ksmpolicy.trust.scopes import (
    HOST_SCOPE,
    HostScopes,
    parse_nodelist,
    process_nodes,
    read_host,
)
from tests.fakehost import FakeHost


def fake_host(root: Path, nodes: int, across: str | None, *, has_memory: bool = True) -> HostPaths:
    host = FakeHost(root).numa(nodes, has_memory=has_memory)
    host.ksm(**({"merge_across_nodes": across} if across is not None else {}))
    return HostPaths(root)


@pytest.mark.parametrize(
    ("text", "nodes"),
    [("0", (0,)), ("0-3", (0, 1, 2, 3)), ("0,2-3\n", (0, 2, 3)), ("", ())],
)
def test_nodelists(text: str, nodes: tuple[int, ...]) -> None:
    assert parse_nodelist(text) == nodes


@pytest.mark.parametrize("bad", ["x", "3-1", "-1"])
def test_bad_nodelists(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_nodelist(bad)


@pytest.mark.parametrize("nodes", [2, 4])
def test_per_node_scopes_only_with_merge_across_nodes_0(tmp_path: Path, nodes: int) -> None:
    across = read_host(fake_host(tmp_path / "a", nodes, "1"))
    assert across == HostScopes(tuple(range(nodes)), True)
    assert across.names == (HOST_SCOPE,)
    per_node = read_host(fake_host(tmp_path / "b", nodes, "0"))
    assert per_node.names == tuple(f"node{n}" for n in range(nodes))
    assert per_node.scopes_of(None) == per_node.names  # unbound: every node
    assert per_node.scopes_of((1,)) == ("node1",)
    assert per_node.scopes_of((7,)) == per_node.names  # a node that is not here: all


def test_node_directories_when_has_memory_is_missing(tmp_path: Path) -> None:
    host = read_host(fake_host(tmp_path, 4, "0", has_memory=False))
    assert host.nodes == (0, 1, 2, 3)


def test_no_numa_in_sysfs_is_one_node_and_no_knob_is_one_scope(tmp_path: Path) -> None:
    (tmp_path / "sys/kernel/mm/ksm").mkdir(parents=True)
    host = read_host(HostPaths(tmp_path))
    assert host == HostScopes((0,), None)
    assert host.names == (HOST_SCOPE,)


def write_process(root: Path, pid: int, numa_maps: str, mems_allowed: str) -> None:
    proc = root / "proc" / str(pid)
    proc.mkdir(parents=True)
    (proc / "numa_maps").write_text(numa_maps)
    (proc / "status").write_text(f"Name:\tqemu\nMems_allowed_list:\t{mems_allowed}\n")


RAM = 0x7F0000000000
NUMA_MAPS = (
    "55d1c0a00000 default file=/usr/bin/qemu-system-x86_64 mapped=100 N0=100\n"
    f"{RAM:x} {{policy}} anon=65536 dirty=65536 N1=65536 kernelpagesize_kB=4\n"
    "7f1000000000 default anon=12 dirty=12 N0=12 kernelpagesize_kB=4\n"
)


@pytest.mark.parametrize(
    ("policy", "mems", "nodes"),
    [
        ("bind:1", "0-3", (1,)),  # Proxmox: policy=bind on the backend
        ("bind=static:2-3", "0-3", (2, 3)),
        ("interleave:0-1", "0-3", (0, 1)),
        ("prefer:1", "0-3", (0, 1, 2, 3)),  # preferred may fall back anywhere
        ("default", "1", (1,)),  # libvirt strict: the cpuset's Mems_allowed
        ("bind:0-3", "2", (2,)),
    ],
)
def test_a_vms_nodes_from_its_guest_ram_policy(
    tmp_path: Path, policy: str, mems: str, nodes: tuple[int, ...]
) -> None:
    write_process(tmp_path, 42, NUMA_MAPS.format(policy=policy), mems)
    found = process_nodes(HostPaths(tmp_path), 42, ((RAM, RAM + 2**28),))
    assert found == nodes


def test_without_ranges_every_vma_counts(tmp_path: Path) -> None:
    write_process(tmp_path, 42, NUMA_MAPS.format(policy="bind:1"), "0-1")
    assert process_nodes(HostPaths(tmp_path), 42, ()) == (0, 1)  # the default VMAs
    assert process_nodes(HostPaths(tmp_path), 43, ()) is None  # gone


def policy_with(extra: str) -> object:
    from ksmpolicy.policy.load import parse_policy

    return parse_policy(
        "version: 1\ndomains:\n  provider: {priority: 10, nodes: [0]}\n"
        "  tenant-b: {nodes: [1, 2]}\n" + extra
    )


def test_check_explains_one_merge_scope(tmp_path: Path) -> None:
    from ksmpolicy.trust.scopes import describe

    lines = describe(policy_with(""), read_host(fake_host(tmp_path, 2, "1")))  # type: ignore[arg-type]
    assert lines[0] == (
        "this host has 1 merge scope: only one domain can merge at a time; domains by priority: "
        "provider (priority 10), tenant-b (priority 0); equal priorities go to the larger savings"
    )
    assert lines[1].startswith("nodes: of provider, tenant-b have no effect")


@pytest.mark.parametrize("nodes", [2, 4])
def test_check_explains_per_node_scopes(tmp_path: Path, nodes: int) -> None:
    from ksmpolicy.trust.scopes import describe

    policy = policy_with("isolation: {merge_across_nodes: false}\n")
    lines = describe(policy, read_host(fake_host(tmp_path, nodes, "1")))  # type: ignore[arg-type]
    assert lines[0] == (
        f"this host has {nodes} merge scopes, one per NUMA node (the policy sets "
        "merge_across_nodes=0): one domain can merge per node; a VM not bound to nodes counts "
        "in every node"
    )
    expected = ["node0: provider", "node1: tenant-b"]
    expected += ["node2: tenant-b", "node3: only VMs not bound to nodes"][: nodes - 2]
    assert lines[1 : 1 + nodes] == expected
