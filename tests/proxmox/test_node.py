"""The Proxmox side on a fake node: a temporary root with /etc/pve, the installed hookscript run
as a process, and `qm set` played by a small stand-in (tests/proxmox/qm_standin.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from ksmpolicy.cli.main import cli
from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.paths import HostPaths
from ksmpolicy.runtime.notify import Listener
from tests.conftest import REPO, replace_policy

DATA = REPO / "tests/data/proxmox"
POLICY = """\
version: 1
enforcement: {mode}
rules:
  - name: databases
    match: {{tags: [database]}}
    action: exclude
proxmox: {{qemu_server_version: "{version}"}}
"""


class Node:
    """A fake Proxmox node under a temporary root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "etc/pve/qemu-server").mkdir(parents=True)
        (root / "var/lib/vz/snippets").mkdir(parents=True)
        (root / "etc/pve/storage.cfg").write_text(
            "dir: local\n\tpath /var/lib/vz\n\tcontent iso,vztmpl,backup,snippets\n\n"
            "lvmthin: local-lvm\n\tthinpool data\n\tvgname pve\n\tcontent rootdir,images\n"
        )
        self.qm = root / "qm"
        self.qm.write_text(
            f'#!/bin/sh\nexec {sys.executable} {REPO / "tests/proxmox/qm_standin.py"} {root} "$@"\n'
        )
        self.qm.chmod(0o755)
        self.policy = root / "policy.yaml"
        self.set_policy()

    def set_policy(self, mode: str = "block", version: str = "9.2.6") -> None:
        self.write_policy(POLICY.format(mode=mode, version=version))

    def write_policy(self, text: str) -> None:
        replace_policy(self.policy, text)

    def add(self, vmid: str, source: str, **replace: str) -> Path:
        text = (DATA / source).read_text()
        for old, new in replace.items():
            text = text.replace(old, new)
        path = self.root / "etc/pve/qemu-server" / f"{vmid}.conf"
        path.write_text(text)
        return path

    def config(self, vmid: str) -> str:
        return (self.root / "etc/pve/qemu-server" / f"{vmid}.conf").read_text()

    def qm_log(self, *, digests: bool = False) -> list[str]:
        """The `qm` calls made, without `--digest SHA1` (every `qm set` carries one; a test
        of the digest asks for them)."""
        log = self.root / "qm.log"
        calls = log.read_text().splitlines() if log.exists() else []
        return calls if digests else [re.sub(r" --digest [0-9a-f]{40}", "", c) for c in calls]

    def cli(self, *args: str) -> tuple[int, str, str]:
        """The command line in-process; errors as main() reports them (exit 1, one line)."""
        result = CliRunner().invoke(cli, ["-p", str(self.policy), *args])
        if isinstance(result.exception, KsmPolicyError):
            return 1, result.stdout, f"ksmpolicy: error: {result.exception}\n"
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.stdout, result.stderr

    def install(self) -> Path:
        code, _out, err = self.cli(
            "proxmox",
            "install",
            "--root",
            str(self.root),
            "--qm",
            str(self.qm),
            "--hook-policy",
            str(self.policy),
        )
        assert code == 0, err
        return self.root / "var/lib/vz/snippets/ksmpolicy-hook"

    def hook(self, vmid: str, phase: str) -> subprocess.CompletedProcess[str]:
        script = self.root / "var/lib/vz/snippets/ksmpolicy-hook"
        return subprocess.run(
            [str(script), vmid, phase], capture_output=True, text=True, timeout=30, check=False
        )


@pytest.fixture
def node(tmp_path: Path) -> Node:
    root = tmp_path / "node"
    root.mkdir()
    root.chmod(0o755)
    return Node(root)


# --- apply and rewrite -------------------------------------------------------------------------


