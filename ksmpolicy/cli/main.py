"""The `ksmpolicy` command line: the group, its global options, and the exit status.

Each command family lives in its own module (policy, status, daemon, libvirt, proxmox); this
one only wires them together and turns errors into one line and an exit status.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Sequence

import click

from ksmpolicy import __version__
from ksmpolicy.cli import daemon, libvirt, pages, placement, policy, proxmox, run, status
from ksmpolicy.cli.common import Options
from ksmpolicy.errors import KsmPolicyError, PolicyError
from ksmpolicy.quoting import one_line, printable

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


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


for command in (
    policy.check,
    policy.explain,
    status.status,
    status.metrics,
    pages.pages,
    pages.estimate,
    pages.audit,
    status.doctor,
    status.fleet,
    placement.sketch,
    placement.index_,
    placement.place,
    placement.rebalance,
    daemon.daemon,
    daemon.reconcile,
    daemon.notify,
    run.exec_,
    run.systemd_dropin,
    libvirt.xml,
    libvirt.hook,
    libvirt.install,
    libvirt.uninstall,
    libvirt.apply,
    libvirt.enforce,
    libvirt.restore,
    libvirt.tag,
    proxmox.proxmox,
):
    cli.add_command(command)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit 0 on success, 1 on an error (one line per problem), 2 on bad usage."""
    logging.basicConfig(format="ksmpolicy: %(levelname)s: %(message)s", level=logging.WARNING)
    options = Options()
    try:
        cli.main(args=argv, prog_name="ksmpolicy", obj=options, standalone_mode=False)
    except (Exception, SystemExit) as exc:
        return _failed(exc, options.debug)
    return 0


def _failed(exc: BaseException, debug: bool) -> int:
    """The exit status of a command that raised `exc`, after saying why on stderr."""
    if isinstance(exc, click.exceptions.Exit):
        return exc.exit_code
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    if isinstance(exc, click.ClickException):  # bad usage: click's own message, exit 2
        exc.show()
        return exc.exit_code
    if debug and not isinstance(exc, click.Abort):
        traceback.print_exc()
    click.echo(_failure_line(exc), err=True)
    return 1


def _failure_line(exc: BaseException) -> str:
    if isinstance(exc, click.Abort):
        return "Aborted."
    if isinstance(exc, PolicyError):  # already FILE:LINE: key: message, one problem per line
        return printable(str(exc))
    if isinstance(exc, KsmPolicyError):  # messages name VMs and paths: anyone's strings
        return printable(f"ksmpolicy: error: {exc}")
    # a bug: say so in one line, the traceback with --debug
    return one_line(f"ksmpolicy: internal error: {type(exc).__name__}: {exc} (run with --debug)")


if __name__ == "__main__":
    sys.exit(main())
