"""libvirt adapter: apply definitions, tag domains, switch merging of running domains.

The only modules that import libvirt are this one and `events` (Proxmox hosts have none). They
never decide: the policy, the decider and the XML rewrite do; this module reads domains and
writes what they return.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ksmpolicy.apply import DEADLINE_SECONDS, Outcome, Planned, apply_targets
from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.kernel.qmp import merge_state, set_merge
from ksmpolicy.libvirt import commands
from ksmpolicy.libvirt.domain import NAMESPACE, NAMESPACE_PREFIX, domain_facts
from ksmpolicy.libvirt.images import qcow2_backing_root
from ksmpolicy.libvirt.rewrite import apply_policy
from ksmpolicy.policy.decide import Decider
from ksmpolicy.policy.model import Action, Policy

log = logging.getLogger(__name__)

# libvirt constants, so that callers and tests need not import libvirt.
LIST_PERSISTENT = 4  # VIR_CONNECT_LIST_DOMAINS_PERSISTENT
LIST_ACTIVE = 1  # VIR_CONNECT_LIST_DOMAINS_ACTIVE
XML_SECURE = 1  # VIR_DOMAIN_XML_SECURE: keep passwords, or a redefinition would drop them
XML_INACTIVE = 2  # VIR_DOMAIN_XML_INACTIVE


class LibvirtMissing(KsmPolicyError):
    pass


def libvirt_module() -> Any:
    """libvirt-python, with its default error handler (which prints every error on stderr, as
    "libvirt: XML-RPC error ..." when no libvirtd runs) replaced by one that logs at debug
    level: errors still raise libvirtError, and callers report them once."""
    try:
        import libvirt  # noqa: PLC0415
    except ImportError:
        raise LibvirtMissing(
            "libvirt-python is not installed: pip install 'ksmpolicy[libvirt]', or use Debian's "
            "python3-libvirt (on Proxmox VE use the Proxmox commands instead)"
        ) from None
    _quiet_errors(libvirt)
    return libvirt


@functools.cache
def _quiet_errors(libvirt: Any) -> None:
    libvirt.registerErrorHandler(_quiet_handler, None)


def _quiet_handler(_context: object, error: Any) -> None:
    message = error[2] if isinstance(error, tuple | list) and len(error) > 2 else error
    log.debug("libvirt: %s", message)


def connect(uri: str | None) -> Any:
    libvirt = libvirt_module()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise KsmPolicyError(
            f"cannot connect to libvirt at {uri or 'the default URI'}: {exc}"
        ) from None


class Domain(Protocol):
    def name(self) -> str: ...
    def UUIDString(self) -> str: ...
    def XMLDesc(self, flags: int = 0) -> str: ...
    def isActive(self) -> int: ...


class Connection(Protocol):
    def listAllDomains(self, flags: int = 0) -> list[Any]: ...
    def defineXML(self, xml: str) -> Any: ...


# --- apply -----------------------------------------------------------------------------------


class DomainDefinition:
    """A persistent domain's definition, read and written for the shared apply loop."""

    suffix = ".xml"

    def __init__(self, conn: Connection, domain: Domain) -> None:
        self.conn = conn
        self.domain = domain
        self.key = domain.name()

    def read(self) -> str:
        libvirt = libvirt_module()
        try:
            return self.domain.XMLDesc(XML_INACTIVE | XML_SECURE)
        except libvirt.libvirtError as exc:
            raise KsmPolicyError(str(exc)) from None

    def write(self, _old: str, new: str) -> None:
        libvirt = libvirt_module()
        try:
            self.conn.defineXML(new)
        except libvirt.libvirtError as exc:
            raise KsmPolicyError(str(exc)) from None
        log.info("redefined %s", self.key)


class DomainTarget(DomainDefinition):
    """One persistent domain, planned by the policy."""

    def __init__(self, conn: Connection, domain: Domain, decider: Decider) -> None:
        super().__init__(conn, domain)
        self.decider = decider

    def plan(self, text: str) -> Planned:
        new, facts, decision = apply_policy(text, self.decider, qcow2_backing_root)
        note = None
        if new != text and not decision.definition_merges and self.domain.isActive():
            restart_it, _steps = commands.restart(facts.vm.name, facts.vm.uuid)
            note = (
                "it runs with the setting it started with until it restarts: its ROMs and "
                f"video RAM stay mergeable; restart it ({restart_it}); "
                f"{commands.switch_live(facts.vm.name, facts.vm.uuid)} switches its guest RAM now"
            )
        return Planned(new, facts.vm.name, decision, note)

    def labels(self, name: str) -> tuple[str, str]:
        return f"{name} (defined)", f"{name} (policy)"

    def backup_stem(self, name: str) -> str:
        return f"{name}.{self.domain.UUIDString()}"


