"""libvirt adapter: apply definitions, tag domains, toggle merging live, watch lifecycle events.

The only module that imports libvirt (Proxmox hosts have none). It never decides: the policy,
`decide` and the XML rewrite do; this module reads domains and writes what they return.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ksmpolicy.decide import Decider, Decision
from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.libvirt_xml import (
    NAMESPACE,
    NAMESPACE_PREFIX,
    apply_policy,
    domain_facts,
)
from ksmpolicy.policy import Action, Policy

log = logging.getLogger(__name__)

# libvirt constants, so that callers and tests need not import libvirt.
LIST_PERSISTENT = 4  # VIR_CONNECT_LIST_DOMAINS_PERSISTENT
LIST_ACTIVE = 1  # VIR_CONNECT_LIST_DOMAINS_ACTIVE
XML_SECURE = 1  # VIR_DOMAIN_XML_SECURE: keep passwords, or a redefinition would drop them
XML_INACTIVE = 2  # VIR_DOMAIN_XML_INACTIVE


class LibvirtMissing(KsmPolicyError):
    pass


def libvirt_module() -> Any:
    try:
        import libvirt  # noqa: PLC0415
    except ImportError:
        raise LibvirtMissing(
            "libvirt-python is not installed: pip install 'ksmpolicy[libvirt]' "
            "(on Proxmox VE use the Proxmox commands instead)"
        ) from None
    return libvirt


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


@dataclass(frozen=True)
class ApplyResult:
    name: str
    status: str  # unchanged | changed | would change | failed
    decision: Decision | None = None
    diff: str = ""
    backup: str | None = None
    error: str | None = None


def apply(
    conn: Connection,
    policy: Policy,
    *,
    backup_dir: Path,
    dry_run: bool = False,
    only: Iterable[str] = (),
) -> list[ApplyResult]:
    """Redefine every persistent domain whose definition disagrees with the policy.

    The old definition is saved under `backup_dir` first. A failing domain is reported and the
    others go on.
    """
    wanted = set(only)
    decider = Decider(policy)
    results = []
    domains = sorted(conn.listAllDomains(LIST_PERSISTENT), key=lambda d: d.name())
    seen = set()
    for domain in domains:
        name = domain.name()
        seen.add(name)
        if wanted and name not in wanted:
            continue
        results.append(_apply_one(conn, domain, decider, backup_dir, dry_run))
    for missing in sorted(wanted - seen):
        results.append(ApplyResult(missing, "failed", error="no persistent domain of that name"))
    return results


def _apply_one(
    conn: Connection, domain: Domain, decider: Decider, backup_dir: Path, dry_run: bool
) -> ApplyResult:
    libvirt = libvirt_module()
    name = "?"
    try:
        name = domain.name()
        old = domain.XMLDesc(XML_INACTIVE | XML_SECURE)
        new, _facts, decision = apply_policy(old, decider)
        if new == old:
            return ApplyResult(name, "unchanged", decision)
        diff = "".join(
            difflib.unified_diff(
                old.splitlines(keepends=True),
                new.splitlines(keepends=True),
                f"{name} (defined)",
                f"{name} (policy)",
            )
        )
        if dry_run:
            return ApplyResult(name, "would change", decision, diff)
        backup = write_backup(backup_dir, name, domain.UUIDString(), old)
        conn.defineXML(new)
        log.info("redefined %s (backup %s)", name, backup)
        return ApplyResult(name, "changed", decision, diff, str(backup))
    except (libvirt.libvirtError, KsmPolicyError, OSError) as exc:
        return ApplyResult(name, "failed", error=str(exc).replace("\n", " "))


def write_backup(directory: Path, name: str, uuid: str, xml: str) -> Path:
    """Save a definition as DIR/NAME.UUID.TIMESTAMP.xml (root-only), written atomically."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64]
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}"
    path = directory / f"{safe}.{uuid}.{stamp}.xml"
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(xml)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.rename(path)
    return path


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


# --- the live toggle over QMP ----------------------------------------------------------------


def qmp(domain: Any, command: str, **arguments: Any) -> Any:
    """One QMP command through libvirt (it marks the domain "custom-monitor" tainted)."""
    libvirt = libvirt_module()
    import libvirt_qemu  # noqa: PLC0415

    message = {"execute": command}
    if arguments:
        message["arguments"] = arguments  # type: ignore[assignment]
    try:
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(domain, json.dumps(message), 0))
    except libvirt.libvirtError as exc:
        raise KsmPolicyError(f"QMP {command} on {domain.name()!r} failed: {exc}") from None
    if "error" in reply:
        raise KsmPolicyError(f"QMP {command} on {domain.name()!r}: {reply['error'].get('desc')}")
    return reply.get("return")


def memory_backends(domain: Any) -> list[str]:
    """QOM paths of the guest's RAM backends (pc.ram, ram-node<N>, mem-dimm<N>, ...)."""
    objects = qmp(domain, "qom-list", path="/objects")
    return [
        f"/objects/{o['name']}"
        for o in objects
        if str(o.get("type", "")).startswith("child<memory-backend-")
    ]


