"""What `status` reports, as records: the host and the VMs (from the inventory), each group,
each merge scope under trust domains, the findings. `report/status.py` collects them,
`report/trust.py` judges the VMs under trust domains, `report/render.py` and
`report/metrics.py` show them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ksmpolicy.inventory.model import HostStatus, VmStatus
from ksmpolicy.report.finding import Finding

if TYPE_CHECKING:  # for the annotation only: the sharing map's module loads numpy
    from ksmpolicy.report.sharing import Sharing


@dataclass(frozen=True)
class GroupStatus:
    name: str
    vms: int
    mergeable_bytes: int
    merged_bytes: int


@dataclass(frozen=True)
class Status:
    host: HostStatus
    vms: tuple[VmStatus, ...]
    groups: tuple[GroupStatus, ...]
    findings: tuple[Finding, ...]
    policy: str | None = None
    policy_error: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    sharing: Sharing | None = None  # the sharing map, when the page map could be read
    savings_note: str | None = None  # why per-VM savings come from ksm_stat
    scopes: tuple[ScopeStatus, ...] = ()  # under trust domains: each merge scope's domain


@dataclass(frozen=True)
class ScopeStatus:
    name: str  # host, or node<N> with merge_across_nodes=0
    domain: str
    since: float  # wall-clock time of the claim
    why: str
