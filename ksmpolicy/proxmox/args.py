"""A Proxmox config's `args:` as qemu-server hands it to QEMU, and what it says about merging.

qemu-server appends `args` to the end of the QEMU command line it builds, after its own
`-machine ...,mem-merge=off` for `allow-ksm: 0` (QemuServer.pm: config_to_command), split into
words by Perl's Text::ParseWords::shellwords (PVE::Tools::split_args). So:

* QEMU takes the last `mem-merge=` of every `-machine`/`-M` it sees (kernel/qemuopts.py), and
  one in `args` comes last: `args: -machine mem-merge=on` turns merging back on after
  `allow-ksm: 0`.
* Words are shellwords': runs of ASCII whitespace separate them, `"..."` and `\\x` are
  unescaped, `'...'` is taken as it is; an unbalanced quote or a trailing lone backslash makes
  shellwords return nothing, and qemu-server then passes no `args` at all.

`words` is a port of Text::ParseWords::parse_line (delimiter `\\s+`, keep 0) that also keeps
each word's span in the text, so a rewrite can remove a word pair without retyping the rest.
"""

from __future__ import annotations

import re

from ksmpolicy.kernel.qemuopts import MACHINE_FLAGS, machine_mem_merge
from ksmpolicy.records import dataclass

# ksmpolicy's own form of "merging off" in `args` (before qemu-server 9.0.27 had allow-ksm)
MEM_MERGE_OFF = ("-machine", "mem-merge=off")
# Perl's \s on a byte string: ASCII whitespace only (Python's \s would also take U+00A0 ...)
_SPACE = " \t\n\r\f\v"
_PIECE = re.compile(
    r'"((?:[^\\"]|\\.)*)"'  # a double-quoted piece
    r"|'((?:[^\\']|\\.)*)'"  # a single-quoted piece
    r"""|((?:\\.|[^\\"'])*?)(\Z|[ \t\n\r\f\v]+|(?=["']))""",  # unquoted, up to its delimiter
    re.S,
)
_ESCAPE = re.compile(r"\\(.)", re.S)


@dataclass(frozen=True)
class Word:
    start: int  # its span in the `args` value
    end: int
    text: str  # the word as QEMU gets it

    def plain(self, value: str) -> bool:
        """Written as it is read: no quotes, no escapes."""
        return value[self.start : self.end] == self.text


def words(value: str) -> tuple[Word, ...] | None:
    """The words of `value` as shellwords splits it; None when shellwords returns nothing for
    a non-empty value (an unbalanced quote, a lone trailing backslash)."""
    line = value.lstrip(_SPACE)
    offset = len(value) - len(line)
    found: list[Word] = []
    text: str | None = None  # the word being built
    start = pos = 0
    while pos < len(line):
        match = _PIECE.match(line, pos)
        if match is None:
            return None
        double, single, unquoted, delimiter = match.groups()
        if double is None and single is None and not unquoted and not delimiter:
            return None  # parse_line: `return() unless ...`
        if double is not None:
            piece = _ESCAPE.sub(r"\1", double)
        elif single is not None:
            piece = single
        else:
            piece = _ESCAPE.sub(r"\1", unquoted)
        if text is None:
            text, start = "", pos
        text += piece
        pos = match.end()
        if delimiter:
            found.append(Word(offset + start, offset + match.start(4), text))
            text = None
    if text is not None:
        found.append(Word(offset + start, offset + pos, text))
    return tuple(found)


def split_args(value: str | None) -> list[str]:
    """`args` as the words qemu-server appends to QEMU's command line (`0` is false in Perl:
    no words)."""
    if not value or value == "0":
        return []
    return [w.text for w in words(value) or ()]


def mem_merge(value: str | None) -> bool | None:
    """What `args` says about merging: the last `-machine ...mem-merge=` in it, or None."""
    return machine_mem_merge(split_args(value))


def with_merge_off(value: str) -> str | None:
    """`value` with ksmpolicy's `-machine mem-merge=off` added at the end (it comes last, so it
    wins); None when the words would not simply gain that pair (the value ends inside a quote
    or with a backslash): the caller refuses rather than guess."""
    new = f"{value} {' '.join(MEM_MERGE_OFF)}"
    return new if split_args(new) == [*split_args(value), *MEM_MERGE_OFF] else None


def without_merge_off(value: str) -> str:
    """`value` without ksmpolicy's `-machine mem-merge=off` pairs (written as they are read,
    where QEMU reads them as a pair), and one run of space beside each; other ways of saying
    mem-merge=off are the operator's, and stay."""
    found = words(value) or ()
    spans = []
    index = 0
    while index < len(found):
        word = found[index]
        if word.text in MACHINE_FLAGS and index + 1 < len(found):
            pair = (word, found[index + 1])
            if all(w.plain(value) for w in pair) and tuple(w.text for w in pair) == MEM_MERGE_OFF:
                spans.append((pair[0].start, pair[1].end))
            index += 2
        else:
            index += 1
    for start, end in reversed(spans):
        value = _cut(value, start, end)
    return value


def _cut(value: str, start: int, end: int) -> str:
    """`value` without [start, end) and the whitespace after it (before it, at the end)."""
    after = end
    while after < len(value) and value[after] in _SPACE:
        after += 1
    if after < len(value):
        return value[:start] + value[after:]
    before = start
    while before > 0 and value[before - 1] in _SPACE:
        before -= 1
    return value[:before]
