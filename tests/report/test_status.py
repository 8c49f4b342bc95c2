"""status and metrics: exact figures on a fake host tree, moving figures on the real kernel."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from ksmpolicy.cli.main import cli
from ksmpolicy.control.law import History, LawSettings, Observation, plan
from ksmpolicy.paths import HostPaths
from ksmpolicy.policy.load import parse_policy
from ksmpolicy.report.metrics import (
    StatusCollector,
    exposition,
    metrics_url,
    parse_listen,
    serve,
)
from ksmpolicy.report.render import as_json, text
from ksmpolicy.report.status import collect
from lab.simguest import spawn
from tests.conftest import REPO, RealKsm
from tests.fakehost import FakeHost
from tests.kernel.test_scan import LIBVIRT, PROXMOX, SMAPS, write_process

POLICY = parse_policy(
    """\
version: 1
groups:
  debian: {images: ["*:base-9000-*"]}
rules:
  - {name: databases, match: {tags: [database]}, action: exclude}
""",
    "p.yaml",
)
MIB = 2**20


def fake_host(root: Path, *, run: int = 1, full_scans: int = 5) -> Path:
    host = FakeHost(root).ksm(
        run=run,
        pages_to_scan=1000,
        sleep_millisecs=20,
        pages_sharing=25600,
        pages_shared=100,
        ksm_zero_pages=256,
        general_profit=100 * MIB,
        full_scans=full_scans,
    )
    host.meminfo().ksmd(42, cpu_ns=12_500_000_000)  # the kernel thread, 12.5 s of CPU
    return host.proc


def ksm_stat(merging: int, zero: int = 0, profit: int = 0, mergeable: str = "yes") -> str:
    return (
        f"ksm_rmap_items 10\nksm_zero_pages {zero}\nksm_merging_pages {merging}\n"
        f"ksm_process_profit {profit}\nksm_merge_any: no\nksm_mergeable: {mergeable}\n"
    )


@pytest.fixture
def host(tmp_path: Path) -> Path:
    proc = fake_host(tmp_path)
    # A libvirt guest with its status XML, a Proxmox database VM excluded but still mergeable
    # (drift), and a non-QEMU process that opted in.
    write_process(proc, 100, LIBVIRT, "qemu-system-x86", SMAPS, ksm_stat(12800, 256, 50 * MIB))
    run = tmp_path / "run/libvirt/qemu"
    run.mkdir(parents=True)
    (run / "web-1,blue.xml").write_text(
        "<domstatus state='running' pid='100'><domain type='kvm' id='1'><name>web-1,blue</name>"
        "<metadata><k:vm xmlns:k='urn:ksmpolicy:vm:1'><k:tag>web</k:tag></k:vm></metadata>"
        "<memory unit='MiB'>256</memory></domain></domstatus>"
    )
    write_process(proc, 101, PROXMOX, "kvm", SMAPS, ksm_stat(0))
    pve = tmp_path / "etc/pve/qemu-server"
    pve.mkdir(parents=True)
    (pve / "101.conf").write_text(
        "memory: 2048\nname: pg-primary\nscsi0: local-lvm:base-9000-disk-0/vm-101-disk-0\n"
        "tags: database\n"
    )
    write_process(proc, 102, ["/usr/bin/redis-server"], "redis-server", SMAPS, ksm_stat(5))
    return tmp_path


def test_status_on_a_fake_host_has_exact_figures(host: Path) -> None:
    status = collect(HostPaths(host), POLICY, sample_seconds=0)
    assert status.host.running
    assert status.host.saved_bytes == (25600 + 256) * 4096
    assert status.host.general_profit_bytes == 100 * MIB
    vms = {vm.pid: vm for vm in status.vms}
    web, pg, redis = vms[100], vms[101], vms[102]
    assert (web.name, web.source, web.group, web.decision, web.compliant) == (
        "web-1,blue",
        "libvirt",
        None,
        "merge",
        True,  # its RAM VMA is mergeable ("mg"): the live state counts, not the
    )  # mem-merge=off it was started with (a live toggle undoes that)
    assert (web.mergeable_bytes, web.merged_bytes, web.zero_bytes, web.profit_bytes) == (
        (200000 + 512) * 1024,
        12800 * 4096,
        256 * 4096,
        50 * MIB,
    )
    assert (pg.name, pg.vmid, pg.source, pg.group, pg.decision, pg.rule) == (
        "pg-primary",
        "101",
        "proxmox",
        "debian",
        "exclude",
        "databases",
    )
    assert pg.compliant is False  # excluded, yet its memory is mergeable
    # a process that opted in is decided like a VM, by its kind (and unit, in a service)
    assert (redis.kind, redis.decision, redis.merged_bytes) == ("process", "merge", 5 * 4096)
    messages = {(f.vm, f.message) for f in status.findings}
    assert ("pg-primary", "excluded by the policy but its guest RAM is mergeable") in messages
    assert any(
        f.fix == "ksmpolicy apply --proxmox --vmid 101, then qm reboot 101"
        and (f.severity, f.code) == ("error", "excluded-mergeable")
        for f in status.findings
    )
    assert [(g.name, g.vms) for g in status.groups] == [("(none)", 1), ("debian", 1)]


def test_status_text_fits_80_columns(host: Path) -> None:
    output = text(collect(HostPaths(host), POLICY, sample_seconds=0))
    assert all(len(line) <= 80 for line in output.splitlines()), output
    assert "KSM: running, controlled by unknown (KSM runs with fixed knobs)" in output
    assert "pg-primary" in output and "Findings:" in output


def test_status_json_is_the_documented_shape(host: Path) -> None:
    data = as_json(collect(HostPaths(host), POLICY, sample_seconds=0))
    assert data["version"] == 1
    assert set(data) == {
        "version",
        "hostname",
        "policy",
        "policy_error",
        "savings_note",
        "host",
        "vms",
        "groups",
        "scopes",
        "findings",
    }
    vm = data["vms"][0]  # type: ignore[index]
    assert set(vm) == {
        "pid",
        "name",
        "vmid",
        "uuid",
        "kind",
        "unit",
        "source",
        "group",
        "decision",
        "rule",
        "compliant",
        "ram_bytes",
        "mergeable_bytes",
        "merged_bytes",
        "zero_bytes",
        "profit_bytes",
        "saved_bytes",
        "savings_source",
        "domain",
        "merging_now",
        "hook_said",
    }
    assert set(data["findings"][0]) == {"severity", "vm", "message", "fix", "code", "steps"}  # type: ignore[index]
    assert vm["savings_source"] == "ksm_stat"  # a fake host has no page map  # type: ignore[index]
    json.dumps(data)  # serialisable


def test_stopped_ksm_while_vms_want_merging_is_a_finding(tmp_path: Path) -> None:
    proc = fake_host(tmp_path, run=0)
    argv = [*LIBVIRT]
    argv[5] = "pc-i440fx-7.2,usb=off"  # without mem-merge=off
    write_process(proc, 100, argv, "qemu-system-x86", SMAPS, ksm_stat(0))
    status = collect(HostPaths(tmp_path), POLICY, sample_seconds=0)
    assert status.findings[0].message == "KSM is stopped while 1 VM(s) may merge"
    assert status.vms[0].compliant is True


def test_a_vm_that_merges_nothing_after_full_scans(tmp_path: Path) -> None:
    proc = fake_host(tmp_path, full_scans=7)
    argv = [*LIBVIRT]
    argv[5] = "pc-i440fx-7.2"
    write_process(proc, 100, argv, "qemu-system-x86", SMAPS, ksm_stat(0))
    status = collect(HostPaths(tmp_path), POLICY, sample_seconds=0)
    assert any(
        f.message == "merges nothing after 7 full scans: it costs scan CPU for no gain"
        for f in status.findings
    )


def test_status_without_ksm_or_never_used(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    status = collect(HostPaths(tmp_path), None, sample_seconds=0)
    assert text(status).splitlines()[0] == (
        "KSM: not available (this kernel has no /sys/kernel/mm/ksm; CONFIG_KSM=n)"
    )
    assert as_json(status)["host"]["ksm_available"] is False  # type: ignore[index]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    proc = fake_host(fresh, run=0, full_scans=0)
    for name in ("pages_sharing", "ksm_zero_pages", "general_profit"):
        (fresh / "sys/kernel/mm/ksm" / name).write_text("0\n")
    assert "(KSM has not scanned anything since boot)" in text(
        collect(HostPaths(fresh), None, sample_seconds=0)
    )
    assert proc.exists()
    # scanning, but no full scan yet: not "nothing since boot"
    (fresh / "sys/kernel/mm/ksm/pages_scanned").write_text("81920\n")
    shown = text(collect(HostPaths(fresh), None, sample_seconds=0))
    assert "(ksmd has scanned 81920 pages, but not yet one full scan)" in shown
    assert "not scanned anything" not in shown


def test_cli_status_and_metrics_without_a_policy(host: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        cli, ["-p", str(tmp_path / "none.yaml"), "status", "--root", str(host), "--sample", "0"]
    )
    assert result.exit_code == 0, result.output
    assert "policy: not usable:" in result.output
    result = runner.invoke(cli, ["-p", str(tmp_path / "none.yaml"), "metrics", "--root", str(host)])
    assert result.exit_code == 0
    assert "ksmpolicy_vm_merged_bytes" in result.output


# --- metrics --------------------------------------------------------------------------------


def test_metrics_parse_and_every_family_has_help_and_type(host: Path) -> None:
    exposed = exposition(StatusCollector(HostPaths(host), lambda: POLICY))
    families = {f.name: f for f in text_string_to_metric_families(exposed)}
    for name in families:
        assert f"# HELP {name}" in exposed
        assert f"# TYPE {name}" in exposed
    assert families["ksmpolicy_ksmd_cpu_seconds"].samples[0].value == 12.5
    merged = {
        (s.labels["vm"], s.labels["kind"]): s.value
        for s in families["ksmpolicy_vm_merged_bytes"].samples
    }
    assert merged == {
        ("web-1,blue", "qemu"): 12800 * 4096,
        ("pg-primary", "qemu"): 0,
        ("redis-server[102]", "process"): 5 * 4096,  # a KSM user beside the VMs
    }
    compliant = families["ksmpolicy_vm_compliant"].samples
    assert {(s.labels["vm"], s.labels["decision"], s.value) for s in compliant} == {
        ("web-1,blue", "merge", 1.0),
        ("pg-primary", "exclude", 0.0),
        ("redis-server[102]", "merge", 1.0),
    }
    assert families["ksmpolicy_ksm_general_profit_bytes"].samples[0].value == 100 * MIB
    assert families["ksmpolicy_ksm_full_scans"].type == "counter"
    assert {
        "ksmpolicy_ksm_saved_bytes",
        "ksmpolicy_ksm_zero_pages",
        "ksmpolicy_group_merged_bytes",
        "ksmpolicy_vm_profit_bytes",
        "ksmpolicy_findings",
    } <= set(families)


def test_metric_labels_escape_quotes_and_newlines(tmp_path: Path) -> None:
    proc = fake_host(tmp_path)
    evil = 'say "hi"\\\nbye'
    argv = ["/usr/bin/qemu-system-x86_64", "-name", f"guest={evil}", "-m", "64"]
    write_process(proc, 100, argv, "qemu-system-x86", SMAPS, ksm_stat(1))
    exposed = exposition(StatusCollector(HostPaths(tmp_path), lambda: POLICY))
    assert '\\"hi\\"' in exposed and "\\n" in exposed
    families = {f.name: f for f in text_string_to_metric_families(exposed)}
    names = {s.labels["vm"] for s in families["ksmpolicy_vm_merged_bytes"].samples}
    assert names == {evil}


def test_textfile_is_written_whole(host: Path, tmp_path: Path) -> None:
    target = tmp_path / "ksmpolicy.prom"
    result = CliRunner().invoke(
        cli,
        ["-p", str(tmp_path / "x.yaml"), "metrics", "--textfile", str(target), "--root", str(host)],
    )
    assert result.exit_code == 0, result.output
    assert "ksmpolicy_ksm_saved_bytes" in target.read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("ksmpolicy.prom")] == [
        "ksmpolicy.prom"
    ]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("9573", ("127.0.0.1", 9573)),
        (":9573", ("127.0.0.1", 9573)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("[::1]:9573", ("::1", 9573)),
    ],
)
def test_listen_addresses(address: str, expected: tuple[str, int]) -> None:
    assert parse_listen(address) == expected


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("9573", "http://127.0.0.1:9573/metrics"),
        ("0.0.0.0:80", "http://0.0.0.0:80/metrics"),
        ("[::1]:9573", "http://[::1]:9573/metrics"),
    ],
)
def test_metrics_urls(address: str, expected: str) -> None:
    assert metrics_url(address) == expected


def test_metrics_are_served_where_the_log_says(tmp_path: Path) -> None:
    """The daemon logs the URL `serve` returns (it once printed http://9573/metrics)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = serve(StatusCollector(HostPaths(fake_host(tmp_path)), lambda: POLICY), str(port))
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert "# TYPE ksmpolicy_ksm_available gauge\n" in answer.read().decode()


def test_bad_listen_address() -> None:
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        parse_listen("localhost:http")


def daemon_like() -> SimpleNamespace:
    """What the daemon's collector sees: a reconciler with a last plan."""
    observation = Observation(0, 10_000, 0, 0, 2**30, 2**29)
    return SimpleNamespace(last_plan=plan(observation, LawSettings(), History()))


def test_daemon_metrics_add_the_reconciler(host: Path) -> None:
    exposed = exposition(StatusCollector(HostPaths(host), lambda: POLICY, daemon_like()))
    families = {f.name: f for f in text_string_to_metric_families(exposed)}
    modes = {s.labels["mode"]: s.value for s in families["ksmpolicy_reconciler_mode"].samples}
    assert modes["sprint"] == 1.0
    assert sum(modes.values()) == 1.0
    assert families["ksmpolicy_reconciler_pages_per_second"].samples[0].value > 0


@pytest.mark.parametrize("dashboard_file", ["ksmpolicy.json", "ksmpolicy-fleet.json"])
def test_grafana_dashboard_uses_exposed_metrics(host: Path, dashboard_file: str) -> None:
    dashboard = json.loads((REPO / "contrib/grafana" / dashboard_file).read_text())
    exposed = exposition(StatusCollector(HostPaths(host), lambda: POLICY, daemon_like()))
    names = {f.name for f in text_string_to_metric_families(exposed)}
    # A fake host has no page map: the sharing map's metrics, from a map of two groups.
    from ksmpolicy.report.metrics import sharing_metrics
    from ksmpolicy.report.sharing import PairShare, Sharing

    pairs = (PairShare("web", "web", 100, 2), PairShare("db", "web", 0, 1))
    names |= {m.name for m in sharing_metrics(Sharing((), (), pairs, 200, 0, (), 0.1))}
    names |= {f"{n}_total" for n in names}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    for expr in exprs:
        used = {
            word
            for word in expr.replace("(", " ").replace(")", " ").replace("{", " ").split()
            if word.startswith("ksmpolicy_")
        }
        assert used <= names, (expr, used - names)


# --- the real kernel -----------------------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.root
def test_status_numbers_move_as_merging_happens(real_ksm: RealKsm) -> None:
    guests = [
        real_ksm.track(spawn(f"status-{i}", mib=32, image="status", image_percent=90))
        for i in range(2)
    ]
    pids = {g.pid for g in guests}

    def merged() -> int:
        status = collect(HostPaths(), POLICY, sample_seconds=0)
        return sum(vm.merged_bytes for vm in status.vms if vm.pid in pids)

    assert merged() == 0
    real_ksm.write("pages_to_scan", 5000)
    real_ksm.write("sleep_millisecs", 10)
    real_ksm.write("run", 1)
    deadline = time.monotonic() + 30
    while merged() < 2 * 32 * MIB * 0.8 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert merged() >= 2 * 32 * MIB * 0.8
    status = collect(HostPaths(), POLICY, sample_seconds=0.3)
    assert status.host.running and status.host.saved_bytes > 0
    assert status.host.ksmd_cpu_percent is not None
    ours = [vm for vm in status.vms if vm.pid in pids]
    assert all(vm.decision == "merge" and vm.compliant for vm in ours)


def test_concurrent_scrapes_never_share_the_scanner_at_once(tmp_path: Path) -> None:
    """prometheus_client serves each scrape on its own thread; the scanner's caches were
    used by two scrapes at once."""
    import threading

    from ksmpolicy.kernel.scan import ProcessScanner

    class Watching(ProcessScanner):
        inside = 0
        most = 0

        def scan(self, *, refresh: bool = False) -> list[Any]:
            Watching.inside += 1
            Watching.most = max(Watching.most, Watching.inside)
            time.sleep(0.05)  # a scan of many guests takes this long
            Watching.inside -= 1
            return []

    collector = StatusCollector(HostPaths(tmp_path), lambda: None)
    collector.scanner = Watching(HostPaths(tmp_path))
    threads = [threading.Thread(target=lambda: list(collector.collect())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert Watching.most == 1


def test_a_finding_keeps_to_its_two_lines() -> None:
    """A message or fix that quotes a name with a line break cannot add a line to a report."""
    from ksmpolicy.report.finding import Finding
    from ksmpolicy.report.render import _finding_text

    finding = Finding("warning", "x", "bound to\nfake: line", "run\nrm -rf /", "code")
    assert _finding_text(finding, "x: ") == [
        "  [warning] x: bound to\\u000afake: line",
        "      -> run\\u000arm -rf /",
    ]
