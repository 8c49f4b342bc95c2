"""Proxmox configs read as qemu-server reads them (QemuServer.pm: parse_vm_config and
check_type; `args` split by Text::ParseWords::shellwords and appended to QEMU's command line).

Every expected value here comes from those sources, quoted beside the case; each case failed
on the reader before it followed them.
"""

from __future__ import annotations

import pytest

from ksmpolicy.policy.decide import Decider, drift
from ksmpolicy.policy.load import parse_policy
from ksmpolicy.proxmox.args import split_args, words
from ksmpolicy.proxmox.conf import ConfError, facts, parse, set_merging
from ksmpolicy.proxmox.rewrite import apply_policy
from tests.conftest import REPO

DATA = REPO / "tests/data/proxmox"
# The head of qemu-server's own test config (src/test/parse-config-input/sections.conf).
HEAD = (DATA / "qs-sections.conf").read_text().split("\n[", 1)[0].rstrip("\n") + "\n"
EXCLUDE = parse_policy("version: 1\ndefault: exclude\n")


def conf(*lines: str) -> str:
    return HEAD + "".join(f"{line}\n" for line in lines)


def pve(text: str) -> tuple[bool | None, bool | None, bool]:
    found = facts(parse(text), "120")
    return found.allow_ksm, found.args_mem_merge, found.merging_off


# --- duplicated keys: `$conf->{$key} = $value`, the last one counts ----------------------------


def test_a_duplicated_key_keeps_its_last_value() -> None:
    assert pve(conf("allow-ksm: 0", "allow-ksm: 1")) == (True, None, False)
    assert pve(conf("allow-ksm: 1", "allow-ksm: 0")) == (False, None, True)
    assert facts(parse(conf("name: first", "name: second")), "120").vm.name == "second"


def test_a_value_its_type_check_drops_does_not_override_an_earlier_one() -> None:
    """check_type dies on `allow-ksm: maybe`; parse_vm_config warns and keeps what it had."""
    assert pve(conf("allow-ksm: 0", "allow-ksm: maybe")) == (False, None, True)
    assert pve(conf("allow-ksm: maybe")) == (None, None, False)


def test_the_rewrite_edits_the_line_that_counts_and_drops_its_dead_copies() -> None:
    text = conf("allow-ksm: 0", "allow-ksm: 1")  # merges: the last line counts
    out = set_merging(text, False)
    assert out.count("allow-ksm") == 1
    assert out == conf("allow-ksm: 0")
    assert pve(out)[2] is True
    # Allowing removes the line that counts and its copy, which would otherwise count next.
    assert set_merging(conf("allow-ksm: 0", "allow-ksm: 0"), True) == HEAD
    # Complying text comes back as it is.
    text = conf("allow-ksm: 1", "allow-ksm: 0")
    assert set_merging(text, False) is text


# --- booleans: 1, on, yes, true / 0, off, no, false, in any case --------------------------------


@pytest.mark.parametrize("value", ["0", "off", "No", "FALSE", "oFf", "no", "false"])
def test_every_false_qemu_server_reads_is_off(value: str) -> None:
    text = conf(f"allow-ksm: {value}")
    assert pve(text) == (False, None, True)
    assert set_merging(text, False) is text  # excluded: complies
    assert "allow-ksm" not in set_merging(text, True)  # allowed: the line goes


@pytest.mark.parametrize("value", ["1", "on", "yes", "true", "YES", "True", "ON"])
def test_every_true_qemu_server_reads_is_on(value: str) -> None:
    assert pve(conf(f"allow-ksm: {value}")) == (True, None, False)
    assert facts(parse(conf(f"template: {value}")), "120").template is True


@pytest.mark.parametrize("value", ["2", "y", "n", "00", "enabled", "0 1"])
def test_what_check_type_refuses_is_no_setting(value: str) -> None:
    assert pve(conf(f"allow-ksm: {value}")) == (None, None, False)
    assert facts(parse(conf(f"template: {value}")), "120").template is False


# --- sections: the main one is the current config ----------------------------------------------


def test_keys_after_an_empty_section_header_are_skipped() -> None:
    """`[]` matches `^\\[([^\\]]*)\\]\\s*$`: an unknown section, whose keys qemu-server skips."""
    assert pve(conf("[]", "allow-ksm: 0")) == (None, None, False)
    text = conf("[]", "allow-ksm: 0")
    assert set_merging(text, False) == "allow-ksm: 0\n" + text


DATABASES = parse_policy(
    "version: 1\nrules:\n  - {name: db, match: {tags: [database]}, action: exclude}\n"
)


def test_pending_is_found_in_any_case() -> None:
    text = conf("", "[pending]", "tags: database")
    note = apply_policy(text, "120", Decider(DATABASES))[3]
    assert note is not None and "would make the decision exclude" in note


