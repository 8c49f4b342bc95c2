"""Names in what ksmpolicy prints: escaped in log lines, quoted for a shell in commands.

VM names are chosen by whoever defines the VM and may hold quotes, `$(...)`, backticks and
newlines (libvirt accepts all of them). A log line shows them escaped, on one line; a command
ksmpolicy suggests (`Fix: ksmpolicy apply --domain ...`) quotes them for a POSIX shell, so that
pasting it runs nothing but ksmpolicy. Only plain string operations: the hooks use this.
"""

from __future__ import annotations


def unprintable(char: str) -> bool:
    """What `str.isprintable` calls unprintable: control characters (C0, DEL, C1), format
    characters (Unicode category Cf: the bidirectional overrides and isolates U+202A-U+202E and
    U+2066-U+2069 that reorder what a terminal shows, zero-width characters, U+FEFF, U+061C),
    separators other than the ASCII space (line, paragraph, no-break and wide spaces),
    surrogates, private-use and unassigned code points: anything that could break a line, move
    a terminal's cursor, or make a name look like another."""
    return not char.isprintable()


def quote(name: str) -> str:
    """A VM name on one line, in double quotes, with quotes, backslashes and unprintable
    characters escaped (json's rules, without importing json). For log lines, not shells."""
    return '"' + one_line(name.replace("\\", "\\\\").replace('"', '\\"')) + '"'


_SHELL_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@%+=:,./-_")


def shell_word(word: str) -> str | None:
    """`word` quoted for a POSIX shell as shlex.quote does (without importing shlex and re), or
    None when it holds a control character: such a word cannot be pasted as one line."""
    if any(unprintable(c) for c in word):
        return None
    if word and all(c in _SHELL_SAFE for c in word):
        return word
    return "'" + word.replace("'", "'\"'\"'") + "'"


def shell_command(*words: str) -> str | None:
    """Words joined into one command line to paste, each quoted as `shell_word` does; None when
    one holds a control character."""
    quoted = [shell_word(word) for word in words]
    return None if None in quoted else " ".join(quoted)  # type: ignore[arg-type]


def run_hint(*words: str) -> str:
    """ "run: COMMAND" for a message, with every word quoted; a path or name with control
    characters is not pasteable, so then the hint says what to do instead of how."""
    line = shell_command(*words)
    if line is None:
        return f"run {words[0]} on it by hand (its name has control characters)"
    return f"run: {line}"


def one_line(message: str) -> str:
    """A message as one log line: unprintable characters (newlines, escapes that move a
    terminal's cursor) shown as \\uXXXX, whatever part of it they came from."""
    if message.isprintable():
        return message
    return "".join(_escaped(c) if unprintable(c) else c for c in message)


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text: str) -> str:
    """Text for a terminal or a log with its line breaks kept and every other unprintable
    character escaped as `one_line` does: what ksmpolicy prints of names, paths and process
    names (anyone's) can then neither move a terminal's cursor nor fake a line."""
    return "\n".join(one_line(line) for line in text.split("\n"))


def fix_command(command: str, name: str, uuid: str | None, option: str = "--domain") -> str:
    """A command to paste, naming the VM safely: by name when it quotes onto one line, else by
    UUID, else a pointer to find it."""
    word = shell_word(name)
    if word is None and uuid:
        word = shell_word(uuid)
    if word is None:
        return f"{command} {option} UUID (its name has control characters; see virsh list --uuid)"
    return f"{command} {option} {word}"
