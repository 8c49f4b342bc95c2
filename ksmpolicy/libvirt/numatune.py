"""Binding a domain's memory to NUMA nodes: `<numatune>`, for trust domains with per-node scopes.

With `merge_across_nodes` 0 the kernel merges pages only within a NUMA node, so a trust domain
bound to its own nodes can merge there while another merges elsewhere. The binding is libvirt's
`<numatune><memory mode='strict' nodeset='...'/>`; every `<memnode>` (a guest cell's own
binding) is made strict to the same nodes, or a cell could land outside them. Every other byte
of the definition stays as it was.
"""

from __future__ import annotations

from ksmpolicy.domains.scopes import node_ranges
from ksmpolicy.libvirt.domain import (
    BEFORE_MEMORY_BACKING,
    Element,
    XmlError,
    indent_unit,
    line_indent,
    parse,
)

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
    newline = b"\r\n" if b"\r\n" in raw[: root.start_end + 4096] else b"\n"
    if numatune is None:
        anchor = next(
            (a for t in reversed(_BEFORE_NUMATUNE) if (a := root.child(t)) is not None), None
        )
        at = anchor.end if anchor is not None else root.start_end
        indent = line_indent(raw, anchor.start) if anchor is not None else None
        if indent is None:
            block = b"<numatune>" + memory_tag + b"</numatune>"
        else:
            block = (
                newline
                + indent.encode()
                + b"<numatune>"
                + newline
                + (indent + unit).encode()
                + memory_tag
                + newline
                + indent.encode()
                + b"</numatune>"
            )
        return (raw[:at] + block + raw[at:]).decode("utf-8")
    edits: list[tuple[int, int, bytes]] = []  # (start, end, replacement), applied back to front
    memory = numatune.child("memory")
    if memory is None or not _strict_to(memory, nodeset):
        if memory is not None:
            edits.append((memory.start, memory.end, memory_tag))
        elif numatune.self_closing:
            body = b"<numatune>" + memory_tag + b"</numatune>"
            edits.append((numatune.start, numatune.end, body))
        else:
            first = numatune.children[0] if numatune.children else None
            indent = line_indent(raw, first.start) if first is not None else None
            prefix = b"" if indent is None else newline + indent.encode()
            edits.append((numatune.start_end, numatune.start_end, prefix + memory_tag))
    for memnode in numatune.all("memnode"):
        if not _strict_to(memnode, nodeset):
            cell = memnode.attrs.get("cellid", "0")
            tag = f"<memnode cellid='{cell}' mode='strict' nodeset='{nodeset}'/>".encode()
            edits.append((memnode.start, memnode.end, tag))
    if not edits:
        return data
    for start, end, replacement in sorted(edits, reverse=True):
        raw = raw[:start] + replacement + raw[end:]
    return raw.decode("utf-8")


def _strict_to(element: Element, nodeset: str) -> bool:
    return (
        element.attrs.get("mode", "strict") == "strict"
        and element.attrs.get("nodeset") == nodeset
        and "placement" not in element.attrs
    )
