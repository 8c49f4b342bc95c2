"""`ksmpolicy exec` and `systemd-dropin`: any program (a VMM, a service) with KSM as the policy
decides."""

from __future__ import annotations

import os

import click

from ksmpolicy.cli.common import RUN_DIR, Options, host_paths, policy_option
from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.paths import SYSTEMD_SYSTEM_DIR
from ksmpolicy.quoting import one_line, shell_word


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
    from ksmpolicy.kernel.prctl import memory_merge, set_memory_merge  # noqa: PLC0415
    from ksmpolicy.policy.decide import Decider, VmFacts  # noqa: PLC0415
    from ksmpolicy.runtime.notify import send  # noqa: PLC0415

    policy = options.load()
    who = name or os.path.basename(command[0])  # noqa: PTH119
    decision = Decider(policy).decide(VmFacts(name=who, tags=frozenset(tags)))
    merge = decision.merge and not policy.uses_domains
    if merge:
        set_memory_merge(True)
        if not quiet:
            click.echo(one_line(f"ksmpolicy: {who}: mergeable ({decision.reason})"), err=True)
        send(host_paths("/", run_dir), "started", who)  # the daemon sprints for it
    else:
        why = decision.reason if not decision.merge else "trust domains: only the daemon merges"
        if memory_merge():  # inherited from whoever started us
            set_memory_merge(False)
        click.echo(one_line(f"ksmpolicy: {who}: not mergeable ({why})"), err=True)
    try:
        os.execvp(command[0], list(command))
    except OSError as exc:
        raise click.ClickException(f"cannot run {command[0]}: {exc.strerror}") from None


MEMORY_KSM_SINCE = 254  # systemd's MemoryKSM= (prctl PR_SET_MEMORY_MERGE for the service)
DROPIN_NAME = "50-ksmpolicy.conf"


@click.command("systemd-dropin")
@click.argument("unit")
@click.option("--tag", "-t", "tags", multiple=True, metavar="TAG", help="A tag it carries.")
@click.option("--print", "print_only", is_flag=True, help="Print the drop-in; write nothing.")
@click.option(
    "--dir",
    "directory",
    default=SYSTEMD_SYSTEM_DIR,
    show_default=True,
    metavar="DIR",
    help="Where unit drop-ins go.",
)
@click.option(
    "--systemd-version",
    type=int,
    metavar="N",
    help="Write for this systemd version (default: the installed one, from systemctl).",
)
@policy_option
@click.pass_obj
def systemd_dropin(
    options: Options,
    unit: str,
    tags: tuple[str, ...],
    print_only: bool,
    directory: str,
    systemd_version: int | None,
) -> None:
    """Write a drop-in that gives a systemd service MemoryKSM= as the policy decides.

    \b
    ksmpolicy systemd-dropin jenkins.service --tag ci
    systemctl daemon-reload && systemctl restart jenkins.service

    The policy decides for the unit's name (without `.service`) and TAGs; the
    drop-in (UNIT.d/50-ksmpolicy.conf) says MemoryKSM=yes or no. MemoryKSM=
    came with systemd 254: on an older one this refuses and says which version
    it found (use `ksmpolicy exec` in ExecStart= there).
    """
    from ksmpolicy.files import write_atomic  # noqa: PLC0415
    from ksmpolicy.policy.decide import Decider, VmFacts  # noqa: PLC0415

    if not valid_unit_name(unit):
        raise click.BadParameter(
            f"{unit!r} is not a unit name (letters, digits and :-_.\\@, as systemd allows)",
            param_hint="UNIT",
        )
    full = unit if "." in unit else f"{unit}.service"
    version = systemd_version if systemd_version is not None else installed_systemd()
    if version < MEMORY_KSM_SINCE:
        raise KsmPolicyError(
            f"systemd {version} has no MemoryKSM= (it came with systemd {MEMORY_KSM_SINCE}): "
            f"start the service through `ksmpolicy exec --name {full.rsplit('.', 1)[0]} -- ...` "
            "in its ExecStart= instead"
        )
    policy = options.load()
    name = full.rsplit(".", 1)[0]
    decision = Decider(policy).decide(VmFacts(name=name, tags=frozenset(tags)))
    merge = decision.merge and not policy.uses_domains
    text = (
        f"# Written by `ksmpolicy systemd-dropin {full}`: {decision.reason}.\n"
        "[Service]\n"
        f"MemoryKSM={'yes' if merge else 'no'}\n"
    )
    if print_only:
        click.echo(text, nl=False)
        return
    path = os.path.join(directory, f"{full}.d", DROPIN_NAME)  # noqa: PTH118
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)  # noqa: PTH103, PTH120
        write_atomic(path, text.encode(), 0o644)
    except OSError as exc:
        raise KsmPolicyError(f"cannot write {path}: {exc.strerror or exc}") from None
    click.echo(f"{path}: MemoryKSM={'yes' if merge else 'no'}")
    click.echo(f"then: systemctl daemon-reload && systemctl restart {shell_word(full)}")


_UNIT_CHARACTERS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:-_.\\@"
)


def valid_unit_name(unit: str) -> bool:
    """A name systemd accepts for a unit: its characters, at most 255 of them, no leading dot."""
    return 0 < len(unit) <= 255 and not unit.startswith(".") and set(unit) <= _UNIT_CHARACTERS


def installed_systemd() -> int:
    """The installed systemd's version, from `systemctl --version` ("systemd 252 (...)")."""
    import subprocess  # noqa: PLC0415

    try:
        first = subprocess.run(
            ["systemctl", "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.split("\n", 1)[0]
        return int(first.split()[1])
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        raise KsmPolicyError(
            "cannot tell the systemd version (systemctl --version): give --systemd-version"
        ) from None
