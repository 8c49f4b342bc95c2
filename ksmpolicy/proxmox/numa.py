"""Binding a Proxmox VM's memory to NUMA nodes (`numaN: ...,hostnodes=...,policy=bind`), for
trust domains with per-node merge scopes.

qemu-server turns each `numaN` entry into a memory backend with `host-nodes` and `policy`
(PVE::QemuServer::Memory). The rewrite keeps the guest's topology:

* with `numaN` entries: each gets `hostnodes=` the domain's nodes and `policy=bind`;
* with `numa: 1` and no entries (qemu-server then splits memory and cores by socket): one entry
  per socket, as qemu-server would make them, bound;
* without guest NUMA: `numa: 1` and one `numa0` over every vCPU and all memory (the guest
  still sees one node), bound.

Memory hotplug is refused: its DIMMs follow the entries' nodes only partly, so a binding must
be set by hand there. Only main-section lines change.
"""

from __future__ import annotations

from ksmpolicy.proxmox.conf import (
    ConfError,
    memory_mib,
    newline_of,
    parse,
    pve_bool,
    sorted_position,
)
from ksmpolicy.trust.scopes import node_ranges

_MAX_NUMA = 8  # qemu-server's $MAX_NUMA
_DEFAULT_MEMORY_MIB = 512  # qemu-server's default `memory`


def hostnodes_text(nodes: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> "0-2;5"."""
    return node_ranges(nodes, ";")


def set_numa(text: str, nodes: tuple[int, ...]) -> str:
    """The config with the VM's memory bound to `nodes`; the input text when it already is."""
    if not nodes:
        raise ConfError("no NUMA nodes to bind to")
    config = parse(text)
    main = config.main
    values = main.values
    hostnodes = hostnodes_text(nodes)
    if "memory" in (values.get("hotplug") or "").split(","):
        raise ConfError(
            "memory hotplug is on: bind its NUMA nodes by hand (numaN: ...,hostnodes="
            f"{hostnodes},policy=bind), or turn hotplug of memory off"
        )
    lines: list[str] = list(config.lines)
    newline = newline_of(config.lines)
    entries = [f"numa{i}" for i in range(_MAX_NUMA) if f"numa{i}" in values]
    changed = False
    if entries:
        for key in entries:
            new = _bound(values[key], hostnodes)
            if new != values[key]:
                lines[main.lines_of[key]] = f"{key}: {new}{newline}"
                changed = True
        return "".join(lines) if changed else text
    numa_on = pve_bool(values.get("numa")) is True
    added = _new_entries(values, hostnodes, numa_on=numa_on)
    inserts = []
    if not numa_on:
        if "numa" in values:
            lines[main.lines_of["numa"]] = f"numa: 1{newline}"
        else:
            inserts.append((sorted_position(config, "numa"), f"numa: 1{newline}"))
    for key, value in added:
        inserts.append((sorted_position(config, key), f"{key}: {value}{newline}"))
    # Back to front, and lines for one place in reverse, so that they land in order.
    for _order, (index, line) in sorted(
        enumerate(inserts), key=lambda o: (o[1][0], o[0]), reverse=True
    ):
        lines.insert(index, line)
    return "".join(lines)


def _new_entries(values: dict[str, str], hostnodes: str, *, numa_on: bool) -> list[tuple[str, str]]:
    """numaN entries for a VM that has none: one per socket when its guest NUMA is on (as
    qemu-server lays them out), else one for all its vCPUs and memory."""
    sockets = _number(values.get("sockets"), 1)
    cores = _number(values.get("cores"), 1)
    memory = _memory_mib(values.get("memory"))
    if not numa_on:
        vcpus = sockets * cores
        cpus = "0" if vcpus == 1 else f"0-{vcpus - 1}"
        return [("numa0", _entry(cpus, hostnodes, memory))]
    added = []
    for socket in range(min(sockets, _MAX_NUMA)):
        first = cores * socket
        cpus = str(first) if cores == 1 else f"{first}-{first + cores - 1}"
        added.append((f"numa{socket}", _entry(cpus, hostnodes, memory // sockets)))
    return added


def _entry(cpus: str, hostnodes: str, memory: int) -> str:
    return f"cpus={cpus},hostnodes={hostnodes},memory={memory},policy=bind"


def _bound(value: str, hostnodes: str) -> str:
    """A numaN value with hostnodes and policy=bind set, other options kept in place."""
    parts = [p for p in value.strip().split(",") if p]
    seen = set()
    result = []
    for part in parts:
        key, _, _current = part.partition("=")
        if key == "hostnodes":
            result.append(f"hostnodes={hostnodes}")
        elif key == "policy":
            result.append("policy=bind")
        else:
            result.append(part)
        seen.add(key)
    if "hostnodes" not in seen:
        result.append(f"hostnodes={hostnodes}")
    if "policy" not in seen:
        result.append("policy=bind")
    return ",".join(result)


def _number(value: str | None, default: int) -> int:
    """`sockets:` or `cores:`; the default for anything qemu-server would not have written."""
    text = (value or "").strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 6):
        return default
    return max(1, int(text))


def _memory_mib(value: str | None) -> int:
    found = memory_mib(value)
    return found if found is not None else _DEFAULT_MEMORY_MIB
