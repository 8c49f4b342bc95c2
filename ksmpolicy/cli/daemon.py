"""Commands of the reconciler: `daemon`, `reconcile --once`, and `notify`."""

from __future__ import annotations

import json
import time

import click

from ksmpolicy.cli.common import CONNECT, ROOT, RUN_DIR, Options, host_paths, policy_option


@click.command()
@click.option("--restore-on-exit", is_flag=True, help="Put back the KSM knobs found at start.")
@click.option("--dry-run", is_flag=True, help="Plan and log, but write no knob.")
@ROOT
@RUN_DIR
@click.option("--state-dir", metavar="DIR", hidden=True, help="Backup directory (for tests).")
@CONNECT
@click.option("--no-libvirt", is_flag=True, help="Do not watch libvirt events.")
@click.option("--metrics", metavar="[HOST:]PORT", help="Also serve Prometheus /metrics.")
@click.option(
    "--sketch-every",
    type=click.FloatRange(0, None),
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="With --metrics and a fleet key: serve the host's sketch at /sketch, taken again this "
    "often (0: no /sketch). Whoever reaches the metrics address can read it.",
)
@click.option(
    "--no-process-events",
    is_flag=True,
    help="Find new VMs by polling only (not the kernel's process events).",
)
@click.option(
    "--take-over",
    is_flag=True,
    help="When ksmtuned runs: stop it (SIGTERM); when the kernel advisor was left on: set "
    "advisor_mode=none. Without it the daemon stays passive while they run.",
)
@policy_option
@click.pass_obj
def daemon(  # noqa: PLR0913 - one parameter per option of the command
    options: Options,
    restore_on_exit: bool,
    dry_run: bool,
    root: str,
    run_dir: str | None,
    state_dir: str | None,
    uri: str | None,
    no_libvirt: bool,
    metrics: str | None,
    sketch_every: float,
    no_process_events: bool,
    take_over: bool,
) -> None:
    """Run the reconciler in the foreground (replaces ksmtuned).

    Sizes ksmd's work to the mergeable memory of running VMs, memory pressure and
    the CPU budget in the policy's `reconciler:` section; retunes at once when a
    hook reports a VM start or stop. Logs to stderr (journald-friendly), speaks
    systemd's notify protocol, reloads the policy on SIGHUP and exits on SIGTERM.

    Where libvirt is available it also watches domain events: a new or changed
    definition is rewritten for the policy (unless enforcement is off), and a
    started domain's merging is switched live (when the policy says `live`).

    As root it subscribes to the kernel's process events: a VMM (or a process
    exec'd mergeable) is seen when it execs, and the pace sprints at once.

    It never fights another controller of the KSM knobs (ksmtuned, another
    daemon, a kernel advisor someone left on): it logs the fix once and writes
    nothing until that controller is gone, unless --take-over.
    """
    from ksmpolicy.control.daemon import Daemon, DaemonOptions  # noqa: PLC0415 - keeps `check` light
    from ksmpolicy.control.journal import configure_daemon_logging  # noqa: PLC0415

    configure_daemon_logging(options.debug)
    Daemon(
        host_paths(root, run_dir, state_dir),
        options.policy_path(),
        DaemonOptions(
            restore_on_exit=restore_on_exit,
            dry_run=dry_run,
            libvirt_uri=uri,
            use_libvirt=not no_libvirt,
            metrics=metrics,
            sketch_every=sketch_every or None,
            policy_explicit=options.explicit,
            take_over=take_over,
            use_events=not no_process_events,
        ),
    ).run()


@click.command()
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
@click.option(
    "--force", is_flag=True, help="Write even when a daemon or ksmtuned controls the knobs."
)
@ROOT
@policy_option
@click.pass_obj
def reconcile(
    options: Options,
    once: bool,
    dry_run: bool,
    as_json: bool,
    sample: float,
    force: bool,
    root: str,
) -> None:
    """Plan ksmd's pace once, print it with the reason, and write it.

    With --dry-run nothing is written. A single pass has no history: it cannot
    know that a VM just started, so it plans the calm pace (or pressure) for
    the memory there is, from ksmd's own counters, and never a sprint that no
    later pass would end. When a daemon (or ksmtuned) controls the knobs it
    writes nothing unless --force.
    """
    from ksmpolicy.control.daemon import Reconciler  # noqa: PLC0415
    from ksmpolicy.kernel.controllers import other_controllers  # noqa: PLC0415

    paths = host_paths(root)
    reconciler = Reconciler(paths, options.load(), dry_run=True)
    reconciler.seed()
    if sample > 0:
        time.sleep(sample)
    result = reconciler.step()
    controllers = [  # every daemon counts here: this pass is none of them
        f"{c.name} ({c.detail})" for c in other_controllers(paths, advisor_wanted=True) if c.running
    ]
    if controllers and not dry_run and not force:
        click.echo(
            f"ksmpolicy: {', '.join(controllers)} controls the KSM knobs: nothing written "
            "(--force writes anyway; the controller will set its own again)",
            err=True,
        )
        dry_run = True
    written = [] if dry_run else reconciler.knobs.apply(result.knobs)
    processes = reconciler.observer.processes
    footprint = sum(p.mergeable_bytes for p in processes)
    if as_json:
        report = {
            "policy": reconciler.policy.source,
            "mode": result.mode,
            "reason": result.reason,
            "knobs": dict(result.knobs),
            "written": written,
            "dry_run": dry_run,
            "pages_per_second": round(result.pages_per_second),
            "footprint_bytes": footprint,
            "ksmd_cpu_percent": result.history.cpu_percent,
            "processes": [
                {"pid": p.pid, "kind": p.kind, "name": p.name, "mergeable_bytes": p.mergeable_bytes}
                for p in processes
            ],
        }
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"policy:    {reconciler.policy.source}")
    click.echo(f"mode:      {result.mode}")
    click.echo(f"reason:    {result.reason}")
    click.echo(f"footprint: {footprint / 2**20:.1f} MiB in {len(processes)} processes")
    knobs = "  ".join(f"{k}={v}" for k, v in result.knobs)
    click.echo(f"knobs:     {knobs}{' (dry run: nothing written)' if dry_run else ''}")
    if not dry_run:
        click.echo(f"written:   {', '.join(written) or 'nothing (already so)'}")


@click.command()
@click.argument(
    "event", type=click.Choice(["started", "stopped", "release", "reconnect", "changed"])
)
@click.argument("vm")
@ROOT
@RUN_DIR
def notify(event: str, vm: str, root: str, run_dir: str | None) -> None:
    """Tell the running daemon that VM had EVENT (what the hooks do).

    Never waits: when no daemon listens, the note is dropped and the exit status
    is still 0.
    """
    from ksmpolicy.runtime.notify import send  # noqa: PLC0415

    if not send(host_paths(root, run_dir), event, vm):
        click.echo("ksmpolicy: no daemon is listening; note dropped", err=True)