def test_apply_dry_run_diffs_then_qm_sets(node: Node) -> None:
    node.add("102", "pve-102-allow-ksm-off.conf", **{"tags: database": "tags: web"})
    node.add("110", "qs-simple1.conf", **{"name: simple": "name: pg-1\ntags: database"})
    node.add("9000", "pve-9000-template.conf")
    code, out, _ = node.cli(
        "apply", "--proxmox", "--dry-run", "--root", str(node.root), "--qm", str(node.qm)
    )
    assert code == 0
    assert "--- 102.conf\n+++ 102.conf (policy)\n" in out
    assert "-allow-ksm: 0\n" in out
    assert "+allow-ksm: 0\n" in out
    assert "3 VMs: 0 changed, 2 would change, 0 failed" in out
    assert node.qm_log() == []
    code, out, _ = node.cli("apply", "--proxmox", "--root", str(node.root), "--qm", str(node.qm))
    assert code == 0, out
    assert node.qm_log() == ["set 102 --delete allow-ksm", "set 110 --allow-ksm 0"]
    assert "allow-ksm" not in node.config("102")
    assert "allow-ksm: 0\n" in node.config("110")
    code, out, _ = node.cli("apply", "--proxmox", "--root", str(node.root), "--qm", str(node.qm))
    assert "3 VMs: 0 changed, 0 would change, 0 failed" in out  # idempotent
    assert len(node.qm_log()) == 2


def test_apply_for_old_qemu_server_uses_args(node: Node) -> None:
    node.set_policy(version="8.4.1")
    node.add("110", "pve-104-odd-args.conf", **{"name: odd": "name: odd\ntags: database"})
    node.add("111", "pve-103-old-args.conf")  # may merge now: the pair goes
    code, out, err = node.cli("apply", "--proxmox", "--root", str(node.root), "--qm", str(node.qm))
    assert code == 0, err
    assert node.qm_log() == ["set 111 --args -cpu host,+invtsc"]
    assert "args: -cpu host,+invtsc\n" in node.config("111")
    assert "110 (odd): unchanged" in out  # its args already carry the pair


def test_a_failing_qm_does_not_stop_the_others(node: Node) -> None:
    node.add("110", "qs-simple1.conf", **{"name: simple": "name: a\ntags: database"})
    node.add("111", "qs-simple1.conf", **{"name: simple": "name: b\ntags: database"})
    failing = node.root / "qm-fail"
    failing.write_text(
        "#!/bin/sh\n[ \"$2\" = 110 ] && { echo 'VM 110 is locked (backup)' >&2; exit 2; }\n"
        f'exec {node.qm} "$@"\n'
    )
    failing.chmod(0o755)
    code, out, err = node.cli("apply", "--proxmox", "--root", str(node.root), "--qm", str(failing))
    assert code == 1
    assert "110 (a): failed: qm set 110 --allow-ksm 0 failed: VM 110 is locked (backup)" in err
    assert "111 (b): changed" in out
    assert "2 VMs: 1 changed, 0 would change, 1 failed (110)" in out


def test_rewrite_and_explain_from_files(node: Node) -> None:
    conf = DATA / "pve-101-linked-clone.conf"
    code, out, err = node.cli("proxmox", "rewrite", "--vmid", "101", str(conf))
    assert code == 0
    assert out == conf.read_text()  # web: may merge, nothing to change
    assert "a pending change would make the decision exclude" in err
    code, out, _ = node.cli(
        "proxmox",
        "rewrite",
        "--qemu-server-version",
        "8.0.3",
        "--vmid",
        "102",
        str(DATA / "pve-102-allow-ksm-off.conf"),
    )
    # database: excluded; qemu-server 8.0.3 drops `allow-ksm` as an unknown key, so only
    # `args` can switch merging off there
    text = (DATA / "pve-102-allow-ksm-off.conf").read_text()
    assert out == text.replace("allow-ksm: 0\n", "allow-ksm: 0\nargs: -machine mem-merge=off\n")
    code, out, _ = node.cli(
        "proxmox", "rewrite", "--vmid", "102", str(DATA / "pve-102-allow-ksm-off.conf")
    )
    assert out == text  # on a current qemu-server it complies
    code, out, _ = node.cli("explain", "--vmid", "101", "--pve-conf", str(conf))
    assert code == 0
    assert "note: the [PENDING] changes would make it exclude" in out
    assert "group:    -" in out
    code, out, _ = node.cli(
        "explain", "--vmid", "102", "--pve-conf", str(DATA / "pve-102-allow-ksm-off.conf")
    )
    assert "decision: exclude" in out


