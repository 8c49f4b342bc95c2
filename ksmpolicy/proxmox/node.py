"""Proxmox VE node: VM configs on pmxcfs, `qm set`, apply, and persisting after a start.

Never imports libvirt. Configs are changed only through `qm set` (it takes the VM's config
lock and writes through pmxcfs); ksmpolicy never edits /etc/pve/qemu-server/*.conf itself.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterable, Sequence

from ksmpolicy.apply import Outcome, Planned, apply_targets
from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.files import read_regular
from ksmpolicy.paths import HostPaths
from ksmpolicy.policy.decide import Decider
from ksmpolicy.policy.model import Policy
from ksmpolicy.proxmox.conf import (
    MAX_CONF_BYTES,
    ConfError,
    parse,
    qemu_server_supports_allow_ksm,
)
from ksmpolicy.proxmox.rewrite import apply_policy

log = logging.getLogger(__name__)
# qemu-server's pve-vmid format: 100 to 999999999. Used with fullmatch: no newline slips by.
_VMID = re.compile(r"[1-9][0-9]{2,8}")


def valid_vmid(text: str) -> str:
    """A VMID as Proxmox allows them (100 to 999999999); anything else is refused."""
    if not _VMID.fullmatch(text):
        shown = text.encode("unicode_escape").decode()[:40]
        raise ConfError(f"{shown!r} is not a VMID: Proxmox VMIDs are numbers from 100")
    return text


def read_config(paths: HostPaths, vmid: str) -> str:
    path = paths.pve_config(valid_vmid(vmid))
    try:
        data = read_regular(path, MAX_CONF_BYTES)
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
    shown = " ".join(_without_digest(args))
    try:
        result = subprocess.run(
            [*qm, *args], capture_output=True, text=True, timeout=120, check=False
        )
    except OSError as exc:
        raise KsmPolicyError(
            f"cannot run {' '.join(qm)}: {exc.strerror} (is this a Proxmox VE node?)"
        ) from None
    except subprocess.TimeoutExpired:
        raise KsmPolicyError(f"qm {shown} timed out after 120 s") from None
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        why = message[-1] if message else f"exit status {result.returncode}"
        raise KsmPolicyError(f"qm {shown} failed: {why}")


def _without_digest(args: Sequence[str]) -> list[str]:
    """The arguments as a message shows them: the digest is noise to a reader."""
    if "--digest" not in args:
        return list(args)
    at = list(args).index("--digest")
    return [*args[:at], *args[at + 2 :]]


def digest(text: str) -> str:
    """qemu-server's digest of a config (SHA-1 of the file as read): `qm set --digest` refuses
    to change a config whose digest differs, so an edit made meanwhile is never overwritten."""
    import hashlib  # noqa: PLC0415

    return hashlib.sha1(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def qm_set(qm: Sequence[str], vmid: str, read: str, *options: str) -> None:
    """`qm set VMID OPTIONS`, only if the config is still the text `read` (every `qm set`
    ksmpolicy runs goes through here)."""
    run_qm(qm, "set", vmid, "--digest", digest(read), *options)


def qm_set_args(vmid: str, old: str, new: str) -> list[str]:
    """The `qm set` arguments that turn config `old` into `new`: the keys ksmpolicy writes
    (allow-ksm, args, and numa and numaN for a trust domain's NUMA nodes)."""
    before, after = parse(old).main.values, parse(new).main.values
    options: list[str] = []
    deletes = []
    for key in ("allow-ksm", "args", "numa", *(f"numa{i}" for i in range(8))):
        if before.get(key) == after.get(key):
            continue
        if key in after:
            options += [f"--{key}", after[key]]
        else:
            deletes.append(key)
    if deletes:
        options += ["--delete", ",".join(deletes)]
    return ["set", vmid, *options] if options else []


class ConfigTarget:
    """One VM config for the shared apply loop; written with `qm set`, never edited directly."""

    suffix = ".conf"

    def __init__(
        self, paths: HostPaths, vmid: str, decider: Decider, qm: Sequence[str], allow_ksm: bool
    ) -> None:
        self.paths = paths
        self.key = vmid
        self.decider = decider
        self.qm = qm
        self.allow_ksm = allow_ksm

    def read(self) -> str:
        return read_config(self.paths, self.key)

    def plan(self, text: str) -> Planned:
        new, facts, decision, note = apply_policy(
            text, self.key, self.decider, use_allow_ksm=self.allow_ksm
        )
        return Planned(new, facts.vm.name, decision, note)

    def write(self, old: str, new: str) -> None:
        args = qm_set_args(self.key, old, new)
        if args:
            qm_set(self.qm, self.key, old, *args[2:])

    def labels(self, _name: str) -> tuple[str, str]:
        return f"{self.key}.conf", f"{self.key}.conf (policy)"

    def backup_stem(self, _name: str) -> str:
        return f"pve-{self.key}"


def apply(
    paths: HostPaths,
    policy: Policy,
    *,
    qm: Sequence[str] = ("qm",),
    dry_run: bool = False,
    only: Iterable[str] = (),
    qemu_server_version: str | None = None,
) -> list[Outcome]:
    """Bring every VM config on this node in line with the policy, with `qm set`; the old
    config is saved in the backup directory first."""
    decider = Decider(policy)
    allow_ksm = uses_allow_ksm(policy, qemu_server_version)
    wanted = list(only) or vmids(paths)
    targets = [ConfigTarget(paths, vmid, decider, qm, allow_ksm) for vmid in wanted]
    return apply_targets(targets, backup_dir=paths.backup_dir, dry_run=dry_run)


# --- running VMs -------------------------------------------------------------------------------


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
