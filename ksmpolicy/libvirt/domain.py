"""libvirt domain XML: the hardened parser and the VM's facts (identity, tags, images, memory
region by region). The `<nosharepages/>` rewrite, which edits the text at the parser's byte
offsets, is libvirt/nosharepages.py.

Parsing is hardened: no DOCTYPE (so no entities, no DTD, no network), a size limit, UTF-8 only,
and linear in time and memory on any input: expat gathers text in large chunks, text is kept
(as parts, joined once) only for the few elements whose text is read, and elements are kept only
in the subtrees that facts and the rewrites look at.
"""

from __future__ import annotations

import pyexpat as expat  # xml.parsers.expat without its two package imports (0.4 ms a start)

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.policy.decide import MemoryRegion, VmFacts
from ksmpolicy.records import dataclass, field

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from collections.abc import Callable

MAX_XML_BYTES = 32 * 1024 * 1024
MAX_DISKS = 256  # disks whose backing chains are followed on disk; more is not a real domain
NAMESPACE = "urn:ksmpolicy:vm:1"  # our <metadata> element: <vm><tag>database</tag></vm>
NAMESPACE_PREFIX = "ksmpolicy"
LIBOSINFO = "http://libosinfo.org/xmlns/libvirt/domain/1.0"
_UNITS = {
    "b": 1,
    "bytes": 1,
    "kb": 1000,
    "k": 1024,
    "kib": 1024,
    "mb": 1000**2,
    "m": 1024**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "g": 1024**3,
    "gib": 1024**3,
    "tb": 1000**4,
    "t": 1024**4,
    "tib": 1024**4,
    "pb": 1000**5,
    "p": 1024**5,
    "pib": 1024**5,
}
# Where a new <memoryBacking> goes: after the last of these present (libvirt's own order).
BEFORE_MEMORY_BACKING = (
    "name",
    "uuid",
    "genid",
    "title",
    "description",
    "metadata",
    "maxMemory",
    "memory",
    "currentMemory",
    "blkiotune",
    "memtune",
)


class XmlError(KsmPolicyError):
    """Domain XML that ksmpolicy will not read."""


@dataclass(eq=False)
class Element:
    """A parsed element with the byte offsets of its source text."""

    tag: str  # "{uri}local" for namespaced elements
    attrs: dict[str, str]
    start: int  # offset of "<"
    start_end: int  # offset just after the start tag's ">"
    end: int = 0  # offset just after the end tag (or the self-closing tag)
    self_closing: bool = False
    children: list[Element] = field(default_factory=list)
    text: str = ""

    def child(self, tag: str) -> Element | None:
        return next((c for c in self.children if c.tag == tag), None)

    def all(self, tag: str) -> list[Element]:
        return [c for c in self.children if c.tag == tag]


def parse(data: str | bytes) -> tuple[Element, bytes]:
    """Parse domain XML; return the root element and the UTF-8 bytes its offsets refer to."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > MAX_XML_BYTES:
        raise XmlError(f"domain XML is larger than {MAX_XML_BYTES // 2**20} MB: refusing it")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise XmlError(f"domain XML is not valid UTF-8 (byte {exc.start})") from None
    tree = _Tree(raw)
    try:
        tree.parser.Parse(raw, True)
    except expat.ExpatError as exc:
        raise XmlError(
            f"domain XML is not well-formed: {expat.ErrorString(exc.code)} "
            f"(line {exc.lineno}, column {exc.offset + 1})"
        ) from None
    if not tree.roots:
        raise XmlError("domain XML is empty")
    return tree.roots[0], raw


class _Tree:
    """expat's handlers, building the kept elements with their byte offsets."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        # One entry per open element: the element when it is kept, else None (nor its children).
        self.stack: list[Element | None] = []
        self.parts: list[list[str] | None] = []  # its text, for the elements whose text is read
        self.roots: list[Element] = []
        parser = expat.ParserCreate("utf-8", namespace_separator="}")
        parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        parser.buffer_text = True  # adjacent text (and entity references) in one call, not many
        parser.buffer_size = 1 << 16
        parser.StartDoctypeDeclHandler = _refuse_doctype
        parser.EntityDeclHandler = _refuse_doctype
        parser.StartElementHandler = self.start
        parser.EndElementHandler = self.end
        parser.CharacterDataHandler = self.text
        self.parser = parser

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        name = _clark(tag)
        stack = self.stack
        parent = stack[-1] if stack else None
        if stack and (parent is None or not (parent is self.roots[0] or _keeps(parent, name))):
            stack.append(None)
            self.parts.append(None)
            return
        at = self.parser.CurrentByteIndex
        gt = _tag_end(self.raw, at)
        element = Element(
            tag=name,
            attrs={_clark(k): v for k, v in attrs.items()},
            start=at,
            start_end=gt + 1,
            self_closing=self.raw[gt - 1 : gt] == b"/",
        )
        (parent.children if parent is not None else self.roots).append(element)
        stack.append(element)
        self.parts.append([] if name in _TEXT else None)

    def end(self, _tag: str) -> None:
        element = self.stack.pop()
        text_parts = self.parts.pop()
        if element is None:
            return
        if text_parts:
            element.text = "".join(text_parts)
        if element.self_closing:
            element.end = element.start_end
        else:
            element.end = _tag_end(self.raw, self.parser.CurrentByteIndex) + 1

    def text(self, data: str) -> None:
        parts = self.parts
        if parts and parts[-1] is not None:
            parts[-1].append(data)


