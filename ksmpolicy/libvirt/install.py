"""Install and remove the libvirt hook shim; never touch a hook ksmpolicy did not write."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.files import carries_marker, write_atomic
from ksmpolicy.hookshim import shim as hook_shim
from ksmpolicy.kernel.procfs import processes_named
from ksmpolicy.paths import HostPaths

MARKER = "# ksmpolicy-hook: written by `ksmpolicy install libvirt`"


def shim(
    python: str,
    policy: str | None = None,
    run_dir: str | None = None,
    import_paths: Sequence[str] | None = None,
) -> str:
    """The hook file (see `ksmpolicy.hookshim`)."""
    options = []
    if policy:
        options += ["--policy", policy]
    if run_dir:
        options += ["--run-dir", run_dir]
    return hook_shim(
        python,
        f"{MARKER}; `ksmpolicy uninstall libvirt` removes it.",
        "libvirt",
        options,
        import_paths,
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
    import_paths: Sequence[str] | None = None,
) -> Path:
    path = hook_path(paths, main_hook=main_hook, name=name)
    if _ours(path) is False:
        hint = " (install into qemu.d instead: drop --main-hook)" if main_hook else ""
        raise KsmPolicyError(
            f"{path} exists and was not written by ksmpolicy: not overwriting it{hint}"
        )
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        write_atomic(path, shim(python, policy, run_dir, import_paths).encode(), 0o755)
    except OSError as exc:
        raise KsmPolicyError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def uninstall(paths: HostPaths, *, main_hook: bool = False, name: str = "ksmpolicy") -> Path | None:
    path = hook_path(paths, main_hook=main_hook, name=name)
    ours = _ours(path)
    if ours is None:
        return None
    if not ours:
        raise KsmPolicyError(f"{path} was not written by ksmpolicy: leaving it alone")
    path.unlink()
    return path


def _ours(path: Path) -> bool | None:
    """Whether the file at `path` is a hook ksmpolicy wrote; None when nothing is there. A
    symlink or anything but a regular file there is never ours (and never followed)."""
    try:
        return carries_marker(path, MARKER)
    except OSError as exc:
        raise KsmPolicyError(f"cannot read {path}: {exc.strerror}") from None


LIBVIRT_DAEMONS = ("libvirtd", "virtqemud")  # the monolithic daemon, the modular QEMU one


def libvirtd_pids(paths: HostPaths) -> list[int]:
    return processes_named(paths, LIBVIRT_DAEMONS)


def reload_hint(paths: HostPaths) -> str:
    found = reload_command(paths)
    if found is None:
        return "libvirtd (or virtqemud) is not running: it reads the hook when it starts."
    running, command = found
    return f"{' and '.join(running)} read hooks only when they start or reload: run {command}."


def reload_command(paths: HostPaths) -> tuple[list[str], str] | None:
    """(the libvirt daemons running, the commands that make them read their hooks again), or
    None when none runs."""
    pids = {name: processes_named(paths, [name]) for name in LIBVIRT_DAEMONS}
    running = [name for name in LIBVIRT_DAEMONS if pids[name]]
    if not running:
        return None
    units = " ".join(f"{name}.service" for name in running)
    every = " ".join(str(pid) for name in running for pid in pids[name])
    return running, f"`systemctl reload {units}` or `kill -HUP {every}`"


def executable(path: Path) -> bool:
    return os.access(path, os.X_OK)
