"""The file an installer writes as the hook: the absolute interpreter, then a call of
`ksmpolicy.hook.leave` (the libvirt hook by `ksmpolicy install libvirt`, the Proxmox
hookscript by `ksmpolicy proxmox install`, both hooks of the Debian package)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.quoting import quote

IMPORT_PATHS_LINE = "sys.path += "  # then a list of directories (`import_paths_of` reads it)
SHEBANG_FLAGS = " -IS"
# The most of a `#!` line the kernel reads (BINPRM_BUF_SIZE less its last byte): 127 bytes
# before Linux 5.1, 255 since. A longer line is cut (older kernels) or refused (newer ones).
SHEBANG_MAX_BYTES = {False: 127, True: 255}
# Options whose value is a path: libvirtd and Proxmox run hooks from `/`, so a relative one
# would name another file there. `--qm` is a path only when it holds a slash (else PATH's).
PATH_OPTIONS = ("--policy", "--run-dir", "--root")
COMMAND_OPTIONS = ("--qm",)


def shim(
    python: str,
    marker: str,
    platform: str,
    options: Sequence[str] = (),
    import_paths: Sequence[str] | None = None,
) -> str:
    """The text of an installed hook: the absolute interpreter, then a call of `leave`.

    The interpreter runs with `-IS`: isolated (no environment, no user site, no script
    directory) and without `site`, whose .pth files cost a VM start 3-4 ms (measured here);
    the directories this installation imports ksmpolicy and PyYAML from are named instead
    (`import_paths`, found from this interpreter when not given). A shebang passes its flags
    as one argument, hence `-IS`, not `-I -S`.

    When ksmpolicy itself is gone (the package removed, its virtualenv deleted) the hook lets
    the VM start and says so: a Proxmox hookscript copied to a storage outlives the package,
    and a hook that fails every VM start for a tool that is no longer there helps no one. Any
    other import failure still fails the hook.
    """
    paths = list(import_paths) if import_paths is not None else installed_import_paths()
    return (
        f"{shebang(python)}\n"
        f"{marker}\n"
        "import sys\n"
        f"{IMPORT_PATHS_LINE}{paths!r}\n"
        "try:\n"
        "    from ksmpolicy.hook import leave\n"
        "except ModuleNotFoundError as missing:\n"
        "    if missing.name != 'ksmpolicy':\n"
        "        raise\n"
        f"    sys.stderr.write({REMOVED_MESSAGE!r})\n"
        "    sys.exit(0)\n"
        f"leave([*{absolute_options(options)!r}, {platform!r}, *sys.argv[1:]])\n"
    )


REMOVED_MESSAGE = (
    "ksmpolicy-hook: ksmpolicy is not installed any more: this VM start is not checked "
    "(remove this hook: ksmpolicy's uninstall, or delete the file)\n"
)


def shebang(python: str, kernel_release: str | None = None) -> str:
    """The hook's `#!` line, or KsmPolicyError with the fix when the kernel could not run it:
    then every VM start would fail (libvirt refuses a start whose hook cannot be executed)."""
    limit = SHEBANG_MAX_BYTES[_since_5_1(kernel_release or os.uname().release)]
    line = f"#!{python}{SHEBANG_FLAGS}"
    why = None
    if not os.path.isabs(python):  # noqa: PTH117 - the hook's path is a string
        why = "it is not an absolute path (libvirtd runs hooks from /)"
    elif any(c in python for c in " \t\n\0"):
        why = "it holds a space, tab, newline or NUL (the kernel splits a #! line at them)"
    elif len(line.encode("utf-8", "surrogateescape")) > limit:
        why = f"its #! line is longer than the {limit} bytes this kernel reads"
    elif not os.access(python, os.X_OK):
        why = "it is not an executable file"
    if why is not None:
        raise KsmPolicyError(
            f"cannot write a hook that runs the interpreter {quote(python)}: {why}, so the hook "
            "would fail every VM start; install ksmpolicy where its interpreter's path has no "
            "blanks and is short (the Debian package, or a virtualenv such as "
            "/opt/ksmpolicy/venv), then run that installation's `ksmpolicy install`"
        )
    return line


def _since_5_1(release: str) -> bool:
    """Whether a kernel release (`6.1.0-18-amd64`) is Linux 5.1 or later."""
    numbers = []
    for part in release.split(".")[:2]:
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        numbers.append(int(digits or 0))
    return tuple(numbers) >= (5, 1)


def absolute_options(options: Sequence[str]) -> list[str]:
    """The hook's options (`--flag value` pairs) with every path made absolute, as it is
    where the installer runs: the hook runs from `/`."""
    found = list(options)
    for index in range(0, len(found) - 1, 2):
        flag, value = found[index], found[index + 1]
        if flag in PATH_OPTIONS or (flag in COMMAND_OPTIONS and "/" in value):
            found[index + 1] = os.path.abspath(value)  # noqa: PTH100
    return found


def installed_import_paths() -> list[str]:
    """The directories ksmpolicy and PyYAML (which the hooks use to compile a changed policy)
    are imported from by this interpreter, in that order and without repeats."""
    from importlib.util import find_spec  # noqa: PLC0415 - installers only, never the hook

    found: list[str] = []
    for name in ("ksmpolicy", "yaml"):
        spec = find_spec(name)
        if spec is None or not spec.origin:
            continue
        directory = os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))  # noqa: PTH100, PTH120
        if directory not in found:
            found.append(directory)
    return found


def import_paths_of(text: str) -> list[str] | None:
    """The directories a hook written by `shim` imports from, read back from its text (for
    `doctor`); None for a hook of an older version, which relies on `site`."""
    import ast  # noqa: PLC0415 - doctor only, never the hook

    for line in text.splitlines():
        if line.startswith(IMPORT_PATHS_LINE):
            try:
                directories = ast.literal_eval(line.removeprefix(IMPORT_PATHS_LINE))
            except (ValueError, SyntaxError):
                return []
            return [str(d) for d in directories] if isinstance(directories, list) else []
    return None
