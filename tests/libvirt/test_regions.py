"""Guest memory region by region: what libvirt builds for QEMU, what the hook, apply and the
decision make of it, and what a real guest maps.

QEMU maps guest RAM per backend (`pc.ram`, `ram-node<N>`, `mem<device>`), and KSM merges a
backend's pages only when they are private and not hugetlb. The unit tests check the hook and
`apply` on every shape; the root tests check `memory_regions` against the backends libvirt 9.0
itself builds (`virsh domxml-to-native`), and against the mappings of real TCG guests, on a
libvirtd that sees a mounted hugetlbfs.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ksmpolicy.kernel.smaps import parse as parse_smaps
from ksmpolicy.libvirt.domain import domain_facts
from ksmpolicy.libvirt.rewrite import apply_policy
from ksmpolicy.policy.decide import Decider
from ksmpolicy.policy.load import parse_policy
from lab.libvirtd import GUEST, Lab, lab_session
from tests.conftest import IS_ROOT
from tests.libvirt.test_domain import SCHEMA, load_schema, valid
from tests.libvirt.test_hook import Hook

TWO_CELLS = (
    "<cpu><numa>"
    "<cell id='0' cpus='0' memory='{m0}' unit='MiB'{a0}/>"
    "<cell id='1' cpus='1' memory='{m1}' unit='MiB'{a1}/>"
    "</numa></cpu>"
)
DIMM = (
    "<memory model='{model}'{access}><source>{source}</source><target>"
    "<size unit='MiB'>128</size><node>{node}</node></target></memory>"
)


def cells(m0: int = 64, m1: int = 64, a0: str = "", a1: str = "") -> str:
    return TWO_CELLS.format(
        m0=m0,
        m1=m1,
        a0=f" memAccess='{a0}'" if a0 else "",
        a1=f" memAccess='{a1}'" if a1 else "",
    )


def backing(*inner: str) -> str:
    return f"<memoryBacking>{''.join(inner)}</memoryBacking>" if inner else ""


HUGE_NODE0 = "<hugepages><page size='2048' unit='KiB' nodeset='0'/></hugepages>"
HUGE_ALL = "<hugepages/>"
MEMFD = "<source type='memfd'/>"
SHARED = "<access mode='shared'/>"

# name -> (memoryBacking, cpu, devices, [(region, hugepages, shared)])
SHAPES: dict[str, tuple[str, str, str, list[tuple[str, bool, bool]]]] = {
    "plain": ("", "", "", [("ram", False, False)]),
    "all-hugepages": (backing(HUGE_ALL), "", "", [("ram", True, False)]),
    "hugepages-node0-of-one": (backing(HUGE_NODE0), "", "", [("ram", True, False)]),
    "hugepages-node0-only": (
        backing(HUGE_NODE0),
        cells(),
        "",
        [("node0", True, False), ("node1", False, False)],
    ),
    "hugepages-except-node1": (
        backing(
            "<hugepages><page size='2048' unit='KiB'/>"
            "<page size='4' unit='KiB' nodeset='1'/></hugepages>"
        ),
        cells(),
        "",
        [("node0", True, False), ("node1", False, False)],
    ),
    "hugepages-nodeset-0-1-but-1": (
        backing("<hugepages><page size='2048' unit='KiB' nodeset='0-1,^1'/></hugepages>"),
        cells(),
        "",
        [("node0", True, False), ("node1", False, False)],
    ),
    "small-shared-cell": (
        backing(MEMFD),
        cells(16, 112, a0="shared", a1="private"),
        "",
        [("node0", False, True), ("node1", False, False)],
    ),
    "private-cell-under-shared-access": (
        backing(MEMFD, SHARED),
        cells(a1="private"),
        "",
        [("node0", False, True), ("node1", False, False)],
    ),
    "memfd-is-shared-by-default": (backing(MEMFD), "", "", [("ram", False, True)]),
    "file-is-private-by-default": (
        backing("<source type='file'/>"),
        cells(),
        "",
        [("node0", False, False), ("node1", False, False)],
    ),
    "dimm-hugepage-source": (
        "",
        cells(),
        DIMM.format(model="dimm", access="", source="<pagesize unit='KiB'>2048</pagesize>", node=1),
        [("node0", False, False), ("node1", False, False), ("dimm0", True, False)],
    ),
    "dimm-on-a-hugepage-node": (
        backing(HUGE_NODE0),
        cells(),
        DIMM.format(model="dimm", access="", source="", node=0),
        [("node0", True, False), ("node1", False, False), ("dimm0", True, False)],
    ),
    "dimm-shared-cell": (
        backing(MEMFD),
        cells(a0="shared", a1="private"),
        DIMM.format(model="dimm", access="", source="", node=0),
        [("node0", False, True), ("node1", False, False), ("dimm0", False, True)],
    ),
    "nvdimm-maps-its-file-private": (
        "",
        cells(),
        DIMM.format(model="nvdimm", access="", source="<path>/tmp/nvdimm</path>", node=0),
        [("node0", False, False), ("node1", False, False), ("nvdimm0", False, False)],
    ),
}


def domain_xml(
    name: str, memory_backing: str, cpu: str, devices: str = "", *, guest: bool = False
) -> str:
    memory = "<memory unit='MiB'>128</memory>"
    if devices:
        memory = "<maxMemory slots='4' unit='MiB'>1024</maxMemory><memory unit='MiB'>256</memory>"
    boot = ""
    if guest:
        boot = (
            f"<kernel>{GUEST / 'vmlinuz'}</kernel><initrd>{GUEST / 'initrd.img'}</initrd>"
            "<cmdline>console=ttyS0 quiet</cmdline>"
        )
    return (
        f"<domain type='qemu'>\n  <name>{name}</name>\n  {memory}\n  {memory_backing}\n"
        "  <vcpu>2</vcpu>\n"
        f"  <os><type arch='x86_64' machine='pc'>hvm</type>{boot}</os>\n  {cpu}\n"
        f"  <devices><memballoon model='none'/>{devices}</devices>\n</domain>\n"
    )


def shape_xml(shape: str) -> str:
    memory_backing, cpu, devices, _expected = SHAPES[shape]
    return domain_xml(f"shape-{shape}", memory_backing, cpu, devices)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_regions_of_each_shape(shape: str) -> None:
    expected = SHAPES[shape][3]
    facts = domain_facts(shape_xml(shape)).vm
    assert [(r.name, r.hugepages, r.shared) for r in facts.regions] == expected
    assert facts.ram_can_merge == any(not (huge or shared) for _n, huge, shared in expected)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_each_shape_is_a_valid_domain(shape: str) -> None:
    if not SCHEMA.exists():
        pytest.skip("libvirt's schemas are not installed (Debian package libvirt0)")
    assert valid(load_schema(), shape_xml(shape)), load_schema().error_log


# --- the hook and apply agree: everything excluded carries <nosharepages/> ------------------

BLOCK_ALL = "version: 1\nenforcement: block\ndefault: exclude\n"
MERGE_ALL = "version: 1\nenforcement: block\ndefault: merge\n"


@pytest.fixture
def block_hook(tmp_path: Path) -> Hook:
    policy = tmp_path / "policy.yaml"
    policy.write_text(BLOCK_ALL)
    return Hook(tmp_path, policy)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_an_excluded_vm_of_any_shape_is_refused_under_block(block_hook: Hook, shape: str) -> None:
    """Hugepage and shared RAM left the hook silent (exit 0) while apply rewrote the VM: its
    ROMs and video RAM, and its ordinary regions, still merge without <nosharepages/>."""
    result = block_hook(f"shape-{shape}", "prepare", "begin", shape_xml(shape).encode())
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1, (shape, lines)
    assert len(lines) == 1 and "lacks <memoryBacking><nosharepages/>" in lines[0], lines


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_apply_and_the_rewrite_make_every_excluded_shape_unmergeable(
    block_hook: Hook, shape: str
) -> None:
    rewritten, _facts, decision = apply_policy(shape_xml(shape), Decider(parse_policy(BLOCK_ALL)))
    assert "<nosharepages/>" in rewritten and not decision.merge
    if SCHEMA.exists():
        assert valid(load_schema(), rewritten), load_schema().error_log
    # ... and the hook lets the rewritten definition start
    result = block_hook(f"shape-{shape}", "prepare", "begin", rewritten.encode())
    assert (result.returncode, result.stderr) == (0, b"")
    migrated = block_hook(f"shape-{shape}", "migrate", "begin", shape_xml(shape).encode())
    assert migrated.stdout.decode() == rewritten


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_merging_vm_merges_if_any_region_can(shape: str) -> None:
    decision = Decider(parse_policy(MERGE_ALL)).decide(domain_facts(shape_xml(shape)).vm)
    can = any(not (huge or shared) for _n, huge, shared in SHAPES[shape][3])
    assert decision.merge == can
    assert decision.verdict == ("merge" if can else "never")
    if can and not all(not (h or s) for _n, h, s in SHAPES[shape][3]):
        assert "KSM never merges" in decision.reason  # the regions that cannot are named


# --- against real libvirt and QEMU -----------------------------------------------------------

HUGEPAGES_WANTED = 96  # 2 MiB pages: two guests with a 64 MiB hugepage node each, and spare
HUGETLBFS = Path("/dev/hugepages")


@pytest.fixture(scope="module")
def huge_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A libvirtd started after a hugetlbfs is mounted (libvirt finds its mounts when it
    starts), with 2 MiB pages reserved; the mount, the reservation and libvirtd undone after."""
    if not IS_ROOT:
        pytest.skip("needs root to run libvirtd and QEMU (CI runs as root)")
    if not (GUEST / "initrd.img").exists():
        pytest.skip("the test guest is not built (scripts/build-guest; make test builds it)")
    pytest.importorskip("libvirt")
    if subprocess.run(["pidof", "libvirtd"], capture_output=True, check=False).returncode == 0:
        pytest.skip("a libvirtd runs already: it would not see a hugetlbfs mounted now")
    nr = Path("/proc/sys/vm/nr_hugepages")
    before = int(nr.read_text())
    mounted = False
    mounts = Path("/proc/mounts").read_text().splitlines()
    if not any(line.split()[1:3] == [str(HUGETLBFS), "hugetlbfs"] for line in mounts):
        HUGETLBFS.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "hugetlbfs", "none", str(HUGETLBFS)], check=True)
        mounted = True
    try:
        nr.write_text(str(before + HUGEPAGES_WANTED))
        if int(nr.read_text()) < before + HUGEPAGES_WANTED // 2:
            pytest.skip("the kernel could not reserve huge pages (fragmented memory)")
        workdir = tmp_path_factory.mktemp("regions")
        workdir.chmod(0o755)
        yield from lab_session(workdir)
    finally:
        nr.write_text(str(before))
        if mounted:
            subprocess.run(["umount", str(HUGETLBFS)], check=False)
            HUGETLBFS.rmdir()