# --- attach, detach, chaining ----------------------------------------------------------------


def test_attach_chains_a_previous_hookscript_and_detach_restores_it(node: Node) -> None:
    node.install()
    node.add("101", "pve-101-linked-clone.conf")
    node.add("110", "qs-simple1.conf")
    node.add("9000", "pve-9000-template.conf")
    args = ("--root", str(node.root), "--qm", str(node.qm))
    code, out, _ = node.cli("proxmox", "attach", "--all", *args)
    assert code == 0, out
    assert out.splitlines() == [
        "101: attached (chains local:snippets/backup-notify.sh)",
        "110: attached",
        "9000: skipped (template)",
    ]
    assert "hookscript: local:snippets/ksmpolicy-hook\n" in node.config("101")
    chain = node.root / "etc/pve/ksmpolicy/chain/101.hookscript"
    assert chain.read_text() == "local:snippets/backup-notify.sh\n"
    assert node.cli("proxmox", "attach", "110", *args)[1] == "110: already attached\n"
    code, out, _ = node.cli("proxmox", "detach", "--all", *args)
    assert out.splitlines() == [
        "101: detached (restored local:snippets/backup-notify.sh)",
        "110: detached",
        "9000: not attached",
    ]
    assert "hookscript: local:snippets/backup-notify.sh\n" in node.config("101")
    assert "hookscript" not in node.config("110")
    assert not chain.exists()


def test_attach_needs_vmids_or_all(node: Node) -> None:
    assert node.cli("proxmox", "attach", "--root", str(node.root))[0] == 2


def test_install_refuses_a_foreign_file(node: Node) -> None:
    (node.root / "var/lib/vz/snippets/ksmpolicy-hook").write_text("#!/bin/sh\necho mine\n")
    code, _, err = node.cli("proxmox", "install", "--root", str(node.root))
    assert code == 1
    assert "was not written by ksmpolicy: not overwriting it" in err


def test_a_hookscript_others_could_change_is_said_at_install_and_by_doctor(node: Node) -> None:
    from ksmpolicy.report.doctor import diagnose

    snippets = node.root / "var/lib/vz/snippets"
    snippets.mkdir(parents=True, exist_ok=True)
    snippets.chmod(0o777)  # a shared snippets directory anyone may write
    code, _, err = node.cli("proxmox", "install", "--root", str(node.root))
    assert code == 0
    assert f"warning: {snippets} is writable by everyone (mode 0777)" in err
    assert "runs code as root at each start of a VM it is attached to" in err
    found = diagnose(HostPaths(node.root), None, str(node.policy), "not read")
    (check,) = [c for c in found.checks if c.what.startswith("hookscript ")]
    assert check.level == "fail" and "writable by everyone" in check.what
    snippets.chmod(0o755)
    assert not node.cli("proxmox", "install", "--root", str(node.root))[2]
    found = diagnose(HostPaths(node.root), None, str(node.policy), "not read")
    assert not [c for c in found.checks if c.what.startswith("hookscript ")]


def test_install_on_a_storage_without_a_directory(node: Node) -> None:
    code, _, err = node.cli(
        "proxmox", "install", "--storage", "local-lvm", "--root", str(node.root)
    )
    assert code == 1
    assert "storage 'local-lvm' (lvmthin) is not file-based" in err


# --- the hookscript as Proxmox runs it ------------------------------------------------------


def test_pre_start_blocks_a_database_that_allows_ksm(node: Node) -> None:
    node.install()
    node.add("110", "qs-simple1.conf", **{"name: simple": "name: pg-1\ntags: database"})
    result = node.hook("110", "pre-start")
    assert result.returncode == 1
    assert result.stderr == (
        "ksmpolicy: VM 110 ('pg-1') must not share memory (rule 'databases') but its config "
        "allows KSM. Fix: ksmpolicy apply --proxmox --vmid 110\n"
    )


