"""Binding a domain's memory to NUMA nodes: `<numatune>`, for trust domains with per-node scopes.

With `merge_across_nodes` 0 the kernel merges pages only within a NUMA node, so a trust domain
bound to its own nodes can merge there while another merges elsewhere. The binding is libvirt's
`<numatune><memory mode='strict' nodeset='...'/>`; every `<memnode>` (a guest cell's own
binding) is made strict to the same nodes, or a cell could land outside them. Every other byte
of the definition stays as it was.
"""

from __future__ import annotations

from ksmpolicy.libvirt.domain import (
    BEFORE_MEMORY_BACKING,
    Element,
    XmlError,
    indent_unit,
    insert_child,
    line_indent,
    newline_of,
    parse,
    wrapped,
)
from ksmpolicy.trust.scopes import node_ranges

# Where a new <numatune> goes: after the last of these present (libvirt's own order).
_BEFORE_NUMATUNE = (
    *BEFORE_MEMORY_BACKING,
    "memoryBacking",
    "vcpu",
    "vcpus",
    "iothreads",
    "iothreadids",
    "defaultiothread",
    "cputune",
)


def nodeset_text(nodes: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> "0-2,5"."""
    return node_ranges(nodes, ",")


def bound_to(data: str) -> tuple[str | None, str | None]:
    """(mode, nodeset) of the domain's `<numatune><memory>`, or (None, None)."""
    root, _raw = parse(data)
    numatune = root.child("numatune")
    memory = numatune.child("memory") if numatune is not None else None
    if memory is None:
        return None, None
    return memory.attrs.get("mode", "strict"), memory.attrs.get("nodeset")


def set_numatune(data: str, nodes: tuple[int, ...]) -> str:
    """Bind the domain's memory strictly to `nodes`; the input when it already is."""
    if not nodes:
        raise XmlError("no NUMA nodes to bind to")
    root, raw = parse(data)
    if root.tag != "domain":
        raise XmlError(f"not a libvirt domain: the root element is <{root.tag}>")
    nodeset = nodeset_text(nodes)
    memory_tag = f"<memory mode='strict' nodeset='{nodeset}'/>".encode()
    numatune = root.child("numatune")
    unit = indent_unit(raw, root)
    if numatune is None:
        return insert_child(raw, root, _BEFORE_NUMATUNE, "numatune", memory_tag, unit).decode()
    edits = _edits(raw, root, numatune, nodeset, memory_tag)
    if not edits:
        return data
    for start, end, replacement in sorted(edits, reverse=True):
        raw = raw[:start] + replacement + raw[end:]
    return raw.decode("utf-8")


def _edits(
    raw: bytes, root: Element, numatune: Element, nodeset: str, memory_tag: bytes
) -> list[tuple[int, int, bytes]]:
    """(start, end, replacement) that make an existing `<numatune>` strict to `nodeset`."""
    edits = []
    memory = numatune.child("memory")
    if memory is not None and not _strict_to(memory, nodeset):
        edits.append((memory.start, memory.end, memory_tag))
    elif memory is None and numatune.self_closing:
        body = wrapped("numatune", memory_tag, None, "", b"")
        edits.append((numatune.start, numatune.end, body))
    elif memory is None:
        first = numatune.children[0] if numatune.children else None
        indent = line_indent(raw, first.start) if first is not None else None
        prefix = b"" if indent is None else newline_of(raw, root) + indent.encode()
        edits.append((numatune.start_end, numatune.start_end, prefix + memory_tag))
    for memnode in numatune.all("memnode"):
        if not _strict_to(memnode, nodeset):
            cell = memnode.attrs.get("cellid", "0")
            tag = f"<memnode cellid='{cell}' mode='strict' nodeset='{nodeset}'/>".encode()
            edits.append((memnode.start, memnode.end, tag))
    return edits


def _strict_to(element: Element, nodeset: str) -> bool:
    return (
        element.attrs.get("mode", "strict") == "strict"
        and element.attrs.get("nodeset") == nodeset
        and "placement" not in element.attrs
    )
