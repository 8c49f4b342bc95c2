"""The Proxmox VE hookscript on a node: storages with snippets, install, attach and detach.

Proxmox allows one hookscript per VM. Attaching ours to a VM that has another remembers that
one (in /etc/pve/ksmpolicy/chain/, cluster-wide) and ours runs it first with the same
arguments. A hookscript of ours on another storage is recognised and never chained to, so the
hook cannot end up calling itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.files import carries_marker, read_regular, write_atomic
from ksmpolicy.hookshim import shim
from ksmpolicy.paths import HostPaths
from ksmpolicy.proxmox.conf import MAX_CONF_BYTES, parse, split_lines
from ksmpolicy.proxmox.node import read_config, run_qm, valid_vmid

HOOKSCRIPT_NAME = "ksmpolicy-hook"
HOOKSCRIPT_MARKER = "# ksmpolicy-hookscript: written by `ksmpolicy proxmox install`"
# Said when the hookscript's path is not root's alone (a snippets storage on NFS, say).
HOOKSCRIPT_RISK = (
    "whoever can change the hookscript runs code as root at each start of a VM it is "
    "attached to; use a snippets storage only root can write (`--storage`)"
)


def storage_path(paths: HostPaths, storage: str) -> Path:
    """The directory of a file-based storage, from /etc/pve/storage.cfg."""
    try:
        text = read_regular(paths.pve_storage_cfg, MAX_CONF_BYTES).decode("utf-8", "replace")
    except OSError as exc:
        raise KsmPolicyError(f"cannot read {paths.pve_storage_cfg}: {exc.strerror}") from None
    kind = None
    path = None
    for line in split_lines(text):
        header = re.match(r"^(\w+):\s*(\S+)\s*$", line)
        if header:
            if kind is not None:
                break
            if header.group(2) == storage:
                kind = header.group(1)
            continue
        if kind is not None:
            option = line.strip().split(None, 1)
            if option and option[0] == "path" and len(option) == 2:
                path = option[1]
    if kind is None:
        raise KsmPolicyError(f"no storage {storage!r} in {paths.pve_storage_cfg}")
    if path is None and kind in ("nfs", "cifs", "cephfs", "glusterfs"):
        path = f"/mnt/pve/{storage}"
    if path is None:
        raise KsmPolicyError(
            f"storage {storage!r} ({kind}) is not file-based: snippets need a directory storage"
        )
    return paths.root / path.lstrip("/")


def volume_path(paths: HostPaths, volid: str) -> Path:
    """`local:snippets/hook.sh` -> /var/lib/vz/snippets/hook.sh."""
    storage, sep, volume = volid.partition(":")
    if not sep or not volume.startswith("snippets/") or ".." in volume.split("/"):
        raise KsmPolicyError(f"{volid!r} is not a snippets volume (STORAGE:snippets/NAME)")
    return storage_path(paths, storage) / volume


def hookscript_text(
    python: str,
    policy: str | None = None,
    extra: Sequence[str] = (),
    import_paths: Sequence[str] | None = None,
) -> str:
    """The hookscript (see `ksmpolicy.hookshim`)."""
    options = ["--policy", policy] if policy else []
    options += list(extra)
    marker = f"{HOOKSCRIPT_MARKER}; Proxmox runs it as: ksmpolicy-hook VMID PHASE"
    return shim(python, marker, "proxmox", options, import_paths)


def install_hookscript(
    paths: HostPaths,
    storage: str,
    python: str,
    policy: str | None = None,
    extra: Sequence[str] = (),
) -> tuple[Path, str]:
    """Write the hookscript into the storage's snippets directory; return (path, volid)."""
    directory = storage_path(paths, storage) / "snippets"
    path = directory / HOOKSCRIPT_NAME
    if _is_ours(path) is False:
        raise KsmPolicyError(f"{path} exists and was not written by ksmpolicy: not overwriting it")
    directory.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(path, hookscript_text(python, policy, extra).encode(), 0o755)
    except OSError as exc:
        raise KsmPolicyError(f"cannot write {path}: {exc.strerror or exc}") from None
    volid = f"{storage}:snippets/{HOOKSCRIPT_NAME}"
    remembered = installed_file(paths)
    try:  # attach and detach use it when no --storage is given
        remembered.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(remembered, f"{volid}\n".encode(), 0o644)
    except OSError as exc:
        raise KsmPolicyError(f"cannot write {remembered}: {exc.strerror or exc}") from None
    return path, volid


