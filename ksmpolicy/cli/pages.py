"""Commands about pages: `pages` (who shares what with whom) and `estimate` (before merging)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ksmpolicy.cli.common import INTERVAL, ROOT, Options, host_paths, policy_option
from ksmpolicy.errors import KsmPolicyError


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema in the README).")
@click.option(
    "--plot",
    "plot",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE.png",
    help="Also draw the VM x VM matrix as a heatmap (needs matplotlib).",
)
@click.option(
    "--top",
    type=click.IntRange(0, 1000),
    default=10,
    show_default=True,
    help="How many of the pairs that share most to list.",
)
@ROOT
@policy_option
@click.pass_obj
def pages(options: Options, as_json: bool, plot: Path | None, top: int, root: str) -> None:
    """Who shares what with whom: exact per-VM savings and the sharing map (root).

    Walks every KSM user's page tables (/proc/PID/pagemap, /proc/kpageflags,
    /proc/kpagecount, read-only). Each KSM page mapped m times saves m - 1
    pages; each mapping is credited (m - 1)/m, so the per-VM figures add up to
    the kernel's pages_sharing. Prints them per VM, the group x group matrix of
    shared pages (zero pages apart: they merge across every group), the VM
    pairs that share most, and findings.
    """
    from ksmpolicy.report import render  # noqa: PLC0415
    from ksmpolicy.report.status import collect  # noqa: PLC0415

    policy, _error = options.load_or_error()
    status = collect(host_paths(root), policy, sample_seconds=0)
    if status.sharing is None:
        raise KsmPolicyError(f"the page map cannot be read: {status.savings_note}")
    if plot is not None:
        from ksmpolicy.report.plot import heatmap  # noqa: PLC0415

        heatmap(status.sharing, plot)
    if as_json:
        click.echo(json.dumps(render.pages_json(status.sharing), indent=2))
    else:
        click.echo(render.pages_text(status.sharing, top=top))
        if plot is not None:
            click.echo(f"\nheatmap: {plot}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema in the README).")
@INTERVAL
@click.option(
    "--limit-mib",
    type=click.FloatRange(1, None),
    metavar="MIB/S",
    help="Read guest RAM at most this fast (spare a production host).",
)
@click.option("--vm", "names", multiple=True, metavar="NAME", help="Only these VMs.")
@ROOT
@policy_option
@click.pass_obj
def estimate(
    options: Options,
    as_json: bool,
    interval: float,
    limit_mib: float | None,
    names: tuple[str, ...],
    root: str,
) -> None:
    """Predict what KSM would save, before ksmd does any work (root, read-only).

    Reads the present pages of every running VM's guest RAM (/proc/PID/mem),
    hashes each with xxh3-128, and again after --interval for pages that
    appear more than once (ksmd never merges pages that change). Prints the
    saving per VM, per group and for the host, respecting max_page_sharing;
    for VMs the policy excludes, what merging them would save and with whom;
    and suggested groups as a `groups:` section for the policy. Never runs
    ksmd and never writes a KSM knob. Big hosts take minutes: --limit-mib
    bounds the read rate.
    """
    import sys  # noqa: PLC0415

    from ksmpolicy.kernel.ksm import read_ksm  # noqa: PLC0415
    from ksmpolicy.report import render  # noqa: PLC0415
    from ksmpolicy.report.estimate import Guest  # noqa: PLC0415
    from ksmpolicy.report.estimate import estimate as predict  # noqa: PLC0415
    from ksmpolicy.report.status import collect  # noqa: PLC0415

    paths = host_paths(root)
    policy, _error = options.load_or_error()
    status = collect(paths, policy, sample_seconds=0, pagemap=False)
    guests = [
        Guest(vm.pid, vm.name, vm.group, vm.decision in ("merge", None), vm.ram_bytes, vm.start)
        for vm in status.vms
        if vm.decision != "never" and (not names or vm.name in names)
    ]
    if not guests:
        raise KsmPolicyError(
            "no running VM to read" + (f" named {', '.join(names)}" if names else "")
        )
    state = read_ksm(paths)
    cap = state.get("max_page_sharing") if state else None
    zero = state.get("use_zero_pages") if state else None
    if policy is not None:
        zero = int(policy.reconciler.use_zero_pages)  # the daemon writes it
    show = sys.stderr.isatty() and not as_json

    def progress(done: int, total: int) -> None:
        if show and total:
            sys.stderr.write(
                f"\rreading guest RAM: {100 * done / total:3.0f} % "
                f"({done / 2**30:.2f} of {total / 2**30:.2f} GiB)"
            )
            sys.stderr.flush()

    found = predict(
        paths,
        guests,
        interval=interval,
        limit_bytes_per_second=limit_mib * 2**20 if limit_mib else None,
        max_page_sharing=cap or 256,
        use_zero_pages=bool(zero),
        progress=progress,
    )
    if show:
        sys.stderr.write("\r" + " " * 60 + "\r")
    if as_json:
        click.echo(json.dumps(render.estimate_json(found), indent=2))
    else:
        click.echo(render.estimate_text(found))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema in the README).")
@ROOT
@policy_option
@click.pass_obj
def audit(options: Options, as_json: bool, root: str) -> None:
    """Check that no KSM page is mapped across trust domains (root).

    Walks the page tables of every process with mergeable memory, VMs or not,
    and every mergeable area of each (guest RAM, and the ROMs and video RAM a
    live switch leaves mergeable). Each VM counts in its policy's trust domain;
    other processes, and processes not run by root or the hypervisor's user,
    count in domain `host`. Prints the pages mapped across domains and the
    pairs of processes (pid, name, domain) behind them. For cron or
    monitoring: exit 0 when there are none, 1 when there are, 3 when the audit
    cannot be made (no page map, not root, no KSM, a policy that cannot be
    read): that is never read as either.
    """
    from ksmpolicy.report import audit as auditing  # noqa: PLC0415

    try:
        found = auditing.audit(host_paths(root), options.load())
    except (KsmPolicyError, OSError) as exc:  # no verdict: neither clean nor a violation
        reason = str(exc)
        if as_json:
            click.echo(json.dumps(auditing.cannot_audit_json(reason), indent=2))
        else:
            click.echo(auditing.cannot_audit_text(reason), err=True)
        raise SystemExit(auditing.EXIT_CANNOT_AUDIT) from None
    if as_json:
        click.echo(json.dumps(auditing.audit_json(found), indent=2))
    else:
        click.echo(auditing.audit_text(found))
    raise SystemExit(auditing.EXIT_CLEAN if found.ok else auditing.EXIT_VIOLATION)
