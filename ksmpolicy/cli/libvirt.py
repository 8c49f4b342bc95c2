"""Commands for libvirt hosts: the hook, `apply`, `enforce`, `tag`, and offline XML rewrites."""

from __future__ import annotations

from pathlib import Path

import click

from ksmpolicy.apply import Outcome
from ksmpolicy.cli.common import (
    CONNECT,
    QM,
    ROOT,
    RUN_DIR,
    Options,
    host_paths,
    policy_option,
    qemu_server_version_option,
    read_input,
)
from ksmpolicy.cli.render import outcome_line, outcome_summary
from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.policy.decide import Decider
from ksmpolicy.quoting import one_line


@click.group()
def xml() -> None:
    """libvirt domain XML, offline."""


@xml.command("rewrite")
@click.argument("file", default="-", metavar="[FILE]")
@policy_option
@click.pass_obj
def xml_rewrite(options: Options, file: str) -> None:
    """Print a domain XML as the policy wants it (stdin to stdout by default).

    Adds <memoryBacking><nosharepages/> for VMs the policy excludes and removes
    it for VMs it lets merge; every other byte is kept. The same code path as
    the hook's migrate and restore rewrite. Exit 1 (and print nothing) on bad XML.
    """
    from ksmpolicy.libvirt.images import qcow2_backing_root  # noqa: PLC0415
    from ksmpolicy.libvirt.rewrite import apply_policy  # noqa: PLC0415

    policy = options.load()
    rewritten, _facts, _decision = apply_policy(
        read_input(file), Decider(policy), qcow2_backing_root
    )
    click.echo(rewritten, nl=False)


@click.group()
def hook() -> None:
    """Entry points the hypervisor calls (the hook shims run these)."""


@hook.command("libvirt", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="NAME OP SUBOP EXTRA")
@policy_option
@click.pass_obj
def hook_libvirt(options: Options, args: tuple[str, ...]) -> None:
    """libvirt's qemu hook: domain XML on stdin.

    prepare/begin checks the definition against the policy (enforcement off,
    warn or block); migrate/begin and restore/begin print the XML rewritten for
    this host's policy; started, stopped, release and reconnect notify the
    daemon. The installed shim calls the same code without click, for speed.
    """
    from ksmpolicy.hook import main as hook_main  # noqa: PLC0415

    raise SystemExit(hook_main(["--policy", options.policy_path(), "libvirt", *args]))


@click.command()
@click.argument("target", type=click.Choice(["libvirt"]))
@click.option("--main-hook", is_flag=True, help="Install as hooks/qemu instead of qemu.d/.")
@click.option("--name", default="ksmpolicy", show_default=True, help="File name in qemu.d/.")
@click.option("--hook-policy", metavar="FILE", help="Policy the hook reads (default: its own).")
@RUN_DIR
@ROOT
def install(
    target: str, main_hook: bool, name: str, hook_policy: str | None, run_dir: str | None, root: str
) -> None:
    """Install the hook: /etc/libvirt/hooks/qemu.d/ksmpolicy by default.

    Never overwrites a hook that ksmpolicy did not write. The hook runs this
    installation's interpreter by its absolute path. Run it again after an
    upgrade: it rewrites the hook it wrote before.
    """
    from ksmpolicy.libvirt import install as installer  # noqa: PLC0415

    paths = host_paths(root)
    path = installer.install(
        paths, main_hook=main_hook, name=name, policy=hook_policy, run_dir=run_dir
    )
    click.echo(f"installed {path}")
    click.echo(installer.reload_hint(paths))