def test_pre_start_warn_and_off(node: Node) -> None:
    node.install()
    node.add("110", "qs-simple1.conf", **{"name: simple": "name: pg-1\ntags: database"})
    node.set_policy("warn")
    result = node.hook("110", "pre-start")
    assert result.returncode == 0
    assert result.stderr.startswith("ksmpolicy: VM 110 ('pg-1') must not share memory")
    assert "switched at post-start" in result.stderr
    node.set_policy("off")
    assert (node.hook("110", "pre-start").returncode, node.hook("110", "pre-start").stderr) == (
        0,
        "",
    )


def test_pre_start_compliant_and_other_phases(node: Node) -> None:
    node.install()
    node.add("102", "pve-102-allow-ksm-off.conf")
    for phase in ("pre-start", "pre-stop", "post-stop"):
        result = node.hook("102", phase)
        assert (result.returncode, result.stderr) == (0, ""), phase


def test_post_stop_notifies_the_daemon(node: Node) -> None:
    node.install()
    node.add("102", "pve-102-allow-ksm-off.conf")
    listener = Listener(HostPaths(node.root))
    try:
        assert node.hook("102", "post-stop").returncode == 0
        assert [(n.event, n.vm) for n in listener.receive()] == [("stopped", "102")]
    finally:
        listener.close()


def test_chained_hookscript_runs_first_and_its_refusal_counts(node: Node) -> None:
    node.install()
    node.add("102", "pve-102-allow-ksm-off.conf")
    previous = node.root / "var/lib/vz/snippets/backup-notify.sh"
    marker = node.root / "previous-ran"
    previous.write_text(
        f'#!/bin/sh\necho "$@" >> {marker}\n[ "$2" = pre-start ] && exit 3\nexit 0\n'
    )
    previous.chmod(0o755)
    chain = node.root / "etc/pve/ksmpolicy/chain"
    chain.mkdir(parents=True)
    (chain / "102.hookscript").write_text("local:snippets/backup-notify.sh\n")
    assert node.hook("102", "pre-start").returncode == 3
    assert node.hook("102", "post-stop").returncode == 0
    assert marker.read_text() == "102 pre-start\n102 post-stop\n"


@pytest.mark.parametrize(
    "vmid", ["abc", "../../etc/passwd", "101/../102", "0", "-1", "1e3", "101\n"]
)
def test_hostile_vmids_never_crash(node: Node, vmid: str) -> None:
    node.install()
    result = node.hook(vmid, "pre-start")
    assert result.returncode == 1  # this policy says block
    assert result.stderr.count("\n") == 1
    assert "is not a VMID" in result.stderr
    node.set_policy("warn")
    assert node.hook(vmid, "pre-start").returncode == 0


@pytest.mark.parametrize(
    ("case", "setup"),
    [
        ("missing config", lambda n: None),
        (
            "unreadable bytes",
            lambda n: (n.root / "etc/pve/qemu-server/110.conf").write_bytes(b"name: \xff\n"),
        ),
        (
            "NUL bytes",
            lambda n: (n.root / "etc/pve/qemu-server/110.conf").write_text("name: a\0b\n"),
        ),
        (
            "broken lines",
            lambda n: (n.root / "etc/pve/qemu-server/110.conf").write_text("]]]\n::\nname\n"),
        ),
    ],
)
@pytest.mark.parametrize(("mode", "status"), [("warn", 0), ("block", 1)])
def test_hookscript_own_failures_follow_the_mode(
    node: Node, case: str, setup: Callable[[Node], object], mode: str, status: int
) -> None:
    node.install()
    node.set_policy(mode)
    setup(node)
    result = node.hook("110", "pre-start")
    if case == "broken lines":
        assert result.returncode == 0  # nothing to object to: kept, not judged
        return
    assert result.returncode == status, result.stderr
    assert result.stderr.count("\n") == 1


