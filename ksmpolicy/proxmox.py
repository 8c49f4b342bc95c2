"""Proxmox VE adapter: configs on pmxcfs, `qm set`, the hookscript, the QMP live toggle.

Never imports libvirt. Configs are changed only through `qm set` (it takes the VM's config
lock and writes through pmxcfs); ksmpolicy never edits /etc/pve/qemu-server/*.conf itself.
"""

from __future__ import annotations

import difflib
import fcntl
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ksmpolicy.decide import Decider, Decision
from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.host import HostPaths
from ksmpolicy.policy import Policy
from ksmpolicy.proxmox_conf import (
    MAX_CONF_BYTES,
    ConfError,
    apply_policy,
    parse,
    qemu_server_supports_allow_ksm,
)

log = logging.getLogger(__name__)
HOOKSCRIPT_NAME = "ksmpolicy-hook"
HOOKSCRIPT_MARKER = "# ksmpolicy-hookscript: written by `ksmpolicy proxmox install`"
_VMID = re.compile(r"[1-9][0-9]{1,8}")  # used with fullmatch: no trailing newline slips by


def valid_vmid(text: str) -> str:
    """A VMID as Proxmox allows them (100 to 999999999); anything else is refused."""
    if not _VMID.fullmatch(text):
        shown = text.encode("unicode_escape").decode()[:40]
        raise ConfError(f"{shown!r} is not a VMID: Proxmox VMIDs are numbers from 100")
    return text


