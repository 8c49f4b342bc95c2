"""Install and remove the libvirt hook shim; never touch a hook ksmpolicy did not write."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.host import HostPaths

MARKER = "# ksmpolicy-hook: written by `ksmpolicy install libvirt`"


def shim(python: str, policy: str | None = None, run_dir: str | None = None) -> str:
    """The hook file: the absolute interpreter (fast start, no PATH lookup) and three lines."""
    options = []
    if policy:
        options += ["--policy", policy]
    if run_dir:
        options += ["--run-dir", run_dir]
    return (
        f"#!{python} -I\n"
        f"{MARKER}; `ksmpolicy uninstall libvirt` removes it.\n"
        "import sys\n"
        "from ksmpolicy.hook import main\n"
        f"sys.exit(main([*{options!r}, 'libvirt', *sys.argv[1:]]))\n"
    )


def hook_path(paths: HostPaths, *, main_hook: bool, name: str) -> Path:
    hooks = paths.libvirt_hooks
    return hooks / "qemu" if main_hook else hooks / "qemu.d" / name


def install(
    paths: HostPaths,
    *,
    main_hook: bool = False,
    name: str = "ksmpolicy",
    policy: str | None = None,
    run_dir: str | None = None,
    python: str = sys.executable,
) -> Path:
    path = hook_path(paths, main_hook=main_hook, name=name)
    if path.exists() and not _ours(path):
        hint = " (install into qemu.d instead: drop --main-hook)" if main_hook else ""
        raise KsmPolicyError(
            f"{path} exists and was not written by ksmpolicy: not overwriting it{hint}"
        )
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(shim(python, policy, run_dir))
    temporary.chmod(0o755)
    temporary.rename(path)
    return path


def uninstall(paths: HostPaths, *, main_hook: bool = False, name: str = "ksmpolicy") -> Path | None:
    path = hook_path(paths, main_hook=main_hook, name=name)
    if not path.exists():
        return None
    if not _ours(path):
        raise KsmPolicyError(f"{path} was not written by ksmpolicy: leaving it alone")
    path.unlink()
    return path


def _ours(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            return MARKER in handle.read(4096)
    except OSError:
        return False


def libvirtd_pids(paths: HostPaths) -> list[int]:
    from ksmpolicy.host import processes_named  # noqa: PLC0415

    return processes_named(paths, ["libvirtd", "virtqemud"])


def reload_hint(paths: HostPaths) -> str:
    pids = libvirtd_pids(paths)
    if not pids:
        return "libvirtd is not running: it reads the hook when it starts."
    return (
        "libvirtd reads hooks only when it starts or reloads: run "
        f"`systemctl reload libvirtd` or `kill -HUP {' '.join(map(str, pids))}`."
    )


def executable(path: Path) -> bool:
    return os.access(path, os.X_OK)