def _refuse_doctype(*_args: object) -> None:
    raise XmlError("domain XML must not have a DOCTYPE (no DTDs or entities are read)")


# Which children an element keeps (None: all); the root element keeps all of its children.
_EXPAND: dict[str, frozenset[str] | None] = {
    "domain": None,  # also inside libvirt's status files (<domstatus><domain>)
    "memoryBacking": None,
    "hugepages": None,  # its <page> elements
    "numatune": None,  # <memory>, <memnode>: libvirt/numatune.py rewrites them
    "metadata": None,
    f"{{{NAMESPACE}}}vm": None,
    f"{{{LIBOSINFO}}}libosinfo": None,
    "devices": frozenset({"disk", "memory"}),
    "disk": None,
    "memory": None,  # a memory device: <source>, <target>
    "source": None,
    "target": None,
    "backingStore": None,
    "cpu": frozenset({"numa"}),
    "numa": frozenset({"cell"}),
}
# Elements whose text is read.
_TEXT = frozenset({"name", "uuid", "memory", "size", "node", "pagesize", f"{{{NAMESPACE}}}tag"})


def _keeps(parent: Element, child: str) -> bool:
    wanted = _EXPAND.get(parent.tag, frozenset())
    return wanted is None or child in wanted


def _clark(name: str) -> str:
    uri, sep, local = name.rpartition("}")
    return f"{{{uri}}}{local}" if sep else name


def _tag_end(raw: bytes, at: int) -> int:
    """Offset of the ">" that closes the tag starting at `at` (a ">" inside a quoted attribute
    value does not count). C-speed finds, none of them past the tag's end, and none over bytes
    already searched: linear in the tag's length, however many attributes it has."""
    position = at
    gt = raw.find(b">", at)
    found = [-1, -1]  # the next '"' and "'" at or after `position`, when known
    clear = [at, at]  # ... or: there is none in [position, clear)
    while gt >= 0:
        first = -1
        for index, char in enumerate((b'"', b"'")):
            if found[index] < position and clear[index] < gt:
                hit = raw.find(char, max(position, clear[index]), gt)
                found[index] = hit
                clear[index] = gt if hit < 0 else hit
            if found[index] >= position and (first < 0 or found[index] < first):
                first = found[index]
        if first < 0:
            return gt
        closing = raw.find(raw[first : first + 1], first + 1)
        if closing < 0:
            break
        position = closing + 1
        if gt < position:
            gt = raw.find(b">", position)
    raise XmlError("domain XML is not well-formed: unterminated tag")


# --- facts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskImage:
    target: str | None
    source: str | None  # what the disk itself points at
    root: str | None  # the base of its backing chain: the image identity
    error: str | None = None  # why the chain could not be followed to its end


@dataclass(frozen=True)
class DomainFacts:
    vm: VmFacts
    nosharepages: bool
    os_id: str | None
    disks: tuple[DiskImage, ...]


