"""What both hooks share: loading the policy, the deadline, one line to stderr and syslog, and
the own-failure path that the enforcement mode asks for.

The libvirt hook (`ksmpolicy.libvirt.hook`) and the Proxmox hookscript
(`ksmpolicy.proxmox.hook`) run on every VM start. Their own failures (an unreadable policy,
input they cannot parse, a bug, a deadline passed) never stop a VM unless the policy says
`enforcement: block`. The rules:

* **Deadline.** The work runs in a child process against `DEADLINE_SECONDS` (5 s;
  `KSMPOLICY_HOOK_DEADLINE` changes it). A disk on a hung NFS mount, a FIFO or a hung pmxcfs
  cannot hold a start longer (see `deadline.run_in_child` for why a child, not a thread);
  when the deadline passes the hook takes the own-failure path with the enforcement of the
  policy it had loaded, else of the last good one, else warns.
* **Last good policy.** Every policy a hook loads successfully is kept compiled in the
  root-only runtime directory. When the file later cannot be used (deleted, swapped for one
  others could write, broken), the hook keeps enforcing that last good policy and says so in
  one line on every start, so removing or breaking the file never switches enforcement off
  silently. `ksmpolicy check` shows why the file is refused.
* **No policy ever.** With no file and no last good policy, a broken file decides alone: the
  start is refused only if the file asks for `block` in a spelling the validator accepts, and
  only if no one but root could have written it (else its text is nobody's word).

Only `os` is imported at module level; the rest is imported when needed.
"""

from __future__ import annotations

import os

from ksmpolicy.quoting import fix_command, one_line, quote

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import IO

    from ksmpolicy.policy.decide import Decision
    from ksmpolicy.policy.model import Policy

DEADLINE_SECONDS = 5.0
NO_POLICY_SAID = "no-policy-said"  # in the cache dir: the hook has said there is no policy
HOOK_SAID = "hook-said"  # in the run dir: what the hook said about each VM at its last start
__all__ = ["Session", "StartCheck", "fix_command", "quote", "report", "run", "says_block"]


def deadline_seconds() -> float:
    try:
        value = float(os.environ.get("KSMPOLICY_HOOK_DEADLINE", DEADLINE_SECONDS))
    except ValueError:
        return DEADLINE_SECONDS
    return value if 0 < value <= 600 else DEADLINE_SECONDS


