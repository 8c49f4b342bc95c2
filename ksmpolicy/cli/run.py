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
    ksmpolicy exec --tag tenant-a -- firecracker --id fc-42 --api-sock /run/fc-42.sock
    ksmpolicy exec -n build-runner -- java -jar runner.jar

    Decides for what COMMAND will be once it runs, as status and the daemon
    will see it: its kind (qemu, firecracker, cloud-hypervisor, crosvm, kata;
    service inside a systemd service, else process), the name it gives itself
    (Firecracker's --id, QEMU's -name; NAME may only repeat it), else NAME,
    else its service's or its program's name, and TAGs. A COMMAND that cannot
    be run fails first (exit 127, or 126 when not executable), before anything
    is decided or announced. When the decision is merge it calls
    prctl(PR_SET_MEMORY_MERGE) (Linux 6.4+, CAP_SYS_RESOURCE), tells the
    daemon, and execs COMMAND, which keeps the flag and passes it to its
    children. Excluded, or under trust domains (only the daemon may switch
    merging, and no one can switch a running process's flag), it execs without
    merging and says so.
    """
    import errno  # noqa: PLC0415

    from ksmpolicy.kernel.prctl import memory_merge, set_memory_merge  # noqa: PLC0415
    from ksmpolicy.kernel.scan import systemd_unit  # noqa: PLC0415
    from ksmpolicy.platforms.process import command_facts  # noqa: PLC0415
    from ksmpolicy.policy.decide import Decider  # noqa: PLC0415
    from ksmpolicy.runtime.notify import send  # noqa: PLC0415

    executable = resolve_program(command[0])
    paths = host_paths("/", run_dir)
    facts = command_facts(
        command,
        executable,
        unit=systemd_unit(paths.proc / "self"),
        name=name,
        tags=frozenset(tags),
    )
    policy = options.load()
    decision = Decider(policy).decide(facts)
    merge = decision.merge and not policy.uses_domains
    who = f"{facts.name} ({facts.kind})" if facts.kind != "process" else facts.name
    if merge:
        set_memory_merge(True)
        if not quiet:
            click.echo(one_line(f"ksmpolicy: {who}: mergeable ({decision.reason})"), err=True)
        send(paths, "started", facts.name)  # the daemon sprints for it
    else:
        why = decision.reason if not decision.merge else "trust domains: only the daemon merges"
        if memory_merge():  # inherited from whoever started us
            set_memory_merge(False)
        click.echo(one_line(f"ksmpolicy: {who}: not mergeable ({why})"), err=True)
    try:
        os.execv(executable, list(command))
    except OSError as exc:
        missing = exc.errno == errno.ENOENT  # e.g. a script's interpreter
        raise (NotFound if missing else CannotRun)(command[0], exc.strerror or str(exc)) from None


class CannotRun(click.ClickException):
    """A command that is there but cannot be run: exit 126, as a shell's."""

    exit_code = 126

    def __init__(self, program: str, why: str) -> None:
        super().__init__(one_line(f"cannot run {program}: {why}"))


class NotFound(CannotRun):
    """A command that is not there: exit 127, as a shell's."""

    exit_code = 127


def resolve_program(program: str) -> str:
    """The file `program` will be exec'd from, as execvp finds it (PATH when it has no `/`);
    CannotRun when there is none or it is not executable."""
    import shutil  # noqa: PLC0415

    if "/" not in program:
        found = shutil.which(program)
        if found is None:
            raise NotFound(program, "command not found (not in PATH)")
        return found
    if not os.path.exists(program):  # noqa: PTH110
        raise NotFound(program, "No such file or directory")
    if os.path.isdir(program) or not os.access(program, os.X_OK):  # noqa: PTH112
        raise CannotRun(program, "not an executable file")
    return program


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

    The policy decides for the service as the process scan will see its
    processes: kind `service`, the unit (for `units:` rules), its name without
    `.service`, and TAGs; the drop-in (UNIT.d/50-ksmpolicy.conf) says
    MemoryKSM=yes or no. Only .service units take it. MemoryKSM=
    came with systemd 254: on an older one this refuses and says which version
    it found (use `ksmpolicy exec` in ExecStart= there).
    """
    from ksmpolicy.files import write_atomic  # noqa: PLC0415
    from ksmpolicy.platforms.process import service_facts  # noqa: PLC0415
    from ksmpolicy.policy.decide import Decider  # noqa: PLC0415

    if not valid_unit_name(unit):
        raise click.BadParameter(
            f"{unit!r} is not a unit name (letters, digits and :-_.\\@, as systemd allows)",
            param_hint="UNIT",
        )
    full = unit if "." in unit else f"{unit}.service"
    if not full.endswith(".service"):
        raise click.BadParameter(
            f"{unit!r} is no service: MemoryKSM= goes in a .service unit's [Service] section",
            param_hint="UNIT",
        )
    version = systemd_version if systemd_version is not None else installed_systemd()
    if version < MEMORY_KSM_SINCE:
        raise KsmPolicyError(
            f"systemd {version} has no MemoryKSM= (it came with systemd {MEMORY_KSM_SINCE}): "
            f"start the service through `ksmpolicy exec --name {full.rsplit('.', 1)[0]} -- ...` "
            "in its ExecStart= instead"
        )
    policy = options.load()
    decision = Decider(policy).decide(service_facts(full, frozenset(tags)))
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