def test_of_two_pending_sections_the_last_counts() -> None:
    """Each `[PENDING]` starts `$conf = $res->{pending} = {}` afresh."""
    text = conf("", "[PENDING]", "tags: database", "", "[PENDING]", "tags: web")
    assert apply_policy(text, "120", Decider(DATABASES))[3] is None


@pytest.mark.parametrize("header", ["[foo]", "[special:cloudinit]", "[special:fleecing]", "[:3]"])
def test_no_other_section_is_the_current_config(header: str) -> None:
    assert pve(conf("", header, "allow-ksm: 0")) == (None, None, False)


def test_a_line_ending_in_snapstate_is_no_key() -> None:
    """`m/snapstate:\\s*(prepare|delete)\\s*$/` is tested before `args:`, and not anchored."""
    assert pve(conf("allow-ksm: 0", "args: -machine mem-merge=on -name snapstate:delete")) == (
        False,
        None,
        True,
    )


# --- args: appended last to QEMU's command line, split by shellwords ---------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ("-machine mem-merge=off", False),
        ("-machine mem-merge=off -machine mem-merge=on", True),  # QEMU: the last one wins
        ("-machine mem-merge=on -machine type=q35", True),
        ("-M pc,mem-merge=off", False),
        ("--machine mem-merge=off", False),
        ("--M q35,mem-merge=no", False),
        ("-machine 'mem-merge=off'", False),
        ('-machine "type=q35,mem-merge=off"', False),
        ("-machine mem-merge\\=off", False),
        ("-machine accel=tcg,mem-merge=off '", None),  # unbalanced: shellwords gives nothing
        ("-machine mem-merge=off \\", None),  # lone trailing backslash: nothing either
        ("-fw_cfg 'name=opt/x,string=-machine mem-merge=off'", None),
        ("-M -machine mem-merge=off", None),  # a machine named -machine, then a disk image
        ("0", None),  # `if ($conf->{args})`: "0" is false in Perl
    ],
)
def test_args_say_what_qemu_will_do(args: str, says: bool | None) -> None:
    assert pve(conf(f"args: {args}"))[1] is says


def test_args_turn_merging_back_on_after_allow_ksm_off() -> None:
    text = conf("allow-ksm: 0", "args: -cpu host -machine mem-merge=on")
    found = facts(parse(text), "120")
    assert found.merging_off is False
    decision = Decider(EXCLUDE).decide(found.vm)
    assert drift(decision, found.vm, merging_off=found.merging_off) == "mergeable"
    out = set_merging(text, False)
    assert out == conf(
        "allow-ksm: 0", "args: -cpu host -machine mem-merge=on -machine mem-merge=off"
    )
    assert pve(out) == (False, False, True)
    assert set_merging(out, False) == out
    # Allowing again takes out ksmpolicy's pair only, and the VM merges.
    assert set_merging(out, True) == conf("args: -cpu host -machine mem-merge=on")


def test_args_the_rewrite_cannot_extend_are_refused() -> None:
    text = conf("args: -smbios 'type=0")  # shellwords: nothing
    with pytest.raises(ConfError, match="ends inside a quote or with a backslash"):
        set_merging(text, False, use_allow_ksm=False)
    assert set_merging(text, False) == "allow-ksm: 0\n" + text


def test_an_operators_own_mem_merge_off_stays_when_allowed() -> None:
    text = conf("args: -M q35,mem-merge=off")
    assert set_merging(text, True) is text
    assert pve(text)[2] is True


def test_an_old_qemu_server_drops_allow_ksm() -> None:
    """Before 9.0.27 `allow-ksm` is no key of the schema: check_type dies, the line is
    dropped, so only `args` can switch merging off there."""
    text = conf("allow-ksm: 0")
    assert facts(parse(text), "120", use_allow_ksm=False).merging_off is False
    out = set_merging(text, False, use_allow_ksm=False)
    assert out == "args: -machine mem-merge=off\n" + text


# --- shellwords, as Text::ParseWords splits -----------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("  a  b\tc ", ["a", "b", "c"]),
        ("'a b'c\"d e\"", ["a bcd e"]),
        ('"a\\"b" \'c\\d\'', ['a"b', "c\\d"]),  # \\ unescaped in "..." only
        ("a\\ b", ["a b"]),
        ('a "" b', ["a", "", "b"]),
        ("a\u00a0b", ["a\u00a0b"]),  # Perl's \s on bytes: no-break space is no space
        ("a\x0bb", ["a", "b"]),  # vertical tab is
        ("a 'b", []),
    ],
)
def test_shellwords(value: str, expected: list[str]) -> None:
    assert split_args(value) == expected


def test_word_spans_point_at_the_text() -> None:
    value = " -a 'b c' d"
    found = words(value)
    assert found is not None
    assert [value[w.start : w.end] for w in found] == ["-a", "'b c'", "d"]
    assert [w.plain(value) for w in found] == [True, False, True]
