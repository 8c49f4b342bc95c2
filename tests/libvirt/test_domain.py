"""Domain XML facts and the nosharepages rewrite: golden files, libvirt's schema, properties."""

from __future__ import annotations

import functools
import os
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from ksmpolicy.libvirt.domain import DiskImage, XmlError, domain_facts
from ksmpolicy.libvirt.images import qcow2_backing_root
from ksmpolicy.libvirt.nosharepages import set_nosharepages
from tests.conftest import REPO

DATA = REPO / "tests/data/libvirt"
GOLDEN = DATA / "golden"
INPUTS = sorted(DATA.glob("*.xml"))
SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")
REGENERATE = os.environ.get("KSMPOLICY_REGENERATE") == "1"


@functools.cache
def load_schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMA)))


@pytest.fixture
def schema() -> etree.RelaxNG:
    if not SCHEMA.exists():
        pytest.skip("libvirt's schemas are not installed (Debian package libvirt0)")
    return load_schema()


def valid(schema: etree.RelaxNG, text: str) -> bool:
    return bool(schema.validate(etree.fromstring(text.encode())))


def outside_memory_backing(text: str, tag: str = "memoryBacking") -> bytes:
    """Canonical XML of everything but <memoryBacking> (or another top-level `tag`),
    whitespace-only text ignored."""
    root = etree.fromstring(text.encode())
    for element in root.findall(tag):
        root.remove(element)
    for node in root.iter():
        if node.text is not None and not node.text.strip():
            node.text = None
        if node.tail is not None and not node.tail.strip():
            node.tail = None
    return etree.tostring(root, method="c14n")


MEMORY_BACKING_TAGS = re.compile(r"<memoryBacking/>|</?memoryBacking>|<nosharepages/>")


def only_memory_backing_lines_changed(before: str, after: str) -> bool:
    """Byte for byte, the two texts differ only in memoryBacking/nosharepages tags and the
    lines those stand on: with the tags taken out and emptied lines dropped, they are equal."""

    def rest(text: str) -> list[str]:
        return [line for line in MEMORY_BACKING_TAGS.sub("", text).split("\n") if line.strip()]

    return rest(before) == rest(after)


# --- facts -----------------------------------------------------------------------------------


def test_facts_of_a_tagged_database() -> None:
    facts = domain_facts((DATA / "ksm-tagged-database.xml").read_text())
    assert facts.vm.name == "pg-primary"
    assert facts.vm.uuid == "0a0a0a0a-0000-4000-8000-000000000001"
    assert facts.vm.tags == {"database", "Prod"}
    assert facts.vm.memory_bytes == 16 * 2**30
    assert facts.os_id == "http://debian.org/debian/12"
    assert facts.disks == (
        DiskImage(
            "vda",
            "/var/lib/libvirt/images/pg-primary.qcow2",
            "/var/lib/libvirt/images/pg-primary.qcow2",
        ),
    )
    assert not facts.nosharepages


@pytest.mark.parametrize(
    ("name", "regions", "can_merge", "nosharepages"),
    [
        ("hugepages-default.xml", [("ram", True, False)], False, False),
        ("memfd-memory-numa.xml", [("node0", True, True)], False, False),
        ("vhost-user-fs-fd-memory.xml", [("node0", False, True)], False, False),
        # one shared cell does not make the private one unmergeable
        ("cpu-numa-memshared.xml", [("node0", False, True), ("node1", False, False)], True, False),
        ("ksm-nosharepages.xml", [("ram", False, False)], True, True),
        ("memtune.xml", [("ram", False, False)], True, False),
    ],
)
def test_memory_backing_facts(
    name: str, regions: list[tuple[str, bool, bool]], can_merge: bool, nosharepages: bool
) -> None:
    facts = domain_facts((DATA / name).read_text())
    assert [(r.name, r.hugepages, r.shared) for r in facts.vm.regions] == regions
    assert (facts.vm.ram_can_merge, facts.nosharepages) == (can_merge, nosharepages)


