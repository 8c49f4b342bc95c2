"""Proxmox configs: facts on real texts, golden rewrites, and the byte-for-byte laws."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ksmpolicy.policy.decide import Decider
from ksmpolicy.policy.load import parse_policy
from ksmpolicy.proxmox.conf import (
    ConfError,
    facts,
    parse,
    qemu_server_supports_allow_ksm,
    set_merging,
)
from ksmpolicy.proxmox.rewrite import apply_policy
from tests.conftest import REPO

DATA = REPO / "tests/data/proxmox"
GOLDEN = DATA / "golden"
CONFIGS = sorted(DATA.glob("*.conf"))
REGENERATE = os.environ.get("KSMPOLICY_REGENERATE") == "1"
VARIANTS = {
    "exclude": (False, True),
    "exclude-old": (False, False),
    "allow": (True, True),
}


def read(name: str) -> str:
    return (DATA / name).read_text()


def test_facts_of_a_linked_clone() -> None:
    config = parse(read("pve-101-linked-clone.conf"))
    found = facts(config, "101")
    assert found.vm.name == "web-101"
    assert found.vm.vmid == "101"
    assert found.vm.tags == {"web", "prod"}
    assert found.vm.images == ("local-lvm:base-9000-disk-0",)  # the base, not the clone
    assert found.vm.memory_bytes == 2048 * 2**20
    assert found.hookscript == "local:snippets/backup-notify.sh"
    assert (found.allow_ksm, found.args_mem_merge, found.template) == (None, None, False)
    assert [s.name for s in config.sections] == [
        None,
        "PENDING",
        "special:cloudinit",
        "before-upgrade",
    ]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("pve-102-allow-ksm-off.conf", {"allow_ksm": False, "memory": 16384, "merging_off": True}),
        ("pve-103-old-args.conf", {"allow_ksm": None, "args": False, "merging_off": True}),
        ("pve-104-odd-args.conf", {"args": False, "merging_off": True}),
        ("pve-105-virtiofs.conf", {"shared": True}),
        ("pve-9000-template.conf", {"template": True, "images": ("local-lvm:base-9000-disk-0",)}),
        ("pve-106-dir-linked-clone.conf", {"images": ("local:9001/base-9001-disk-0.qcow2",)}),
        ("qs-memory-hugepages-2m.conf", {"hugepages": True, "images": ()}),
        ("qs-simple1.conf", {"images": ("local:8006/vm-8006-disk-0.qcow2",), "memory": 768}),
        (
            "qs-simple-rbd.conf",
            {"images": ("rbd-store:vm-8006-disk-0", "krbd-store:vm-8006-disk-0")},
        ),
        ("qs-locked.conf", {"lock": "backup", "name": "apache"}),
        ("qs-efi-secboot-and-tpm.conf", {"name": "VM 100", "images": ()}),
        ("qs-memory-hotplug.conf", {"memory": 66560}),
    ],
)
def test_facts_table(name: str, expected: dict[str, object]) -> None:
    found = facts(parse(read(name)), "100")
    actual = {
        "allow_ksm": found.allow_ksm,
        "args": found.args_mem_merge,
        "merging_off": found.merging_off,
        "shared": any(r.shared for r in found.vm.regions),
        "hugepages": any(r.hugepages for r in found.vm.regions),
        "template": found.template,
        "images": found.vm.images,
        "memory": (found.vm.memory_bytes or 0) // 2**20,
        "lock": found.lock,
        "name": found.vm.name,
    }
    assert {k: actual[k] for k in expected} == expected


def test_qemu_server_versions() -> None:
    assert qemu_server_supports_allow_ksm("9.0.27")
    assert qemu_server_supports_allow_ksm("9.2.6")
    assert qemu_server_supports_allow_ksm("10.0.1")
    assert not qemu_server_supports_allow_ksm("9.0.26")
    assert not qemu_server_supports_allow_ksm("8.4.1")
    assert qemu_server_supports_allow_ksm(None)  # unknown: current


# --- golden rewrites and laws -------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_rewrite_matches_golden(path: Path, variant: str) -> None:
    allow, new = VARIANTS[variant]
    out = set_merging(path.read_text(), allow, use_allow_ksm=new)
    golden = GOLDEN / f"{path.stem}.{variant}.conf"
    if REGENERATE:
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(out)
    assert out == golden.read_text()


def laws(before: str, after: str, allow: bool, use_allow_ksm: bool = True) -> None:
    """Idempotent; outside the main section byte for byte; in it, only allow-ksm/args lines."""
    config, rewritten = parse(before), parse(after)
    main_end, new_main_end = config.main.end, rewritten.main.end
    assert (
        before.splitlines(keepends=True)[main_end:]
        == after.splitlines(keepends=True)[new_main_end:]
    )
    old_main = [
        line
        for line in before.splitlines(keepends=True)[:main_end]
        if not line.startswith(("allow-ksm:", "args:"))
    ]
    new_main = [
        line
        for line in after.splitlines(keepends=True)[:new_main_end]
        if not line.startswith(("allow-ksm:", "args:"))
    ]
    assert old_main == new_main
    assert facts(rewritten, "1", use_allow_ksm=use_allow_ksm).merging_off is (not allow)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_rewrite_laws_on_real_configs(path: Path, variant: str) -> None:
    allow, new = VARIANTS[variant]
    before = path.read_text()
    after = set_merging(before, allow, use_allow_ksm=new)
    assert set_merging(after, allow, use_allow_ksm=new) == after
    laws(before, after, allow, new)
    if facts(parse(before), "1", use_allow_ksm=new).merging_off is not allow:
        assert after is before  # compliant input comes back untouched


def test_odd_args_keep_their_quoting() -> None:
    before = read("pve-104-odd-args.conf")
    after = set_merging(before, True)
    args = next(line for line in after.splitlines() if line.startswith("args:"))
    assert args == (
        "args: -device 'usb-host,vendorid=0x1234' -fw_cfg \"name=opt/x,string=-machine "
        'mem-merge=off" -smbios type=0,vendor=\\"a\\"'
    )


LINES = st.sampled_from(
    [
        "cores: 2\n",
        "memory: 2048\n",
        "name: vm\n",
        "args: -cpu host\n",
        "args: -machine mem-merge=off\n",
        "allow-ksm: 0\n",
        "allow-ksm: 1\n",
        "tags: a;b\n",
        "scsi0: local-lvm:base-9000-disk-0/vm-1-disk-0,size=8G\n",
        "#a description line\n",
        "broken line without colon\n",
        "\n",
    ]
)
SECTIONS = st.lists(
    st.tuples(
        st.sampled_from(["[PENDING]", "[special:cloudinit]", "[snap1]"]),
        st.lists(LINES, max_size=4),
    ),
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(LINES, max_size=10), SECTIONS, st.booleans(), st.booleans())
def test_rewrite_laws_on_generated_configs(
    main: list[str], sections: list[tuple[str, list[str]]], allow: bool, new: bool
) -> None:
    # A config has each main key once; duplicates would be Proxmox's problem, not ours.
    seen: set[str] = set()
    unique = []
    for line in main:
        key = line.split(":", 1)[0]
        if ":" in line and not line.startswith("#"):
            if key in seen:
                continue
            seen.add(key)
        unique.append(line)
    text = "".join(unique) + "".join(f"\n{h}\n" + "".join(body) for h, body in sections)
    after = set_merging(text, allow, use_allow_ksm=new)
    assert set_merging(after, allow, use_allow_ksm=new) == after
    laws(text, after, allow, new)


# --- pending changes and the decision ----------------------------------------------------------

POLICY = parse_policy(
    "version: 1\nrules:\n  - {name: databases, match: {tags: [database]}, action: exclude}\n"
)


def test_pending_change_that_alters_the_decision_is_noted() -> None:
    new, _found, decision, note = apply_policy(
        read("pve-101-linked-clone.conf"), "101", Decider(POLICY)
    )
    assert decision.action.value == "merge"
    assert new == read("pve-101-linked-clone.conf")
    assert note == (
        "a pending change would make the decision exclude (rule 'databases' (line 3): tag "
        "database -> exclude); it applies at the next start"
    )


# --- hostile input --------------------------------------------------------------------------


def test_nul_bytes_are_refused() -> None:
    with pytest.raises(ConfError, match="config contains NUL bytes: not a Proxmox config"):
        parse("name: a\0b\n")


def test_a_10_mb_description_is_fine() -> None:
    text = "".join(f"#{'x' * 99}\n" for _ in range(100_000)) + "memory: 512\nname: big\n"
    after = set_merging(text, False)
    assert after.endswith("allow-ksm: 0\nmemory: 512\nname: big\n")
    assert after.startswith(text[:1000])


def test_over_16_mb_is_refused() -> None:
    with pytest.raises(ConfError, match="larger than 16 MB"):
        parse("#" * (17 * 2**20))


def test_broken_lines_are_kept_not_judged() -> None:
    text = "garbage without colon\nname: x\n: no key\nmemory: 1024\n"
    assert set_merging(text, False) == (
        "garbage without colon\nallow-ksm: 0\nname: x\n: no key\nmemory: 1024\n"
    )


@pytest.mark.parametrize(
    "line",
    [
        "memory: " + "9" * 5000,  # beyond Python's digit limit: ValueError, before
        "memory: current=" + "9" * 5000,
        "memory: \u0664\u0660\u0669\u0666",  # Arabic-Indic digits: no number qemu-server writes
    ],
)
def test_a_number_no_qemu_server_writes_is_no_number(line: str) -> None:
    from ksmpolicy.proxmox.conf import facts, parse

    config = f"cores: 2\n{line}\nname: web\nscsi0: local-lvm:vm-101-disk-0\n"
    assert facts(parse(config), "101").vm.memory_bytes is None
    new = apply_policy(config, "101", Decider(parse_policy("version: 1\n")))[0]
    assert new == config  # decided (merge) and left as it was


def test_an_impossible_qemu_server_version_is_refused() -> None:
    from ksmpolicy.policy.model import valid_qemu_server_version
    from ksmpolicy.proxmox.conf import qemu_server_supports_allow_ksm

    assert valid_qemu_server_version("9.0.27-1")
    assert not valid_qemu_server_version("9" * 5000)
    assert qemu_server_supports_allow_ksm("9" * 5000 + ".1")  # read as far as it makes sense
