"""What both hooks share: loading the policy, the deadline, one line to stderr and syslog, and
the own-failure path that the enforcement mode asks for.

The libvirt hook (`ksmpolicy.libvirt.hook`) and the Proxmox hookscript
(`ksmpolicy.proxmox.hook`) run on every VM start. Their own failures (an unreadable policy,
input they cannot parse, a bug, a deadline passed) never stop a VM unless the policy says
`enforcement: block`. The rules:

* **Deadline.** The work runs against `DEADLINE_SECONDS` (5 s; `KSMPOLICY_HOOK_DEADLINE`
  changes it). A disk on a hung NFS mount, a FIFO or a slow pmxcfs cannot hold a start longer;
  when the deadline passes the hook takes the own-failure path with the enforcement of the
  policy it had loaded, else of the last good one, else warns.
* **Last good policy.** Every policy a hook loads successfully is kept compiled in the
  root-only runtime directory. When the file later cannot be used (deleted, swapped for one
  others could write, broken), the hook keeps enforcing that last good policy and says so in
  one line on every start, so removing or breaking the file never switches enforcement off
  silently. `ksmpolicy check` shows why the file is refused.
* **No policy ever.** With no file and no last good policy, a broken file decides alone: the
  start is refused only if the file asks for `block` in a spelling the validator accepts.

Only `os` is imported at module level; the rest is imported when needed.
"""

from __future__ import annotations

import os

from ksmpolicy.quoting import fix_command, quote

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import IO

    from ksmpolicy.policy.model import Policy

DEADLINE_SECONDS = 5.0
__all__ = ["Session", "fix_command", "quote", "report", "run", "says_block"]


def deadline_seconds() -> float:
    try:
        value = float(os.environ.get("KSMPOLICY_HOOK_DEADLINE", DEADLINE_SECONDS))
    except ValueError:
        return DEADLINE_SECONDS
    return value if 0 < value <= 600 else DEADLINE_SECONDS


class Session:
    """One hook run: what it will say, and the policy it acts on.

    The work runs on a worker thread (see `run`); it only appends to `lines` and sets `stdout`,
    and the caller's thread writes them out, so nothing is half-written when a deadline passes.
    """

    def __init__(self, who: str, policy_path: str, cache_dir: str) -> None:
        self.who = who
        self.policy_path = policy_path
        self.cache_dir = cache_dir
        self.lines: list[tuple[str, str]] = []
        self.stdout: str | None = None
        self.policy: Policy | None = None
        self.timed_out = False

    def report(self, message: str, level: str) -> None:
        self.lines.append((message, level))

    def load_policy(self) -> Policy | None:
        """The policy, from the compiled cache while the file is unchanged; the last good one
        when the file cannot be used; None (with one line) when there is neither."""
        from ksmpolicy.errors import KsmPolicyError  # noqa: PLC0415
        from ksmpolicy.policy.load import load_last_good, load_policy  # noqa: PLC0415

        try:
            self.policy = load_policy(self.policy_path, cache_dir=self.cache_dir)
            return self.policy
        except KsmPolicyError as exc:
            first = str(exc).splitlines()[0]
        last = load_last_good(self.policy_path, self.cache_dir)
        if last is not None:
            self.report(
                f"ksmpolicy: policy not usable: {first}; {self.who} is checked against the "
                "last good policy compiled from that file (fix the file, or run "
                "`ksmpolicy check` to see why)",
                "err",
            )
            self.policy = last
            return last
        self.report(f"ksmpolicy: policy not usable, {self.who} not checked: {first}", "err")
        return None

    def unusable_policy_status(self) -> int:
        """The exit status when no policy can be used: 1 only if the file asks for `block`."""
        return 1 if says_block(self.policy_path) else 0

    def own_failure(self, message: str) -> int:
        """A fault of the hook's own: block only under `enforcement: block`, else warn."""
        block = _blocks(self.policy)
        self.report(f"ksmpolicy: {message}", "err" if block else "warning")
        return 1 if block else 0


def run(session: Session, work: Callable[[], int], out: IO[str], err: IO[str]) -> int:
    """Run `work` against the deadline and write out what the session collected.

    After a deadline the worker may still be blocked in the kernel; the caller must then end
    the process without waiting for it (`session.timed_out`; `ksmpolicy.hook.main` does).
    """
    from ksmpolicy.deadline import DeadlineExceeded, call_with_deadline  # noqa: PLC0415

    seconds = deadline_seconds()
    try:
        status = call_with_deadline(work, seconds, f"checking {session.who}")
    except DeadlineExceeded:
        session.timed_out = True
        policy = session.policy or _last_good(session)
        block = _blocks(policy)
        lines = list(session.lines)
        lines.append(
            (
                f"ksmpolicy: {session.who} not checked within {seconds:g} s (a disk or the policy "
                "on a slow or hung filesystem, or a FIFO?): "
                + ("refusing the start (enforcement: block)" if block else "starting it anyway"),
                "err" if block else "warning",
            )
        )
        for message, level in lines:
            report(err, message, level)
        return 1 if block else 0
    except Exception as exc:  # a bug in the hook: never a traceback, never a block unless asked
        status = session.own_failure(
            f"internal error on {session.who}: {type(exc).__name__}: {exc}"
        )
    for message, level in session.lines:
        report(err, message, level)
    if session.stdout is not None:
        out.write(session.stdout)
        out.flush()
    return status


def _blocks(policy: Policy | None) -> bool:
    from ksmpolicy.policy.model import Enforcement  # noqa: PLC0415

    return policy is not None and policy.enforcement is Enforcement.BLOCK


def _last_good(session: Session) -> Policy | None:
    from ksmpolicy.policy.load import load_last_good  # noqa: PLC0415

    return load_last_good(session.policy_path, session.cache_dir)


def report(err: IO[str], message: str, level: str) -> None:
    """One line to stderr (libvirt and Proxmox show it) and to syslog as `ksmpolicy-hook`."""
    line = message.replace("\n", " ")
    print(line, file=err, flush=True)
    try:
        import syslog  # noqa: PLC0415

        priority = {"err": syslog.LOG_ERR, "info": syslog.LOG_INFO}.get(level, syslog.LOG_WARNING)
        syslog.openlog("ksmpolicy-hook", syslog.LOG_PID, syslog.LOG_DAEMON)
        syslog.syslog(priority, line)
        syslog.closelog()
    except OSError:
        pass


def says_block(path: str) -> bool:
    """Best effort for an unusable policy: does its text ask for `enforcement: block`, in any
    spelling the validator accepts? Reads a regular file only, and never blocks on it."""
    from ksmpolicy.files import read_regular  # noqa: PLC0415
    from ksmpolicy.policy.load import MAX_POLICY_BYTES  # noqa: PLC0415

    try:
        data = read_regular(path, MAX_POLICY_BYTES)
    except OSError:
        return False
    from ksmpolicy.policy.model import Enforcement  # noqa: PLC0415
    from ksmpolicy.policy.validate import enforcement_in  # noqa: PLC0415

    return enforcement_in(data.decode("utf-8", "replace")) is Enforcement.BLOCK


def run_dir(override: str | None) -> str:
    from ksmpolicy.paths import RUN_DIR  # noqa: PLC0415

    return override or RUN_DIR


def notify_socket(override_run_dir: str | None) -> str:
    from ksmpolicy.paths import NOTIFY_SOCKET  # noqa: PLC0415

    return os.path.join(run_dir(override_run_dir), NOTIFY_SOCKET)  # noqa: PTH118
