"""Names as ksmpolicy prints them: every character that can hide, reorder or break a line is
escaped by the one function every printer uses (`quoting.one_line`)."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ksmpolicy.quoting import fix_command, one_line, printable, quote, shell_word

# Bidirectional overrides and isolates (Trojan Source), zero-width and other format characters.
BIDI = [chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))]
FORMAT = ["\u200b", "\u200c", "\u200d", "\u200e", "\u200f", "\ufeff", "\u061c", "\u00ad"]
HIDDEN = st.characters(categories=["Cc", "Cf", "Zl", "Zp", "Co", "Cs"])


@pytest.mark.parametrize("char", BIDI + FORMAT)
def test_bidi_and_format_characters_are_escaped(char: str) -> None:
    name = f"web{char}1"
    code = f"\\u{ord(char):04x}"
    assert one_line(name) == f"web{code}1"
    assert quote(name) == f'"web{code}1"'
    assert printable(f"a\n{name}") == f"a\nweb{code}1"
    assert shell_word(name) is None  # never pasted: a shell would run what the eye does not see
    assert fix_command("ksmpolicy apply", name, "6e6b7d53") == "ksmpolicy apply --domain 6e6b7d53"


@given(st.text(), HIDDEN, st.text())
def test_no_hidden_character_survives(before: str, hidden: str, after: str) -> None:
    for shown in (one_line(before + hidden + after), printable(before + hidden + after)):
        assert all(unicodedata.category(c)[0] not in "CZ" or c in " \n" for c in shown)
        shown.encode("utf-8")  # a lone surrogate would not even print


def test_astral_characters_are_escaped_unambiguously() -> None:
    assert one_line("a\U000e0001b") == "a\\U000e0001b"  # a tag character (Cf), plane 14
    assert one_line("ok \U0001f600 é 日本") == "ok \U0001f600 é 日本"  # printable stays


def test_errors_of_every_command_are_printed_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    from ksmpolicy.cli.main import main

    assert main(["explain", "--facts", "/nonexistent/evil\u202etxt.yaml"]) == 1
    err = capsys.readouterr().err
    assert "\u202e" not in err
    assert "evil\\u202etxt.yaml" in err
