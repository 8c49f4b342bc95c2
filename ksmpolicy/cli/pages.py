"""Commands about pages: `pages` (who shares what with whom) and `estimate` (before merging)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ksmpolicy.cli.common import ROOT, Options, host_paths, policy_option
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
