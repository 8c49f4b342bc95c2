"""`ksmpolicy restore`: libvirt definitions as they were before ksmpolicy first changed them.

`apply` (and the daemon) save a domain's definition before each rewrite, as
`NAME.UUID.TIME.xml` in the backup directory (/var/lib/ksmpolicy/backups; after `apt purge`,
/var/backups/ksmpolicy-definitions-TIME/). The oldest backup of a UUID is its definition
before ksmpolicy. Restoring goes through the same loop as `apply`: a diff first (--dry-run),
the current definition saved as one more backup, a definition that changed meanwhile left
alone. A backup is used only for the domain whose UUID it names and holds; a domain that no
longer exists is not defined again (that is `virsh define FILE`, by hand).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ksmpolicy.apply import Outcome, Planned, apply_targets
from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.files import read_regular
from ksmpolicy.libvirt.domain import MAX_XML_BYTES, domain_facts
from ksmpolicy.libvirt.host import DomainDefinition, libvirt_module

UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
BACKUP_NAME = re.compile(
    rf"(?P<stem>.*)\.(?P<uuid>{UUID})\.(?P<time>\d{{8}}T\d{{6}}\.\d{{9}})\.xml"
)


@dataclass(frozen=True)
class Backup:
    uuid: str
    time: str  # as in the file name: sorts in time order
    path: Path


def oldest_backups(directory: Path) -> dict[str, Backup]:
    """The oldest backup of each domain UUID in `directory`."""
    found: dict[str, Backup] = {}
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise KsmPolicyError(f"cannot read {directory}: {exc.strerror}") from None
    for path in entries:
        match = BACKUP_NAME.fullmatch(path.name)
        if match is None or not path.is_file():
            continue
        backup = Backup(match["uuid"].lower(), match["time"], path)
        if backup.uuid not in found or backup.time < found[backup.uuid].time:
            found[backup.uuid] = backup
    return found


class RestoreTarget(DomainDefinition):
    """One domain and its oldest backup, for the shared apply loop: read and written as
    `apply` does, planned from the backup instead of the policy."""

    def __init__(self, conn: Any, domain: Any, backup: Backup) -> None:
        super().__init__(conn, domain)
        self.backup = backup

    def plan(self, _text: str) -> Planned:
        data = read_regular(self.backup.path, MAX_XML_BYTES)
        facts = domain_facts(data)
        if (facts.vm.uuid or "").lower() != self.backup.uuid:
            raise KsmPolicyError(f"{self.backup.path} holds another domain's definition")
        note = None
        if self.domain.isActive():
            note = "it runs with the setting it started with until it restarts"
        return Planned(data.decode("utf-8"), self.key, None, note)

    def labels(self, name: str) -> tuple[str, str]:
        return f"{name} (defined)", f"{name} ({self.backup.path.name})"

    def backup_stem(self, name: str) -> str:
        return f"{name}.{self.backup.uuid}"


def restore(
    conn: Any,
    directory: Path,
    *,
    save_to: Path,
    only: Iterable[str] = (),
    dry_run: bool = False,
) -> list[Outcome]:
    """Bring each domain with a backup in `directory` back to its oldest one; the current
    definition is saved in `save_to` first. `only`: names or UUIDs."""
    libvirt = libvirt_module()
    wanted = {w.lower() for w in only}
    targets = []
    missing = []
    for uuid, backup in sorted(oldest_backups(directory).items()):
        try:
            domain = conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError:
            missing.append(Outcome(uuid, backup.path.name, "skipped", note="no such domain now"))
            continue
        if wanted and not {domain.name().lower(), uuid} & wanted:
            continue
        targets.append(RestoreTarget(conn, domain, backup))
    outcomes = apply_targets(targets, backup_dir=save_to, dry_run=dry_run)
    return outcomes + ([] if wanted else missing)