def test_live_backing_chains_give_their_roots() -> None:
    facts = domain_facts((DATA / "disk-backing-chains.xml").read_text())
    assert [(d.target, d.root) for d in facts.disks] == [
        ("vda", "/tmp/missing-backing-store.qcow"),
        ("vdb", "/tmp/Fedora-17-x86_64-Live-KDE.iso"),
        ("vdc", "gluster:Volume1/Image"),
        ("vdd", "/tmp/image.qcow"),
        ("vde", "/dev/HostVG/QEMUGuest11"),
    ]


def qcow2(path: Path, backing: str | None, fmt: str | None = "qcow2") -> None:
    """A minimal qcow2 version 3 header as qemu-img writes it: a backing file name, and its
    format in the backing_fmt header extension (`fmt=None`: an image without one)."""
    name = (backing or "").encode()
    extensions = b""
    if backing and fmt:
        data = fmt.encode()
        extensions += struct.pack(">II", 0xE2792ACA, len(data)) + data.ljust(8, b"\0")
    extensions += struct.pack(">II", 0, 0)
    offset = 112 + len(extensions)
    header = b"QFI\xfb" + struct.pack(">IQII", 3, offset if backing else 0, len(name), 16)
    header = header.ljust(100, b"\0") + struct.pack(">I", 112)
    path.write_bytes(header.ljust(112, b"\0") + extensions + name)


def test_persistent_xml_follows_declared_qcow2_headers(tmp_path: Path) -> None:
    (tmp_path / "base.img").write_bytes(b"\0" * 512)
    qcow2(tmp_path / "mid.qcow2", "base.img", "raw")  # relative: beside its overlay
    qcow2(tmp_path / "top.qcow2", str(tmp_path / "mid.qcow2"))
    assert qcow2_backing_root(str(tmp_path / "top.qcow2")) == (str(tmp_path / "base.img"), None)


def test_an_undeclared_backing_format_ends_the_chain_unopened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "base.qcow2")  # opening it for reading would block the hook
    qcow2(tmp_path / "top.qcow2", "base.qcow2", fmt=None)
    root, why = qcow2_backing_root(str(tmp_path / "top.qcow2"))
    assert root == str(tmp_path / "base.qcow2")
    assert why == f"{root}: its format is not declared, so its backing chain is not followed"


def test_a_raw_disk_is_never_read_even_with_a_forged_header(tmp_path: Path) -> None:
    """A guest writes a qcow2 header naming someone else's image into its raw disk."""
    forged = tmp_path / "guest.img"
    qcow2(forged, "/var/lib/libvirt/images/provider-base.qcow2")
    for declared in ("raw", None, "RAW"):
        xml = (
            "<domain type='kvm'><name>web</name><devices><disk type='file' device='disk'>"
            + (f"<driver name='qemu' type='{declared}'/>" if declared else "")
            + f"<source file='{forged}'/><target dev='vda'/></disk></devices></domain>"
        )
        assert domain_facts(xml, qcow2_backing_root).vm.images == (str(forged),)
    assert qcow2_backing_root(str(forged), "raw") == (str(forged), None)


def test_a_fifo_or_device_declared_qcow2_is_not_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.qcow2")
    root, why = qcow2_backing_root(str(tmp_path / "fifo.qcow2"))
    assert (root, why) == (
        str(tmp_path / "fifo.qcow2"),
        f"cannot read {root}: is a FIFO, not a regular file",
    )
    root, why = qcow2_backing_root("/dev/zero")
    assert why == "cannot read /dev/zero: is a character device, not a regular file"


def test_missing_and_looping_chains_are_facts_not_crashes(tmp_path: Path) -> None:
    qcow2(tmp_path / "orphan.qcow2", "gone.qcow2")
    root, error = qcow2_backing_root(str(tmp_path / "orphan.qcow2"))
    assert root == str(tmp_path / "gone.qcow2")
    assert error == f"cannot read {tmp_path / 'gone.qcow2'}: No such file or directory"
    qcow2(tmp_path / "a.qcow2", "b.qcow2")
    qcow2(tmp_path / "b.qcow2", "a.qcow2")
    assert qcow2_backing_root(str(tmp_path / "a.qcow2"))[1] == (
        f"backing chain loops back to {tmp_path / 'a.qcow2'}"
    )