@click.command()
@click.argument("target", type=click.Choice(["libvirt"]))
@click.option("--main-hook", is_flag=True, help="Remove hooks/qemu instead of qemu.d/.")
@click.option("--name", default="ksmpolicy", show_default=True, help="File name in qemu.d/.")
@ROOT
def uninstall(target: str, main_hook: bool, name: str, root: str) -> None:
    """Remove the hook that `install` wrote (and nothing else)."""
    from ksmpolicy.libvirt import install as installer  # noqa: PLC0415

    paths = host_paths(root)
    removed = installer.uninstall(paths, main_hook=main_hook, name=name)
    click.echo(f"removed {removed}" if removed else "no ksmpolicy hook was installed")
    if removed:
        click.echo(installer.reload_hint(paths))


@click.command()
@CONNECT
@click.option("--dry-run", is_flag=True, help="Print a unified diff per VM; change nothing.")
@click.option(
    "--domain", "-d", "domains", multiple=True, metavar="NAME", help="Only these (name or UUID)."
)
@click.option("--proxmox", is_flag=True, help="Proxmox VE: the VM configs of this node.")
@click.option("--vmid", "vmids", multiple=True, metavar="VMID", help="With --proxmox: only these.")
@qemu_server_version_option
@QM
@ROOT
@policy_option
@click.pass_obj
def apply(  # noqa: PLR0913 - one parameter per option of the command
    options: Options,
    uri: str | None,
    dry_run: bool,
    domains: tuple[str, ...],
    proxmox: bool,
    vmids: tuple[str, ...],
    qemu_server_version: str | None,
    qm: str,
    root: str,
) -> None:
    """Change VM definitions that disagree with the policy (libvirt or Proxmox VE).

    libvirt: adds or removes <nosharepages/> and redefines the domain; each old
    definition is saved under /var/lib/ksmpolicy/backups first. Proxmox VE
    (--proxmox): `qm set VMID --allow-ksm 0` (or, before qemu-server 9.0.27,
    `-machine mem-merge=off` in --args), or removes them. Running VMs follow at
    their next start (`enforce --live` switches libvirt ones now). A VM that
    fails does not stop the others; the exit status is then 1.
    """
    if vmids and not proxmox:
        raise click.UsageError("--vmid is for Proxmox VE: add --proxmox (libvirt: --domain)")
    if domains and proxmox:
        raise click.UsageError("--domain is for libvirt: with --proxmox, use --vmid")
    policy = options.load_file()
    paths = host_paths(root)
    if proxmox and not (paths.pve / "qemu-server").is_dir():
        raise KsmPolicyError(
            f"--proxmox: this is no Proxmox VE node ({paths.pve / 'qemu-server'} does not exist)"
        )
    if proxmox:
        from ksmpolicy.proxmox import node  # noqa: PLC0415

        outcomes = node.apply(
            paths,
            policy,
            qm=(qm,),
            dry_run=dry_run,
            only=vmids,
            qemu_server_version=qemu_server_version,
        )
        noun = "VMs"
    else:
        from ksmpolicy.libvirt import host  # noqa: PLC0415

        conn = host.connect(uri)
        outcomes = host.apply(
            conn, policy, backup_dir=paths.backup_dir, dry_run=dry_run, only=domains
        )
        noun = "domains"
    report_outcomes(outcomes, noun, dry_run=dry_run, proxmox=proxmox)


@click.command()
@CONNECT
@click.option("--live", is_flag=True, help="Also switch running domains' merging now (QMP).")
@click.option(
    "--domain", "-d", "domains", multiple=True, metavar="NAME", help="Only these (name or UUID)."
)
@ROOT
@policy_option
@click.pass_obj
def enforce(
    options: Options, uri: str | None, live: bool, domains: tuple[str, ...], root: str
) -> None:
    """One pass of what the daemon does: fix definitions, and with --live running VMs.

    The live switch sets `merge` on each guest RAM backend over QMP
    (virDomainQemuMonitorCommand); libvirt then marks the domain
    "custom-monitor" tainted, which is harmless but shows in its log.
    """
    from ksmpolicy.libvirt import host  # noqa: PLC0415

    policy = options.load_file()
    conn = host.connect(uri)
    outcomes = host.apply(conn, policy, backup_dir=host_paths(root).backup_dir, only=domains)
    failed = [o.key for o in outcomes if o.status == "failed"]
    for outcome in outcomes:
        if outcome.status != "unchanged":
            line = f"{outcome.key}: definition {outcome.status} {outcome.error or ''}"
            click.echo(one_line(line).rstrip())
        if outcome.note:
            click.echo(one_line(f"{outcome.key}: note: {outcome.note}"))
    if live:
        for done in host.enforce_live(conn, policy, only=domains):
            state = "" if done.merge is None else f" (merge {'on' if done.merge else 'off'})"
            click.echo(
                one_line(f"{done.name}: running {done.status}{state} {done.detail}").rstrip()
            )
            if done.status == "failed":
                failed.append(done.name)
    if failed:
        raise SystemExit(1)


