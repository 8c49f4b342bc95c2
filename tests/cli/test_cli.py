"""The command line through click's CliRunner, and once as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ksmpolicy import __version__
from ksmpolicy.cli.main import cli, main
from tests.conftest import REPO

DEFAULT = str(REPO / "policies/default.yaml")


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(cli, list(args), env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def all_commands(group: click.Group = cli, prefix: tuple[str, ...] = ()) -> list[list[str]]:
    """Every command and group of the CLI, hidden ones included, as argument lists."""
    found = [list(prefix)]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            found += all_commands(command, (*prefix, name))
        else:
            found.append([*prefix, name])
    return found


def test_the_command_walk_finds_nested_and_hidden_commands() -> None:
    found = all_commands()
    assert ["proxmox", "persist"] in found and ["xml", "rewrite"] in found
    assert len(found) >= 20


@pytest.mark.parametrize("command", all_commands(), ids=lambda c: " ".join(c) or "ksmpolicy")
def test_every_command_has_help(command: list[str]) -> None:
    for flag in ("-h", "--help"):
        code, out, _ = run(*command, flag)
        assert code == 0, out
        assert out.startswith("Usage: ")
        summary = out.split("\n\n")[1].strip()
        assert len(summary) > 20, f"{command}: no description in --help"


def test_version() -> None:
    code, out, _ = run("--version")
    assert (code, out) == (0, f"ksmpolicy, version {__version__}\n")


def test_check_shipped_default_policy() -> None:
    code, out, _ = run("check", DEFAULT)
    assert code == 0
    assert out == (
        f"{DEFAULT}: ok (1 rule, 0 groups, 0 VMs named; default merge, enforcement warn)\n"
    )


def test_check_reports_typo_with_line_and_hint(write_policy: Callable[..., Path]) -> None:
    path = write_policy(
        "version: 1\nrules:\n  - acton: exclude\n    match: {tags: [database]}\n"
        "    action: exclude\n"
    )
    code, out, err = run("check", str(path))
    assert code == 1
    assert out == ""
    assert err == f"{path}:3: rules.0.acton: unknown key (did you mean 'action'?)\n"


def test_check_uses_global_policy_and_env(write_policy: Callable[..., Path]) -> None:
    good = write_policy("version: 1\n", "good.yaml")
    assert run("--policy", str(good), "check")[0] == 0
    assert run("check", "--policy", str(good))[0] == 0
    assert run("check", env={"KSMPOLICY_POLICY": str(good)})[0] == 0
    code, _, err = run("check", env={"KSMPOLICY_POLICY": "/nonexistent.yaml"})
    assert (code, err) == (1, "/nonexistent.yaml: no such file\n")


def test_explain_one_vm() -> None:
    code, out, _ = run("-p", DEFAULT, "explain", "--name", "pg-primary", "--tag", "database")
    assert code == 0
    assert out.splitlines()[:5] == [
        "VM:       pg-primary",
        "decision: exclude",
        "group:    -",
        "rule:     databases and latency-sensitive VMs",
        "tags:     database",
    ]


def test_explain_json() -> None:
    code, out, _ = run("explain", "-p", DEFAULT, "-n", "web", "--json")
    assert code == 0
    assert json.loads(out) == [
        {
            "vm": "web",
            "action": "merge",
            "merge": True,
            "group": None,
            "rule": None,
            "reason": "no rule matched; default is merge",
            "tags": [],
            "domain": "default",
            "domain_reason": "no domain given",
            "bind_nodes": [],
        }
    ]


def test_explain_facts_table() -> None:
    code, out, _ = run(
        "explain", "-p", str(REPO / "policies/homelab.yaml"), "--facts", str(REPO / "demo/vms.yaml")
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["VM", "GROUP", "DECISION", "RULE"]
    rows = {line.split()[0]: line.split(None, 3) for line in lines[1:]}
    assert rows["web-1"] == ["web-1", "ubuntu-2404", "merge", "(default)"]
    assert rows["pg-primary"][2] == "exclude"
    assert rows["hugepage-dpdk"][2:4] == ["never", "(memory)  (default)"]


def test_explain_usage_errors_exit_2() -> None:
    assert main(["explain"]) == 2
    assert main(["explain", "--name", "a", "--facts", "f.yaml"]) == 2
    assert main(["no-such-command"]) == 2
    assert main(["check", "--bogus"]) == 2


def test_errors_exit_1_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-p", "/nonexistent.yaml", "explain", "-n", "x"]) == 1
    assert capsys.readouterr().err == "/nonexistent.yaml: no such file\n"


def test_bad_facts_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    facts = tmp_path / "vms.yaml"
    facts.write_text("- {name: a, colour: red}\n")
    assert main(["-p", DEFAULT, "explain", "--facts", str(facts)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{facts}:1: 0.colour: unknown key (allowed: name, uuid, vmid,")


def test_internal_error_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr("ksmpolicy.report.status.collect", boom)  # inject a bug
    assert main(["status"]) == 1
    assert capsys.readouterr().err == (
        "ksmpolicy: internal error: RuntimeError: kaboom (run with --debug)\n"
    )
    assert main(["--debug", "status"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_console_script_runs_as_a_process() -> None:
    exe = Path(sys.executable).parent / "ksmpolicy"
    result = subprocess.run(
        [str(exe), "check", DEFAULT], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{DEFAULT}: ok")


def test_reconcile_requires_once() -> None:
    assert main(["reconcile"]) == 2


def test_notify_rejects_unknown_events() -> None:
    assert main(["notify", "exploded", "vm"]) == 2


# --- bad input is an error, never silently accepted -----------------------------------------


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The console script's entry point: errors become exit 1 and one line on stderr."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bad_combinations_and_inputs_are_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\n")
    xml = REPO / "tests/data/libvirt/ksm-nosharepages.xml"
    code, _out, err = run_main(capsys, "-p", str(policy), "apply", "--dry-run", "--vmid", "100")
    assert (code, "--vmid is for Proxmox VE: add --proxmox" in err) == (2, True), err
    code, _out, err = run_main(
        capsys, "-p", str(policy), "apply", "--dry-run", "--proxmox", "--root", str(tmp_path)
    )
    assert code == 1
    assert "this is no Proxmox VE node" in err
    for args in (
        ("proxmox", "rewrite", str(xml), "--vmid", "100"),
        ("explain", "--pve-conf", str(xml), "--vmid", "100"),
    ):
        code, _out, err = run_main(capsys, "-p", str(policy), *args)
        assert code == 1, args
        assert "this is XML (a libvirt domain?), not a Proxmox VM config" in err, err
    code, _out, err = run_main(capsys, "-p", str(policy), "proxmox", "rewrite", "-")
    assert code == 2
    assert "give --vmid VMID" in err
    code, _out, err = run_main(capsys, "-p", str(policy), "metrics", "--every", "5")
    assert (code, "--every rewrites a --textfile" in err) == (2, True), err


def test_a_missing_file_reads_the_same_everywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "gone")
    messages = set()
    for args in (
        ("-p", missing, "check"),
        ("explain", "--xml", missing),
        ("proxmox", "rewrite", missing, "--vmid", "100"),
        ("explain", "--facts", missing),
    ):
        code, _out, err = run_main(capsys, "-p", DEFAULT, *args) if args[0] != "-p" else run(*args)
        assert code == 1, (args, err)
        messages.add(err.strip().removeprefix("ksmpolicy: error: "))
    assert messages == {f"{missing}: no such file"}, messages


# --- the manual covers the command line ------------------------------------------------------

MANUAL = [
    REPO / "README.md",
    REPO / "contrib/proxmox/README.md",
    *sorted((REPO / "docs").glob("*.md")),
]


# Options many commands share, documented once: (flag, what the line that documents it says)
SHARED = {"--policy": "every command", "--connect": "every libvirt command"}


def documented() -> list[str]:
    return [line for page in MANUAL for line in page.read_text().splitlines()]


def test_every_command_and_option_is_in_the_readme_or_docs() -> None:
    """Each command (by its full name) and each of its options (on a line that also names
    the command) appears in the README or docs/. Hidden ones (for tests) are exempt."""
    lines = documented()
    missing = []
    for path in all_commands():
        if not path:
            continue
        command: click.Command = cli
        for word in path:
            assert isinstance(command, click.Group)
            command = command.commands[word]
        if command.hidden:
            continue
        name = " ".join(path)
        if not any(f"ksmpolicy {name}" in line or f"`{name}" in line for line in lines):
            missing.append(f"command `ksmpolicy {name}`")
            continue
        for param in command.params:
            if not isinstance(param, click.Option) or param.hidden or param.name == "help":
                continue
            flag = max(param.opts, key=len)
            shared = SHARED.get(flag)
            if shared and any(flag in line and shared in line for line in lines):
                continue
            if not any(flag in line and path[-1] in line for line in lines):
                missing.append(f"`ksmpolicy {name} {flag}`")
    assert not missing, "not in the README or docs/: " + ", ".join(missing)