def libvirt_backends(xml_path: Path) -> list[tuple[str, bool, bool]]:
    """(backend id, hugepages, shared) of each guest RAM backend libvirt builds for QEMU."""
    argv = subprocess.run(
        ["virsh", "-c", "qemu:///system", "domxml-to-native", "qemu-argv", "--xml", str(xml_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    found = []
    for text in re.findall(r"'(\{\"qom-type\":\"memory-backend-[^']*\})'", argv):
        backend = json.loads(text)
        kind = backend["qom-type"].removeprefix("memory-backend-")
        huge = "hugepages" in backend.get("mem-path", "") or bool(backend.get("hugetlb"))
        # QEMU's own defaults when libvirt says nothing: memfd shares, file and ram do not
        shared = backend.get("share", kind == "memfd")
        found.append((backend["id"], huge, bool(shared)))
    return found


@pytest.mark.root
def test_regions_are_the_backends_libvirt_builds(huge_lab: Lab, tmp_path: Path) -> None:
    for shape in sorted(SHAPES):
        path = tmp_path / f"{shape}.xml"
        path.write_text(shape_xml(shape))
        built = libvirt_backends(path)
        regions = domain_facts(path.read_text()).vm.regions
        assert [(huge, shared) for _id, huge, shared in built] == [
            (r.hugepages, r.shared) for r in regions
        ], (shape, built)
        # and in the same order: pc.ram, or ram-node<N> per cell, then mem<device> per device
        for (backend, _h, _s), region in zip(built, regions, strict=True):
            wanted = "pc.ram" if region.name == "ram" else f"ram-{region.name}"
            assert backend in (wanted, f"mem{region.name}"), (shape, backend)


def vmas_of(pid: int) -> list[tuple[int, bool, bool]]:
    """(size MiB, mergeable, hugetlb) of each mapping of a running QEMU."""
    smaps = parse_smaps(Path(f"/proc/{pid}/smaps").read_bytes())
    return [(v.size >> 20, v.mergeable, v.hugetlb) for v in smaps.vmas]


@pytest.mark.root
@pytest.mark.parametrize(
    ("shape", "nosharepages", "check"),
    [
        # hugepages for node 0 only: node 1 is ordinary memory and merges
        (
            "hugepages-node0-only",
            False,
            lambda vmas: (64, False, True) in vmas and (64, True, False) in vmas,
        ),
        # a small shared cell does not make the large private one unmergeable
        ("small-shared-cell", False, lambda vmas: (112, True, False) in vmas),
        # all RAM in hugepages: QEMU's ROMs and video RAM still merge ...
        (
            "all-hugepages",
            False,
            lambda vmas: (128, False, True) in vmas and any(m for _s, m, _h in vmas),
        ),
        # ... unless the definition says <nosharepages/>
        ("all-hugepages", True, lambda vmas: not any(m for _s, m, _h in vmas)),
    ],
)
def test_a_real_guest_maps_its_regions_as_decided(
    huge_lab: Lab,
    shape: str,
    nosharepages: bool,
    check: Callable[[list[tuple[int, bool, bool]]], bool],
) -> None:
    memory_backing, cpu, devices, _expected = SHAPES[shape]
    if nosharepages:
        memory_backing = memory_backing.replace("<memoryBacking>", "<memoryBacking><nosharepages/>")
    name = f"ksmpolicy-test-region-{shape}" + ("-nosharepages" if nosharepages else "")
    domain = huge_lab.conn.defineXML(domain_xml(name, memory_backing, cpu, devices, guest=True))
    huge_lab.defined.append(name)
    domain.create()
    try:
        pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
        vmas = vmas_of(pid)
        assert check(vmas), sorted(v for v in vmas if v[0] >= 1)
    finally:
        domain.destroy()
