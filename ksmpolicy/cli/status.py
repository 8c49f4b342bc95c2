"""Commands that report: `status`, `metrics` and `doctor`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ksmpolicy.cli.common import ROOT, RUN_DIR, Options, host_paths, policy_option
from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.policy.model import Policy
from ksmpolicy.quoting import one_line


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema in the README).")
@click.option(
    "--sample",
    type=click.FloatRange(0, 10),
    default=0.2,
    show_default=True,
    metavar="SECONDS",
    help="Measure ksmd's CPU share over this long (0: don't).",
)
@click.option(
    "--no-pagemap",
    is_flag=True,
    help="Don't walk the page map: faster on big hosts; SAVED then comes from ksm_stat.",
)
@ROOT
@RUN_DIR
@policy_option
@click.pass_obj
def status(
    options: Options,
    as_json: bool,
    sample: float,
    no_pagemap: bool,
    root: str,
    run_dir: str | None,
) -> None:
    """What KSM saves, for which VM, at what CPU cost (read-only).

    The host (KSM running, who controls it, knobs, memory saved, ksmd CPU), a
    row per running VM (group, decision and rule, whether its running state
    complies, mergeable and merged MiB, profit), totals per group, and findings
    with what to do, and what the hook said at each VM's start (libvirt shows a
    hook's output only when it refuses a start). Works without a policy (no
    decisions then). As root it walks the page map for exact per-VM savings
    (SAVED), which add up to what KSM saves; otherwise SAVED comes from ksm_stat
    and says so.
    """
    from ksmpolicy.report import render  # noqa: PLC0415
    from ksmpolicy.report.status import collect  # noqa: PLC0415

    policy, error = options.load_or_error()
    collected = collect(
        host_paths(root, run_dir),
        policy,
        sample_seconds=sample,
        policy_error=error,
        pagemap=not no_pagemap,
    )
    if as_json:
        click.echo(json.dumps(render.as_json(collected), indent=2))
    else:
        click.echo(render.text(collected))


@click.command()
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
    if every is not None and not textfile:
        raise click.UsageError("--every rewrites a --textfile: give --textfile PATH too")
    from ksmpolicy.report import metrics as exposition  # noqa: PLC0415

    def policy() -> Policy | None:
        return options.load_or_error()[0]

    collector = exposition.StatusCollector(host_paths(root), policy)
    if listen and textfile:
        raise click.UsageError("--listen and --textfile exclude each other")
    if listen:
        try:
            url = exposition.serve(collector, listen)
        except (ValueError, OSError) as exc:
            raise KsmPolicyError(f"cannot listen on {listen}: {exc}") from None
        click.echo(f"serving metrics on {url}", err=True)
        exposition.every(3600, lambda: None)
    elif textfile:

        def write() -> None:
            exposition.write_textfile(collector, textfile)

        if every:
            exposition.every(every, write)
        write()
    else:
        click.echo(exposition.exposition(collector), nl=False)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON: a list of checks.")
@ROOT
@RUN_DIR
@policy_option
@click.pass_obj
def doctor(options: Options, as_json: bool, root: str, run_dir: str | None) -> None:
    """Is this host set up right, and why is each VM merging or not?

    The host: KSM and this kernel's features, other controllers of the knobs
    (ksmtuned, qemu-kvm's KSM_ENABLED, the kernel advisor, another daemon), the
    policy and its trust, the libvirt hook (and whether the running libvirt has
    read it), Proxmox hookscripts, the daemon (alive, notify socket), THP. Each
    VM: why it is or is not merging (hugepages, shared memory, mem-merge=off, RAM
    not mergeable, ksmd stopped, confidential memory, sparse mergeable areas,
    drift from the policy). Every line that is not fine says the fix. Exit 1
    when anything fails.
    """
    from ksmpolicy.report.doctor import diagnose  # noqa: PLC0415

    policy, error = options.load_or_error()
    diagnosis = diagnose(host_paths(root, run_dir), policy, options.policy_path(), error)
    if as_json:
        checks = [
            {"level": c.level, "subject": c.subject, "what": c.what, "fix": c.fix}
            for c in diagnosis.checks
        ]
        click.echo(json.dumps({"ok": not diagnosis.failed, "checks": checks}, indent=2))
    else:
        width = max((len(c.subject) for c in diagnosis.checks), default=4)
        for check in diagnosis.checks:
            subject = one_line(check.subject)
            click.echo(one_line(f"{check.level.upper():<5} {subject:<{width}}  {check.what}"))
            if check.fix and check.level != "ok":
                click.echo(one_line(f"{'':<5} {'':<{width}}  fix: {check.fix}"))
    if diagnosis.failed:
        raise SystemExit(1)


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
def fleet(files: tuple[Path, ...], as_json: bool) -> None:
    """One table over many hosts, from each host's `ksmpolicy status --json`.

    Gather the files as you reach your hosts (ssh, Ansible, cron); each host is
    named by the JSON's hostname. Hosts are listed most saved first, with ksmd's
    CPU, their VMs, whether KSM runs (or the daemon is passive), and below, every
    error and warning that needs an operator with its fix. Exit 1 when a host has
    an error finding.
    """
    from ksmpolicy.report import render  # noqa: PLC0415
    from ksmpolicy.report.fleet import fleet as gather  # noqa: PLC0415

    rows = gather(files)
    if as_json:
        click.echo(json.dumps(render.fleet_json(rows), indent=2))
    else:
        click.echo(render.fleet_text(rows))
    if any(r.errors for r in rows):
        raise SystemExit(1)
