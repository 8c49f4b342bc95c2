"""The `ksmpolicy` command line: parse, wire the pieces together, print. No decisions here."""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import click

from ksmpolicy import __version__
from ksmpolicy.decide import Decider, Decision, VmFacts
from ksmpolicy.errors import KsmPolicyError, PolicyError
from ksmpolicy.host import HostPaths, default_policy
from ksmpolicy.policy import Policy, load_policy
from ksmpolicy.samples import load_facts

F = TypeVar("F", bound=Callable[..., Any])
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@dataclass
class Options:
    """Global options, shared with every subcommand through click's context object."""

    policy: str | None = None  # None: the search order of host.default_policy
    debug: bool = False

    def policy_path(self) -> str:
        return self.policy or default_policy(HostPaths())


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


ROOT = click.option("--root", default="/", metavar="DIR", hidden=True, help="Host root (tests).")


@click.group(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--policy",
    "-p",
    metavar="FILE",
    help="Policy file. Default: $KSMPOLICY_POLICY, else /etc/pve/ksmpolicy/policy.yaml if it "
    "exists (Proxmox VE, cluster-wide), else /etc/ksmpolicy/policy.yaml.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.version_option(__version__, "--version", prog_name="ksmpolicy")
@click.pass_context
def cli(ctx: click.Context, policy: str | None, debug: bool) -> None:
    """Per-VM Kernel Same-page Merging policy for libvirt/KVM and Proxmox VE.

    The policy (YAML) says which VMs may have their memory merged by KSM and
    which must not (latency-sensitive or untrusted ones). See `ksmpolicy
    COMMAND --help` and the README's policy reference.
    """
    options = ctx.ensure_object(Options)
    options.policy = policy
    options.debug = debug
    if debug:
        logging.getLogger().setLevel(logging.DEBUG)


@cli.command()
@click.argument("files", nargs=-1, metavar="[POLICY]...")
@policy_option
@click.pass_obj
def check(options: Options, files: tuple[str, ...]) -> None:
    """Validate policy files and report every problem.

    Checks the given files, else the policy in use (--policy). Problems are
    printed one per line as FILE:LINE: key: message. Exit 0 when all are valid,
    1 otherwise.
    """
    failed = False
    for file in files or (options.policy_path(),):
        try:
            policy = load_policy(file)
        except KsmPolicyError as exc:
            click.echo(str(exc), err=True)
            failed = True
            continue
        click.echo(
            f"{file}: ok ({_count(policy.rules, 'rule')}, {_count(policy.groups, 'group')}, "
            f"{_count(policy.vms, 'VM')} tagged; default {policy.default.value}, "
            f"enforcement {policy.enforcement.value})"
        )
    if failed:
        raise SystemExit(1)


@cli.command()
@click.option("--name", "-n", metavar="NAME", help="VM name (libvirt domain or Proxmox name).")
@click.option("--uuid", metavar="UUID", help="VM UUID, for `vms:` entries keyed by UUID.")
@click.option("--vmid", metavar="VMID", help="Proxmox VMID, for `vms:` entries keyed by VMID.")
@click.option("--tag", "-t", "tags", multiple=True, metavar="TAG", help="A tag the VM carries.")
@click.option("--image", "images", multiple=True, metavar="IMAGE", help="Base image identity.")
@click.option("--hugepages", is_flag=True, help="The VM's memory is hugepage-backed.")
@click.option("--facts", "facts_file", metavar="FILE", help="A YAML list of VMs: print a table.")
@click.option(
    "--xml", "xml_file", metavar="FILE", help="A libvirt domain XML file ('-' for stdin)."
)
@click.option(
    "--pve-conf",
    "pve_file",
    metavar="FILE",
    help="A Proxmox VE config (/etc/pve/qemu-server/VMID.conf).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@policy_option
@click.pass_obj
def explain(
    options: Options,
    name: str | None,
    uuid: str | None,
    vmid: str | None,
    tags: tuple[str, ...],
    images: tuple[str, ...],
    hugepages: bool,
    facts_file: str | None,
    xml_file: str | None,
    pve_file: str | None,
    as_json: bool,
) -> None:
    """Show what the policy decides for a VM, and why.

    Describe one VM with --name (and --tag, --image, ...), give its libvirt
    definition with --xml FILE (tags from its <metadata>, images from its
    disks' backing chains), or many VMs with --facts FILE, a YAML list like
    `- {name: web-1, tags: [web]}`.

    \b
    Example:
      ksmpolicy explain --name pg-primary --tag database
    """
    sources = [s for s in (name, facts_file, xml_file, pve_file) if s is not None]
    if not sources:
        raise click.UsageError(
            "give --name NAME (with --tag, --image, ...), --xml, --pve-conf or --facts"
        )
    if len(sources) > 1:
        raise click.UsageError("--name, --xml, --pve-conf and --facts exclude each other")
    policy = load_policy(options.policy_path())
    if facts_file is not None:
        vms = load_facts(facts_file)
    elif xml_file is not None:
        from ksmpolicy.libvirt_xml import domain_facts, qcow2_backing_root  # noqa: PLC0415

        vms = [domain_facts(_read_input(xml_file), qcow2_backing_root).vm]
    elif pve_file is not None:
        from ksmpolicy import proxmox_conf  # noqa: PLC0415

        text = _read_text(pve_file)
        vmid = vmid or _vmid_from_name(pve_file)
        config = proxmox_conf.parse(text)
        vms = [proxmox_conf.facts(config, vmid).vm]
        pending = proxmox_conf.with_pending(config)
        if pending is not None and not as_json:
            later = Decider(policy).decide(proxmox_conf.facts(config, vmid, pending).vm)
            if later.action is not Decider(policy).decide(vms[0]).action:
                click.echo(f"note: the [PENDING] changes would make it {later.action.value}")
    else:
        assert name is not None
        vms = [VmFacts(name, uuid, vmid, frozenset(tags), images, hugepages=hugepages)]
    decider = Decider(policy)
    decisions = [decider.decide(vm) for vm in vms]
    if as_json:
        click.echo(json.dumps([_decision_json(d) for d in decisions], indent=2))
    elif facts_file is None:
        _print_one(decisions[0], policy)
    else:
        click.echo(decision_table(decisions))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema in the README).")
@click.option(
    "--sample",
    type=click.FloatRange(0, 10),
    default=0.2,
    show_default=True,
    metavar="SECONDS",
    help="Measure ksmd's CPU share over this long (0: don't).",
)
@ROOT
@policy_option
@click.pass_obj
def status(options: Options, as_json: bool, sample: float, root: str) -> None:
    """What KSM saves, for which VM, at what CPU cost (read-only).

    The host (KSM running, who controls it, knobs, memory saved, ksmd CPU), a
    row per running VM (group, decision and rule, whether its running state
    complies, mergeable and merged MiB, profit), totals per group, and findings
    with what to do. Works without a policy (no decisions then).
    """
    from ksmpolicy import status as status_module  # noqa: PLC0415

    policy, error = _policy_or_error(options)
    collected = status_module.collect(
        HostPaths(Path(root)), policy, sample_seconds=sample, policy_error=error
    )
    if as_json:
        click.echo(json.dumps(status_module.as_json(collected), indent=2))
    else:
        click.echo(status_module.text(collected))


@cli.command()
@click.option(
    "--listen", metavar="[HOST:]PORT", help="Serve /metrics over HTTP (localhost default)."
)
@click.option("--textfile", metavar="PATH", help="Write for node_exporter's textfile collector.")
@click.option(
    "--every", type=float, metavar="SECONDS", help="With --textfile: rewrite it this often."
)
@ROOT
@policy_option
@click.pass_obj
def metrics(
    options: Options, listen: str | None, textfile: str | None, every: float | None, root: str
) -> None:
    """Prometheus metrics: per VM, per group, and KSM host figures.

    \b
    ksmpolicy metrics --listen 9573              # http://127.0.0.1:9573/metrics
    ksmpolicy metrics --textfile /var/lib/prometheus/node-exporter/ksmpolicy.prom
    Without an option, print them once.
    """
    from ksmpolicy import metrics as metrics_module  # noqa: PLC0415

    def policy() -> Policy | None:
        return _policy_or_error(options)[0]

    collector = metrics_module.StatusCollector(HostPaths(Path(root)), policy)
    if listen and textfile:
        raise click.UsageError("--listen and --textfile exclude each other")
    if listen:
        try:
            metrics_module.serve(collector, listen)
        except (ValueError, OSError) as exc:
            raise KsmPolicyError(f"cannot listen on {listen}: {exc}") from None
        click.echo(f"serving metrics on {listen} (/metrics)", err=True)
        metrics_module.every(3600, lambda: None)
    elif textfile:

        def write() -> None:
            metrics_module.write_textfile(collector, textfile)

        if every:
            metrics_module.every(every, write)
        write()
    else:
        click.echo(metrics_module.exposition(collector), nl=False)


def _policy_or_error(options: Options) -> tuple[Policy | None, str | None]:
    try:
        return load_policy(options.policy_path()), None
    except KsmPolicyError as exc:
        return None, str(exc).splitlines()[0]


@cli.command()
@click.option("--restore-on-exit", is_flag=True, help="Put back the KSM knobs found at start.")
@click.option("--dry-run", is_flag=True, help="Plan and log, but write no knob.")
@ROOT
@click.option("--run-dir", metavar="DIR", hidden=True, help="Runtime directory (for tests).")
@click.option("--state-dir", metavar="DIR", hidden=True, help="Backup directory (for tests).")
@CONNECT
@click.option("--no-libvirt", is_flag=True, help="Do not watch libvirt events.")
@click.option("--metrics", metavar="[HOST:]PORT", help="Also serve Prometheus /metrics.")
@policy_option
@click.pass_obj
def daemon(
    options: Options,
    restore_on_exit: bool,
    dry_run: bool,
    root: str,
    run_dir: str | None,
    state_dir: str | None,
    uri: str | None,
    no_libvirt: bool,
    metrics: str | None,
) -> None:
    """Run the reconciler in the foreground (replaces ksmtuned).

    Sizes ksmd's work to the mergeable memory of running VMs, memory pressure and
    the CPU budget in the policy's `reconciler:` section; retunes at once when a
    hook reports a VM start or stop. Logs to stderr (journald-friendly), speaks
    systemd's notify protocol, reloads the policy on SIGHUP and exits on SIGTERM.

    Where libvirt is available it also watches domain events: a new or changed
    definition is rewritten for the policy (unless enforcement is off), and a
    started domain's merging is switched live (when the policy says `live`).
    """
    from ksmpolicy.daemon import Daemon  # noqa: PLC0415 - keeps `check`/`explain` light

    configure_daemon_logging(options.debug)
    paths = HostPaths(
        Path(root),
        Path(run_dir) if run_dir else None,
        Path(state_dir) if state_dir else None,
    )
    Daemon(
        paths,
        options.policy_path(),
        restore_on_exit=restore_on_exit,
        dry_run=dry_run,
        libvirt_uri=uri,
        use_libvirt=not no_libvirt,
        metrics=metrics,
    ).run()


@cli.command()
@click.option(
    "--once", is_flag=True, required=True, help="One pass (required; the loop is `daemon`)."
)
@click.option("--dry-run", is_flag=True, help="Print what would be written; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option(
    "--sample",
    type=click.FloatRange(0, 60),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Measure ksmd's CPU over this long before planning.",
)
@ROOT
@policy_option
@click.pass_obj
def reconcile(
    options: Options, once: bool, dry_run: bool, as_json: bool, sample: float, root: str
) -> None:
    """Plan ksmd's pace once, print it with the reason, and write it.

    With --dry-run nothing is written. A single pass has no history: it cannot
    know that a VM just started, so it plans the calm pace (or pressure).
    """
    from ksmpolicy.daemon import Reconciler  # noqa: PLC0415

    reconciler = Reconciler(HostPaths(Path(root)), load_policy(options.policy_path()), dry_run=True)
    if sample > 0:
        reconciler.step()
        time.sleep(sample)
    result = reconciler.step()
    written = [] if dry_run else reconciler.knobs.apply(result.knobs)
    observation = reconciler.observer
    footprint = sum(p.mergeable_bytes for p in observation.processes)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "mode": result.mode,
                    "reason": result.reason,
                    "knobs": dict(result.knobs),
                    "written": written,
                    "dry_run": dry_run,
                    "pages_per_second": round(result.pages_per_second),
                    "footprint_bytes": footprint,
                    "ksmd_cpu_percent": result.history.cpu_percent,
                    "processes": [
                        {
                            "pid": p.pid,
                            "kind": p.kind,
                            "name": p.name,
                            "mergeable_bytes": p.mergeable_bytes,
                        }
                        for p in observation.processes
                    ],
                },
                indent=2,
            )
        )
        return
    click.echo(f"mode:      {result.mode}")
    click.echo(f"reason:    {result.reason}")
    click.echo(f"footprint: {footprint / 2**20:.1f} MiB in {len(observation.processes)} processes")
    knobs = "  ".join(f"{k}={v}" for k, v in result.knobs)
    click.echo(f"knobs:     {knobs}{' (dry run: nothing written)' if dry_run else ''}")
    if not dry_run:
        click.echo(f"written:   {', '.join(written) or 'nothing (already so)'}")