def test_domain_facts_with_probe_uses_the_base_image(tmp_path: Path) -> None:
    (tmp_path / "debian-12.img").write_bytes(b"\0" * 512)
    qcow2(tmp_path / "vm.qcow2", "debian-12.img", "raw")
    xml = (
        "<domain type='kvm'><name>web</name><devices><disk type='file' device='disk'>"
        f"<driver name='qemu' type='qcow2'/><source file='{tmp_path / 'vm.qcow2'}'/>"
        "<target dev='vda'/></disk></devices></domain>"
    )
    facts = domain_facts(xml, qcow2_backing_root)
    assert facts.vm.images == (str(tmp_path / "debian-12.img"),)


def test_a_live_chain_stops_at_an_undeclared_layer() -> None:
    xml = (
        "<domain type='kvm'><name>web</name><devices><disk type='file' device='disk'>"
        "<driver name='qemu' type='qcow2'/><source file='/img/top.qcow2'/>"
        "<backingStore type='file'><source file='/img/mid.qcow2'/>"
        "<backingStore type='file'><format type='qcow2'/><source file='/img/base.qcow2'/>"
        "</backingStore></backingStore><target dev='vda'/></disk></devices></domain>"
    )
    assert domain_facts(xml).vm.images == ("/img/mid.qcow2",)


# --- the rewrite: golden files ----------------------------------------------------------------


@pytest.mark.parametrize("path", INPUTS, ids=lambda p: p.name)
@pytest.mark.parametrize("want", [True, False], ids=["exclude", "merge"])
def test_rewrite_matches_golden_file(path: Path, want: bool) -> None:
    """Golden outputs in tests/data/libvirt/golden; KSMPOLICY_REGENERATE=1 rewrites them."""
    out = set_nosharepages(path.read_text(), want)
    golden = GOLDEN / f"{path.stem}.{'exclude' if want else 'merge'}.xml"
    if REGENERATE:
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(out)
    assert out == golden.read_text()


@pytest.mark.parametrize("path", INPUTS, ids=lambda p: p.name)
@pytest.mark.parametrize("want", [True, False], ids=["exclude", "merge"])
def test_rewrite_laws_on_libvirt_test_files(path: Path, want: bool, schema: etree.RelaxNG) -> None:
    before = path.read_text()
    after = set_nosharepages(before, want)
    assert set_nosharepages(after, want) == after  # idempotent
    assert domain_facts(after).nosharepages is want
    assert outside_memory_backing(after) == outside_memory_backing(before)
    assert only_memory_backing_lines_changed(before, after)
    if valid(schema, before):
        assert valid(schema, after), schema.error_log
    if domain_facts(before).nosharepages is want:
        assert after is before  # compliant input comes back as the same object


def test_most_inputs_are_schema_valid(schema: etree.RelaxNG) -> None:
    """The schema property must not be vacuous: most inputs validate."""
    assert sum(valid(schema, p.read_text()) for p in INPUTS) >= len(INPUTS) * 2 // 3


# --- the rewrite: generated variants ----------------------------------------------------------

BACKING_CHILDREN = [
    "<hugepages/>",
    "<locked/>",
    "<source type='memfd'/>",
    "<access mode='shared'/>",
    "<allocation mode='immediate'/>",
    "<discard/>",
]


