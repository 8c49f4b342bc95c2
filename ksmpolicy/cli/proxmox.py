"""Commands for Proxmox VE nodes: the hookscript, attaching it, config rewrites."""

from __future__ import annotations

import sys

import click

from ksmpolicy.cli.common import (
    QM,
    ROOT,
    Options,
    host_paths,
    policy_option,
    qemu_server_version_option,
    read_pve_config,
    vmid_for,
)
from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.policy.decide import Decider
from ksmpolicy.quoting import printable


@click.group("proxmox")
def proxmox() -> None:
    """Proxmox VE: the hookscript, attaching it to VMs, config rewrites."""


@proxmox.command("install")
@click.option("--storage", default="local", show_default=True, help="A storage with snippets.")
@click.option(
    "--hook-policy", metavar="FILE", help="Policy the hookscript reads (default: search)."
)
@ROOT
@QM
def proxmox_install(storage: str, hook_policy: str | None, root: str, qm: str) -> None:
    """Write the hookscript to STORAGE's snippets directory (executable).

    Then attach it to VMs with `ksmpolicy proxmox attach`. The storage needs the
    `snippets` content type (Datacenter > Storage > Edit > Content).
    """
    from ksmpolicy.files import untrusted_reason  # noqa: PLC0415
    from ksmpolicy.proxmox.hookscript import HOOKSCRIPT_RISK, install_hookscript  # noqa: PLC0415

    extra = ["--root", root] if root != "/" else []
    extra += ["--qm", qm] if qm != "qm" else []
    path, volid = install_hookscript(host_paths(root), storage, sys.executable, hook_policy, extra)
    click.echo(f"installed {path} ({volid})")
    reason = untrusted_reason(path)
    if reason is not None:
        click.echo(f"warning: {reason}: {HOOKSCRIPT_RISK}", err=True)
    click.echo("attach it: ksmpolicy proxmox attach --all (or VMIDs)")


@proxmox.command("attach")
@click.argument("vmids", nargs=-1, metavar="[VMID]...")
@click.option("--all", "all_vms", is_flag=True, help="Every VM on this node.")
@click.option(
    "--storage",
    help="Where it was installed (default: where `proxmox install` put it, else local).",
)
@ROOT
@QM
def proxmox_attach(
    vmids: tuple[str, ...], all_vms: bool, storage: str | None, root: str, qm: str
) -> None:
    """Set the hookscript on VMs (`qm set VMID --hookscript ...`).

    A hookscript a VM already had is remembered (in /etc/pve/ksmpolicy/chain/)
    and run first, with the same arguments; its exit status counts.
    """
    _attach_or_detach(vmids, all_vms, storage, root, qm, attach=True)


@proxmox.command("detach")
@click.argument("vmids", nargs=-1, metavar="[VMID]...")
@click.option("--all", "all_vms", is_flag=True, help="Every VM on this node.")
@click.option(
    "--storage",
    help="Where it was installed (default: where `proxmox install` put it, else local).",
)
@ROOT
@QM
def proxmox_detach(
    vmids: tuple[str, ...], all_vms: bool, storage: str | None, root: str, qm: str
) -> None:
    """Remove the hookscript from VMs, putting back one it chained."""
    _attach_or_detach(vmids, all_vms, storage, root, qm, attach=False)


def _attach_or_detach(
    vmids: tuple[str, ...], all_vms: bool, storage: str | None, root: str, qm: str, *, attach: bool
) -> None:
    from ksmpolicy.proxmox import hookscript, node  # noqa: PLC0415

    if all_vms == bool(vmids):
        raise click.UsageError("give VMIDs or --all (not both)")
    paths = host_paths(root)
    volid = hookscript.installed_volume(paths, storage)
    failed = []
    for vmid in vmids or tuple(node.vmids(paths)):
        try:
            if attach:
                what = hookscript.attach(paths, vmid, volid, qm=(qm,))
            else:
                what = hookscript.detach(paths, vmid, volid, qm=(qm,))
        except KsmPolicyError as exc:
            click.echo(printable(f"{vmid}: failed: {exc}"), err=True)
            failed.append(vmid)
            continue
        click.echo(f"{vmid}: {what}")
    if failed:
        raise SystemExit(1)