if TYPE_CHECKING:
    # (path, its declared format) -> (the base of its chain, why the chain ended early)
    BackingProbe = Callable[[str, str | None], tuple[str, str | None]]


def domain_facts(data: str | bytes, probe: BackingProbe | None = None) -> DomainFacts:
    """Facts of a domain from its XML. `probe(path, format)` follows qcow2 backing files on disk
    for persistent XML, which has no <backingStore> chain; None leaves the chain unexplored."""
    root, _raw = parse(data)
    return facts_of(root, probe)


def facts_of(root: Element, probe: BackingProbe | None = None) -> DomainFacts:
    if root.tag != "domain":
        raise XmlError(f"not a libvirt domain: the root element is <{root.tag}>")
    name_element = root.child("name")
    # The name exactly as libvirt stores it: ` web-1\t` is not `web-1`.
    name = name_element.text if name_element is not None else ""
    if not name:
        raise XmlError("domain XML has no <name>")
    uuid_element = root.child("uuid")
    backing = root.child("memoryBacking")
    tags: set[str] = set()
    os_id = None
    metadata = root.child("metadata")
    if metadata is not None:
        for ours in metadata.all(f"{{{NAMESPACE}}}vm"):
            tags.update(t.text.strip() for t in ours.all(f"{{{NAMESPACE}}}tag") if t.text.strip())
        osinfo = metadata.child(f"{{{LIBOSINFO}}}libosinfo")
        os_element = osinfo.child(f"{{{LIBOSINFO}}}os") if osinfo is not None else None
        os_id = os_element.attrs.get("id") if os_element is not None else None
    found = [d for d in _devices(root, "disk") if _is_disk(d)]
    disks = tuple(_disk(d, probe if i < MAX_DISKS else None) for i, d in enumerate(found))
    vm = VmFacts(
        name=name,
        uuid=uuid_element.text.strip().lower() if uuid_element is not None else None,
        tags=frozenset(tags),
        images=tuple(i for i in (d.root or d.source for d in disks) if i),
        memory_bytes=_memory_bytes(root.child("memory")),
        regions=memory_regions(root),
    )
    return DomainFacts(
        vm=vm,
        nosharepages=backing is not None and backing.child("nosharepages") is not None,
        os_id=os_id,
        disks=disks,
    )


def _devices(root: Element, tag: str) -> list[Element]:
    devices = root.child("devices")
    return devices.all(tag) if devices is not None else []


def _is_disk(disk: Element) -> bool:
    return disk.attrs.get("device", "disk") in ("disk", "lun")


def _memory_bytes(element: Element | None) -> int | None:
    if element is None:
        return None
    return _memory_bytes_attr(element.text, element.attrs.get("unit", "KiB"))


def memory_regions(root: Element) -> tuple[MemoryRegion, ...]:
    """Guest RAM region by region, as libvirt hands it to QEMU: one backend per guest NUMA
    cell (`ram-node<N>`) or one for all RAM (`pc.ram`, which counts as node 0), and one per
    memory device (`mem<model><N>`).

    A region is hugepage-backed when a `<hugepages><page>` applies to it: the page whose
    `nodeset` names its node, else the page without a nodeset (an empty `<hugepages/>` is the
    default huge page size for all); a page of the system's page size is no huge page. It is
    mapped shared when its access is (a device's `access`, else its cell's `memAccess`, else
    `<memoryBacking><access mode>`), and when it is a memfd (`<source type='memfd'/>`) whose
    access is not `private`: QEMU's memfd backend maps shared unless told otherwise. These are
    libvirt 9.0's rules (qemuBuildMemoryBackendProps); tests/libvirt/test_regions.py checks them
    against the command line libvirt builds and against real guests' mappings."""
    backing = root.child("memoryBacking")
    hugepages = backing.child("hugepages") if backing is not None else None
    access = backing.child("access") if backing is not None else None
    source = backing.child("source") if backing is not None else None
    memfd = source is not None and source.attrs.get("type") == "memfd"
    default_access = access.attrs.get("mode") if access is not None else None
    cpu = root.child("cpu")
    numa = cpu.child("numa") if cpu is not None else None
    cells = {
        _int(cell.attrs.get("id"), index): cell
        for index, cell in enumerate(numa.all("cell") if numa is not None else [])
    }
    regions = []
    if not cells:
        huge = _huge_page_for(hugepages, 0)
        shared = _shared(memfd, default_access)
        regions.append(MemoryRegion("ram", _memory_bytes(root.child("memory")), huge, shared))
    for number, cell in cells.items():
        size = _memory_bytes_attr(cell.attrs.get("memory"), cell.attrs.get("unit", "KiB"))
        mode = cell.attrs.get("memAccess") or default_access
        huge = _huge_page_for(hugepages, number)
        regions.append(MemoryRegion(f"node{number}", size, huge, _shared(memfd, mode)))
    for index, device in enumerate(_devices(root, "memory")):
        regions.append(_memory_device(device, index, hugepages, memfd, default_access, cells))
    return tuple(regions)