@cli.command()
@click.argument(
    "event", type=click.Choice(["started", "stopped", "release", "reconnect", "changed"])
)
@click.argument("vm")
@ROOT
@click.option("--run-dir", metavar="DIR", hidden=True, help="Runtime directory (for tests).")
def notify(event: str, vm: str, root: str, run_dir: str | None) -> None:
    """Tell the running daemon that VM had EVENT (what the hooks do).

    Never waits: when no daemon listens, the note is dropped and the exit status
    is still 0.
    """
    from ksmpolicy import notify as notes  # noqa: PLC0415

    if not notes.send(_paths(root, run_dir), event, vm):
        click.echo("ksmpolicy: no daemon is listening; note dropped", err=True)


@cli.group()
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
    from ksmpolicy.libvirt_xml import apply_policy  # noqa: PLC0415

    policy = load_policy(options.policy_path())
    rewritten, _facts, _decision = apply_policy(_read_input(file), Decider(policy))
    click.echo(rewritten, nl=False)


@cli.group()
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


@cli.command()
@click.argument("target", type=click.Choice(["libvirt"]))
@click.option("--main-hook", is_flag=True, help="Install as hooks/qemu instead of qemu.d/.")
@click.option("--name", default="ksmpolicy", show_default=True, help="File name in qemu.d/.")
@click.option("--hook-policy", metavar="FILE", help="Policy the hook reads (default: its own).")
@click.option("--run-dir", metavar="DIR", hidden=True, help="Daemon runtime directory.")
@ROOT
def install(
    target: str, main_hook: bool, name: str, hook_policy: str | None, run_dir: str | None, root: str
) -> None:
    """Install the hook: /etc/libvirt/hooks/qemu.d/ksmpolicy by default.

    Never overwrites a hook that ksmpolicy did not write. The hook runs this
    installation's interpreter by its absolute path.
    """
    from ksmpolicy import install as installer  # noqa: PLC0415

    paths = HostPaths(Path(root))
    path = installer.install(
        paths, main_hook=main_hook, name=name, policy=hook_policy, run_dir=run_dir
    )
    click.echo(f"installed {path}")
    click.echo(installer.reload_hint(paths))