def live_merge(domain: Any) -> dict[str, bool]:
    return {
        path: bool(qmp(domain, "qom-get", path=path, property="merge"))
        for path in memory_backends(domain)
    }


def set_live_merge(domain: Any, merge: bool) -> list[str]:
    """Make every RAM backend (un)mergeable now; return the backends that changed."""
    changed = []
    for path, current in live_merge(domain).items():
        if current != merge:
            qmp(domain, "qom-set", path=path, property="merge", value=merge)
            changed.append(path)
    return changed


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
        name = domain.name()
        if wanted and name not in wanted:
            continue
        results.append(enforce_one(domain, decider))
    return results


def enforce_one(domain: Any, decider: Decider) -> LiveResult:
    name = domain.name()
    try:
        facts = domain_facts(domain.XMLDesc(0))
        decision = decider.decide(facts.vm)
        if facts.vm.hugepages or facts.vm.shared_memory:
            return LiveResult(name, "skipped", None, "hugepage/shared memory never merges")
        merge = decision.action is Action.MERGE
        changed = set_live_merge(domain, merge)
    except KsmPolicyError as exc:
        return LiveResult(name, "failed", None, str(exc))
    if changed:
        log.info(
            "%s: merging switched %s live (%s)", name, "on" if merge else "off", ", ".join(changed)
        )
        return LiveResult(name, "toggled", merge, ", ".join(changed))
    return LiveResult(name, "complies", merge)


# --- lifecycle events (for the daemon) -------------------------------------------------------


@dataclass(frozen=True)
class Event:
    kind: str  # defined | started | stopped
    name: str


class Watcher:
    """libvirt lifecycle events on a queue; `wake` is called so the daemon's select returns."""

    def __init__(self, uri: str | None, wake: Callable[[], None]) -> None:
        libvirt = libvirt_module()
        self.libvirt = libvirt
        self.events: queue.Queue[Event] = queue.Queue()
        self.wake = wake
        libvirt.virEventRegisterDefaultImpl()
        self._thread = threading.Thread(target=self._run, name="libvirt-events", daemon=True)
        self._thread.start()
        self.conn = connect(uri)
        self._callback = self.conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None
        )

    def _run(self) -> None:
        while True:
            self.libvirt.virEventRunDefaultImpl()

    def _on_event(self, _conn: Any, domain: Any, event: int, _detail: int, _opaque: Any) -> None:
        kinds = {
            self.libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
            self.libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
            self.libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
        }
        kind = kinds.get(event)
        if kind is not None:
            self.events.put(Event(kind, domain.name()))
            self.wake()

    def drain(self) -> list[Event]:
        events = []
        while True:
            try:
                events.append(self.events.get_nowait())
            except queue.Empty:
                return events

    def close(self) -> None:
        try:
            self.conn.domainEventDeregisterAny(self._callback)
            self.conn.close()
        except self.libvirt.libvirtError:
            pass


class Enforcer:
    """What the daemon does with libvirt: on DEFINED rewrite the definition (unless the policy's
    enforcement is off), on STARTED switch the running VM's merging (when the policy is `live`).
    At start it does one pass over every domain."""

    def __init__(self, uri: str | None, wake: Callable[[], None], backup_dir: Path) -> None:
        self.watcher = Watcher(uri, wake)
        self.backup_dir = backup_dir

    def catch_up(self, policy: Policy) -> None:
        self._definitions(policy, ())
        if policy.live:
            for result in enforce_live(self.watcher.conn, policy):
                if result.status in ("toggled", "failed"):
                    log.info("%s: %s %s", result.name, result.status, result.detail)

    def handle(self, policy: Policy) -> tuple[int, int]:
        """Act on queued events; return (VMs started, VMs started or stopped)."""
        from ksmpolicy.policy import Enforcement  # noqa: PLC0415

        starts = stops = 0
        for event in self.watcher.drain():
            log.debug("libvirt: %s %s", event.name, event.kind)
            if event.kind == "defined" and policy.enforcement is not Enforcement.OFF:
                self._definitions(policy, (event.name,))
            elif event.kind == "started":
                starts += 1
                if policy.live:
                    self._live(policy, event.name)
            elif event.kind == "stopped":
                stops += 1
        return starts, starts + stops

    def _definitions(self, policy: Policy, only: Iterable[str]) -> None:
        conn = self.watcher.conn
        for result in apply(conn, policy, backup_dir=self.backup_dir, only=only):
            if result.status == "changed":
                log.info(
                    "%s: definition rewritten for the policy (backup %s)",
                    result.name,
                    result.backup,
                )
            elif result.status == "failed" and result.error != "no persistent domain of that name":
                log.warning("%s: cannot rewrite the definition: %s", result.name, result.error)

    def _live(self, policy: Policy, name: str) -> None:
        try:
            domain = self.watcher.conn.lookupByName(name)
        except self.watcher.libvirt.libvirtError as exc:
            log.warning("%s: started but not found: %s", name, exc)
            return
        result = enforce_one(domain, Decider(policy))
        if result.status == "failed":
            log.warning("%s: live switch failed: %s", name, result.detail)

    def close(self) -> None:
        self.watcher.close()