def _memory_device(
    device: Element,
    index: int,
    hugepages: Element | None,
    memfd: bool,
    default_access: str | None,
    cells: dict[int | None, Element],
) -> MemoryRegion:
    """A `<memory model=...>` device: a backend of its own, hugepage-backed by its
    `<source><pagesize>` or else by its target node's page, accessed by its `access`, else
    its target cell's, else the default. NVDIMM and virtio-pmem map their file."""
    model = device.attrs.get("model", "dimm")
    source = device.child("source")
    target = device.child("target")
    size_element = target.child("size") if target is not None else None
    size = None
    if size_element is not None:
        size = _memory_bytes_attr(size_element.text, size_element.attrs.get("unit", "KiB"))
    page = source.child("pagesize") if source is not None else None
    node_element = target.child("node") if target is not None else None
    node = _int(node_element.text.strip(), None) if node_element is not None else None
    if page is not None:
        huge = not _is_system_page(page.text.strip(), page.attrs.get("unit", "KiB"))
    else:
        huge = _huge_page_for(hugepages, node if cells else 0)
    cell = cells.get(node) if node is not None else None
    mode = device.attrs.get("access") or (cell.attrs.get("memAccess") if cell else None)
    file_backed = model in ("nvdimm", "virtio-pmem")
    shared = _shared(memfd and not file_backed, mode or default_access)
    return MemoryRegion(f"{model}{index}", size, huge, shared)


def _shared(memfd: bool, access: str | None) -> bool:
    """Whether a backend maps guest RAM shared: asked for, or a memfd not asked to be
    private (QEMU's memory-backend-memfd defaults to share=on; file and ram to off)."""
    return access == "shared" or (memfd and access != "private")


def _huge_page_for(hugepages: Element | None, node: int | None) -> bool:
    """Whether `<hugepages>` backs guest NUMA node `node` (a guest without cells is node 0;
    None: a device on no node, which only a page without a nodeset backs)."""
    if hugepages is None:
        return False
    pages = hugepages.all("page")
    if not pages:
        return True  # <hugepages/>: the default huge page size, for all memory
    general = None
    for page in pages:
        nodeset = page.attrs.get("nodeset")
        if nodeset is None:
            general = page
        elif node is not None and node in _nodeset(nodeset):
            return not _is_system_page(page.attrs.get("size"), page.attrs.get("unit", "KiB"))
    if general is None:
        return False
    return not _is_system_page(general.attrs.get("size"), general.attrs.get("unit", "KiB"))


def _nodeset(text: str) -> set[int]:
    """libvirt's node list `0-2,^1,4`; what does not parse names no node."""
    found: set[int] = set()
    for part in text.replace(" ", "").split(","):
        negate = part.startswith("^")
        low, _, high = part.lstrip("^").partition("-")
        first, last = _int(low, None), _int(high or low, None)
        if first is None or last is None or last - first > 4096:
            continue
        span = set(range(first, last + 1))
        found = found - span if negate else found | span
    return found


def _is_system_page(size: str | None, unit: str) -> bool:
    """A `<page size>` of the system's page size is no huge page (libvirt ignores it)."""
    if size is None:
        return False
    from ksmpolicy.paths import PAGE_SIZE  # noqa: PLC0415

    return _memory_bytes_attr(size, unit) == PAGE_SIZE


def _int(text: str | None, default: int | None) -> int | None:
    if text is None or not (text.isascii() and text.isdigit()) or len(text) > 9:
        return default
    return int(text)


