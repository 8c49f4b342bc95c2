"""QEMU's option syntax, `key=value,key=value`, read once for every reader of a command line.

QEMU (util/qemu-option.c) splits an option string at each comma that is not doubled: `,,` is a
literal comma inside a value, so `guest=a,,,x=1` is `guest` = `a,` and `x` = `1`. A first part
without `=` is the option's implied key (`-name web` is `guest=web`, `-m 512` is `size=512`);
here its key is "". Any later part without `=` is a short-form boolean: `server` is
`server=on`, `nodelay` is `delay=off` (deprecated in QEMU 6.0, still read). A key given twice
keeps its last value, as QEMU does. Linear in the string's length (one `find` per comma).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence


def options(value: str) -> list[tuple[str, str]]:
    """(key, value) pairs in order; the implied first value has key ""."""
    parts: list[str] = []
    pieces: list[str] = []  # the current part, split at its escaped commas
    start = 0
    while True:
        comma = value.find(",", start)
        if comma < 0:
            pieces.append(value[start:])
            parts.append("".join(pieces))
            break
        if value.startswith(",", comma + 1):  # ",," is a comma inside the value
            pieces.append(value[start : comma + 1])
            start = comma + 2
            continue
        pieces.append(value[start:comma])
        parts.append("".join(pieces))
        pieces = []
        start = comma + 1
    found = []
    for index, part in enumerate(parts):
        key, sep, item = part.partition("=")
        if sep:
            found.append((key, item))
        elif index == 0:
            found.append(("", part))
        elif part.startswith("no"):
            found.append((part[2:], "off"))
        else:
            found.append((part, "on"))
    return found


def option_map(value: str) -> dict[str, str]:
    """The options as a mapping: a key given twice keeps its last value."""
    return dict(options(value))


def qemu_bool(text: str | None) -> bool | None:
    """A boolean option's value as QEMU reads it (qapi_bool_parse): on/yes/true/y or
    off/no/false/n, case-sensitive; None for anything else (QEMU refuses to start) or absent."""
    if text in ("on", "yes", "true", "y"):
        return True
    if text in ("off", "no", "false", "n"):
        return False
    return None


# `-machine` as QEMU's option table spells it: `-M` is its short form, and QEMU reads `--opt` as
# `-opt` (vl.c: lookup_opt skips a second dash).
MACHINE_FLAGS = frozenset({"-machine", "--machine", "-M", "--M"})


def machine_mem_merge(argv: Sequence[str]) -> bool | None:
    """`mem-merge` as QEMU will apply it from a command line: each `-machine` (or `-M`,
    `--machine`) is merged into one set of machine options, a later key replacing an earlier
    one (keyval_parse_into), so the last `mem-merge=` given wins. None when none says it (QEMU's
    default: on). A flag's value is never read as a flag: `-M -machine` is a machine called
    `-machine`, and the option after it stands on its own."""
    found = None
    index = 0
    while index < len(argv):
        if argv[index] in MACHINE_FLAGS and index + 1 < len(argv):
            merge = qemu_bool(option_map(argv[index + 1]).get("mem-merge"))
            if merge is not None:
                found = merge
            index += 2
        else:
            index += 1
    return found
