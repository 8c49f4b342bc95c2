"""Prometheus metrics: per VM, per group, and the host figures node_exporter lacks."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ksmpolicy.files import write_atomic
from ksmpolicy.inventory.model import HostStatus
from ksmpolicy.kernel.scan import ProcessScanner
from ksmpolicy.paths import PAGE_SIZE, HostPaths
from ksmpolicy.policy.model import Policy
from ksmpolicy.report.findings import SEVERITIES
from ksmpolicy.report.model import Status
from ksmpolicy.report.status import collect

if TYPE_CHECKING:
    from ksmpolicy.report.sharing import Sharing

VM_LABELS = ["vm", "vmid", "group", "kind"]  # kind: qemu, firecracker, service, ...


PAGEMAP_SECONDS = 60.0  # scrapes in between reuse the last page-map walk


class StatusCollector:
    """Collects on every scrape. `reconciler` (the daemon's) adds what it decided.

    The page map (exact savings, the sharing map) is walked at most every `pagemap_seconds`:
    a walk reads every guest's page tables, which on a large host costs seconds of CPU, and
    scrapes come every 15 s or so. In between, the last walk's figures are reused for the VMs
    still running.
    """

    def __init__(
        self,
        paths: HostPaths,
        policy: Callable[[], Policy | None],
        reconciler: Any = None,
        pagemap_seconds: float = PAGEMAP_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        keeper: Callable[[], Any] | None = None,
    ) -> None:
        self.paths = paths
        self.policy = policy
        self.reconciler = reconciler
        self.keeper = keeper
        self.scanner = ProcessScanner(paths)
        self.pagemap_seconds = pagemap_seconds
        self.clock = clock
        self._sharing: Sharing | None = None
        self._walked: float | None = None
        # prometheus_client serves scrapes on threads; the scanner's caches are not for sharing.
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            now = self.clock()
            fresh = self._walked is not None and now - self._walked < self.pagemap_seconds
            status = collect(
                self.paths,
                self.policy(),
                sample_seconds=0,
                scanner=self.scanner,
                pagemap=not fresh,
                reuse=self._sharing if fresh else None,
            )
            if not fresh:
                self._sharing, self._walked = status.sharing, now
        yield from status_metrics(status)
        if self.reconciler is not None and self.reconciler.last_plan is not None:
            yield from reconciler_metrics(self.reconciler)
        keeper = self.keeper() if self.keeper is not None else None
        if keeper is not None:
            yield from keeper_metrics(keeper)


def _gauge(name: str, help_text: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        yield GaugeMetricFamily(f"ksmpolicy_{name}", help_text, value=value)


def status_metrics(status: Status) -> Iterator[Metric]:
    """Every family `status` can say: the host's, each VM's, each group's, the findings."""
    host = status.host
    yield from _gauge(
        "ksm_available", "1 if the kernel has KSM (/sys/kernel/mm/ksm).", int(host.available)
    )
    yield from _gauge("ksm_running", "1 if ksmd runs (run=1).", int(host.running))
    yield from _gauge("page_size_bytes", "The kernel's page size, which KSM merges in.", PAGE_SIZE)
    if host.available:
        yield from _host_metrics(host)
    yield from _vm_metrics(status)


def _host_metrics(host: HostStatus) -> Iterator[Metric]:
    yield from _gauge(
        "ksm_saved_bytes",
        "Memory KSM saves: (pages_sharing + ksm_zero_pages) x page size.",
        host.saved_bytes,
    )
    yield from _gauge(
        "ksm_pages_sharing", "KSM pages_sharing: sites sharing KSM pages.", host.pages_sharing
    )
    yield from _gauge("ksm_pages_shared", "KSM pages_shared: KSM pages in use.", host.pages_shared)
    yield from _gauge(
        "ksm_zero_pages",
        "KSM ksm_zero_pages: empty pages merged with the zero page.",
        host.zero_pages,
    )
    yield from _gauge(
        "ksm_general_profit_bytes",
        "KSM general_profit: memory saved minus rmap overhead; negative when KSM costs more.",
        host.general_profit_bytes,
    )
    others = GaugeMetricFamily(
        "ksmpolicy_other_controllers",
        "Other controllers of the KSM knobs (ksmtuned, another daemon, the kernel advisor, "
        "qemu-kvm's KSM_ENABLED); when=running rewrites them, when=boot sets them at boot.",
        labels=["controller", "when"],
    )
    for name, running in host.others:
        others.add_metric([name, "running" if running else "boot"], 1)
    yield others
    yield from _gauge(
        "daemon_passive",
        "1 while the daemon writes no knob because another controller runs.",
        float(host.passive is not None),
    )
    pages = host.knobs.get("pages_to_scan")
    if isinstance(pages, int):
        yield from _gauge("ksm_pages_to_scan", "The KSM knob pages_to_scan.", pages)
    sleep = host.knobs.get("sleep_millisecs")
    if isinstance(sleep, int):  # in seconds, Prometheus' base unit
        yield from _gauge(
            "ksm_sleep_seconds", "The KSM knob sleep_millisecs, in seconds.", sleep / 1000
        )
    if host.full_scans is not None:
        yield CounterMetricFamily(
            "ksmpolicy_ksm_full_scans",
            "Full scans ksmd completed since boot.",
            value=host.full_scans,
        )
    if host.ksmd_cpu_seconds is not None:
        yield CounterMetricFamily(
            "ksmpolicy_ksmd_cpu_seconds",
            "CPU time of the ksmd thread since boot.",
            value=host.ksmd_cpu_seconds,
        )


def _vm_metrics(status: Status) -> Iterator[Metric]:
    families = {
        "mergeable": GaugeMetricFamily(
            "ksmpolicy_vm_mergeable_bytes",
            "Resident memory of the VM that KSM may merge.",
            labels=VM_LABELS,
        ),
        "merged": GaugeMetricFamily(
            "ksmpolicy_vm_merged_bytes",
            "Pages of the VM mapped to KSM pages (ksm_merging_pages).",
            labels=VM_LABELS,
        ),
        "zero": GaugeMetricFamily(
            "ksmpolicy_vm_zero_bytes",
            "Pages of the VM merged with the zero page.",
            labels=VM_LABELS,
        ),
        "profit": GaugeMetricFamily(
            "ksmpolicy_vm_profit_bytes",
            "ksm_process_profit of the VM: saved minus overhead.",
            labels=VM_LABELS,
        ),
        "saved": GaugeMetricFamily(
            "ksmpolicy_vm_saved_bytes",
            "Memory the VM's merging saves: exact from the page map (source=pagemap), else "
            "ksm_stat's merged and zero pages, which over-count shared pages (source=ksm_stat).",
            labels=[*VM_LABELS, "source"],
        ),
        "compliant": GaugeMetricFamily(
            "ksmpolicy_vm_compliant",
            "1 if the running VM merges as its policy decides, 0 if not.",
            labels=[*VM_LABELS, "decision"],
        ),
    }
    for vm in status.vms:  # VMs, and every other KSM user (VMMs, services, processes)
        labels = [vm.name, vm.vmid or "", vm.group or "", vm.kind]
        families["mergeable"].add_metric(labels, vm.mergeable_bytes)
        families["merged"].add_metric(labels, vm.merged_bytes)
        families["zero"].add_metric(labels, vm.zero_bytes)
        if vm.profit_bytes is not None:
            families["profit"].add_metric(labels, vm.profit_bytes)
        families["saved"].add_metric([*labels, vm.savings_source], vm.saved_bytes)
        if vm.compliant is not None:
            families["compliant"].add_metric([*labels, vm.decision or ""], int(vm.compliant))
    yield from families.values()
    if status.sharing is not None:
        yield from sharing_metrics(status.sharing)
    group_vms = GaugeMetricFamily(
        "ksmpolicy_group_vms", "Running VMs in the group.", labels=["group"]
    )
    group_mergeable = GaugeMetricFamily(
        "ksmpolicy_group_mergeable_bytes", "Mergeable memory of the group's VMs.", labels=["group"]
    )
    group_merged = GaugeMetricFamily(
        "ksmpolicy_group_merged_bytes", "Merged memory of the group's VMs.", labels=["group"]
    )
    for group in status.groups:
        group_vms.add_metric([group.name], group.vms)
        group_mergeable.add_metric([group.name], group.mergeable_bytes)
        group_merged.add_metric([group.name], group.merged_bytes)
    yield from (group_vms, group_mergeable, group_merged)
    findings = GaugeMetricFamily(
        "ksmpolicy_findings", "Findings of `ksmpolicy status`.", labels=["severity"]
    )
    for severity in SEVERITIES:
        findings.add_metric([severity], sum(f.severity == severity for f in status.findings))
    yield findings
    yield GaugeMetricFamily(
        "ksmpolicy_residue_vms",
        "VMs whose guest RAM is off but whose ROMs and video RAM stay mergeable until they "
        "restart (QEMU keeps its start-time setting).",
        value=sum(f.code == "residue" for f in status.findings),
    )


def sharing_metrics(sharing: Sharing) -> Iterator[Metric]:
    """Shared pages per group pair (a group with itself: pages two of its VMs share)."""
    pairs = GaugeMetricFamily(
        "ksmpolicy_group_pair_shared_pages",
        "KSM pages that VMs of both groups map (kind=content), or zero pages (kind=zero); "
        "group_a = group_b: pages shared within the group. '-' is VMs in no group.",
        labels=["group_a", "group_b", "kind"],
    )
    for pair in sharing.group_pairs:
        pairs.add_metric([pair.a, pair.b, "content"], pair.shared_pages)
        pairs.add_metric([pair.a, pair.b, "zero"], pair.zero_pages)
    yield pairs
    cross = GaugeMetricFamily(
        "ksmpolicy_cross_domain_pages",
        "KSM pages mapped by VMs (or other processes) of two or more trust domains: must be "
        "0. kind=content, or zero for zero-filled KSM pages (use_zero_pages=0).",
        labels=["kind"],
    )
    cross.add_metric(["content"], sharing.cross_domain_pages)
    cross.add_metric(["zero"], sharing.cross_domain_zero_pages)
    yield cross
    yield GaugeMetricFamily(
        "ksmpolicy_pagemap_walk_seconds",
        "How long the last page-map walk took.",
        value=sharing.seconds,
    )


def keeper_metrics(keeper: Any) -> Iterator[Metric]:
    """The daemon's trust domains: each merge scope's active domain, hand-overs, refusals."""
    scope = GaugeMetricFamily(
        "ksmpolicy_scope_domain",
        "1 for the trust domain that merges in each merge scope (host, or nodeN).",
        labels=["scope", "domain"],
    )
    for name, claim in sorted(keeper.last.claims.items()):
        scope.add_metric([name, claim.domain], 1)
    yield scope
    yield CounterMetricFamily(
        "ksmpolicy_domain_handovers",
        "Times a merge scope went from one trust domain to another.",
        value=keeper.handovers,
    )
    yield CounterMetricFamily(
        "ksmpolicy_domain_refusals",
        "Hand-overs the memory guard refused (the host could not absorb the unmerge).",
        value=keeper.refusals,
    )


def reconciler_metrics(reconciler: Any) -> Iterator[Metric]:
    plan = reconciler.last_plan
    mode = GaugeMetricFamily(
        "ksmpolicy_reconciler_mode",
        "The reconciler's mode (1 for the current one).",
        labels=["mode"],
    )
    for name in ("stopped", "calm", "slow", "settle", "sprint", "pressure", "advisor"):
        mode.add_metric([name], int(plan.mode == name))
    yield mode
    yield GaugeMetricFamily(
        "ksmpolicy_reconciler_pages_per_second",
        "Scan rate the reconciler planned.",
        value=plan.pages_per_second,
    )
    yield GaugeMetricFamily(
        "ksmpolicy_reconciler_cost_seconds_per_page",
        "ksmd CPU-seconds per scanned page, measured.",
        value=plan.history.cost_per_page,
    )


def registry_for(collector: StatusCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def exposition(collector: StatusCollector) -> str:
    return generate_latest(registry_for(collector)).decode()


def parse_listen(address: str) -> tuple[str, int]:
    """`9573`, `:9573`, `127.0.0.1:9573`, `[::1]:9573` -> (host, port); localhost by default."""
    host, sep, port = address.rpartition(":")
    if not sep:
        host, port = "", address
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host, int(port)


def metrics_url(address: str) -> str:
    """Where `serve(collector, address)` answers: `9573` -> http://127.0.0.1:9573/metrics."""
    host, port = parse_listen(address)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


# Another page beside /metrics: () -> (HTTP status, content type, body)
Route = Callable[[], tuple[str, str, bytes]]


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


def serve(
    collector: StatusCollector, address: str, routes: Mapping[str, Route] | None = None
) -> str:
    """Serve /metrics (and `routes`, by path) on `address` ([HOST:]PORT) from a thread; return
    the metrics URL. Every path not in `routes` is Prometheus's, as its own server answers."""
    host, port = parse_listen(address)
    metrics = make_wsgi_app(registry_for(collector))
    pages = dict(routes or {})

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        route = pages.get(environ.get("PATH_INFO", ""))
        if route is None:
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        status, content_type, body = route()
        start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]

    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("_Bound", (_Server,), {"address_family": family})
    server: WSGIServer = make_server(host, port, app, server_class, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return metrics_url(address)


def write_textfile(collector: StatusCollector, path: str) -> None:
    """For node_exporter's textfile collector: a new file beside it, renamed over it, following
    no symlink (its directory may belong to node_exporter's user)."""
    write_atomic(path, generate_latest(registry_for(collector)), 0o644)


def every(seconds: float, action: Callable[[], None]) -> None:
    while True:
        action()
        time.sleep(seconds)