@st.composite
def domains(draw: st.DrawFn) -> str:
    indent = draw(st.sampled_from(["  ", "    ", "\t", ""]))
    newline = "\n" if indent else ""
    quote = draw(st.sampled_from(["'", '"']))
    lines = [f"<domain type={quote}kvm{quote}>"]
    lines.append(f"{indent}<name>vm-{draw(st.integers(0, 9))}</name>")
    if draw(st.booleans()):
        lines.append(f"{indent}<!-- a comment before memory -->")
    lines.append(f"{indent}<memory unit={quote}MiB{quote}>512</memory>")
    if draw(st.booleans()):
        lines.append(f"{indent}<currentMemory unit={quote}MiB{quote}>512</currentMemory>")
    if draw(st.booleans()):
        lines.append(f"{indent}<memtune><hard_limit unit='KiB'>1048576</hard_limit></memtune>")
    backing = draw(st.sampled_from(["none", "self-closing", "empty", "children"]))
    if backing == "self-closing":
        lines.append(f"{indent}<memoryBacking/>")
    elif backing == "empty":
        lines.append(f"{indent}<memoryBacking>{newline}{indent}</memoryBacking>")
    elif backing == "children":
        children = draw(
            st.lists(st.sampled_from(BACKING_CHILDREN), min_size=0, max_size=3, unique=True)
        )
        if draw(st.booleans()):
            children.insert(draw(st.integers(0, len(children))), "<nosharepages/>")
        order = {
            c: i for i, c in enumerate(["<hugepages/>", "<nosharepages/>", *BACKING_CHILDREN[1:]])
        }
        children.sort(key=order.__getitem__)
        inner = "".join(f"{newline}{indent * 2}{c}" for c in children)
        lines.append(f"{indent}<memoryBacking>{inner}{newline}{indent}</memoryBacking>")
    lines.append(f"{indent}<vcpu placement={quote}static{quote}>1</vcpu>")
    os_type = "<type arch='x86_64' machine='pc'>hvm</type>"
    lines.append(f"{indent}<os>{newline}{indent * 2}{os_type}{newline}{indent}</os>")
    if draw(st.booleans()):
        lines.append(
            f"{indent}<metadata>{newline}{indent * 2}<app:x xmlns:app='http://example.org/app'>"
            f"keep &amp; me</app:x>{newline}{indent}</metadata>"
        )
    lines.append("</domain>")
    text = newline.join(lines) + ("\n" if draw(st.booleans()) else "")
    if draw(st.booleans()):
        text = '<?xml version="1.0" encoding="UTF-8"?>\n' + text
    return text


@settings(max_examples=300, deadline=None)
@given(domains(), st.booleans())
def test_rewrite_laws_on_generated_domains(text: str, want: bool) -> None:
    after = set_nosharepages(text, want)
    assert set_nosharepages(after, want) == after
    assert domain_facts(after).nosharepages is want
    assert outside_memory_backing(after) == outside_memory_backing(text)
    assert only_memory_backing_lines_changed(text, after)

    # The other <memoryBacking> children survive, in their order.
    def children(t: str) -> list[str]:
        root = etree.fromstring(t.encode())
        backing = root.find("memoryBacking")
        return [] if backing is None else [c.tag for c in backing if c.tag != "nosharepages"]

    assert children(after) == children(text)


@settings(max_examples=60, deadline=None)
@given(domains(), st.booleans())
def test_generated_domains_keep_schema_validity(text: str, want: bool) -> None:
    if not SCHEMA.exists():
        pytest.skip("libvirt's schemas are not installed")
    schema = load_schema()
    if valid(schema, text):
        assert valid(schema, set_nosharepages(text, want))


# --- hostile input ----------------------------------------------------------------------------

REAL = [path.read_text() for path in sorted(DATA.glob("*.xml"))]
PIECES = [
    "<",
    ">",
    "/>",
    "'",
    '"',
    "&amp;",
    "&#0;",
    "\x85",
    "\u2028",
    "\r\n",
    "<![CDATA[x]]>",
    "<!--",
    "-->",
    "<nosharepages/>",
    "<memoryBacking>",
    "</memoryBacking>",
    "<hugepages/>",
    "<backingStore type='file'><format type='qcow2'/><source file='/etc/shadow'/></backingStore>",
    "<disk type='file'><driver type='qcow2'/><source file='/dev/zero'/></disk>",
    "<memory unit='EiB'>" + "9" * 5000 + "</memory>",
    "<name></name>",
    " xmlns:a='x' ",
]


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """A real domain XML with a few pieces put in or cut out, anywhere."""
    text = draw(st.sampled_from(REAL))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:at] + draw(st.sampled_from(PIECES)) + text[at:]
        else:
            text = text[:at] + text[at + draw(st.integers(1, 20)) :]
    return text


