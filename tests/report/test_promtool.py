"""Every metric passes Prometheus' own linter, `promtool check metrics` (from Debian's
prometheus package; scripts/bootstrap puts it in the virtualenv)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from ksmpolicy.cli.main import cli
from ksmpolicy.paths import HostPaths
from ksmpolicy.report.metrics import StatusCollector, exposition, sharing_metrics
from ksmpolicy.report.sharing import PairShare, Sharing
from ksmpolicy.trust.choose import Claim
from lab.simguest import spawn
from tests.report.test_status import POLICY, daemon_like, host  # noqa: F401 - the fixture

PROMTOOL = Path(sys.executable).with_name("promtool")


def lint(exposed: str) -> str:
    """promtool's complaints, one per line; '' when there are none."""
    assert PROMTOOL.exists(), f"{PROMTOOL} is missing: run scripts/bootstrap"
    result = subprocess.run(
        [str(PROMTOOL), "check", "metrics"],
        input=exposed,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    complaints = (result.stdout + result.stderr).strip()
    assert (result.returncode == 0) == (complaints == ""), complaints
    return complaints


def test_promtool_flags_a_unit_that_is_not_the_base_unit() -> None:
    """The name this project exported before: the linter can fail."""
    bad = (
        "# HELP ksmpolicy_ksm_sleep_milliseconds The KSM knob sleep_millisecs.\n"
        "# TYPE ksmpolicy_ksm_sleep_milliseconds gauge\n"
        "ksmpolicy_ksm_sleep_milliseconds 20.0\n"
    )
    assert 'use base unit "seconds" instead of "milliseconds"' in lint(bad)


def test_every_family_the_daemon_exports_passes_promtool(host: Path) -> None:  # noqa: F811
    """Status, reconciler and trust-domain families from a fake host, and the page map's from
    a map of two groups (a fake host has no page map)."""
    keeper = SimpleNamespace(
        last=SimpleNamespace(claims={"host": Claim("provider", 0.0, "priority")}, residue=[]),
        handovers=2,
        refusals=1,
    )
    collector = StatusCollector(
        HostPaths(host), lambda: POLICY, daemon_like(), keeper=lambda: keeper
    )
    exposed = exposition(collector)
    pairs = (PairShare("web", "web", 100, 2), PairShare("db", "web", 0, 1))
    from prometheus_client import CollectorRegistry, generate_latest

    class Fixed:
        def collect(self) -> object:
            return sharing_metrics(Sharing((), (), pairs, 200, 0, (), 0.1))

    registry = CollectorRegistry()
    registry.register(Fixed())  # type: ignore[arg-type]
    exposed += generate_latest(registry).decode()
    for family in (
        "ksmpolicy_ksm_sleep_seconds",
        "ksmpolicy_reconciler_mode",
        "ksmpolicy_scope_domain",
        "ksmpolicy_domain_handovers_total",
        "ksmpolicy_cross_domain_pages",
        "ksmpolicy_group_pair_shared_pages",
    ):
        assert f"\n{family}" in exposed, family
    assert lint(exposed) == ""


@pytest.mark.root
def test_metrics_of_this_host_pass_promtool(tmp_path: Path) -> None:
    """`ksmpolicy metrics` on the real host (needs root: the page map), with two guest-like
    processes in two trust domains."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\ndomains: {a: {}, b: {}}\n"
        "groups:\n  ga: {names: [pt-a], domain: a}\n  gb: {names: [pt-b], domain: b}\n"
    )
    guests = [spawn(name, mib=16, image="promtool") for name in ("pt-a", "pt-b")]
    try:
        result = CliRunner().invoke(cli, ["-p", str(policy), "metrics"])
    finally:
        for guest in guests:
            guest.terminate()
            guest.wait()
    assert result.exit_code == 0, result.output
    assert "ksmpolicy_cross_domain_pages" in result.output  # the page map was walked
    assert 'vm="pt-a"' in result.output
    assert lint(result.output) == ""