@proxmox.command("undo")
@click.argument("vmids", nargs=-1, metavar="[VMID]...")
@click.option("--all", "all_vms", is_flag=True, help="Every VM on this node.")
@click.option("--dry-run", is_flag=True, help="Print the diffs; change nothing.")
@ROOT
@QM
def proxmox_undo(vmids: tuple[str, ...], all_vms: bool, dry_run: bool, root: str, qm: str) -> None:
    """Let VMs merge again as Proxmox does by default: remove `allow-ksm: 0` and the
    `-machine mem-merge=off` pair from `args` (the form written before qemu-server
    9.0.27), with `qm set`; each old config is saved under
    /var/lib/ksmpolicy/backups first. A setting you made by hand goes too: look at
    --dry-run first.
    """
    from ksmpolicy.cli.render import outcome_line  # noqa: PLC0415
    from ksmpolicy.policy.load import parse_policy  # noqa: PLC0415
    from ksmpolicy.proxmox import node  # noqa: PLC0415

    if all_vms == bool(vmids):
        raise click.UsageError("give VMIDs or --all (not both)")
    paths = host_paths(root)
    if not (paths.pve / "qemu-server").is_dir():
        raise KsmPolicyError(f"this is no Proxmox VE node ({paths.pve / 'qemu-server'} is missing)")
    everyone_merges = parse_policy("version: 1\ndefault: merge\n", "<undo>")
    outcomes = node.apply(paths, everyone_merges, qm=(qm,), dry_run=dry_run, only=vmids)
    for outcome in outcomes:
        if outcome.diff and dry_run:
            click.echo(outcome.diff, nl=False)
        click.echo(outcome_line(outcome, proxmox=True), err=outcome.status == "failed")
    if any(o.status == "failed" for o in outcomes):
        raise SystemExit(1)


@proxmox.command("rewrite")
@click.argument("file", default="-", metavar="[FILE]")
@click.option("--vmid", metavar="VMID", help="The VM's id (default: from FILE's name).")
@qemu_server_version_option
@policy_option
@click.pass_obj
def proxmox_rewrite(
    options: Options, file: str, vmid: str | None, qemu_server_version: str | None
) -> None:
    """Print a VM config as the policy wants it (stdin to stdout by default).

    Only the main section changes (`allow-ksm`, or `args` before qemu-server
    9.0.27); description, [PENDING], cloud-init and snapshot sections are kept
    byte for byte. The same code path as `apply --proxmox`.
    """
    from ksmpolicy.proxmox import node  # noqa: PLC0415
    from ksmpolicy.proxmox.rewrite import apply_policy  # noqa: PLC0415

    vmid = vmid_for(file, vmid)
    policy = options.load()
    new, _facts, _decision, note = apply_policy(
        read_pve_config(file, "for a domain XML use `ksmpolicy xml rewrite`"),
        vmid,
        Decider(policy),
        use_allow_ksm=node.uses_allow_ksm(policy, qemu_server_version),
    )
    if note:
        click.echo(f"ksmpolicy: note: {note}", err=True)
    click.echo(new, nl=False)


@proxmox.command("persist", hidden=True)
@click.argument("vmid")
@ROOT
@QM
@policy_option
@click.pass_obj
def proxmox_persist(options: Options, vmid: str, root: str, qm: str) -> None:
    """Write the decision into a VM's config once its lock is free (the hookscript's helper)."""
    from ksmpolicy.proxmox import node  # noqa: PLC0415

    status = node.persist(host_paths(root), node.valid_vmid(vmid), options.load_file(), qm=(qm,))
    click.echo(f"{vmid}: {status}")