def installed_file(paths: HostPaths) -> Path:
    """Where `proxmox install` notes the hookscript's volume (cluster-wide, in pmxcfs)."""
    return paths.pve_ksmpolicy / "hookscript-volume"


def installed_volume(paths: HostPaths, storage: str | None) -> str:
    """The hookscript's volume: on --storage if given, else where `proxmox install` put it,
    else on `local`."""
    if storage is not None:
        return f"{storage}:snippets/{HOOKSCRIPT_NAME}"
    try:
        noted = read_regular(installed_file(paths), 4096).decode("utf-8", "replace").strip()
    except OSError:
        noted = ""
    return (
        noted
        if noted.endswith(f":snippets/{HOOKSCRIPT_NAME}")
        else f"local:snippets/{HOOKSCRIPT_NAME}"
    )


def _is_ours(path: Path) -> bool | None:
    """Whether `path` holds a hookscript ksmpolicy wrote; None when nothing is there."""
    try:
        return carries_marker(path, HOOKSCRIPT_MARKER)
    except OSError as exc:
        raise KsmPolicyError(f"cannot read {path}: {exc.strerror}") from None


def is_our_volume(paths: HostPaths, volid: str) -> bool:
    """Whether a hookscript volume is ours, on any storage: by its name, or by its content."""
    _storage, _sep, volume = volid.partition(":")
    if volume == f"snippets/{HOOKSCRIPT_NAME}":
        return True
    try:
        return bool(_is_ours(volume_path(paths, volid)))
    except KsmPolicyError:
        return False


def chain_file(paths: HostPaths, vmid: str) -> Path:
    return paths.pve_ksmpolicy / "chain" / f"{valid_vmid(vmid)}.hookscript"


def previous_hookscript(paths: HostPaths, vmid: str) -> str | None:
    try:
        data = read_regular(chain_file(paths, vmid), 4096)
    except OSError:
        return None
    return data.decode("utf-8", "replace").strip() or None


def attach(paths: HostPaths, vmid: str, volid: str, *, qm: Sequence[str] = ("qm",)) -> str:
    """Set our hookscript on a VM, remembering one that was there; return what happened."""
    facts = parse(read_config(paths, vmid)).main.values
    current = facts.get("hookscript")
    if current == volid:
        return "already attached"
    if facts.get("template", "0").strip() == "1":
        return "skipped (template)"
    if current and is_our_volume(paths, current):
        run_qm(qm, "set", vmid, "--hookscript", volid)  # ours elsewhere: moved, never chained
        return f"attached (replaces ours from {current})"
    if current:
        chain = chain_file(paths, vmid)
        chain.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_atomic(chain, (current + "\n").encode(), 0o644)
        except OSError as exc:
            raise KsmPolicyError(f"cannot write {chain}: {exc.strerror or exc}") from None
    run_qm(qm, "set", vmid, "--hookscript", volid)
    return f"attached (chains {current})" if current else "attached"


def detach(paths: HostPaths, vmid: str, volid: str, *, qm: Sequence[str] = ("qm",)) -> str:
    """Remove our hookscript, putting back the one it chained."""
    current = parse(read_config(paths, vmid)).main.values.get("hookscript")
    if current != volid:
        return "not attached"
    previous = previous_hookscript(paths, vmid)
    if previous:
        run_qm(qm, "set", vmid, "--hookscript", previous)
    else:
        run_qm(qm, "set", vmid, "--delete", "hookscript")
    chain_file(paths, vmid).unlink(missing_ok=True)
    return f"detached (restored {previous})" if previous else "detached"
