"""The libvirt hook: every operation, every enforcement mode, its own failures, hostile input.

Most tests run the installed shim as a real process, the way libvirtd does (argv, XML on
stdin, exit status, stderr), with a time limit.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ksmpolicy.libvirt.install import install, shim, uninstall
from ksmpolicy.paths import HostPaths
from ksmpolicy.runtime.notify import Listener
from tests.conftest import REPO

DATA = REPO / "tests/data/libvirt"
DATABASE_XML = (DATA / "ksm-tagged-database.xml").read_bytes()  # tagged database, no nosharepages
EXCLUDED_XML = (DATA / "ksm-nosharepages.xml").read_bytes()  # has nosharepages
POLICY = """\
version: 1
enforcement: {mode}
rules:
  - name: databases
    match: {{tags: [database]}}
    action: exclude
  - name: latency
    match: {{names: [latency-box]}}
    action: {latency}
"""


class Hook:
    def __init__(self, directory: Path, policy: Path) -> None:
        self.path = directory / "qemu-hook"
        self.path.write_text(shim(sys.executable, str(policy), str(directory / "run")))
        self.path.chmod(0o755)
        self.run_dir = directory / "run"

    def __call__(
        self, name: str, op: str, subop: str, xml: bytes = b""
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(self.path), name, op, subop, "-"],
            input=xml,
            capture_output=True,
            timeout=20,
            check=False,
        )


@pytest.fixture
def make_hook(tmp_path: Path) -> Callable[..., Hook]:
    def make(mode: str = "block", latency: str = "exclude", text: str | None = None) -> Hook:
        policy = tmp_path / "policy.yaml"
        policy.write_text(text if text is not None else POLICY.format(mode=mode, latency=latency))
        policy.chmod(0o644)
        return Hook(tmp_path, policy)

    return make


def test_block_refuses_a_database_without_nosharepages(make_hook: Callable[..., Hook]) -> None:
    result = make_hook("block")("pg-primary", "prepare", "begin", DATABASE_XML)
    assert result.returncode == 1
    assert result.stderr.decode() == (
        "ksmpolicy: \"pg-primary\" must not share memory (rule 'databases') but its definition "
        "lacks <memoryBacking><nosharepages/>. Fix: ksmpolicy apply --domain pg-primary\n"
    )
    assert result.stdout == b""


def test_warn_lets_it_start_and_says_why(make_hook: Callable[..., Hook]) -> None:
    result = make_hook("warn")("pg-primary", "prepare", "begin", DATABASE_XML)
    assert result.returncode == 0
    assert result.stderr.decode().startswith('ksmpolicy: "pg-primary" must not share memory')
    assert result.stderr.decode().endswith("Run: ksmpolicy apply --domain pg-primary\n")


def test_off_says_nothing(make_hook: Callable[..., Hook]) -> None:
    result = make_hook("off")("pg-primary", "prepare", "begin", DATABASE_XML)
    assert (result.returncode, result.stderr) == (0, b"")


def test_compliant_definition_starts_quietly(make_hook: Callable[..., Hook]) -> None:
    result = make_hook("block")("latency-box", "prepare", "begin", EXCLUDED_XML)
    assert (result.returncode, result.stderr) == (0, b"")


def test_block_never_stops_a_vm_for_merging_too_little(make_hook: Callable[..., Hook]) -> None:
    """nosharepages where the policy allows merging costs memory, not safety: warn only."""
    result = make_hook("block", latency="merge")("latency-box", "prepare", "begin", EXCLUDED_XML)
    assert result.returncode == 0
    assert b"may share memory (rule 'latency') but its definition has <nosharepages/>" in (
        result.stderr
    )


@pytest.mark.parametrize("op", [("migrate", "begin"), ("restore", "begin")])
def test_incoming_xml_is_rewritten_for_this_host(
    make_hook: Callable[..., Hook], op: tuple[str, str]
) -> None:
    result = make_hook("warn")("pg-primary", *op, DATABASE_XML)
    assert result.returncode == 0
    assert result.stdout.decode() == (DATA / "golden/ksm-tagged-database.exclude.xml").read_text()


def test_incoming_compliant_xml_comes_back_unchanged(make_hook: Callable[..., Hook]) -> None:
    result = make_hook("warn")("latency-box", "restore", "begin", EXCLUDED_XML)
    assert (result.returncode, result.stdout) == (0, EXCLUDED_XML)


@pytest.mark.parametrize(
    "op", [("start", "begin"), ("prepare", "end"), ("attach", "begin"), ("stopped", "begin")]
)
def test_other_operations_exit_0_at_once(
    make_hook: Callable[..., Hook], op: tuple[str, str]
) -> None:
    result = make_hook("block")("pg-primary", *op, b"not even xml")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


def test_started_and_stopped_notify_the_daemon(make_hook: Callable[..., Hook]) -> None:
    hook = make_hook("warn")
    listener = Listener(HostPaths(run_override=hook.run_dir))
    try:
        for op in (("started", "begin"), ("stopped", "end"), ("release", "end")):
            assert hook("web 1", *op).returncode == 0
        assert [(n.event, n.vm) for n in listener.receive()] == [
            ("started", "web 1"),
            ("stopped", "web 1"),
            ("release", "web 1"),
        ]
    finally:
        listener.close()


def test_notes_without_a_daemon_never_fail(make_hook: Callable[..., Hook]) -> None:
    result = make_hook("block")("pg-primary", "started", "begin")
    assert (result.returncode, result.stderr) == (0, b"")


# --- its own failures ----------------------------------------------------------------------


def test_unreadable_policy_does_not_block(make_hook: Callable[..., Hook]) -> None:
    result = make_hook(text="version: 1\nrules: [\n")(
        "pg-primary", "prepare", "begin", DATABASE_XML
    )
    assert result.returncode == 0
    assert result.stderr.decode().startswith(
        'ksmpolicy: policy not usable, "pg-primary" not checked: '
    )
    assert result.stderr.count(b"\n") == 1


def test_unreadable_policy_that_asks_for_block_blocks(make_hook: Callable[..., Hook]) -> None:
    hook = make_hook(text="version: 1\nenforcement: block  # strict\nrules: [\n")
    result = hook("pg-primary", "prepare", "begin", DATABASE_XML)
    assert result.returncode == 1
    assert result.stderr.count(b"\n") == 1


def test_missing_policy_does_not_block_or_rewrite_and_says_so_once(tmp_path: Path) -> None:
    policy = tmp_path / "nonexistent.yaml"
    hook = Hook(tmp_path, policy)
    first = hook("pg-primary", "prepare", "begin", DATABASE_XML)
    assert (first.returncode, first.stdout) == (0, b"")  # started as defined, nothing rewritten
    assert first.stderr.decode() == (
        f"ksmpolicy: no policy at {policy}: enforcement off, VMs start as defined (said once; "
        "`ksmpolicy check` says how to install one)\n"
    )
    again = hook("pg-primary", "prepare", "begin", DATABASE_XML)
    assert (again.returncode, again.stdout, again.stderr) == (0, b"", b"")
    # a policy used once forgets the note (the last good policy covers a later deletion)
    policy.write_text(POLICY.format(mode="warn", latency="exclude"))
    policy.chmod(0o644)
    assert hook("web-1", "prepare", "begin", EXCLUDED_XML).returncode == 0
    assert not (hook.run_dir / "no-policy-said").exists()


HOSTILE = {
    "billion laughs": (
        b'<!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">'
        b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]><domain><name>&c;</name></domain>'
    ),
    "external dtd": b'<!DOCTYPE domain SYSTEM "http://example.invalid/d.dtd"><domain/>',
    "100 MB": b"<domain><name>x</name>" + b" " * (100 * 2**20) + b"</domain>",
    "not utf-8": b"<domain><name>caf\xe9</name></domain>",
    "no name": b"<domain><memory>1</memory></domain>",
    "not xml": b"\x00\x01\x02garbage",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize(("mode", "status"), [("warn", 0), ("block", 1)])
def test_hostile_xml_gets_one_line_and_the_mode_exit_code(
    make_hook: Callable[..., Hook], case: str, mode: str, status: int
) -> None:
    hook = make_hook(mode)
    name = 'evil "vm" $(reboot)\nnext'
    for op in (("prepare", "begin"), ("restore", "begin")):
        result = hook(name, *op, HOSTILE[case])
        assert result.returncode == status, result.stderr
        assert result.stdout == b""  # nothing half-written for libvirt to use
        assert result.stderr.count(b"\n") == 1, result.stderr
        assert b'"evil \\"vm\\" $(reboot)\\u000anext"' in result.stderr


def test_a_bug_does_not_block_under_warn(
    make_hook: Callable[..., Hook],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An internal error (injected) is reported in one line and lets the VM start."""
    import io

    from ksmpolicy import hook as hook_module

    policy = str(make_hook("warn").path.parent / "policy.yaml")

    def boom(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr("ksmpolicy.libvirt.domain.domain_facts", boom)
    run_dir = str(make_hook("warn").run_dir)  # keep the policy cache out of /run
    status = hook_module.main(
        [
            "--policy",
            policy,
            "--run-dir",
            run_dir,
            "libvirt",
            "pg-primary",
            "prepare",
            "begin",
            "-",
        ],
        stdin=io.BytesIO(DATABASE_XML),
    )
    assert status == 0
    assert capsys.readouterr().err == (
        'ksmpolicy: internal error checking "pg-primary": RuntimeError: kaboom\n'
    )


def test_bad_usage_exits_2() -> None:
    from ksmpolicy.hook import main

    assert main(["libvirt", "only-a-name"]) == 2
    assert main(["proxmox", "101"]) == 2
    assert main(["xen", "101", "pre-start"]) == 2
    assert main(["--bogus", "libvirt", "a", "b", "c", "d"]) == 2


# --- install and uninstall -------------------------------------------------------------------


def test_install_writes_an_executable_shim_and_uninstall_removes_it(tmp_path: Path) -> None:
    paths = HostPaths(tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(mode="block", latency="exclude"))
    path = install(paths, policy=str(policy), run_dir=str(tmp_path / "run"))
    assert path == tmp_path / "etc/libvirt/hooks/qemu.d/ksmpolicy"
    assert path.stat().st_mode & 0o777 == 0o755
    assert path.read_text().startswith(f"#!{sys.executable} -IS\n")  # no `site`: 3-4 ms
    xml = (REPO / "tests/data/libvirt/ksm-tagged-database.xml").read_bytes()
    run = subprocess.run(  # as libvirt runs it: the file names where ksmpolicy and YAML are
        [str(path), "pg-primary", "prepare", "begin", "-"],
        input=xml,
        capture_output=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=20,
        check=False,
    )
    assert run.returncode == 1  # the policy was compiled (YAML) and refuses this database VM
    assert run.stderr.decode().startswith('ksmpolicy: "pg-primary" must not share memory')
    assert install(paths) == path  # ours: may be rewritten
    assert uninstall(paths) == path
    assert not path.exists()
    assert uninstall(paths) is None


def test_install_never_overwrites_a_foreign_hook(tmp_path: Path) -> None:
    from ksmpolicy.errors import KsmPolicyError

    paths = HostPaths(tmp_path)
    main_hook = tmp_path / "etc/libvirt/hooks/qemu"
    main_hook.parent.mkdir(parents=True)
    main_hook.write_text("#!/bin/sh\n# the admin's own hook\n")
    with pytest.raises(KsmPolicyError, match="was not written by ksmpolicy: not overwriting it"):
        install(paths, main_hook=True)
    with pytest.raises(KsmPolicyError, match="was not written by ksmpolicy: leaving it alone"):
        uninstall(paths, main_hook=True)
    assert main_hook.read_text() == "#!/bin/sh\n# the admin's own hook\n"
    assert install(paths).name == "ksmpolicy"  # qemu.d/ is fine beside it


def test_cli_install_tells_about_the_reload(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ksmpolicy.cli.main import cli

    result = CliRunner().invoke(cli, ["install", "libvirt", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"installed {tmp_path}/etc/libvirt/hooks/qemu.d/ksmpolicy" in result.output
    assert "libvirtd" in result.output.splitlines()[1]
    result = CliRunner().invoke(cli, ["uninstall", "libvirt", "--root", str(tmp_path)])
    assert result.exit_code == 0
    assert "removed" in result.output


def test_repository_hook_runs_from_a_checkout() -> None:
    """hooks/qemu in the repository is a working shim for a checkout with its .venv."""
    shim_path = REPO / "hooks/qemu"
    called = HostPaths().run_dir / "hook-called"  # the trace it leaves for `doctor`
    was_there = called.exists()
    try:
        result = subprocess.run(
            [str(shim_path), "vm", "start", "begin", "-"],
            capture_output=True,
            timeout=20,
            check=False,
        )
    finally:
        if not was_there:
            called.unlink(missing_ok=True)
    assert (result.returncode, result.stderr) == (0, b"")


def test_a_hugepage_vm_with_nosharepages_starts_under_block(
    make_hook: Callable[..., Hook],
) -> None:
    """Hugepage memory never merges, so <nosharepages/> on it disagrees with nothing: the hook
    used to refuse such a VM under `block` whenever the policy let it merge."""
    xml = (
        b"<domain type='kvm'><name>big-1</name><memory unit='GiB'>8</memory>"
        b"<memoryBacking><hugepages/><nosharepages/></memoryBacking></domain>"
    )
    result = make_hook("block")("big-1", "prepare", "begin", xml)
    assert (result.returncode, result.stderr) == (0, b"")
    excluded = xml.replace(b"<name>big-1</name>", b"<name>latency-box</name>")
    result = make_hook("block", latency="merge")("latency-box", "prepare", "begin", excluded)
    assert (result.returncode, result.stderr) == (0, b"")


def test_a_shim_written_by_the_previous_version_still_works(tmp_path: Path) -> None:
    """Hooks installed before the restructure call `ksmpolicy.hook.main` with this text."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(mode="block", latency="exclude"))
    policy.chmod(0o644)
    old = tmp_path / "old-shim"
    options = ["--policy", str(policy), "--run-dir", str(tmp_path / "run")]
    old.write_text(
        f"#!{sys.executable} -I\n"
        "# ksmpolicy-hook: written by `ksmpolicy install libvirt`; `ksmpolicy uninstall libvirt`"
        " removes it.\nimport sys\nfrom ksmpolicy.hook import main\n"
        f"sys.exit(main([*{options!r}, 'libvirt', *sys.argv[1:]]))\n"
    )
    old.chmod(0o755)
    result = subprocess.run(
        [str(old), "pg-primary", "prepare", "begin", "-"],
        input=DATABASE_XML,
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 1
    assert b"must not share memory" in result.stderr


# --- trust domains ------------------------------------------------------------------------------

DOMAINS = """\
version: 1
enforcement: {mode}
domains:
  provider: {{priority: 10, nodes: [0]}}
  tenant-b: {{}}
groups:
  web: {{names: ["web-*", "latency-box"], domain: provider}}
isolation: {{merge_across_nodes: false}}
"""


def test_under_domains_block_refuses_a_mergeable_definition_and_says_why(
    make_hook: Callable[..., Hook],
) -> None:
    """Every VM of a policy with trust domains starts unmergeable: the daemon switches the
    active domain's guest RAM on live. A definition that merges from its start would share
    its ROMs and video RAM with any domain, so block refuses it."""
    xml = (DATA / "q35.xml").read_bytes().replace(b"<name>q35-test</name>", b"<name>web-1</name>")
    result = make_hook(text=DOMAINS.format(mode="block"))("web-1", "prepare", "begin", xml)
    assert result.returncode == 1
    assert result.stderr.decode() == (
        "ksmpolicy: \"web-1\" is in trust domain 'provider': ksmpolicy switches its merging on, "
        "live, only while that domain merges, so its definition needs "
        "<memoryBacking><nosharepages/>. Fix: ksmpolicy apply --domain web-1\n"
    )
    warn = make_hook(text=DOMAINS.format(mode="warn"))("web-1", "prepare", "begin", xml)
    assert warn.returncode == 0
    assert b"is in trust domain 'provider'" in warn.stderr


def test_under_domains_an_unmergeable_definition_starts(make_hook: Callable[..., Hook]) -> None:
    result = make_hook(text=DOMAINS.format(mode="block"))(
        "latency-box", "prepare", "begin", EXCLUDED_XML
    )
    assert (result.returncode, result.stderr) == (0, b"")


def test_under_domains_incoming_xml_is_made_unmergeable_and_bound(
    make_hook: Callable[..., Hook],
) -> None:
    """A VM migrating in gets this host's rules: no merging from its start, and memory bound
    to its domain's NUMA nodes (per-node merge scopes)."""
    xml = (DATA / "q35.xml").read_bytes().replace(b"<name>q35-test</name>", b"<name>web-1</name>")
    result = make_hook(text=DOMAINS.format(mode="warn"))("web-1", "migrate", "begin", xml)
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert "<nosharepages/>" in out
    assert "<memory mode='strict' nodeset='0'/>" in out


def test_under_domains_block_refuses_a_start_that_would_force_an_unmerge_the_host_cannot_absorb(
    make_hook: Callable[..., Hook], tmp_path: Path
) -> None:
    """The memory guard at start: a provider VM (priority 10) would take the host's scope from
    tenant-b, whose unmerge the daemon measured at 1 PB: block refuses the start, warn says so."""
    from ksmpolicy.kernel.procfs import start_ticks
    from ksmpolicy.trust.choose import Claim
    from ksmpolicy.trust.state import Member, State, save

    tenant = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = start_ticks(HostPaths(), tenant.pid)
        assert start is not None
        run = HostPaths(run_override=tmp_path / "run")
        save(
            run,
            State(
                scopes={"host": Claim("tenant-b", 1.0, "first")},
                members={tenant.pid: Member(tenant.pid, start, "cust", "tenant-b", ("host",))},
                unmerge_bytes={"host": 10**15},
            ),
        )
        hook = make_hook(text=DOMAINS.format(mode="block"))
        result = hook("latency-box", "prepare", "begin", EXCLUDED_XML)
        assert result.returncode == 1
        message = result.stderr.decode()
        assert message.startswith(
            "ksmpolicy: \"latency-box\": its trust domain 'provider' outranks 'tenant-b', which "
            "merges in scope host: starting it would unmerge 'tenant-b', and unmerging would "
            "need 953674316 MiB"
        ), message
        warn = make_hook(text=DOMAINS.format(mode="warn"))(
            "latency-box", "prepare", "begin", EXCLUDED_XML
        )
        assert warn.returncode == 0 and b"outranks 'tenant-b'" in warn.stderr
    finally:
        tenant.kill()
        tenant.wait()
    # tenant-b's VM stopped: nothing to unmerge, the start goes ahead
    result = make_hook(text=DOMAINS.format(mode="block"))(
        "latency-box", "prepare", "begin", EXCLUDED_XML
    )
    assert (result.returncode, result.stderr) == (0, b"")


def run_shim(path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path.write_text(text)
    path.chmod(0o755)
    return subprocess.run(
        [str(path), "vm", "prepare", "begin", "-"],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def test_a_hook_lets_vms_start_once_ksmpolicy_is_gone(tmp_path: Path) -> None:
    """A hook whose ksmpolicy was removed (a Proxmox hookscript outlives the package in its
    storage; a deleted virtualenv) lets VMs start and says why; any other missing import (a
    dependency of ksmpolicy) still fails the hook."""
    from ksmpolicy.libvirt.install import shim

    gone = tmp_path / "gone"  # dist-packages after `apt remove`: no ksmpolicy in it
    gone.mkdir()
    hook = tmp_path / "ksmpolicy"
    removed = run_shim(hook, shim(sys.executable, import_paths=[str(gone)]))
    assert removed.returncode == 0, removed.stderr
    assert "ksmpolicy is not installed any more: this VM start is not checked" in removed.stderr
    broken = tmp_path / "broken"  # ksmpolicy there, a dependency of it missing
    (broken / "ksmpolicy").mkdir(parents=True)
    (broken / "ksmpolicy/__init__.py").write_text("")
    (broken / "ksmpolicy/hook.py").write_text("import no_such_dependency\n")
    failed = run_shim(hook, shim(sys.executable, import_paths=[str(broken)]))
    assert failed.returncode == 1
    assert "No module named 'no_such_dependency'" in failed.stderr
