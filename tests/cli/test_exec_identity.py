"""`ksmpolicy exec` and `systemd-dropin` decide for what will run: the kind and name the process
scan will give it (kernel/vmm.py), so `kinds:`, `units:` and name rules hold for it; a command
that cannot run fails before anything is decided or announced."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.paths import HostPaths
from ksmpolicy.platforms.process import command_facts
from ksmpolicy.runtime.notify import Listener
from tests.conftest import IS_ROOT
from tests.control.test_daemon import KSMPOLICY

POLICY = """version: 1
rules:
  - {name: no firecracker, match: {kinds: [firecracker]}, action: exclude}
  - {name: no ci, match: {units: ["jenkins*.service"]}, action: exclude}
"""
# Prints the merge_any line of its own ksm_stat (the flag exec set or cleared), then its argv.
SHOW = (
    "import sys\n"
    "print([l.strip() for l in open('/proc/self/ksm_stat') if 'merge_any' in l][0])\n"
    "print(sys.argv[1:])\n"
)


CH_SOCKET = ("--api-socket", "path=/run/ch-3.sock")


def vmm(tmp_path: Path, name: str) -> Path:
    """A program called `name` that runs Python: argv[0] and the kernel's comm are `name`, as
    for the real binary (a script would run as its interpreter)."""
    path = tmp_path / name
    path.symlink_to(os.path.realpath(sys.executable))
    return path


def run(tmp_path: Path, *args: str, policy: str = POLICY) -> subprocess.CompletedProcess[str]:
    file = tmp_path / "policy.yaml"
    file.write_text(policy)
    return subprocess.run(
        [KSMPOLICY, "-p", str(file), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --- the facts: one classification ------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "kind", "name"),
    [
        (["firecracker", "--id", "fc-1"], "firecracker", "fc-1"),
        (["/usr/bin/firecracker", "--id=fc-1", "--api-sock", "/run/x"], "firecracker", "fc-1"),
        (
            ["jailer", "--id", "fc-2", "--exec-file", "/usr/bin/firecracker", "--uid", "1"],
            "firecracker",
            "fc-2",
        ),
        (["cloud-hypervisor", "--api-socket", "path=/run/ch-7.sock"], "cloud-hypervisor", "ch-7"),
        (["qemu-system-x86_64", "-name", "guest=web-1", "-m", "512"], "qemu", "web-1"),
        (["java", "-jar", "runner.jar"], "process", "java"),
    ],
)
def test_a_command_is_what_the_scan_will_see(argv: list[str], kind: str, name: str) -> None:
    facts = command_facts(argv, f"/usr/bin/{Path(argv[0]).name}", unit=None)
    assert (facts.kind, facts.name) == (kind, name)


def test_in_a_service_a_command_is_that_service() -> None:
    facts = command_facts(["java", "-jar", "r.jar"], "/usr/bin/java", unit="jenkins.service")
    assert (facts.kind, facts.name, facts.unit) == ("service", "jenkins", "jenkins.service")
    named = command_facts(["java"], "/usr/bin/java", unit="jenkins.service", name="runner")
    assert (named.kind, named.name, named.unit) == ("service", "runner", "jenkins.service")


def test_a_name_may_not_contradict_the_one_the_vm_gives_itself() -> None:
    with pytest.raises(KsmPolicyError, match="names itself 'fc-1' \\(firecracker\\)"):
        command_facts(["firecracker", "--id", "fc-1"], "/bin/firecracker", unit=None, name="web")
    same = command_facts(["firecracker", "--id", "fc-1"], "/bin/f", unit=None, name="fc-1")
    assert same.name == "fc-1"


# --- exec on real processes --------------------------------------------------------------------


def test_exec_decides_a_firecracker_as_firecracker(tmp_path: Path) -> None:
    """It decided as kind `qemu` named `firecracker`, so `kinds: [firecracker]` let it merge."""
    program = vmm(tmp_path, "firecracker")
    result = run(tmp_path, "exec", "--", str(program), "-c", SHOW, "--id", "fc-1")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(
        "ksmpolicy: fc-1 (firecracker): not mergeable (rule 'no firecracker'"
    )
    assert result.stdout.splitlines() == ["ksm_merge_any: no", "['--id', 'fc-1']"]


def test_exec_refuses_a_name_that_is_not_the_vms(tmp_path: Path) -> None:
    program = vmm(tmp_path, "firecracker")
    result = run(tmp_path, "exec", "-n", "web", "--", str(program), "-c", SHOW, "--id", "fc-1")
    assert result.returncode == 1
    assert "names itself 'fc-1' (firecracker)" in result.stderr
    assert result.stdout == ""  # nothing ran


@pytest.mark.root
@pytest.mark.kernel
@pytest.mark.skipif(not IS_ROOT, reason="PR_SET_MEMORY_MERGE needs CAP_SYS_RESOURCE")
def test_exec_merges_what_the_policy_lets_merge_and_the_scan_agrees(tmp_path: Path) -> None:
    program = vmm(tmp_path, "cloud-hypervisor")
    code = "import time\nprint(open('/proc/self/comm').read().strip(), flush=True)\ntime.sleep(60)"
    file = tmp_path / "policy.yaml"
    file.write_text(POLICY)
    process = subprocess.Popen(
        [KSMPOLICY, "-p", str(file), "exec", "--", str(program), "-c", code, *CH_SOCKET],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline().strip() == "cloud-hyperviso"  # comm: 15 characters
        status = Path(f"/proc/{process.pid}/ksm_stat").read_text()
        assert "ksm_merge_any: yes" in status
        from ksmpolicy.kernel.scan import ProcessScanner

        seen = {p.pid: p for p in ProcessScanner(HostPaths(Path("/"))).scan()}
        assert (seen[process.pid].kind, seen[process.pid].name) == ("cloud-hypervisor", "ch-3")
    finally:
        process.kill()
        process.wait()
    assert process.stderr.read().startswith("ksmpolicy: ch-3 (cloud-hypervisor): mergeable")


@pytest.mark.parametrize(
    ("command", "code", "says"),
    [
        ("/nonexistent/vmm", 127, "cannot run /nonexistent/vmm: No such file or directory"),
        ("no-such-vmm-here", 127, "cannot run no-such-vmm-here: command not found"),
        ("{tmp}/plain.txt", 126, "cannot run {tmp}/plain.txt: not an executable file"),
        ("{tmp}", 126, "cannot run {tmp}: not an executable file"),
    ],
)
def test_a_command_that_cannot_run_fails_before_anything_is_announced(
    tmp_path: Path, command: str, code: int, says: str
) -> None:
    """A shell's exit codes; and the daemon hears of nothing (it was told `started`, then the
    exec failed)."""
    (tmp_path / "plain.txt").write_text("not a program\n")
    run_dir = tmp_path / "run"
    listener = Listener(HostPaths(tmp_path, run_dir))
    command = command.format(tmp=tmp_path)
    result = run(tmp_path, "exec", "--run-dir", str(run_dir), "--", command, "--id", "x")
    assert result.returncode == code, result.stderr
    assert says.format(tmp=tmp_path) in result.stderr
    assert "mergeable" not in result.stderr  # nothing decided
    assert listener.receive() == []


# --- systemd-dropin -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "policy", "want"),
    [
        ("jenkins-ci.service", POLICY, "no"),  # units: ["jenkins*.service"]
        ("web.service", POLICY, "yes"),
        ("web", "version: 1\nrules:\n  - {match: {kinds: [service]}, action: exclude}\n", "no"),
        ("web", "version: 1\nrules:\n  - {match: {kinds: [qemu]}, action: exclude}\n", "yes"),
    ],
)
def test_the_dropin_applies_unit_and_kind_rules(
    tmp_path: Path, unit: str, policy: str, want: str
) -> None:
    result = run(
        tmp_path, "systemd-dropin", unit, "--systemd-version", "254", "--print", policy=policy
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(f"[Service]\nMemoryKSM={want}\n")


def test_the_dropin_is_for_services_only(tmp_path: Path) -> None:
    result = run(tmp_path, "systemd-dropin", "jenkins.socket", "--systemd-version", "254")
    assert result.returncode == 2
    assert "'jenkins.socket' is no service" in result.stderr
