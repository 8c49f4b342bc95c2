"""The hooks: libvirt's qemu hook (argv + domain XML on stdin) -> what to do, and the exit code.

This runs on every VM start, so it imports only what the operation at hand needs, and it never
calls back into libvirt (libvirtd waits for the hook: that would deadlock). Its own failures
(an unreadable policy, bad XML, a bug) never stop a VM unless the policy says
`enforcement: block`.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import IO

    from ksmpolicy.decide import Decision
    from ksmpolicy.libvirt_xml import DomainFacts
    from ksmpolicy.policy import Policy

DEFAULT_POLICY = "/etc/ksmpolicy/policy.yaml"
# libvirt operation/sub-operation -> the note the daemon gets.
_NOTES = {
    ("started", "begin"): "started",
    ("stopped", "end"): "stopped",
    ("release", "end"): "release",
    ("reconnect", "begin"): "reconnect",
}
USAGE = (
    "usage: ksmpolicy-hook [--policy FILE] (libvirt NAME OPERATION SUBOPERATION EXTRA"
    " | proxmox VMID PHASE)"
)
_OPTIONS = ("--policy", "--run-dir", "--root", "--qm")


def main(argv: Sequence[str] | None = None, *, stdin: IO[bytes] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    options: dict[str, str] = {}
    while args and args[0].startswith("--"):
        option = args.pop(0)
        if option not in _OPTIONS or not args:
            print(USAGE, file=sys.stderr)
            return 2
        options[option] = args.pop(0)
    policy = options.get("--policy") or os.environ.get("KSMPOLICY_POLICY")
    if args[:1] == ["libvirt"] and len(args) >= 4:
        stream = stdin if stdin is not None else sys.stdin.buffer
        hook = LibvirtHook(args[1], policy or DEFAULT_POLICY, options.get("--run-dir"))
        return hook.run(args[2], args[3], stream, sys.stdout, sys.stderr)
    if args[:1] == ["proxmox"] and len(args) >= 3:
        from ksmpolicy.proxmox_hook import ProxmoxHook  # noqa: PLC0415

        proxmox = ProxmoxHook(
            args[1],
            policy,
            root=options.get("--root", "/"),
            run_dir=options.get("--run-dir"),
            qm=options.get("--qm", "qm"),
        )
        return proxmox.run(args[2], sys.stdout, sys.stderr)
    print(USAGE, file=sys.stderr)
    return 2


class LibvirtHook:
    def __init__(self, name: str, policy_path: str, run_dir: str | None = None) -> None:
        self.name = name
        self.policy_path = policy_path
        self.run_dir = run_dir

    def run(
        self, operation: str, suboperation: str, stdin: IO[bytes], out: IO[str], err: IO[str]
    ) -> int:
        note = _NOTES.get((operation, suboperation))
        if note is not None:
            self.notify(note)
            return 0
        if (operation, suboperation) == ("prepare", "begin"):
            return self.check_start(stdin, err)
        if (operation, suboperation) in (("migrate", "begin"), ("restore", "begin")):
            return self.rewrite_incoming(operation, stdin, out, err)
        return 0

    # --- prepare begin: does the definition being started follow the policy?

    def check_start(self, stdin: IO[bytes], err: IO[str]) -> int:
        from ksmpolicy.errors import KsmPolicyError  # noqa: PLC0415
        from ksmpolicy.policy import Enforcement  # noqa: PLC0415

        policy = self.load_policy(err)
        if policy is None:
            return 1 if _says_block(self.policy_path) else 0
        if policy.enforcement is Enforcement.OFF:
            return 0
        try:
            facts, decision = self.evaluate(stdin, policy)
        except (KsmPolicyError, OSError, ValueError) as exc:
            return self.own_failure(f"cannot check {_q(self.name)}: {exc}", policy, err)
        except Exception as exc:  # a bug must not stop VMs unless the policy says so
            what = f"{type(exc).__name__}: {exc}"
            return self.own_failure(f"internal error checking {_q(self.name)}: {what}", policy, err)
        message = start_verdict(self.name, facts, decision)
        if message is None:
            return 0
        if policy.enforcement is Enforcement.BLOCK and not decision.merge:
            _report(err, message + f" Fix: ksmpolicy apply --domain {_q(self.name)}", "err")
            return 1
        _report(err, message + f" Run: ksmpolicy apply --domain {_q(self.name)}", "warning")
        return 0

    # --- migrate begin / restore begin: hand libvirt this host's version of the XML

    def rewrite_incoming(self, operation: str, stdin: IO[bytes], out: IO[str], err: IO[str]) -> int:
        from ksmpolicy.decide import Decider  # noqa: PLC0415
        from ksmpolicy.errors import KsmPolicyError  # noqa: PLC0415
        from ksmpolicy.libvirt_xml import apply_policy  # noqa: PLC0415

        policy = self.load_policy(err)
        if policy is None:  # print nothing: libvirt keeps the XML it has
            return 1 if _says_block(self.policy_path) else 0
        try:
            rewritten, _facts, _decision = apply_policy(_read(stdin), Decider(policy))
        except (KsmPolicyError, OSError, ValueError) as exc:
            message = f"cannot rewrite {_q(self.name)} on {operation}: {exc}"
            return self.own_failure(message, policy, err)
        except Exception as exc:
            what = f"{type(exc).__name__}: {exc}"
            message = f"internal error on {operation} of {_q(self.name)}: {what}"
            return self.own_failure(message, policy, err)
        out.write(rewritten)
        out.flush()
        return 0

    # --- shared

    def load_policy(self, err: IO[str]) -> Policy | None:
        from ksmpolicy.errors import KsmPolicyError  # noqa: PLC0415
        from ksmpolicy.host import default_run_dir  # noqa: PLC0415
        from ksmpolicy.policy import load_policy  # noqa: PLC0415

        try:
            # The compiled cache in the root-only runtime directory spares YAML parsing.
            return load_policy(self.policy_path, cache_dir=self.run_dir or default_run_dir())
        except KsmPolicyError as exc:
            first = str(exc).splitlines()[0]
            _report(
                err, f"ksmpolicy: policy not usable, {_q(self.name)} not checked: {first}", "err"
            )
            return None

    def evaluate(self, stdin: IO[bytes], policy: Policy) -> tuple[DomainFacts, Decision]:
        return self.evaluate_bytes(_read(stdin), policy)

    def evaluate_bytes(self, data: bytes, policy: Policy) -> tuple[DomainFacts, Decision]:
        from ksmpolicy.decide import decide  # noqa: PLC0415
        from ksmpolicy.libvirt_xml import domain_facts, qcow2_backing_root  # noqa: PLC0415

        facts = domain_facts(data, qcow2_backing_root)
        return facts, decide(facts.vm, policy)

    def own_failure(self, message: str, policy: Policy, err: IO[str]) -> int:
        from ksmpolicy.policy import Enforcement  # noqa: PLC0415

        block = policy.enforcement is Enforcement.BLOCK
        _report(err, f"ksmpolicy: {message}", "err" if block else "warning")
        return 1 if block else 0

    def notify(self, event: str) -> None:
        from ksmpolicy import notify  # noqa: PLC0415
        from ksmpolicy.host import NOTIFY_SOCKET, default_run_dir  # noqa: PLC0415

        socket_path = os.path.join(self.run_dir or default_run_dir(), NOTIFY_SOCKET)  # noqa: PTH118
        notify.send_to(socket_path, event, self.name)


def start_verdict(name: str, facts: DomainFacts, decision: Decision) -> str | None:
    """None when the definition complies with the decision, else one line saying why not."""
    from ksmpolicy.policy import Action  # noqa: PLC0415

    vm = facts.vm
    can_merge = not (facts.nosharepages or vm.hugepages or vm.shared_memory)
    rule = f"rule {decision.rule!r}" if decision.rule else "the policy default"
    if decision.action is Action.EXCLUDE and can_merge:
        return (
            f"ksmpolicy: {_q(name)} must not share memory ({rule}) but its definition lacks "
            "<memoryBacking><nosharepages/>."
        )
    if decision.action is Action.MERGE and facts.nosharepages:
        return (
            f"ksmpolicy: {_q(name)} may share memory ({rule}) but its definition has "
            "<nosharepages/>."
        )
    return None


def _read(stdin: IO[bytes]) -> bytes:
    from ksmpolicy.libvirt_xml import MAX_XML_BYTES, XmlError  # noqa: PLC0415

    data = stdin.read(MAX_XML_BYTES + 1)
    if len(data) > MAX_XML_BYTES:
        raise XmlError(f"domain XML on stdin is larger than {MAX_XML_BYTES // 2**20} MB")
    return data


def _q(name: str) -> str:
    """A VM name on one line, in double quotes, with quotes, backslashes and control
    characters escaped (json's rules, without importing json)."""
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if c >= " " and c != "\x7f" else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'


def _report(err: IO[str], message: str, level: str) -> None:
    """One line to stderr (libvirt shows it on a failed start) and to syslog."""
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


def _says_block(path: str) -> bool:
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


if __name__ == "__main__":
    sys.exit(main())
