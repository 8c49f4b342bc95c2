"""Merge scopes: the sets of pages KSM can merge with each other.

The kernel keeps one stable tree per scope: the whole host, or each NUMA node when
`merge_across_nodes` is 0 (then a page only ever merges with pages on its own node). There is
no other boundary in upstream KSM (no per-cgroup KSM), so keeping trust domains apart means
that in each scope at most one domain's VMs are mergeable at any moment.

A VM counts in every scope its memory may land in: with per-node scopes, the nodes its guest
RAM is bound to (the memory policy in /proc/PID/numa_maps, within the cpuset's
Mems_allowed), or every node when it is not bound.
"""

from __future__ import annotations

import re

from ksmpolicy.paths import HostPaths
from ksmpolicy.records import dataclass

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ksmpolicy.policy.model import Policy

HOST_SCOPE = "host"
# numa_maps' memory policies that keep memory on their nodes ("bind=static:0-1"); "default",
# "local" and "prefer" may fall back to any node.
_POLICY = re.compile(r"^(bind|interleave|prefer \(many\)|weighted interleave)(=[a-z|]+)?:(\S+)")


@dataclass(frozen=True)
class HostScopes:
    nodes: tuple[int, ...]  # NUMA nodes with memory
    merge_across_nodes: bool | None  # the kernel's knob; None when this kernel has none

    @property
    def per_node(self) -> bool:
        return self.merge_across_nodes is False

    @property
    def names(self) -> tuple[str, ...]:
        if self.per_node:
            return tuple(node_scope(n) for n in self.nodes)
        return (HOST_SCOPE,)

    def scopes_of(self, nodes: tuple[int, ...] | None) -> tuple[str, ...]:
        """The scopes of a VM whose memory may use `nodes` (None: not bound, any node)."""
        if not self.per_node:
            return (HOST_SCOPE,)
        usable = [n for n in self.nodes if nodes is None or n in nodes]
        return tuple(node_scope(n) for n in (usable or self.nodes))


def node_scope(node: int) -> str:
    return f"node{node}"


def node_ranges(nodes: tuple[int, ...], separator: str) -> str:
    """(0, 1, 2, 5) -> "0-2" + separator + "5": libvirt's nodeset (","), qemu-server's
    hostnodes (";")."""
    ordered = sorted(set(nodes))
    parts: list[str] = []
    index = 0
    while index < len(ordered):
        end = index
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        first, last = ordered[index], ordered[end]
        parts.append(str(first) if first == last else f"{first}-{last}")
        index = end + 1
    return separator.join(parts)


def parse_nodelist(text: str) -> tuple[int, ...]:
    """`0-2,4` -> (0, 1, 2, 4). Raises ValueError on anything else."""
    found: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if first < 0 or last < first or last > 4095:
            raise ValueError(f"bad node range {part!r}")
        found.update(range(first, last + 1))
    return tuple(sorted(found))


def read_host(paths: HostPaths) -> HostScopes:
    """The host's NUMA nodes with memory and its merge_across_nodes knob."""
    node_dir = paths.numa_nodes
    nodes: tuple[int, ...] = ()
    try:
        nodes = parse_nodelist((node_dir / "has_memory").read_text())
    except (OSError, ValueError):
        try:
            nodes = tuple(
                sorted(
                    int(entry.name[4:])
                    for entry in node_dir.iterdir()
                    if entry.name.startswith("node") and entry.name[4:].isdigit()
                )
            )
        except OSError:
            nodes = ()
    try:
        across: bool | None = (paths.ksm_dir / "merge_across_nodes").read_text().strip() != "0"
    except OSError:
        across = None
    return HostScopes(nodes or (0,), across)