@click.command()
@click.argument("vm")
@click.argument("tags", nargs=-1, required=True)
@click.option("--remove", is_flag=True, help="Remove these tags instead of adding them.")
@CONNECT
def tag(vm: str, tags: tuple[str, ...], remove: bool, uri: str | None) -> None:
    """Add tags to a libvirt domain (its <metadata>, namespace urn:ksmpolicy:vm:1).

    \b
    Example:
      ksmpolicy tag pg-primary database
    """
    from ksmpolicy.libvirt import host  # noqa: PLC0415

    now = host.set_tags(host.connect(uri), vm, tags, remove=remove)
    click.echo(one_line(f"{vm}: tags {', '.join(now) or '(none)'}"))


@click.command()
@CONNECT
@click.option(
    "--backups",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the backups are (default: /var/lib/ksmpolicy/backups; after `apt purge`, "
    "/var/backups/ksmpolicy-definitions-TIME).",
)
@click.option(
    "--domain", "-d", "domains", multiple=True, metavar="NAME", help="Only these (name or UUID)."
)
@click.option("--dry-run", is_flag=True, help="Print the diffs; change nothing.")
@ROOT
def restore(
    uri: str | None, backups: Path | None, domains: tuple[str, ...], dry_run: bool, root: str
) -> None:
    """Put libvirt definitions back as they were before ksmpolicy first changed them.

    The oldest backup of each domain (NAME.UUID.TIME.xml, saved by `apply` and the
    daemon before each rewrite) is its definition before ksmpolicy; changes made to
    it since are lost, so look at --dry-run first. The current definition is saved
    as one more backup. A domain that no longer exists is not defined again
    (`virsh define FILE` does that). Running VMs follow at their next start. Turn
    the policy off first (stop the daemon, `ksmpolicy uninstall libvirt`), or the
    hook and the daemon rewrite the definitions again.
    """
    from ksmpolicy.libvirt import host  # noqa: PLC0415
    from ksmpolicy.libvirt.restore import restore as restore_backups  # noqa: PLC0415

    paths = host_paths(root)
    directory = backups or paths.backup_dir
    outcomes = restore_backups(
        host.connect(uri), directory, save_to=paths.backup_dir, only=domains, dry_run=dry_run
    )
    if not outcomes:
        click.echo(f"no backups of existing domains in {directory}")
    report_outcomes(outcomes, "domains", dry_run=dry_run, proxmox=False)


def report_outcomes(outcomes: list[Outcome], noun: str, *, dry_run: bool, proxmox: bool) -> None:
    """Each VM's line (with its diff under --dry-run, and its note), the summary; exit 1 when
    one failed."""
    for outcome in outcomes:
        if outcome.diff and dry_run:
            click.echo(outcome.diff, nl=False)
        click.echo(outcome_line(outcome, proxmox=proxmox), err=outcome.status == "failed")
        if outcome.note:
            click.echo(one_line(f"{outcome.key}: note: {outcome.note}"))
    click.echo(outcome_summary(outcomes, noun))
    if any(o.status == "failed" for o in outcomes):
        raise SystemExit(1)