def test_broken_policy_never_blocks_unless_it_says_block(node: Node) -> None:
    node.install()
    node.add("110", "qs-simple1.conf")
    node.policy.write_text("version: 1\nrules: [\n")
    assert node.hook("110", "pre-start").returncode == 0
    node.policy.write_text("version: 1\nenforcement: block\nrules: [\n")
    assert node.hook("110", "pre-start").returncode == 1


def test_the_repository_hookscript_runs_from_a_checkout(node: Node) -> None:
    result = subprocess.run(
        [str(REPO / "contrib/proxmox/ksmpolicy-hook"), "101", "pre-stop"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_persist_waits_for_the_config_lock(node: Node) -> None:
    """The post-start helper: `qm set` only once the start's lock is gone."""
    import fcntl

    node.add("110", "qs-simple1.conf", **{"name: simple": "name: pg-1\ntags: database"})
    lock = node.root / "var/lock/qemu-server/lock-110.conf"
    lock.parent.mkdir(parents=True)
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        helper = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-m",
                "ksmpolicy",
                "-p",
                str(node.policy),
                "proxmox",
                "persist",
                "110",
                "--root",
                str(node.root),
                "--qm",
                str(node.qm),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.5)
        assert helper.poll() is None  # waiting for the lock
        assert node.qm_log() == []
    out, _ = helper.communicate(timeout=30)
    assert (helper.returncode, out) == (0, "110: changed\n")
    assert node.qm_log() == ["set 110 --allow-ksm 0"]


def test_proxmox_modules_never_import_libvirt() -> None:
    code = (
        "import sys, ksmpolicy.proxmox.node, ksmpolicy.proxmox.hook, ksmpolicy.proxmox.conf, "
        "ksmpolicy.proxmox.hookscript, ksmpolicy.cli.main; sys.exit('libvirt' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_stand_in_is_honest_about_what_it_does(tmp_path: Path) -> None:
    """The qm stand-in keeps other sections byte for byte, like qm set."""
    node = Node(tmp_path)
    node.add("101", "pve-101-linked-clone.conf")
    before = node.config("101")
    assert (
        subprocess.run([str(node.qm), "set", "101", "--allow-ksm", "0"], check=False).returncode
        == 0
    )
    after = node.config("101")
    assert after.split("[PENDING]")[1] == before.split("[PENDING]")[1]
    assert "agent: 1\nallow-ksm: 0\nboot:" in after.split("[PENDING]")[0]  # sorted, as qm does


# --- regressions ------------------------------------------------------------------------------


class SilentQemu:
    """A QMP socket whose QEMU greets and then never answers (a guest stuck in a long
    migration, an overloaded host): a stand-in for a real but hung QEMU."""

    def __init__(self, path: Path) -> None:
        import socket
        import threading

        path.parent.mkdir(parents=True, exist_ok=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(8)
        self.clients: list[socket.socket] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            client.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
            self.clients.append(client)  # reads nothing, answers nothing

    def close(self) -> None:
        self.server.close()
        for client in self.clients:
            client.close()


def test_post_start_gives_up_on_a_qemu_that_never_answers(node: Node) -> None:
    node.install()
    node.add("110", "qs-simple1.conf", **{"name: simple": "name: pg-1\ntags: database"})
    qemu = SilentQemu(node.root / "var/run/qemu-server/110.qmp")
    try:
        started = time.monotonic()
        result = node.hook("110", "post-start")  # times out after 30 s: the old hook hung here
        took = time.monotonic() - started
    finally:
        qemu.close()
    assert result.returncode == 0  # post-start never blocks
    assert took < 10, f"post-start took {took:.1f} s"
    assert "ksmpolicy: VM 110: post-start: QMP on" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_attach_never_chains_to_our_own_hookscript_elsewhere(node: Node) -> None:
    """A VM still pointing at our hookscript on another storage used to get it as the chained
    one: the hook then ran itself first, at every phase."""
    shared = node.root / "mnt/shared/snippets"
    shared.mkdir(parents=True)
    with (node.root / "etc/pve/storage.cfg").open("a") as cfg:
        cfg.write("\ndir: shared\n\tpath /mnt/shared\n\tcontent snippets\n")
    code, _out, err = node.cli(
        "proxmox", "install", "--storage", "shared", "--root", str(node.root), "--qm", str(node.qm)
    )
    assert code == 0, err
    node.install()
    node.add(
        "101",
        "qs-simple1.conf",
        **{"name: simple": "name: web\nhookscript: shared:snippets/ksmpolicy-hook"},
    )
    code, out, err = node.cli(
        "proxmox", "attach", "101", "--root", str(node.root), "--qm", str(node.qm)
    )
    assert (code, out) == (
        0,
        "101: attached (replaces ours from shared:snippets/ksmpolicy-hook)\n",
    ), err
    assert not (node.root / "etc/pve/ksmpolicy/chain/101.hookscript").exists()
    assert node.qm_log() == ["set 101 --hookscript local:snippets/ksmpolicy-hook"]
    # A chain file left by an older version that names ours is skipped, not run.
    chain = node.root / "etc/pve/ksmpolicy/chain"
    chain.mkdir(parents=True, exist_ok=True)
    (chain / "101.hookscript").write_text("shared:snippets/ksmpolicy-hook\n")
    result = node.hook("101", "pre-stop")
    assert result.returncode == 0
    assert result.stderr == (
        "ksmpolicy: VM 101: the chained hookscript shared:snippets/ksmpolicy-hook is ours: "
        "skipped\n"
    )


def test_the_persist_helper_runs_isolated(node: Node, tmp_path: Path) -> None:
    """post-start re-runs ksmpolicy in the background to persist the decision. Without -I that
    Python honoured PYTHONPATH and the current directory, and ran whatever `ksmpolicy` module
    it found there first."""
    evil = tmp_path / "evil/ksmpolicy"
    evil.mkdir(parents=True)
    marker = tmp_path / "evil-ran"
    (evil / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (evil / "__main__.py").write_text("")
    node.install()
    node.set_policy("warn")
    node.add("110", "qs-simple1.conf", **{"name: simple": "name: pg-1\ntags: database"})
    script = node.root / "var/lib/vz/snippets/ksmpolicy-hook"
    result = subprocess.run(
        [str(script), "110", "post-start"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "evil")},
        cwd=tmp_path / "evil",
    )
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and node.qm_log() != ["set 110 --allow-ksm 0"]:
        time.sleep(0.2)
    assert node.qm_log() == ["set 110 --allow-ksm 0"]  # the real ksmpolicy persisted it
    assert not marker.exists()


def test_undo_removes_both_forms_after_a_dry_run(node: Node) -> None:
    """allow-ksm: 0 (qemu-server >= 9.0.27) and `args: -machine mem-merge=off` (before it)."""
    node.add("102", "pve-102-allow-ksm-off.conf")
    node.add("103", "pve-103-old-args.conf")
    before = (node.config("102"), node.config("103"))
    assert "allow-ksm: 0" in before[0]
    assert "-machine mem-merge=off" in before[1]
    args = ("--root", str(node.root), "--qm", str(node.qm))
    code, out, err = node.cli("proxmox", "undo", "--all", "--dry-run", *args)
    assert code == 0, err
    assert "-allow-ksm: 0" in out and "mem-merge=off" in out
    assert (node.config("102"), node.config("103")) == before and node.qm_log() == []
    code, out, err = node.cli("proxmox", "undo", "--all", *args)
    assert code == 0, err
    assert "allow-ksm" not in node.config("102")
    assert "mem-merge=off" not in node.config("103")
    assert node.qm_log() == ["set 102 --delete allow-ksm", "set 103 --args -cpu host,+invtsc"]
    assert sorted(p.name for p in (node.root / "var/lib/ksmpolicy/backups").iterdir())


def test_attach_and_detach_use_the_storage_install_used(node: Node) -> None:
    (node.root / "mnt/shared").mkdir(parents=True)
    with (node.root / "etc/pve/storage.cfg").open("a") as cfg:
        cfg.write("\ndir: shared\n\tpath /mnt/shared\n\tcontent snippets\n")
    args = ("--root", str(node.root), "--qm", str(node.qm))
    code, out, err = node.cli("proxmox", "install", "--storage", "shared", *args)
    assert code == 0, err
    node.add("110", "qs-simple1.conf")
    code, out, _ = node.cli("proxmox", "attach", "110", *args)
    assert out == "110: attached\n"
    assert "hookscript: shared:snippets/ksmpolicy-hook\n" in node.config("110")
    code, out, _ = node.cli("proxmox", "detach", "110", *args)
    assert out == "110: detached\n"


def test_doctor_names_vms_without_the_hookscript(node: Node) -> None:
    from ksmpolicy.report.doctor import diagnose

    node.install()
    node.add("110", "qs-simple1.conf")
    node.add("9000", "pve-9000-template.conf")  # templates never start: not needed there
    paths = HostPaths(node.root)

    def hookscript_check() -> tuple[str, str, str | None]:
        found = diagnose(paths, None, str(node.policy), "not read")
        (check,) = [c for c in found.checks if "hookscript" in c.what]
        return check.level, check.what, check.fix

    level, what, fix = hookscript_check()
    assert (level, what) == ("fail", "1 VM(s) without ksmpolicy's hookscript: 110")
    assert fix == "ksmpolicy proxmox attach 110"
    node.cli("proxmox", "attach", "110", "--root", str(node.root), "--qm", str(node.qm))
    assert hookscript_check()[:2] == ("ok", "ksmpolicy's hookscript is attached to every VM")


def test_doctor_reports_a_config_it_cannot_read_and_goes_on(node: Node) -> None:
    """One config that is not UTF-8 (a tenant's description in Latin-1, a broken copy) is one
    finding about that VM, not the end of doctor."""
    from ksmpolicy.report.doctor import diagnose

    node.install()
    node.add("110", "qs-simple1.conf")
    paths = HostPaths(node.root)
    paths.pve_config("111").write_bytes(b"name: caf\xe9\nmemory: 512\n")
    found = diagnose(paths, None, str(node.policy), "not read")
    unreadable = [c for c in found.checks if c.subject == "VM 111"]
    assert [c.level for c in unreadable] == ["warn"], found.checks
    assert "not valid UTF-8" in unreadable[0].what
    assert any("without ksmpolicy's hookscript: 110" in c.what for c in found.checks)


def test_a_config_changed_between_read_and_write_is_never_overwritten(node: Node) -> None:
    """Every `qm set` ksmpolicy runs carries the digest of the config it read: an edit made
    meanwhile (an operator's `qm set`, the GUI) makes it fail, as qemu-server does, instead of
    being overwritten. Both the policy's rewrite and attaching the hookscript."""
    from ksmpolicy.errors import KsmPolicyError
    from ksmpolicy.policy.decide import Decider
    from ksmpolicy.policy.load import parse_policy
    from ksmpolicy.proxmox import hookscript
    from ksmpolicy.proxmox.node import ConfigTarget

    node.install()
    path = node.add("110", "qs-simple1.conf")
    paths = HostPaths(node.root)
    policy = parse_policy("version: 1\nrules:\n  - {match: {names: ['*']}, action: exclude}\n")
    target = ConfigTarget(paths, "110", Decider(policy), (str(node.qm),), True)
    old = target.read()
    new = target.plan(old).new
    assert new != old
    path.write_text(old + "description: edited meanwhile\n")  # someone else's edit
    with pytest.raises(KsmPolicyError, match="detected modified configuration"):
        target.write(old, new)
    assert node.config("110").endswith("description: edited meanwhile\n")
    assert "allow-ksm" not in node.config("110")
    target.write(target.read(), target.plan(target.read()).new)  # read again: it applies
    assert "allow-ksm: 0" in node.config("110")
    assert all("--digest" in call for call in node.qm_log(digests=True))
    volid = hookscript.installed_volume(paths, None)
    assert hookscript.attach(paths, "110", volid, qm=(str(node.qm),)) == "attached"
    assert all("--digest" in call for call in node.qm_log(digests=True))
