"""`ksmpolicy exec`: start any program (a VMM, a service) with KSM as the policy decides."""

from __future__ import annotations

import os

import click

from ksmpolicy.cli.common import RUN_DIR, Options, host_paths, policy_option


@click.command("exec", context_settings={"ignore_unknown_options": True})
@click.option("--name", "-n", metavar="NAME", help="The name the policy knows it by.")
@click.option("--tag", "-t", "tags", multiple=True, metavar="TAG", help="A tag it carries.")
@click.option("--quiet", "-q", is_flag=True, help="Say nothing when the decision is to merge.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@RUN_DIR
@policy_option
@click.pass_obj
def exec_(
    options: Options,
    name: str | None,
    tags: tuple[str, ...],
    quiet: bool,
    command: tuple[str, ...],
    run_dir: str | None,
) -> None:
    """Run COMMAND with its memory mergeable if the policy says merge.

    \b
    ksmpolicy exec --name fc-42 --tag tenant-a -- firecracker --api-sock /run/fc-42.sock
    ksmpolicy exec -n build-runner -- java -jar runner.jar

    Decides for NAME (default: the command's name) and TAGs, calls
    prctl(PR_SET_MEMORY_MERGE) (Linux 6.4+, CAP_SYS_RESOURCE) when the decision
    is merge, tells the daemon, and execs COMMAND, which keeps the flag and
    passes it to its children. Excluded, or under trust domains (only the daemon
    may switch merging, and no one can switch a running process's flag), it
    execs without merging and says so.
    """
    from ksmpolicy.control.notify import send  # noqa: PLC0415
    from ksmpolicy.kernel.prctl import memory_merge, set_memory_merge  # noqa: PLC0415
    from ksmpolicy.policy.decide import Decider, VmFacts  # noqa: PLC0415

    policy = options.load()
    who = name or os.path.basename(command[0])  # noqa: PTH119
    decision = Decider(policy).decide(VmFacts(name=who, tags=frozenset(tags)))
    merge = decision.merge and not policy.uses_domains
    if merge:
        set_memory_merge(True)
        if not quiet:
            click.echo(f"ksmpolicy: {who}: mergeable ({decision.reason})", err=True)
        send(host_paths("/", run_dir), "started", who)  # the daemon sprints for it
    else:
        why = decision.reason if not decision.merge else "trust domains: only the daemon merges"
        if memory_merge():  # inherited from whoever started us
            set_memory_merge(False)
        click.echo(f"ksmpolicy: {who}: not mergeable ({why})", err=True)
    try:
        os.execvp(command[0], list(command))
    except OSError as exc:
        raise click.ClickException(f"cannot run {command[0]}: {exc.strerror}") from None