class Session:
    """One hook run: what it will say, and the policy it acts on.

    The work runs in a child process (see `run`): each line it reports, and the enforcement of
    the policy it loads, reach the hook at once, so that a run cut off by the deadline still
    says what it knew. The hook process writes them out.
    """

    def __init__(self, who: str, policy_path: str, cache_dir: str, vm_key: str = "") -> None:
        self.who = who
        self.vm_key = vm_key  # names the VM in the run dir's notes: libvirt's name, a VMID
        self.policy_path = policy_path
        self.cache_dir = cache_dir
        self.stdout: str | None = None
        self.policy: Policy | None = None
        self.timed_out = False
        self._send: Callable[[object], None] | None = None
        self._preface: str | None = None  # said before the next line, on the same line

    def report(self, message: str, level: str) -> None:
        if self._preface is not None:
            message = f"{self._preface} {message.removeprefix('ksmpolicy: ')}"
            level, self._preface = "err", None
        if self._send is not None:
            self._send(("line", message, level))

    def finish(self) -> None:
        """Say what is still to be said (a preface with nothing after it)."""
        if self._preface is not None:
            preface, self._preface = self._preface, None
            self.report(preface, "err")

    def load_policy(self) -> Policy | None:
        """The policy, from the compiled cache while the file is unchanged; the last good one
        when the file cannot be used; None (with one line) when there is neither."""
        from ksmpolicy.errors import KsmPolicyError  # noqa: PLC0415
        from ksmpolicy.policy.load import load_last_good, load_policy  # noqa: PLC0415

        try:
            self.policy = load_policy(self.policy_path, cache_dir=self.cache_dir)
        except KsmPolicyError as exc:
            first = str(exc).splitlines()[0]
            last = load_last_good(self.policy_path, self.cache_dir)
            if last is None:
                if not os.path.lexists(self.policy_path):
                    self._say_once_no_policy()
                    return None
                self.report(f"ksmpolicy: policy not usable, {self.who} not checked: {first}", "err")
                return None
            self._preface = (
                f"ksmpolicy: policy not usable: {first}; {self.who} is checked against the "
                "last good policy compiled from that file (fix the file, or run "
                "`ksmpolicy check` to see why)."
            )
            self.policy = last
        if self._send is not None:
            self._send(("enforcement", self.policy.enforcement.value))
        # said again if the file goes away once more; contextlib would cost the hook an import
        try:  # noqa: SIM105
            os.unlink(os.path.join(self.cache_dir, NO_POLICY_SAID))  # noqa: PTH108, PTH118
        except OSError:
            pass
        return self.policy

    def _say_once_no_policy(self) -> None:
        """No policy file and none ever compiled: enforcement is off (no VM is refused or
        rewritten). Said once, not on every start, until a policy has been used."""
        from ksmpolicy.files import make_private_dir  # noqa: PLC0415

        try:
            make_private_dir(self.cache_dir)
            fd = os.open(
                os.path.join(self.cache_dir, NO_POLICY_SAID),  # noqa: PTH118
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
        except FileExistsError:
            return
        except OSError:
            pass  # cannot remember: say it every time rather than never
        else:
            os.close(fd)
        self.report(
            f"ksmpolicy: no policy at {self.policy_path}: enforcement off, VMs start as defined "
            "(said once; `ksmpolicy check` says how to install one)",
            "notice",
        )

    def unusable_policy_status(self) -> int:
        """The exit status when no policy can be used: 1 only if the file asks for `block`."""
        return 1 if says_block(self.policy_path) else 0

    def refuse_start(self, policy: Policy, decision: Decision, who: str) -> bool:
        """Under trust domains: report a VM that two bindings put in different domains (it
        starts, unmergeable), and a start that would force a hand-over the host cannot absorb;
        True when `enforcement: block` refuses it."""
        from ksmpolicy.policy.model import CONFLICT_DOMAIN  # noqa: PLC0415

        if decision.domain == CONFLICT_DOMAIN:
            self.report(f"ksmpolicy: {who}: {decision.reason}", "warning")
            return False
        refusal = start_refusal(policy, decision, self.cache_dir)
        if refusal is None:
            return False
        block = _blocks(policy)
        self.report(f"ksmpolicy: {who}: {refusal}", "err" if block else "warning")
        return block

    def own_failure(self, message: str) -> int:
        """A fault of the hook's own: block only under `enforcement: block`, else warn."""
        block = _blocks(self.policy)
        self.report(f"ksmpolicy: {message}", "err" if block else "warning")
        return 1 if block else 0

    def check_start(
        self,
        who: str,
        evaluate: Callable[[Policy], StartCheck],
        *,
        read_input: Callable[[], None] = lambda: None,
    ) -> int:
        """The start check of both hooks: the policy, the VM's decision and how its definition
        drifts from it; under `block` a definition that would merge what it must not is
        refused, anything else is a warning. `read_input` runs after the policy is loaded (a
        stdin that never ends then meets the policy's enforcement at the deadline)."""
        from ksmpolicy.errors import KsmPolicyError  # noqa: PLC0415
        from ksmpolicy.policy.model import Enforcement  # noqa: PLC0415

        policy = self.load_policy()
        read_input()
        if policy is None:
            return self.unusable_policy_status()
        if policy.enforcement is Enforcement.OFF:
            return 0
        try:
            found = evaluate(policy)
        except (KsmPolicyError, OSError, ValueError) as exc:
            return self.own_failure(f"cannot check {who}: {exc}")
        except Exception as exc:  # a bug must not stop VMs unless the policy says so
            return self.own_failure(f"internal error checking {who}: {type(exc).__name__}: {exc}")
        return self._start_outcome(policy, who, found)

    def _start_outcome(self, policy: Policy, who: str, found: StartCheck) -> int:
        from ksmpolicy.policy.model import Enforcement  # noqa: PLC0415

        if found.note:
            self.report(f"ksmpolicy: {who}: {found.note}", "warning")
        if self.refuse_start(policy, found.decision, who):
            return 1
        if found.drift is None:
            return 0
        how, message = found.drift
        block = policy.enforcement is Enforcement.BLOCK and how == "mergeable"
        line = f"{message} Fix: {found.fix}" if block else f"{message} {found.advice}"
        self.report(line, "err" if block else "warning")
        return 1 if block else 0


class StartCheck:
    """What a hook found about a VM that starts (`Session.check_start`)."""

    __slots__ = ("advice", "decision", "drift", "fix", "note")

    def __init__(
        self,
        decision: Decision,
        drift: tuple[str, str] | None,
        fix: str,
        advice: str,
        note: str | None = None,
    ) -> None:
        self.decision = decision
        self.drift = drift  # (how the definition drifts, one line), or None: it complies
        self.fix = fix  # the command that rewrites the definition
        self.advice = advice  # what a warning adds ("Run: FIX")
        self.note = note  # something else to say about it (a warning of its own)


HOOK_CALLED = "hook-called"  # in the run dir: touched on every call; `doctor` reads its time


def mark_called(run_dir: str) -> None:
    """Leave the time of this call in the root-only run dir, so that `doctor` can tell that
    the hypervisor calls the hook (libvirtd reads hooks only when it starts or reloads).
    Best effort: never the hook's failure."""
    path = os.path.join(run_dir, HOOK_CALLED)  # noqa: PTH118
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            from ksmpolicy.files import make_private_dir  # noqa: PLC0415

            make_private_dir(run_dir)
            fd = os.open(path, flags, 0o600)
        try:
            os.utime(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def run(
    session: Session,
    work: Callable[[], int],
    out: IO[str],
    err: IO[str],
    *,
    reads_stdin: bool = False,
) -> int:
    """Run `work` in a child process against the deadline, and write out what it reported.
    `reads_stdin`: the work reads the hook's stdin, so that reading it is under the deadline
    too (it should load the policy first, so that a stdin that never ends meets the policy's
    enforcement)."""
    from ksmpolicy.deadline import run_in_child  # noqa: PLC0415

    def child(send: Callable[[object], None]) -> object:
        session._send = send
        status = work()
        session.finish()
        return (status, session.stdout)

    seconds = deadline_seconds()
    out.flush()
    err.flush()
    result = run_in_child(child, seconds, keep_stdin=reads_stdin)
    enforcement: str | None = None
    said: list[tuple[str, str]] = []
    for message in result.progress:
        if not isinstance(message, tuple):
            continue
        if message[0] == "line":
            report(err, message[1], message[2])
            said.append((message[2], message[1]))
        elif message[0] == "enforcement":
            enforcement = message[1]
    if session.vm_key:
        keep_said(session.cache_dir, session.vm_key, said)
    if result.finished and isinstance(result.result, tuple):
        status, stdout = result.result
        if stdout is not None:
            out.write(stdout)
            out.flush()
        return int(status)
    if enforcement is None:
        last = _last_good(session)
        enforcement = last.enforcement.value if last is not None else None
    block = enforcement == "block"
    if result.error is not None:  # a bug in the hook: never a traceback, never a block unless asked
        report(err, f"ksmpolicy: internal error on {session.who}: {result.error}", _level(block))
        return 1 if block else 0
    session.timed_out = True
    outcome = "refusing the start (enforcement: block)" if block else "starting it anyway"
    report(
        err,
        f"ksmpolicy: {session.who} not checked within {seconds:g} s (a disk or the policy on a "
        f"slow or hung filesystem, a FIFO, or input that never ends?): {outcome}",
        _level(block),
    )
    return 1 if block else 0


def said_path(run_dir: str, key: str) -> str:
    """Where the hook keeps what it said about the VM `key` (its name, or a VMID)."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else f"%{ord(c):x}" for c in key)
    return os.path.join(run_dir, HOOK_SAID, safe[:200])  # noqa: PTH118


def keep_said(run_dir: str, key: str, lines: list[tuple[str, str]]) -> None:
    """Keep the lines of this run for `ksmpolicy status`: libvirt shows a hook's output only
    when it refuses a start, so a warning would otherwise reach only syslog. The first line is
    the VM's key, then `LEVEL<TAB>LINE` per line; nothing said removes the note. Best effort."""
    from ksmpolicy.files import make_private_dir, write_atomic  # noqa: PLC0415

    path = said_path(run_dir, key)
    try:
        if not lines:
            os.unlink(path)  # noqa: PTH108
            return
        make_private_dir(os.path.dirname(path))  # noqa: PTH120
        text = "".join(f"{level}\t{one_line(line)}\n" for level, line in lines)
        write_atomic(path, f"{one_line(key)}\n{text}".encode(), 0o600, private_dir=True)
    except OSError:
        pass


def _level(block: bool) -> str:
    return "err" if block else "warning"


def _blocks(policy: Policy | None) -> bool:
    from ksmpolicy.policy.model import Enforcement  # noqa: PLC0415

    return policy is not None and policy.enforcement is Enforcement.BLOCK


def _last_good(session: Session) -> Policy | None:
    from ksmpolicy.policy.load import load_last_good  # noqa: PLC0415

    return load_last_good(session.policy_path, session.cache_dir)


def report(err: IO[str], message: str, level: str) -> None:
    """One line to stderr (libvirt and Proxmox show it) and to syslog as `ksmpolicy-hook`.
    Names in it are quoted already; paths and errors may hold anything, so every unprintable
    character is escaped here, whatever part of the message it came from."""
    line = one_line(message)
    print(line, file=err, flush=True)
    try:
        import syslog  # noqa: PLC0415

        priority = {
            "err": syslog.LOG_ERR,
            "notice": syslog.LOG_NOTICE,
            "info": syslog.LOG_INFO,
        }.get(level, syslog.LOG_WARNING)
        syslog.openlog("ksmpolicy-hook", syslog.LOG_PID, syslog.LOG_DAEMON)
        syslog.syslog(priority, line)
        syslog.closelog()
    except OSError:
        pass


def says_block(path: str) -> bool:
    """Best effort for an unusable policy: does its text ask for `enforcement: block`, in any
    spelling the validator accepts? Reads a regular file only, and never blocks on it."""
    from ksmpolicy.files import read_regular, untrusted_reason  # noqa: PLC0415
    from ksmpolicy.policy.load import MAX_POLICY_BYTES  # noqa: PLC0415

    if os.geteuid() == 0 and untrusted_reason(path) is not None:
        return False  # its text is not root's: whoever wrote it must not get to refuse starts
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


def start_refusal(policy: Policy, decision: Decision, run_dir: str | None) -> str | None:
    """Under trust domains: why this start must not happen (it would force a hand-over the
    host cannot absorb), or None. Only `enforcement: block` refuses on it."""
    if not policy.uses_domains or not decision.merge:
        return None
    from pathlib import Path  # noqa: PLC0415

    from ksmpolicy.paths import HostPaths  # noqa: PLC0415
    from ksmpolicy.trust.guard import start_refusal as refusal  # noqa: PLC0415

    paths = HostPaths(run_override=Path(run_dir) if run_dir else None)
    return refusal(paths, policy, decision.domain, decision.bind_nodes)
