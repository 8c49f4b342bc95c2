"""The file an installer writes as the hook: the absolute interpreter, then a call of
`ksmpolicy.hook.leave` (the libvirt hook by `ksmpolicy install libvirt`, the Proxmox
hookscript by `ksmpolicy proxmox install`, both hooks of the Debian package)."""

from __future__ import annotations

import os
from collections.abc import Sequence

IMPORT_PATHS_LINE = "sys.path += "  # then a list of directories (`import_paths_of` reads it)


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
    """
    paths = list(import_paths) if import_paths is not None else installed_import_paths()
    return (
        f"#!{python} -IS\n"
        f"{marker}\n"
        "import sys\n"
        f"{IMPORT_PATHS_LINE}{paths!r}\n"
        "from ksmpolicy.hook import leave\n"
        f"leave([*{list(options)!r}, {platform!r}, *sys.argv[1:]])\n"
    )


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
