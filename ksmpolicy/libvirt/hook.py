"""libvirt's qemu hook: argv + domain XML on stdin -> what to do, and the exit code.

This runs on every VM start, so it imports only what the operation at hand needs, and it never
calls back into libvirt (libvirtd waits for the hook: that would deadlock).
"""

from __future__ import annotations

from ksmpolicy import hookcore

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import IO

    from ksmpolicy.libvirt.domain import DomainFacts
    from ksmpolicy.policy.decide import Decision
    from ksmpolicy.policy.model import Policy

# libvirt operation/sub-operation -> the note the daemon gets.
_NOTES = {
    ("started", "begin"): "started",
    ("stopped", "end"): "stopped",
    ("release", "end"): "release",
    ("reconnect", "begin"): "reconnect",
}


class LibvirtHook:
    def __init__(self, name: str, policy_path: str | None, run_dir: str | None = None) -> None:
        from ksmpolicy.paths import default_policy_fast  # noqa: PLC0415

        self.name = name
        self.policy_path = policy_path or default_policy_fast()
        self.run_dir = run_dir
        self.session = hookcore.Session(
            hookcore.quote(name), self.policy_path, hookcore.run_dir(run_dir), vm_key=name
        )

    def run(
        self, operation: str, suboperation: str, stdin: IO[bytes], out: IO[str], err: IO[str]
    ) -> int:
        hookcore.mark_called(self.session.cache_dir)
        note = _NOTES.get((operation, suboperation))
        if note is not None:
            self.notify(note)
            return 0
        # The XML is read in the child, under the deadline: a stdin that never closes ends
        # there like a hung disk, with the enforcement of the policy loaded first.
        read = lambda: read_stdin(stdin)  # noqa: E731
        if (operation, suboperation) == ("prepare", "begin"):
            work = lambda: self.check_start(read)  # noqa: E731
            return hookcore.run(self.session, work, out, err, reads_stdin=True)
        if (operation, suboperation) in (("migrate", "begin"), ("restore", "begin")):
            work = lambda: self.rewrite_incoming(operation, read)  # noqa: E731
            return hookcore.run(self.session, work, out, err, reads_stdin=True)
        return 0

    # --- prepare begin: does the definition being started follow the policy?

    def check_start(self, read: Callable[[], bytes | Exception]) -> int:
        xml: list[bytes | Exception] = []

        def evaluate(policy: Policy) -> hookcore.StartCheck:
            facts, decision = self.evaluate(xml[0], policy)
            fix = hookcore.fix_command("ksmpolicy apply", self.name, facts.vm.uuid)
            drift = start_verdict(self.name, facts, decision)
            return hookcore.StartCheck(decision, drift, fix, f"Run: {fix}")

        # libvirt writes the XML whatever the hook does with it: it is read in any case
        return self.session.check_start(
            self.session.who, evaluate, read_input=lambda: xml.append(read())
        )

    # --- migrate begin / restore begin: hand libvirt this host's version of the XML

    def rewrite_incoming(self, operation: str, read: Callable[[], bytes | Exception]) -> int:
        from ksmpolicy.errors import KsmPolicyError  # noqa: PLC0415
        from ksmpolicy.libvirt.images import qcow2_backing_root  # noqa: PLC0415
        from ksmpolicy.libvirt.rewrite import apply_policy  # noqa: PLC0415
        from ksmpolicy.policy.decide import Decider  # noqa: PLC0415

        session = self.session
        policy = session.load_policy()
        xml = read()
        if policy is None:  # print nothing: libvirt keeps the XML it has
            return session.unusable_policy_status()
        who = session.who
        try:
            rewritten, _facts, _decision = apply_policy(
                _data(xml), Decider(policy), qcow2_backing_root
            )
        except (KsmPolicyError, OSError, ValueError) as exc:
            return session.own_failure(f"cannot rewrite {who} on {operation}: {exc}")
        except Exception as exc:
            what = f"{type(exc).__name__}: {exc}"
            return session.own_failure(f"internal error on {operation} of {who}: {what}")
        session.stdout = rewritten
        return 0

    # --- shared

    def evaluate(self, xml: bytes | Exception, policy: Policy) -> tuple[DomainFacts, Decision]:
        from ksmpolicy.libvirt.domain import domain_facts  # noqa: PLC0415
        from ksmpolicy.libvirt.images import qcow2_backing_root  # noqa: PLC0415
        from ksmpolicy.policy.decide import decide  # noqa: PLC0415

        facts = domain_facts(_data(xml), qcow2_backing_root)
        return facts, decide(facts.vm, policy)

    def notify(self, event: str) -> None:
        from ksmpolicy.runtime.notify import send_to  # noqa: PLC0415

        send_to(hookcore.notify_socket(self.run_dir), event, self.name)


def start_verdict(name: str, facts: DomainFacts, decision: Decision) -> tuple[str, str] | None:
    """None when the definition complies with the decision, else (how it drifts, one line)."""
    from ksmpolicy.policy.decide import drift  # noqa: PLC0415

    how = drift(decision, facts.vm, merging_off=facts.nosharepages)
    if how is None:
        return None
    rule = decision.rule_text
    who = hookcore.quote(name)
    if how == "mergeable" and decision.merge:  # under trust domains
        return how, (
            f"ksmpolicy: {who} is in trust domain {decision.domain!r}: ksmpolicy switches its "
            "merging on, live, only while that domain merges, so its definition needs "
            "<memoryBacking><nosharepages/>."
        )
    if how == "mergeable":
        return how, (
            f"ksmpolicy: {who} must not share memory ({rule}) but its definition lacks "
            "<memoryBacking><nosharepages/>."
        )
    return (
        how,
        f"ksmpolicy: {who} may share memory ({rule}) but its definition has <nosharepages/>.",
    )


def read_stdin(stdin: IO[bytes] | None) -> bytes | Exception:
    """The domain XML libvirt passes, or the error reading it (reported by the check, which
    knows the enforcement mode)."""
    from ksmpolicy.libvirt.domain import MAX_XML_BYTES, XmlError  # noqa: PLC0415

    if stdin is None:
        return XmlError("no domain XML: standard input is closed")
    try:
        data = stdin.read(MAX_XML_BYTES + 1)
    except (OSError, ValueError) as exc:
        return XmlError(f"cannot read the domain XML: {exc}")
    if len(data) > MAX_XML_BYTES:
        return XmlError(f"domain XML on stdin is larger than {MAX_XML_BYTES // 2**20} MB")
    return data


def _data(xml: bytes | Exception) -> bytes:
    if isinstance(xml, Exception):
        raise xml
    return xml