def read_config(paths: HostPaths, vmid: str) -> str:
    path = paths.pve_config(valid_vmid(vmid))
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONF_BYTES + 1)
    except FileNotFoundError:
        raise ConfError(f"{path}: no such file (no VM {vmid} on this node)") from None
    except OSError as exc:
        raise ConfError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_CONF_BYTES:
        raise ConfError(f"{path}: larger than {MAX_CONF_BYTES // 2**20} MB: not a VM config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfError(f"{path}: not valid UTF-8 (byte {exc.start})") from None


def vmids(paths: HostPaths) -> list[str]:
    """VMIDs with a config on this node, in numeric order."""
    directory = paths.pve / "qemu-server"
    try:
        names = [p.stem for p in directory.glob("*.conf")]
    except OSError:
        return []
    return sorted((n for n in names if _VMID.fullmatch(n)), key=int)


def installed_qemu_server() -> str | None:
    """The installed qemu-server package version, or None where dpkg doesn't know it."""
    try:
        found = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "qemu-server"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found.stdout.strip() or None if found.returncode == 0 else None


def uses_allow_ksm(policy: Policy, override: str | None = None) -> bool:
    """`allow-ksm` (qemu-server >= 9.0.27) or the older `args` way: the command line's
    --qemu-server-version, else the policy's proxmox.qemu_server_version, else dpkg's."""
    version = override or policy.proxmox.qemu_server_version or installed_qemu_server()
    return qemu_server_supports_allow_ksm(version)


# --- qm ---------------------------------------------------------------------------------------


def run_qm(qm: Sequence[str], *args: str) -> None:
    try:
        result = subprocess.run(
            [*qm, *args], capture_output=True, text=True, timeout=120, check=False
        )
    except OSError as exc:
        raise KsmPolicyError(
            f"cannot run {' '.join(qm)}: {exc.strerror} (is this a Proxmox VE node?)"
        ) from None
    except subprocess.TimeoutExpired:
        raise KsmPolicyError(f"qm {' '.join(args)} timed out after 120 s") from None
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        why = message[-1] if message else f"exit status {result.returncode}"
        raise KsmPolicyError(f"qm {' '.join(args)} failed: {why}")


def qm_set_args(vmid: str, old: str, new: str) -> list[str]:
    """The `qm set` arguments that turn config `old` into `new` (allow-ksm and args only)."""
    before, after = parse(old).main.values, parse(new).main.values
    options: list[str] = []
    deletes = []
    for key in ("allow-ksm", "args"):
        if before.get(key) == after.get(key):
            continue
        if key in after:
            options += [f"--{key}", after[key]]
        else:
            deletes.append(key)
    if deletes:
        options += ["--delete", ",".join(deletes)]
    return ["set", vmid, *options] if options else []


@dataclass(frozen=True)
class ApplyResult:
    vmid: str
    name: str
    status: str  # unchanged | changed | would change | failed | skipped
    decision: Decision | None = None
    diff: str = ""
    note: str | None = None
    error: str | None = None


def apply(
    paths: HostPaths,
    policy: Policy,
    *,
    qm: Sequence[str] = ("qm",),
    dry_run: bool = False,
    only: Iterable[str] = (),
    qemu_server_version: str | None = None,
) -> list[ApplyResult]:
    """Bring every VM config on this node in line with the policy, with `qm set`."""
    decider = Decider(policy)
    allow_ksm = uses_allow_ksm(policy, qemu_server_version)
    wanted = list(only) or vmids(paths)
    results = []
    for vmid in wanted:
        try:
            old = read_config(paths, vmid)
            new, facts, decision, note = apply_policy(old, vmid, decider, use_allow_ksm=allow_ksm)
        except KsmPolicyError as exc:
            results.append(ApplyResult(vmid, "?", "failed", error=str(exc)))
            continue
        name = facts.vm.name
        if new == old:
            results.append(ApplyResult(vmid, name, "unchanged", decision, note=note))
            continue
        diff = "".join(
            difflib.unified_diff(
                old.splitlines(keepends=True),
                new.splitlines(keepends=True),
                f"{vmid}.conf",
                f"{vmid}.conf (policy)",
            )
        )
        if dry_run:
            results.append(ApplyResult(vmid, name, "would change", decision, diff, note))
            continue
        try:
            run_qm(qm, *qm_set_args(vmid, old, new))
        except KsmPolicyError as exc:
            results.append(ApplyResult(vmid, name, "failed", decision, diff, note, str(exc)))
            continue
        results.append(ApplyResult(vmid, name, "changed", decision, diff, note))
    return results


# --- storages and the hookscript ---------------------------------------------------------------


def storage_path(paths: HostPaths, storage: str) -> Path:
    """The directory of a file-based storage, from /etc/pve/storage.cfg."""
    try:
        text = paths.pve_storage_cfg.read_text()
    except OSError as exc:
        raise KsmPolicyError(f"cannot read {paths.pve_storage_cfg}: {exc.strerror}") from None
    kind = None
    path = None
    for line in text.splitlines():
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


def hookscript_text(python: str, policy: str | None = None, extra: Sequence[str] = ()) -> str:
    options = ["--policy", policy] if policy else []
    options += list(extra)
    return (
        f"#!{python} -I\n"
        f"{HOOKSCRIPT_MARKER}; Proxmox runs it as: ksmpolicy-hook VMID PHASE\n"
        "import sys\n"
        "from ksmpolicy.hook import main\n"
        f"sys.exit(main([*{options!r}, 'proxmox', *sys.argv[1:]]))\n"
    )


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
    if path.exists() and HOOKSCRIPT_MARKER not in path.read_text(errors="replace"):
        raise KsmPolicyError(f"{path} exists and was not written by ksmpolicy: not overwriting it")
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{HOOKSCRIPT_NAME}.tmp"
    temporary.write_text(hookscript_text(python, policy, extra))
    temporary.chmod(0o755)
    temporary.rename(path)
    return path, f"{storage}:snippets/{HOOKSCRIPT_NAME}"


def chain_file(paths: HostPaths, vmid: str) -> Path:
    return paths.pve_ksmpolicy / "chain" / f"{valid_vmid(vmid)}.hookscript"


def previous_hookscript(paths: HostPaths, vmid: str) -> str | None:
    try:
        return chain_file(paths, vmid).read_text().strip() or None
    except OSError:
        return None


def attach(paths: HostPaths, vmid: str, volid: str, *, qm: Sequence[str] = ("qm",)) -> str:
    """Set our hookscript on a VM, remembering one that was there; return what happened."""
    facts = parse(read_config(paths, vmid)).main.values
    current = facts.get("hookscript")
    if current == volid:
        return "already attached"
    if facts.get("template", "0").strip() == "1":
        return "skipped (template)"
    if current:
        chain = chain_file(paths, vmid)
        chain.parent.mkdir(parents=True, exist_ok=True)
        chain.write_text(current + "\n")
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


# --- running VMs -------------------------------------------------------------------------------


def set_live_merge(
    socket_path: str, merge: bool, *, attempts: int = 20, timeout: float = 3.0
) -> list[str]:
    """Make every guest RAM backend of a running VM (un)mergeable over its QMP socket, with
    QEMU's own QMP library. The socket takes one client at a time: retry while it is busy."""
    import asyncio  # noqa: PLC0415

    try:
        from qemu.qmp import QMPClient  # noqa: PLC0415
    except ImportError:
        raise KsmPolicyError(
            "the QMP library is missing: pip install 'ksmpolicy[proxmox]'"
        ) from None

    async def toggle() -> list[str]:
        client = QMPClient("ksmpolicy")
        await asyncio.wait_for(client.connect(socket_path), timeout)
        try:
            objects = await client.execute("qom-list", {"path": "/objects"})
            changed = []
            for entry in objects if isinstance(objects, list) else []:
                if not str(entry.get("type", "")).startswith("child<memory-backend-"):
                    continue
                path = f"/objects/{entry['name']}"
                current = await client.execute("qom-get", {"path": path, "property": "merge"})
                if bool(current) != merge:
                    await client.execute(
                        "qom-set", {"path": path, "property": "merge", "value": merge}
                    )
                    changed.append(path)
            return changed
        finally:
            await client.disconnect()

    last: Exception | None = None
    for _ in range(attempts):
        try:
            return asyncio.run(toggle())
        except (TimeoutError, OSError, EOFError) as exc:
            last = exc
        except Exception as exc:  # qemu.qmp's connection and protocol errors
            last = exc
        time.sleep(0.25)
    raise KsmPolicyError(f"QMP on {socket_path} failed {attempts} times: {last}")


def wait_for_lock(paths: HostPaths, vmid: str, timeout: float = 120.0) -> bool:
    """Wait until no one holds the VM's config lock (the start task does during pre-start)."""
    lock = paths.pve_lock(vmid)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with lock.open("a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
                return True
        except FileNotFoundError:
            return True  # nobody ever locked it
        except BlockingIOError:
            pass
        except OSError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def persist(
    paths: HostPaths,
    vmid: str,
    policy: Policy,
    *,
    qm: Sequence[str] = ("qm",),
    qemu_server_version: str | None = None,
) -> str:
    """After a start: write the decision into the config with `qm set`, once the start's
    config lock is released (never fighting it)."""
    if not wait_for_lock(paths, vmid):
        raise KsmPolicyError(f"VM {vmid}: its config stayed locked for 120 s; not persisting")
    results = apply(paths, policy, qm=qm, only=[vmid], qemu_server_version=qemu_server_version)
    result = results[0]
    if result.status == "failed":
        raise KsmPolicyError(f"VM {vmid}: {result.error}")
    return result.status


def spawn_persist(argv: Sequence[str]) -> None:
    """Run `persist` detached, so the hookscript returns at once (the start holds the lock)."""
    with open(os.devnull, "rb") as null_in, open(os.devnull, "wb") as null_out:  # noqa: PTH123
        subprocess.Popen(
            list(argv),
            stdin=null_in,
            stdout=null_out,
            stderr=null_out,
            start_new_session=True,
            close_fds=True,
        )