def process_nodes(
    paths: HostPaths, pid: int, ranges: tuple[tuple[int, int], ...]
) -> tuple[int, ...] | None:
    """The NUMA nodes a process's guest RAM may use: the bind or interleave nodes of its
    mergeable VMAs' memory policy, within the cpuset's Mems_allowed; None when not bound.
    (Reading numa_maps walks the page tables like smaps: only per-node hosts pay for it.)"""
    proc = paths.proc / str(pid)
    allowed: tuple[int, ...] | None = None
    try:
        for line in (proc / "status").read_text().splitlines():
            if line.startswith("Mems_allowed_list:"):
                allowed = parse_nodelist(line.split(":", 1)[1])
        text = (proc / "numa_maps").read_text()
    except (OSError, ValueError):
        return allowed
    starts = {start for start, _end in ranges}
    bound: set[int] = set()
    unbound = False
    for line in text.splitlines():
        address, _, rest = line.partition(" ")
        try:
            start = int(address, 16)
        except ValueError:
            continue
        if starts and start not in starts:
            continue
        found = _POLICY.match(rest)
        if found is None:  # default, or preferred: may fall back to any node
            unbound = True
            continue
        try:
            bound.update(parse_nodelist(found.group(3)))
        except ValueError:
            unbound = True
    if unbound or not bound:
        return allowed
    return tuple(sorted(bound & set(allowed))) if allowed is not None else tuple(sorted(bound))


def guest_ram_ranges(
    paths: HostPaths, pid: int, ram_bytes: int | None
) -> tuple[tuple[int, int], ...]:
    """The VMAs that hold a QEMU's guest RAM, from /proc/PID/maps (which, unlike smaps, costs
    no page-table walk): writable, not executable, from half of `-m` to its size. Empty when
    unknown; then every VMA counts."""
    if not ram_bytes:
        return ()
    try:
        text = (paths.proc / str(pid) / "maps").read_text()
    except OSError:
        return ()
    found = []
    for line in text.splitlines():
        span, _, rest = line.partition(" ")
        low, _, high = span.partition("-")
        try:
            start, end = int(low, 16), int(high, 16)
        except ValueError:
            continue
        perms = rest[:4]
        if (
            perms[:2] == "rw"
            and "x" not in perms
            and ram_bytes // 2 <= end - start <= ram_bytes + (4 << 20)
        ):
            found.append((start, end))
    return tuple(found)


def describe(policy: Policy, host: HostScopes) -> list[str]:
    """What a policy's trust domains mean on this host, one line per merge scope (for
    `check`)."""
    lines = []
    want = policy.isolation.merge_across_nodes
    per_node = want is False if want is not None else host.per_node
    knob = "" if want is None else f" (the policy sets merge_across_nodes={int(want)})"
    domains = sorted(policy.domains, key=lambda d: (-d.priority, d.name))
    names = ", ".join(f"{d.name} (priority {d.priority})" for d in domains) or "none"
    if not policy.uses_domains:
        lines.append(f"no trust domains: every VM may share pages with every other{knob}")
    elif not per_node or len(host.nodes) < 2:
        lines.append(
            f"this host has 1 merge scope{knob}: only one domain can merge at a time; "
            f"domains by priority: {names}; equal priorities go to the larger savings"
        )
    else:
        lines.append(
            f"this host has {len(host.nodes)} merge scopes, one per NUMA node{knob}: one "
            "domain can merge per node; a VM not bound to nodes counts in every node"
        )
        for node in host.nodes:
            bound = [d.name for d in domains if node in d.nodes]
            who = ", ".join(bound) if bound else "only VMs not bound to nodes"
            lines.append(f"node{node}: {who}")
    unbound = [d.name for d in policy.domains if d.nodes and not per_node]
    if unbound:
        lines.append(
            f"nodes: of {', '.join(unbound)} have no effect while merge_across_nodes is 1 "
            "(set isolation.merge_across_nodes: false)"
        )
    if policy.uses_domains:
        lines.append(
            "every VM is defined unmergeable; the daemon switches the active domain's guest "
            "RAM on, live (it must run: systemctl enable --now ksmpolicy)"
        )
    return lines