def _memory_bytes_attr(value: str | None, unit: str) -> int | None:
    number = _int(value.strip() if value is not None else None, None)
    if number is None:
        return None
    return number * _UNITS.get(unit.lower(), 1024)


def _source_identity(element: Element) -> str | None:
    source = element.child("source")
    if source is None:
        return None
    kind = element.attrs.get("type", "file")
    if kind == "volume":
        pool, volume = source.attrs.get("pool"), source.attrs.get("volume")
        return f"{pool}/{volume}" if pool and volume else None
    if kind == "network":
        protocol, name = source.attrs.get("protocol"), source.attrs.get("name")
        return f"{protocol}:{name}" if protocol and name else None
    return source.attrs.get("file") or source.attrs.get("dev") or source.attrs.get("dir")


def _disk(disk: Element, probe: BackingProbe | None) -> DiskImage:
    """A disk's image identity. The chain is followed only through declared formats (see
    `images`): in live XML through `<backingStore>` layers that state `<format type='qcow2'/>`,
    else, for a file libvirt declares as qcow2, through the headers on disk."""
    target_element = disk.child("target")
    target = target_element.attrs.get("dev") if target_element is not None else None
    source = _source_identity(disk)
    chain = disk.child("backingStore")
    declared = _format(disk.child("driver"), "type")
    if chain is not None:  # live XML (or a user-given chain): follow it, never the files
        root, fmt = source, declared
        while chain is not None and chain.child("source") is not None and fmt == "qcow2":
            root = _source_identity(chain) or root
            fmt = _format(chain.child("format"), "type")
            chain = chain.child("backingStore")
        return DiskImage(target, source, root)
    if source is None:
        return DiskImage(target, None, None, "disk has no source")
    if probe is not None and disk.attrs.get("type", "file") == "file":
        root, error = probe(source, declared)
        return DiskImage(target, source, root, error)
    return DiskImage(target, source, source)


def _format(element: Element | None, attribute: str) -> str | None:
    value = element.attrs.get(attribute) if element is not None else None
    return value.strip().lower() if value else None


# --- where a line goes: indentation of the document's own lines ---------------------------


def line_indent(raw: bytes, at: int) -> str | None:
    """The whitespace between the previous newline and `at`, or None if other text is there."""
    line_start = raw.rfind(b"\n", 0, at) + 1
    prefix = raw[line_start:at]
    if line_start == 0 or prefix.strip():
        return None
    return prefix.decode()


def indent_unit(raw: bytes, root: Element) -> str:
    root_indent = line_indent(raw, root.start) or ""
    for child in root.children:
        indent = line_indent(raw, child.start)
        if indent is not None and len(indent) > len(root_indent):
            return indent[len(root_indent) :]
    return "  "


def newline_of(raw: bytes, root: Element) -> bytes:
    """The line ending the document uses (CRLF or LF), for lines an edit inserts."""
    return b"\r\n" if b"\r\n" in raw[: root.start_end + 4096] else b"\n"


def wrapped(tag: str, inner: bytes, indent: str | None, unit: str, newline: bytes) -> bytes:
    """`<tag>inner</tag>`: on one line when `indent` is None (the document is on one line),
    else on lines of their own, `inner` one `unit` deeper than `indent`."""
    opening, closing = f"<{tag}>".encode(), f"</{tag}>".encode()
    if indent is None:
        return opening + inner + closing
    return (
        opening + newline + (indent + unit).encode() + inner + newline + indent.encode() + closing
    )


def insert_child(
    raw: bytes, root: Element, after: tuple[str, ...], tag: str, inner: bytes, unit: str
) -> bytes:
    """A new `<tag>inner</tag>` in `root`, after the last of the children named in `after`
    (libvirt's order of elements), indented like that sibling."""
    anchor = next((a for t in reversed(after) if (a := root.child(t)) is not None), None)
    at = anchor.end if anchor is not None else root.start_end
    indent = line_indent(raw, anchor.start) if anchor is not None else None
    block = wrapped(tag, inner, indent, unit, newline_of(raw, root))
    if indent is not None:
        block = newline_of(raw, root) + indent.encode() + block
    return raw[:at] + block + raw[at:]
