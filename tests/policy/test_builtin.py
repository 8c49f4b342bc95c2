"""The built-in default: what every read-only command and the daemon use with no policy file."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from ksmpolicy import __version__
from ksmpolicy.errors import PolicyError
from ksmpolicy.paths import HostPaths
from ksmpolicy.policy.decide import Decider, VmFacts
from ksmpolicy.policy.load import BUILTIN_NAME, builtin_policy, load_policy, load_policy_or_builtin
from ksmpolicy.policy.model import Action, Enforcement
from tests.conftest import REPO
from tests.control.test_daemon import KSMPOLICY, wait_for

HOST_HAS_A_POLICY = any(p.exists() for p in HostPaths().policy_search())
first_run = pytest.mark.skipif(
    HOST_HAS_A_POLICY, reason="this host has a policy file: not a first run (CI has none)"
)


def test_the_builtin_is_the_shipped_default_with_enforcement_and_live_off() -> None:
    shipped = load_policy(REPO / "policies/default.yaml", check_trust=False)
    builtin = builtin_policy("/nowhere/policy.yaml")
    assert (builtin.enforcement, builtin.live) == (Enforcement.OFF, False)
    assert builtin.source == f"{BUILTIN_NAME} (no file at /nowhere/policy.yaml)"
    assert (builtin.rules, builtin.default, builtin.reconciler) == (
        shipped.rules,
        shipped.default,
        shipped.reconciler,
    )
    decider = Decider(builtin)
    assert decider.decide(VmFacts(name="pg", tags=frozenset({"database"}))).action is Action.EXCLUDE
    assert decider.decide(VmFacts(name="web")).action is Action.MERGE


def test_a_missing_file_falls_back_only_when_no_policy_was_named(tmp_path: Path) -> None:
    missing = tmp_path / "policy.yaml"
    assert load_policy_or_builtin(missing, explicit=False).source.startswith(BUILTIN_NAME)
    with pytest.raises(PolicyError, match="no such file"):
        load_policy_or_builtin(missing, explicit=True)


def test_a_broken_file_is_an_error_never_the_builtin(tmp_path: Path) -> None:
    broken = tmp_path / "policy.yaml"
    broken.write_text("version: 1\nenforcement: sometimes\n")
    with pytest.raises(PolicyError, match="enforcement"):
        load_policy_or_builtin(broken, explicit=False)


def test_the_package_data_is_in_the_wheel_manifest() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert '"policy/default.yaml"' in text
    assert (REPO / "policies/default.yaml").resolve() == (
        REPO / "ksmpolicy/policy/default.yaml"
    ).resolve()


def ksmpolicy(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KSMPOLICY_POLICY"}
    return subprocess.run(
        [KSMPOLICY, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


@first_run
def test_first_run_status_check_explain_and_reconcile_name_the_builtin() -> None:
    where = str(HostPaths().policy_search()[-1])
    named = f"policy: {BUILTIN_NAME} (no file at {where})"
    status = ksmpolicy("status")
    assert status.returncode == 0, status.stderr
    assert named in status.stdout
    explain = ksmpolicy("explain", "--name", "pg", "--tag", "database")
    assert "decision: exclude" in explain.stdout
    assert named.replace("policy: ", "policy:   ") in explain.stdout
    check = ksmpolicy("check")
    assert check.returncode == 0
    assert check.stdout.startswith(
        f"no policy file at {where}: every command uses the {BUILTIN_NAME}"
    )
    dry = ksmpolicy("reconcile", "--once", "--dry-run", "--sample", "0")
    assert dry.returncode == 0, dry.stderr
    assert named.replace("policy: ", "policy:    ") in dry.stdout
    # commands that change VMs never act on the built-in default
    apply = ksmpolicy("apply", "--dry-run")
    assert apply.returncode == 1
    assert f"{where}: no such file" in apply.stderr


@first_run
def test_first_run_daemon_dry_run_names_the_builtin(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    with log.open("w") as err:
        process = subprocess.Popen(
            [KSMPOLICY, "daemon", "--dry-run", "--no-libvirt", "--run-dir", str(tmp_path / "run")],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={k: v for k, v in os.environ.items() if k != "KSMPOLICY_POLICY"},
        )
        try:
            assert wait_for(lambda: "started:" in log.read_text(), 15), log.read_text()
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=15)
    assert (
        f"started: ksmpolicy {__version__}, policy {BUILTIN_NAME} (no file at " in log.read_text()
    )
