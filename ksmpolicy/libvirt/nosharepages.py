"""The `<nosharepages/>` rewrite of domain XML: an edit at the parser's byte offsets that
touches nothing else (comments, namespaces, attribute quoting and order, the whitespace of every
untouched node stay byte for byte; a line it inserts ends as the document's lines do)."""

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


def set_nosharepages(data: str, want: bool) -> str:
    """Add (`want`) or remove <nosharepages/> in <memoryBacking>; the input when it complies.

    Creates <memoryBacking> after <memory>/<currentMemory>/<memtune> when needed and removes
    it when it is left with no child elements. Every other byte stays as it was.
    """
    root, raw = parse(data)
    if root.tag != "domain":
        raise XmlError(f"not a libvirt domain: the root element is <{root.tag}>")
    backing = root.child("memoryBacking")
    present = backing is not None and backing.child("nosharepages") is not None
    if present == want:
        return data
    unit = indent_unit(raw, root)
    if want:
        edited = _add(raw, root, backing, unit)
    else:
        assert backing is not None
        edited = _remove(raw, backing)
    return edited.decode("utf-8")


def _add(raw: bytes, root: Element, backing: Element | None, unit: str) -> bytes:
    tag = b"<nosharepages/>"
    if backing is None:
        return insert_child(raw, root, BEFORE_MEMORY_BACKING, "memoryBacking", tag, unit)
    newline = newline_of(raw, root)
    outer = line_indent(raw, backing.start)
    if backing.self_closing or (
        not backing.children and not raw[backing.start_end : _close_start(raw, backing)].strip()
    ):
        body = wrapped("memoryBacking", tag, outer, unit, newline)
        return raw[: backing.start] + body + raw[backing.end :]
    # After <hugepages> if there is one (libvirt's order), else first.
    hugepages = backing.child("hugepages")
    at = hugepages.end if hugepages is not None else backing.start_end
    first = backing.children[0] if backing.children else None
    indent = line_indent(raw, first.start) if first is not None else None
    if indent is None:
        indent = None if outer is None else outer + unit
    prefix = b"" if indent is None else newline + indent.encode()
    return raw[:at] + prefix + tag + raw[at:]


def _close_start(raw: bytes, element: Element) -> int:
    """Offset of the "</" of a non-self-closing element's end tag."""
    return raw.rindex(b"</", element.start_end, element.end)


def _remove(raw: bytes, backing: Element) -> bytes:
    target = backing.child("nosharepages")
    assert target is not None
    others = [c for c in backing.children if c is not target]
    if not others and not _has_comment(raw, backing):
        return _cut(raw, backing)
    return _cut(raw, target)


def _has_comment(raw: bytes, element: Element) -> bool:
    return b"<!--" in raw[element.start_end : element.end]


def _cut(raw: bytes, element: Element) -> bytes:
    """Remove an element together with the indentation and newline that introduce it."""
    start = element.start
    line_start = raw.rfind(b"\n", 0, start)
    if line_start >= 0 and not raw[line_start + 1 : start].strip():
        start = line_start  # also drop the line break and indentation before it
        if raw[start - 1 : start] == b"\r":
            start -= 1
    return raw[:start] + raw[element.end :]
