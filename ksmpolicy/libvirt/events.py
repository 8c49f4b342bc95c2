"""libvirt lifecycle events for the daemon: rewrite new definitions, switch started domains."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ksmpolicy.libvirt.host import (
    NO_SUCH_DOMAIN,
    apply,
    connect,
    enforce_live,
    enforce_one,
    libvirt_module,
)
from ksmpolicy.policy.decide import Decider
from ksmpolicy.policy.model import Enforcement, Policy

log = logging.getLogger(__name__)


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
    At start it does one pass over every domain, under the same two conditions."""

    def __init__(self, conn: Any, events: Watcher | None, backup_dir: Path) -> None:
        self.conn = conn
        self.watcher = events
        self.backup_dir = backup_dir

    @classmethod
    def watching(cls, uri: str | None, wake: Callable[[], None], backup_dir: Path) -> Enforcer:
        watcher = Watcher(uri, wake)
        return cls(watcher.conn, watcher, backup_dir)

    def catch_up(self, policy: Policy) -> None:
        if policy.enforcement is not Enforcement.OFF:
            self._definitions(policy, ())
        if policy.live and not policy.uses_domains:  # under domains the keeper switches
            for result in enforce_live(self.conn, policy):  # a switch is logged where made
                if result.status == "failed":
                    log.warning("%s: live switch failed: %s", result.name, result.detail)

    def handle(self, policy: Policy) -> tuple[list[str], int]:
        """Act on queued events; return (the domains that started, VMs started or stopped)."""
        started: list[str] = []
        stops = 0
        for event in self.watcher.drain() if self.watcher is not None else []:
            log.debug("libvirt: %s %s", event.name, event.kind)
            if event.kind == "defined" and policy.enforcement is not Enforcement.OFF:
                self._definitions(policy, (event.name,))
            elif event.kind == "started":
                started.append(event.name)
                if policy.live and not policy.uses_domains:
                    self._live(policy, event.name)
            elif event.kind == "stopped":
                stops += 1
        return started, len(started) + stops

    def _definitions(self, policy: Policy, only: Iterable[str]) -> None:
        for result in apply(self.conn, policy, backup_dir=self.backup_dir, only=only):
            if result.status == "changed":
                log.info(
                    "%s: definition rewritten for the policy (backup %s)", result.key, result.backup
                )
            elif result.status == "failed" and result.error != NO_SUCH_DOMAIN:
                log.warning("%s: cannot rewrite the definition: %s", result.key, result.error)

    def _live(self, policy: Policy, name: str) -> None:
        libvirt = libvirt_module()
        try:
            domain = self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            log.warning("%s: started but not found: %s", name, exc)
            return
        result = enforce_one(domain, Decider(policy))
        if result.status == "failed":
            log.warning("%s: live switch failed: %s", name, result.detail)

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