@settings(max_examples=300, deadline=None)
@given(mutated(), st.booleans())
def test_mutated_domains_give_facts_or_one_clear_error(text: str, want: bool) -> None:
    """Whatever the XML holds, reading and rewriting it ends in facts or in XmlError (which the
    hook reports in one line), never in another exception (an "internal error")."""
    try:
        facts = domain_facts(text, qcow2_backing_root)
    except XmlError as exc:
        assert "\n" not in str(exc)
        return
    assert facts.vm.name
    after = set_nosharepages(text, want)
    assert domain_facts(after).nosharepages is want


BILLION_LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + "".join(
        f' <!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">\n'
        for i in range(1, 10)
    )
    + "]>\n<domain><name>&lol9;</name></domain>"
)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (BILLION_LAUGHS, "domain XML must not have a DOCTYPE (no DTDs or entities are read)"),
        (
            '<!DOCTYPE domain SYSTEM "http://example.invalid/domain.dtd"><domain/>',
            "domain XML must not have a DOCTYPE (no DTDs or entities are read)",
        ),
        (
            '<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]><domain><name>&x;</name></domain>',
            "domain XML must not have a DOCTYPE (no DTDs or entities are read)",
        ),
        (
            "<domain><name>&undefined;</name></domain>",
            "domain XML is not well-formed: undefined entity (line 1, column 15)",
        ),
        (b"<domain><name>caf\xe9</name></domain>", "domain XML is not valid UTF-8 (byte 17)"),
        ("<domain><memory>1</memory></domain>", "domain XML has no <name>"),
        (
            "<network><name>x</name></network>",
            "not a libvirt domain: the root element is <network>",
        ),
        (
            "<domain><name>x</name>",
            "domain XML is not well-formed: no element found (line 1, column 23)",
        ),
        ("", "domain XML is not well-formed: no element found (line 1, column 1)"),
    ],
)
def test_hostile_xml_is_refused_with_one_line(data: str | bytes, message: str) -> None:
    with pytest.raises(XmlError) as info:
        domain_facts(data)
    assert str(info.value) == message
    if isinstance(data, str) and data and "<name>" in data:
        with pytest.raises(XmlError):
            set_nosharepages(data, True)


def test_100_mb_is_refused_before_parsing() -> None:
    big = "<domain><name>x</name>" + "<!-- padding -->" * (100 * 2**20 // 16) + "</domain>"
    with pytest.raises(XmlError, match="larger than 32 MB: refusing it"):
        domain_facts(big)


def test_odd_names_survive_the_rewrite() -> None:
    name = 'a "quoted" $(touch /tmp/pwned) &amp; `x`\nsecond line'
    xml = f"<domain type='kvm'>\n  <name>{name}</name>\n  <memory>1024</memory>\n</domain>\n"
    out = set_nosharepages(xml, True)
    assert f"<name>{name}</name>" in out
    assert domain_facts(out).vm.name == 'a "quoted" $(touch /tmp/pwned) & `x`\nsecond line'


@pytest.mark.parametrize(
    "body",
    [
        "  <memory unit='KiB'>1048576</memory>\n",
        "  <memory unit='KiB'>1048576</memory>\n  <memoryBacking>\n    <hugepages/>\n"
        "  </memoryBacking>\n",
        "  <memory unit='KiB'>1048576</memory>\n  <memoryBacking/>\n",
    ],
)
def test_crlf_documents_stay_crlf(body: str) -> None:
    lf = f"<domain type='kvm'>\n  <name>db</name>\n{body}</domain>\n"
    crlf = lf.replace("\n", "\r\n")
    added = set_nosharepages(crlf, True)
    assert added == set_nosharepages(lf, True).replace("\n", "\r\n")
    assert "\r\n" in added and "\n" not in added.replace("\r\n", "")
    assert set_nosharepages(added, False) == crlf.replace("  <memoryBacking/>\r\n", "")
