"""What both hooks share: loading the policy, one line to stderr and syslog, and the
own-failure path that the enforcement mode asks for.

The libvirt hook (`ksmpolicy.libvirt.hook`) and the Proxmox hookscript
(`ksmpolicy.proxmox.hook`) run on every VM start. Their own failures (an unreadable policy,
input they cannot parse, a bug) never stop a VM unless the policy says `enforcement: block`.
Only `os` is imported at module level; the rest is imported when needed.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from typing import IO

    from ksmpolicy.policy.model import Policy


def load_policy(path: str, cache_dir: str, who: str, err: IO[str]) -> Policy | None:
    """The policy for a hook, from the compiled cache when the file is unchanged; None (with
    one line reported) when it cannot be used."""
    from ksmpolicy.errors import KsmPolicyError  # noqa: PLC0415
    from ksmpolicy.policy.load import load_policy as load  # noqa: PLC0415

    try:
        return load(path, cache_dir=cache_dir)
    except KsmPolicyError as exc:
        first = str(exc).splitlines()[0]
        report(err, f"ksmpolicy: policy not usable, {who} not checked: {first}", "err")
        return None


def unusable_policy_status(path: str) -> int:
    """The exit status when the policy cannot be used: 1 only if it asks for `block`."""
    return 1 if says_block(path) else 0


def own_failure(message: str, policy: Policy, err: IO[str]) -> int:
    """A fault of the hook's own: block only under `enforcement: block`, else warn."""
    from ksmpolicy.policy.model import Enforcement  # noqa: PLC0415

    block = policy.enforcement is Enforcement.BLOCK
    report(err, f"ksmpolicy: {message}", "err" if block else "warning")
    return 1 if block else 0


def quote(name: str) -> str:
    """A VM name on one line, in double quotes, with quotes, backslashes and control
    characters escaped (json's rules, without importing json)."""
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if c >= " " and c != "\x7f" else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'


def report(err: IO[str], message: str, level: str) -> None:
    """One line to stderr (libvirt and Proxmox show it) and to syslog as `ksmpolicy-hook`."""
    line = message.replace("\n", " ")
    print(line, file=err, flush=True)
    try:
        import syslog  # noqa: PLC0415

        priority = syslog.LOG_ERR if level == "err" else syslog.LOG_WARNING
        syslog.openlog("ksmpolicy-hook", syslog.LOG_PID, syslog.LOG_DAEMON)
        syslog.syslog(priority, line)
        syslog.closelog()
    except OSError:
        pass


def says_block(path: str) -> bool:
    """Best effort for an unusable policy: does its text ask for `enforcement: block`?"""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:  # noqa: PTH123
            text = handle.read(1024 * 1024)
    except OSError:
        return False
    return any(
        line.split("#", 1)[0].replace(" ", "").replace("\t", "")
        in ("enforcement:block", "enforcement:'block'", 'enforcement:"block"')
        for line in text.splitlines()
        if not line.startswith((" ", "\t"))
    )


def run_dir(override: str | None) -> str:
    from ksmpolicy.paths import RUN_DIR  # noqa: PLC0415

    return override or RUN_DIR


def notify_socket(override_run_dir: str | None) -> str:
    from ksmpolicy.paths import NOTIFY_SOCKET  # noqa: PLC0415

    return os.path.join(run_dir(override_run_dir), NOTIFY_SOCKET)  # noqa: PTH118
