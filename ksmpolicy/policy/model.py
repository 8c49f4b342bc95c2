"""The policy as values: frozen records that every other part reads. No I/O."""

from __future__ import annotations

import re

from ksmpolicy.records import dataclass, field

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from collections.abc import Mapping
    from enum import Enum as Choice  # mypy checks members and exhaustiveness as an Enum's
else:
    from ksmpolicy.records import Choice  # the same interface without enum's import cost

SUPPORTED_VERSION = 1
DEFAULT_DOMAIN = "default"  # the trust domain of every VM the policy puts in none
HOST_DOMAIN = "host"  # the audit's domain for processes that are no VM (or not believed to be)
# Names no declared domain may take: the two above are ksmpolicy's own.
RESERVED_DOMAINS = (DEFAULT_DOMAIN, HOST_DOMAIN)
# Domain and group names: they appear in metrics labels, log lines, suggested commands and
# host sketches. fullmatch only: no trailing newline.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
NAME_RULE = "1-64 letters, digits and _ . : - (starting with a letter or digit)"
# The domain of a VM that two bindings put in different trust domains: it never merges. No
# declared domain can be called so (names are letters, digits and `_ . : -`).
CONFLICT_DOMAIN = "(conflict)"


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
    domains: tuple[str, ...] = ()  # trust domains (from what the host controls, see Group)
    kinds: tuple[str, ...] = ()  # what runs it: qemu, firecracker, cloud-hypervisor, service, ...
    units: tuple[str, ...] = ()  # systemd unit globs ("jenkins*.service")


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
    # The trust domain of its VMs. A VM joins a group with a domain only through what the host
    # controls (its name, images, the tags the policy's `vms:` gives it), never through tags
    # the VM carries itself: those cannot move a VM across a trust boundary.
    domain: str | None = None


@dataclass(frozen=True)
class Domain:
    """A trust domain: VMs that may share memory with each other and with nobody else."""

    name: str
    priority: int = 0  # the highest priority among domains with running VMs merges
    nodes: tuple[int, ...] = ()  # NUMA nodes its VMs are bound to (merge_across_nodes: false)
    line: int = 0


@dataclass(frozen=True)
class IsolationSettings:
    """How trust domains are kept apart: merge scopes, the memory guard, the choice."""

    # The kernel's merge_across_nodes: false gives one merge scope per NUMA node. None leaves
    # the knob as the host has it.
    merge_across_nodes: bool | None = None
    unmerge_reserve_mib: float = 1024.0  # memory the guard keeps free when pages are unmerged
    stickiness_percent: float = 25.0  # a domain takes a scope over on savings by this margin
    min_hold_seconds: float = 600.0  # ... and not before the active domain held it this long
    audit_interval_seconds: float = 300.0  # the daemon's page-map audit (at most 1 % of a core)


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
class IdentitySettings:
    """Who controls which field of a VM on this host (see policy/identity.py)."""

    # Fields tenants can set on their own VMs: no trust domain may rest on them. A VM's own
    # tags always count as tenant-controlled.
    tenant_controlled: tuple[str, ...] = ("tags",)


def valid_qemu_server_version(text: str) -> bool:
    """A qemu-server version as dpkg prints it: 9.0.27, 8.4.1-2 (ASCII digits, bounded)."""
    import re  # noqa: PLC0415 - the hook reads the model; only validation needs re

    return re.fullmatch(r"[0-9]{1,9}(\.[0-9]{1,9}){0,3}(-[0-9]{1,9})?", text) is not None


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
    # Tags given to VMs by the policy itself, keyed by a typed identity: `uuid:…`, `vmid:…`,
    # `name:…` (policy/identity.py).
    vms: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    reconciler: ReconcilerSettings = ReconcilerSettings()
    proxmox: ProxmoxSettings = ProxmoxSettings()
    source: str = "<builtin>"
    domains: tuple[Domain, ...] = ()
    # Trust domains given to VMs by the `vms:` section, keyed like `vms`.
    vm_domains: Mapping[str, str] = field(default_factory=dict, hash=False)
    isolation: IsolationSettings = IsolationSettings()
    identity: IdentitySettings = IdentitySettings()

    @property
    def uses_domains(self) -> bool:
        """Trust domains are on: every VM is defined unmergeable and only the active domain's
        guest RAM is switched to mergeable, live."""
        return bool(self.domains)

    def domain(self, name: str) -> Domain:
        """A domain by name; `default` (and any name not declared) with priority 0."""
        for domain in self.domains:
            if domain.name == name:
                return domain
        return Domain(name)
