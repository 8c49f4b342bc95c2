"""What the command modules share: the global options, common option decorators, and input."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.paths import HostPaths, default_policy
from ksmpolicy.policy.load import load_policy, load_policy_or_builtin
from ksmpolicy.policy.model import Policy

F = TypeVar("F", bound=Callable[..., Any])
MAX_INPUT_BYTES = 32 * 2**20  # a domain XML or a VM config given as a file or on stdin


@dataclass
class Options:
    """Global options, shared with every subcommand through click's context object."""

    policy: str | None = None  # None: the search order of paths.default_policy
    debug: bool = False

    def policy_path(self) -> str:
        return self.policy or default_policy(HostPaths())

    @property
    def explicit(self) -> bool:
        """A policy was named (--policy, $KSMPOLICY_POLICY): never the built-in default."""
        return self.policy is not None or bool(os.environ.get("KSMPOLICY_POLICY"))

    def load(self) -> Policy:
        """The policy; the built-in default when none was named and no file exists."""
        return load_policy_or_builtin(self.policy_path(), explicit=self.explicit)

    def load_file(self) -> Policy:
        """The policy from a file, for commands that change VMs: never the built-in default."""
        return load_policy(self.policy_path())

    def load_or_error(self) -> tuple[Policy | None, str | None]:
        """The policy, or None and the first line of why it cannot be used."""
        try:
            return self.load(), None
        except KsmPolicyError as exc:
            return None, str(exc).splitlines()[0]


def policy_option(func: F) -> F:
    """`--policy P` on a subcommand overrides the global one."""

    def remember(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is not None:
            ctx.ensure_object(Options).policy = value

    return click.option(
        "--policy",
        "-p",
        metavar="FILE",
        expose_value=False,
        callback=remember,
        help="Policy file (overrides the global --policy).",
    )(func)


CONNECT = click.option(
    "--connect", "-c", "uri", metavar="URI", help="libvirt URI (default: libvirt's default)."
)
INTERVAL = click.option(
    "--interval",
    type=click.FloatRange(0, 600),
    default=3.0,
    show_default=True,
    metavar="SECONDS",
    help="Hash the pages again after this long; pages that changed are left out (ksmd would "
    "not merge them).",
)
ROOT = click.option("--root", default="/", metavar="DIR", hidden=True, help="Host root (tests).")
RUN_DIR = click.option("--run-dir", metavar="DIR", hidden=True, help="Runtime directory (tests).")
QM = click.option("--qm", default="qm", hidden=True, help="The qm command (a stand-in in tests).")


def host_paths(root: str, run_dir: str | None = None, state_dir: str | None = None) -> HostPaths:
    return HostPaths(
        Path(root), Path(run_dir) if run_dir else None, Path(state_dir) if state_dir else None
    )


def read_input(file: str) -> bytes:
    """A file's bytes, or stdin's for `-`, up to MAX_INPUT_BYTES."""
    try:
        if file == "-":
            stdin = getattr(sys.stdin, "buffer", None)
            if stdin is None or stdin.closed:
                raise KsmPolicyError("standard input is closed: give a FILE, or pipe one in")
            data = bytes(stdin.read(MAX_INPUT_BYTES + 1))
        else:
            with Path(file).open("rb") as handle:
                data = handle.read(MAX_INPUT_BYTES + 1)
    except FileNotFoundError:
        raise KsmPolicyError(f"{file}: no such file") from None  # as the policy loader says
    except OSError as exc:
        raise KsmPolicyError(f"cannot read {file}: {exc.strerror}") from None
    if len(data) > MAX_INPUT_BYTES:
        raise KsmPolicyError(f"{file}: larger than {MAX_INPUT_BYTES // 2**20} MB: refusing it")
    return data


def read_text(file: str) -> str:
    data = read_input(file)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KsmPolicyError(f"{file}: not valid UTF-8 (byte {exc.start})") from None


def read_pve_config(file: str, instead: str) -> str:
    """A Proxmox VM config's text; a libvirt domain XML given by mistake is refused (it would
    parse as a config with no keys, and its VM get the default decision silently)."""
    text = read_text(file)
    if text.lstrip("\ufeff \t\r\n").startswith("<"):
        raise KsmPolicyError(
            f"{file}: this is XML (a libvirt domain?), not a Proxmox VM config: {instead}"
        )
    return text


def vmid_for(file: str, vmid: str | None) -> str:
    """The VMID of a Proxmox config: --vmid, else the file's name (VMID.conf); refused as the
    hookscript refuses it. Without one, `vms:` tags keyed by VMID would be lost silently."""
    from ksmpolicy.proxmox.node import valid_vmid  # noqa: PLC0415

    if vmid is None:
        stem = Path(file).name.split(".")[0] if file != "-" else ""
        if not stem.isdigit():
            raise click.UsageError(f"give --vmid VMID: the VM's id cannot be told from {file!r}")
        vmid = stem
    return valid_vmid(vmid)


def qemu_server_version_option(func: F) -> F:
    """--qemu-server-version, checked like the policy's `proxmox.qemu_server_version`."""

    def check(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        from ksmpolicy.policy.model import valid_qemu_server_version  # noqa: PLC0415

        if value is not None and not valid_qemu_server_version(value):
            raise click.BadParameter(f"{value!r} is not a version like 8.4.1 or 9.0.27-1")
        return value

    return click.option(
        "--qemu-server-version",
        metavar="V",
        callback=check,
        help="Write configs for this qemu-server version (default: the installed one).",
    )(func)


def count(items: Sized, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"