@cli.command()
@click.argument("target", type=click.Choice(["libvirt"]))
@click.option("--main-hook", is_flag=True, help="Remove hooks/qemu instead of qemu.d/.")
@click.option("--name", default="ksmpolicy", show_default=True, help="File name in qemu.d/.")
@ROOT
def uninstall(target: str, main_hook: bool, name: str, root: str) -> None:
    """Remove the hook that `install` wrote (and nothing else)."""
    from ksmpolicy import install as installer  # noqa: PLC0415

    paths = HostPaths(Path(root))
    removed = installer.uninstall(paths, main_hook=main_hook, name=name)
    click.echo(f"removed {removed}" if removed else "no ksmpolicy hook was installed")
    if removed:
        click.echo(installer.reload_hint(paths))


@cli.command()
@CONNECT
@click.option("--dry-run", is_flag=True, help="Print a unified diff per VM; change nothing.")
@click.option("--domain", "-d", "domains", multiple=True, metavar="NAME", help="Only these.")
@click.option("--proxmox", is_flag=True, help="Proxmox VE: the VM configs of this node.")
@click.option("--vmid", "vmids", multiple=True, metavar="VMID", help="With --proxmox: only these.")
@click.option("--qemu-server-version", metavar="V", help="With --proxmox: write configs for it.")
@click.option("--qm", default="qm", hidden=True, help="The qm command (a stand-in in tests).")
@ROOT
@policy_option
@click.pass_obj
def apply(
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
    policy = load_policy(options.policy_path())
    if proxmox:
        _apply_proxmox(policy, root, dry_run, vmids, qemu_server_version, qm)
        return
    from ksmpolicy import libvirt_host  # noqa: PLC0415

    conn = libvirt_host.connect(uri)
    backup_dir = HostPaths(Path(root)).state_dir / "backups"
    results = libvirt_host.apply(conn, policy, backup_dir=backup_dir, dry_run=dry_run, only=domains)
    for result in results:
        if result.diff and dry_run:
            click.echo(result.diff, nl=False)
        line = f"{result.name}: {result.status}"
        if result.backup:
            line += f" (backup {result.backup})"
        if result.error:
            line += f": {result.error}"
        click.echo(line, err=result.status == "failed")
    counts = {s: sum(r.status == s for r in results) for s in ("changed", "would change")}
    failed = [r.name for r in results if r.status == "failed"]
    click.echo(
        f"{len(results)} domains: {counts['changed']} changed, "
        f"{counts['would change']} would change, {len(failed)} failed"
        + (f" ({', '.join(failed)})" if failed else "")
    )
    if failed:
        raise SystemExit(1)


@cli.command()
@CONNECT
@click.option("--live", is_flag=True, help="Also switch running domains' merging now (QMP).")
@click.option("--domain", "-d", "domains", multiple=True, metavar="NAME", help="Only these.")
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
    from ksmpolicy import libvirt_host  # noqa: PLC0415

    policy = load_policy(options.policy_path())
    conn = libvirt_host.connect(uri)
    backup_dir = HostPaths(Path(root)).state_dir / "backups"
    results = libvirt_host.apply(conn, policy, backup_dir=backup_dir, only=domains)
    failed = [r.name for r in results if r.status == "failed"]
    for result in results:
        if result.status != "unchanged":
            click.echo(f"{result.name}: definition {result.status} {result.error or ''}".rstrip())
    if live:
        for done in libvirt_host.enforce_live(conn, policy, only=domains):
            state = "" if done.merge is None else f" (merge {'on' if done.merge else 'off'})"
            click.echo(f"{done.name}: running {done.status}{state} {done.detail}".rstrip())
            if done.status == "failed":
                failed.append(done.name)
    if failed:
        raise SystemExit(1)


@cli.command()
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
    from ksmpolicy import libvirt_host  # noqa: PLC0415

    now = libvirt_host.set_tags(libvirt_host.connect(uri), vm, tags, remove=remove)
    click.echo(f"{vm}: tags {', '.join(now) or '(none)'}")


def _apply_proxmox(
    policy: Policy,
    root: str,
    dry_run: bool,
    vmids: tuple[str, ...],
    version: str | None,
    qm: str,
) -> None:
    from ksmpolicy import proxmox  # noqa: PLC0415

    results = proxmox.apply(
        HostPaths(Path(root)),
        policy,
        qm=(qm,),
        dry_run=dry_run,
        only=vmids,
        qemu_server_version=version,
    )
    for result in results:
        if result.diff and dry_run:
            click.echo(result.diff, nl=False)
        line = f"{result.vmid} ({result.name}): {result.status}"
        if result.error:
            line += f": {result.error}"
        click.echo(line, err=result.status == "failed")
        if result.note:
            click.echo(f"{result.vmid}: note: {result.note}")
    failed = [r.vmid for r in results if r.status == "failed"]
    changed = sum(r.status == "changed" for r in results)
    would = sum(r.status == "would change" for r in results)
    click.echo(
        f"{len(results)} VMs: {changed} changed, {would} would change, {len(failed)} failed"
        + (f" ({', '.join(failed)})" if failed else "")
    )
    if failed:
        raise SystemExit(1)


@cli.group("proxmox")
def proxmox_group() -> None:
    """Proxmox VE: the hookscript, attaching it to VMs, config rewrites."""


QM = click.option("--qm", default="qm", hidden=True, help="The qm command (a stand-in in tests).")


@proxmox_group.command("install")
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
    from ksmpolicy import proxmox  # noqa: PLC0415

    extra = ["--root", root] if root != "/" else []
    extra += ["--qm", qm] if qm != "qm" else []
    path, volid = proxmox.install_hookscript(
        HostPaths(Path(root)), storage, sys.executable, hook_policy, extra
    )
    click.echo(f"installed {path} ({volid})")
    click.echo("attach it: ksmpolicy proxmox attach --all (or VMIDs)")


def _hookscript_volid(storage: str) -> str:
    from ksmpolicy.proxmox import HOOKSCRIPT_NAME  # noqa: PLC0415

    return f"{storage}:snippets/{HOOKSCRIPT_NAME}"


@proxmox_group.command("attach")
@click.argument("vmids", nargs=-1, metavar="[VMID]...")
@click.option("--all", "all_vms", is_flag=True, help="Every VM on this node.")
@click.option("--storage", default="local", show_default=True, help="Where it was installed.")
@ROOT
@QM
def proxmox_attach(vmids: tuple[str, ...], all_vms: bool, storage: str, root: str, qm: str) -> None:
    """Set the hookscript on VMs (`qm set VMID --hookscript ...`).

    A hookscript a VM already had is remembered (in /etc/pve/ksmpolicy/chain/)
    and run first, with the same arguments; its exit status counts.
    """
    _attach_or_detach(vmids, all_vms, storage, root, qm, attach=True)


@proxmox_group.command("detach")
@click.argument("vmids", nargs=-1, metavar="[VMID]...")
@click.option("--all", "all_vms", is_flag=True, help="Every VM on this node.")
@click.option("--storage", default="local", show_default=True, help="Where it was installed.")
@ROOT
@QM
def proxmox_detach(vmids: tuple[str, ...], all_vms: bool, storage: str, root: str, qm: str) -> None:
    """Remove the hookscript from VMs, putting back one it chained."""
    _attach_or_detach(vmids, all_vms, storage, root, qm, attach=False)


def _attach_or_detach(
    vmids: tuple[str, ...], all_vms: bool, storage: str, root: str, qm: str, *, attach: bool
) -> None:
    from ksmpolicy import proxmox  # noqa: PLC0415

    if all_vms == bool(vmids):
        raise click.UsageError("give VMIDs or --all (not both)")
    paths = HostPaths(Path(root))
    volid = _hookscript_volid(storage)
    failed = []
    for vmid in vmids or tuple(proxmox.vmids(paths)):
        try:
            if attach:
                what = proxmox.attach(paths, vmid, volid, qm=(qm,))
            else:
                what = proxmox.detach(paths, vmid, volid, qm=(qm,))
        except KsmPolicyError as exc:
            click.echo(f"{vmid}: failed: {exc}", err=True)
            failed.append(vmid)
            continue
        click.echo(f"{vmid}: {what}")
    if failed:
        raise SystemExit(1)


@proxmox_group.command("rewrite")
@click.argument("file", default="-", metavar="[FILE]")
@click.option("--vmid", metavar="VMID", help="The VM's id (default: from FILE's name).")
@click.option("--qemu-server-version", metavar="V", help="Write for this qemu-server version.")
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
    from ksmpolicy import proxmox, proxmox_conf  # noqa: PLC0415

    policy = load_policy(options.policy_path())
    text = _read_text(file)
    new, _facts, _decision, note = proxmox_conf.apply_policy(
        text,
        vmid or _vmid_from_name(file),
        Decider(policy),
        use_allow_ksm=proxmox.uses_allow_ksm(policy, qemu_server_version),
    )
    if note:
        click.echo(f"ksmpolicy: note: {note}", err=True)
    click.echo(new, nl=False)


@proxmox_group.command("persist", hidden=True)
@click.argument("vmid")
@ROOT
@QM
@policy_option
@click.pass_obj
def proxmox_persist(options: Options, vmid: str, root: str, qm: str) -> None:
    """Write the decision into a VM's config once its lock is free (the hookscript's helper)."""
    from ksmpolicy import proxmox  # noqa: PLC0415

    policy = load_policy(options.policy_path())
    status = proxmox.persist(HostPaths(Path(root)), proxmox.valid_vmid(vmid), policy, qm=(qm,))
    click.echo(f"{vmid}: {status}")


def _vmid_from_name(file: str) -> str:
    stem = Path(file).name.split(".")[0]
    return stem if stem.isdigit() else "?"


def _read_text(file: str) -> str:
    data = _read_input(file)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KsmPolicyError(f"{file}: not valid UTF-8 (byte {exc.start})") from None


def _read_input(file: str) -> bytes:
    from ksmpolicy.libvirt_xml import MAX_XML_BYTES, XmlError  # noqa: PLC0415

    try:
        if file == "-":
            data = sys.stdin.buffer.read(MAX_XML_BYTES + 1)
        else:
            with Path(file).open("rb") as handle:
                data = handle.read(MAX_XML_BYTES + 1)
    except OSError as exc:
        raise KsmPolicyError(f"cannot read {file}: {exc.strerror}") from None
    if len(data) > MAX_XML_BYTES:
        raise XmlError(f"{file}: larger than {MAX_XML_BYTES // 2**20} MB: refusing it")
    return data


def _paths(root: str, run_dir: str | None) -> HostPaths:
    return HostPaths(Path(root), Path(run_dir) if run_dir else None)


def decision_table(decisions: Sequence[Decision]) -> str:
    rows = [("VM", "GROUP", "DECISION", "RULE")]
    for d in decisions:
        rows.append((d.vm, d.group or "-", _verdict(d), d.rule or "(default)"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    )


def _count(items: Sized, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _verdict(decision: Decision) -> str:
    if decision.merge:
        return "merge"
    if decision.action.value == "merge":
        return "never (memory)"
    return "exclude"


def _print_one(decision: Decision, policy: Policy) -> None:
    click.echo(f"VM:       {decision.vm}")
    click.echo(f"decision: {_verdict(decision)}")
    click.echo(f"group:    {decision.group or '-'}")
    click.echo(f"rule:     {decision.rule or '(default)'}")
    click.echo(f"tags:     {', '.join(decision.tags) or '-'}")
    click.echo(f"reason:   {decision.reason}")
    click.echo(f"policy:   {policy.source}")


def _decision_json(decision: Decision) -> dict[str, Any]:
    return {
        "vm": decision.vm,
        "action": decision.action.value,
        "merge": decision.merge,
        "group": decision.group,
        "rule": decision.rule,
        "reason": decision.reason,
        "tags": list(decision.tags),
    }


class JournalFormatter(logging.Formatter):
    """`<N>message` with syslog levels, which journald reads as the priority."""

    PRIORITIES: ClassVar[dict[str, int]] = {
        "DEBUG": 7,
        "INFO": 6,
        "WARNING": 4,
        "ERROR": 3,
        "CRITICAL": 2,
    }

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITIES.get(record.levelname, 6)}>{super().format(record)}"


def configure_daemon_logging(debug: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for handler in root.handlers:
        if sys.stderr.isatty():
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        else:
            handler.setFormatter(JournalFormatter("%(message)s"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit 0 on success, 1 on an error (one line per problem), 2 on bad usage."""
    logging.basicConfig(format="ksmpolicy: %(levelname)s: %(message)s", level=logging.WARNING)
    options = Options()
    try:
        cli.main(args=argv, prog_name="ksmpolicy", obj=options, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("Aborted.", err=True)
        return 1
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except PolicyError as exc:  # already FILE:LINE: key: message, one problem per line
        if options.debug:
            traceback.print_exc()
        click.echo(str(exc), err=True)
        return 1
    except KsmPolicyError as exc:
        if options.debug:
            traceback.print_exc()
        click.echo(f"ksmpolicy: error: {exc}", err=True)
        return 1
    except Exception as exc:  # a bug: say so in one line, the traceback with --debug
        if options.debug:
            traceback.print_exc()
        click.echo(
            f"ksmpolicy: internal error: {type(exc).__name__}: {exc} (run with --debug)", err=True
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
