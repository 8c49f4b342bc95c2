"""The policy as values: frozen records that every other part reads. No I/O."""

from __future__ import annotations

from ksmpolicy.records import dataclass, field

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from collections.abc import Mapping
    from enum import Enum as Choice  # mypy checks members and exhaustiveness as an Enum's
else:
    from ksmpolicy.records import Choice  # the same interface without enum's import cost

SUPPORTED_VERSION = 1


class Action(Choice):
    MERGE = "merge"
    EXCLUDE = "exclude"


class Enforcement(Choice):
    """What a start-time hook does when a VM's definition disagrees with its decision."""

    OFF = "off"
    WARN = "warn"
    BLOCK = "block"


@dataclass(frozen=True)
class Match:
    """Criteria of a rule: keys are AND-ed, the items of one key OR-ed. Empty means "any"."""

    names: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    images: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    name: str
    match: Match
    action: Action
    line: int = 0


@dataclass(frozen=True)
class Group:
    """VMs expected to share pages: a VM belongs if any of its images, tags or its name match."""

    name: str
    images: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReconcilerSettings:
    interval_seconds: float = 10.0
    target_scan_seconds: float = 120.0
    max_ksmd_cpu_percent: float = 20.0
    memory_pressure_percent: float = 20.0  # MemAvailable below this share of RAM raises the pace
    kernel_advisor: bool = False  # hand pacing to the kernel's scan-time advisor where it exists
    # Merge zero pages with the kernel's zero page (the knob use_zero_pages). It only affects
    # pages merged after it changes. On by default: measured here (bench/results/zero-pages.md)
    # it merges zero-heavy guests sooner, for less ksmd CPU and less KSM metadata, and zero
    # pages then form no KSM page that VMs of different groups or domains share.
    use_zero_pages: bool = True


@dataclass(frozen=True)
class ProxmoxSettings:
    # The qemu-server version to write configs for, when dpkg's answer is not wanted (e.g. a
    # cluster mid-upgrade): below 9.0.27 there is no `allow-ksm` and `args` is used instead.
    qemu_server_version: str | None = None


@dataclass(frozen=True)
class Policy:
    version: int = SUPPORTED_VERSION
    enforcement: Enforcement = Enforcement.WARN
    live: bool = True
    default: Action = Action.MERGE
    groups: tuple[Group, ...] = ()
    rules: tuple[Rule, ...] = ()
    # Tags given to VMs by the policy itself, keyed by libvirt name, UUID or Proxmox VMID.
    vms: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    reconciler: ReconcilerSettings = ReconcilerSettings()
    proxmox: ProxmoxSettings = ProxmoxSettings()
    source: str = "<builtin>"