def apply(
    conn: Connection,
    policy: Policy,
    *,
    backup_dir: Path,
    dry_run: bool = False,
    only: Iterable[str] = (),
    deadline_seconds: float = DEADLINE_SECONDS,
) -> list[Outcome]:
    """Redefine every persistent domain whose definition disagrees with the policy; `only`
    names domains by name or UUID. The old definition is saved under `backup_dir` first. Each
    domain gets `deadline_seconds` to be read (its disks on a hung NFS mount fail it alone)."""
    wanted = set(only)
    decider = Decider(policy)
    domains = sorted(conn.listAllDomains(LIST_PERSISTENT), key=lambda d: d.name())
    chosen = []
    seen: set[str] = set()
    for domain in domains:
        keys = {domain.name(), domain.UUIDString().lower()}
        if wanted and not keys & wanted:
            continue
        seen |= keys
        chosen.append(DomainTarget(conn, domain, decider))
    results = apply_targets(
        chosen, backup_dir=backup_dir, dry_run=dry_run, deadline_seconds=deadline_seconds
    )
    for missing in sorted(wanted - seen):
        results.append(Outcome(missing, missing, "failed", error=NO_SUCH_DOMAIN))
    return results


NO_SUCH_DOMAIN = "no persistent domain of that name or UUID"


# --- tags in <metadata> ----------------------------------------------------------------------


def set_tags(conn: Any, name: str, tags: Iterable[str], *, remove: bool = False) -> list[str]:
    """Add (or remove) ksmpolicy tags in the domain's <metadata>; return the tags it now has."""
    libvirt = libvirt_module()
    try:
        domain = conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        raise KsmPolicyError(f"no domain {name!r}: {exc}") from None
    facts = domain_facts(domain.XMLDesc(XML_INACTIVE))
    current = set(facts.vm.tags)
    changes = {t.lower() for t in tags}
    new = sorted(current - changes if remove else current | changes)
    element = "<vm>" + "".join(f"<tag>{_escape(t)}</tag>" for t in new) + "</vm>"
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    if domain.isActive():
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    try:
        domain.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            element if new else None,
            NAMESPACE_PREFIX if new else None,
            NAMESPACE,
            flags,
        )
    except libvirt.libvirtError as exc:
        raise KsmPolicyError(f"cannot set tags of {name!r}: {exc}") from None
    return new


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- the live toggle over libvirt's monitor --------------------------------------------------


def monitor(domain: Any) -> Any:
    """`execute(command, arguments)` for kernel.qmp, through virDomainQemuMonitorCommand
    (libvirt then marks the domain "custom-monitor" tainted)."""
    libvirt = libvirt_module()
    import libvirt_qemu  # noqa: PLC0415

    def execute(command: str, arguments: dict[str, Any] | None) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        try:
            reply = json.loads(libvirt_qemu.qemuMonitorCommand(domain, json.dumps(message), 0))
        except libvirt.libvirtError as exc:
            raise KsmPolicyError(f"QMP {command} on {domain.name()!r} failed: {exc}") from None
        if "error" in reply:
            desc = reply["error"].get("desc")
            raise KsmPolicyError(f"QMP {command} on {domain.name()!r}: {desc}")
        return reply.get("return")

    return execute


def live_merge(domain: Any) -> dict[str, bool]:
    return merge_state(monitor(domain))


@dataclass(frozen=True)
class LiveResult:
    name: str
    status: str  # complies | toggled | skipped | failed
    merge: bool | None = None
    detail: str = ""


def enforce_live(conn: Any, policy: Policy, only: Iterable[str] = ()) -> list[LiveResult]:
    """Bring every running domain's merging in line with the policy, over QMP."""
    wanted = set(only)
    decider = Decider(policy)
    results = []
    for domain in sorted(conn.listAllDomains(LIST_ACTIVE), key=lambda d: d.name()):
        if wanted and not {domain.name(), domain.UUIDString().lower()} & wanted:
            continue
        results.append(enforce_one(domain, decider))
    return results


def enforce_one(domain: Any, decider: Decider) -> LiveResult:
    name = domain.name()
    try:
        facts = domain_facts(domain.XMLDesc(0))
        decision = decider.decide(facts.vm)
        if not facts.vm.ram_can_merge:
            return LiveResult(name, "skipped", None, "hugepage/shared memory never merges")
        merge = decision.action is Action.MERGE
        if merge and decider.policy.uses_domains:
            why = f"trust domain {decision.domain}: the daemon switches it on while it merges"
            return LiveResult(name, "skipped", None, why)
        changed = set_merge(monitor(domain), merge)
    except KsmPolicyError as exc:
        return LiveResult(name, "failed", None, str(exc))
    if changed:
        state = "on" if merge else "off"
        log.info("%s: merging switched %s live (%s)", name, state, ", ".join(changed))
        return LiveResult(name, "toggled", merge, ", ".join(changed))
    return LiveResult(name, "complies", merge)
