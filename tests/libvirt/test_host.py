"""apply, tag and the CLI against libvirt's in-process test driver (test:///default)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ksmpolicy.libvirt.domain import domain_facts
from ksmpolicy.libvirt.host import apply, set_tags
from ksmpolicy.policy.load import parse_policy

libvirt = pytest.importorskip("libvirt", reason="libvirt-python (the libvirt extra) is needed")

POLICY = parse_policy(
    """\
version: 1
rules:
  - name: databases
    match: {tags: [database]}
    action: exclude
  - name: db names
    match: {names: ["db-*"]}
    action: exclude
""",
    "test.yaml",
)


def domain_xml(name: str, *, nosharepages: bool = False, tag: str | None = None) -> str:
    backing = "  <memoryBacking>\n    <nosharepages/>\n  </memoryBacking>\n" if nosharepages else ""
    metadata = (
        f"  <metadata>\n    <k:vm xmlns:k='urn:ksmpolicy:vm:1'><k:tag>{tag}</k:tag></k:vm>\n"
        "  </metadata>\n"
        if tag
        else ""
    )
    return (
        f"<domain type='test'>\n  <name>{name}</name>\n{metadata}"
        f"  <memory unit='MiB'>128</memory>\n{backing}"
        "  <os>\n    <type arch='x86_64'>hvm</type>\n  </os>\n</domain>\n"
    )


@pytest.fixture
def conn() -> Iterator[Any]:
    """A fresh test driver per test: its state lives in the process, so undefine what we add."""
    connection = libvirt.open("test:///default")
    added = []
    specs: list[tuple[str, dict[str, Any]]] = [
        ("db-orders", {}),  # excluded by name, lacks nosharepages -> rewritten
        ("pg-main", {"tag": "database"}),  # excluded by tag -> rewritten
        ("web-1", {"nosharepages": True}),  # may merge, has nosharepages -> removed
        ("web-2", {}),  # complies
        ("db-ok", {"nosharepages": True}),  # complies
    ]
    for name, kwargs in specs:
        connection.defineXML(domain_xml(name, **kwargs))
        added.append(name)
    yield connection
    for name in added:
        with contextlib.suppress(libvirt.libvirtError):
            connection.lookupByName(name).undefine()
    connection.close()


def nosharepages(conn: Any, name: str) -> bool:
    return domain_facts(conn.lookupByName(name).XMLDesc(2)).nosharepages


def test_dry_run_diffs_and_changes_nothing(conn: Any, tmp_path: Path) -> None:
    results = {r.name: r for r in apply(conn, POLICY, backup_dir=tmp_path, dry_run=True)}
    assert {n: r.status for n, r in results.items() if n != "test"} == {
        "db-orders": "would change",
        "pg-main": "would change",
        "web-1": "would change",
        "web-2": "unchanged",
        "db-ok": "unchanged",
    }
    assert (
        "+  <memoryBacking>\n+    <nosharepages/>\n+  </memoryBacking>\n"
        in results["db-orders"].diff
    )
    assert results["db-orders"].diff.startswith("--- db-orders (defined)\n+++ db-orders (policy)\n")
    assert "-    <nosharepages/>\n" in results["web-1"].diff
    assert not nosharepages(conn, "db-orders")
    assert not list(tmp_path.iterdir())


def test_apply_redefines_backs_up_and_is_idempotent(conn: Any, tmp_path: Path) -> None:
    before = conn.lookupByName("db-orders").XMLDesc(2)
    results = {r.name: r for r in apply(conn, POLICY, backup_dir=tmp_path)}
    assert {n for n, r in results.items() if r.status == "changed"} == {
        "db-orders",
        "pg-main",
        "web-1",
    }
    assert nosharepages(conn, "db-orders") and nosharepages(conn, "pg-main")
    assert not nosharepages(conn, "web-1")
    backup = Path(results["db-orders"].backup or "")
    assert backup.parent == tmp_path
    assert backup.read_text() == before
    assert backup.stat().st_mode & 0o777 == 0o600
    assert len(list(tmp_path.iterdir())) == 3
    again = apply(conn, POLICY, backup_dir=tmp_path)
    assert {r.status for r in again} == {"unchanged"}
    assert len(list(tmp_path.iterdir())) == 3


class FailingConnection:
    """The test driver, with defineXML failing for one domain (a small fake, not a mock)."""

    def __init__(self, conn: Any, failing: str) -> None:
        self.conn = conn
        self.failing = failing

    def listAllDomains(self, flags: int = 0) -> list[Any]:
        return list(self.conn.listAllDomains(flags))

    def defineXML(self, xml: str) -> Any:
        if f"<name>{self.failing}</name>" in xml:
            raise libvirt.libvirtError("injected failure: storage is read-only")
        return self.conn.defineXML(xml)


def test_one_failing_domain_does_not_stop_the_others(conn: Any, tmp_path: Path) -> None:
    results = {
        r.name: r for r in apply(FailingConnection(conn, "pg-main"), POLICY, backup_dir=tmp_path)
    }
    assert results["pg-main"].status == "failed"
    assert results["pg-main"].error == "injected failure: storage is read-only"
    assert not nosharepages(conn, "pg-main")  # never written half-way
    assert results["db-orders"].status == "changed"
    assert results["web-1"].status == "changed"


def test_only_named_domains_and_unknown_names(conn: Any, tmp_path: Path) -> None:
    results = apply(conn, POLICY, backup_dir=tmp_path, only=["db-orders", "nope"])
    assert [(r.name, r.status) for r in results] == [
        ("db-orders", "changed"),
        ("nope", "failed"),
    ]


def test_tags_go_into_metadata(conn: Any) -> None:
    assert set_tags(conn, "web-2", ["Database", "prod"]) == ["database", "prod"]
    assert domain_facts(conn.lookupByName("web-2").XMLDesc(2)).vm.tags == {"database", "prod"}
    assert set_tags(conn, "web-2", ["prod"], remove=True) == ["database"]
    results = {
        r.name: r.status for r in apply(conn, POLICY, backup_dir=Path("/nonexistent"), dry_run=True)
    }
    assert results["web-2"] == "would change"  # now a database


def test_cli_apply_reports_and_exits_1_on_failure(tmp_path: Path) -> None:
    """The CLI end to end on the test driver (`test:///default` is per process: run in-process)."""
    from click.testing import CliRunner

    from ksmpolicy.cli.main import cli

    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nrules:\n  - {match: {names: ['test']}, action: exclude}\n")
    policy.chmod(0o644)
    runner = CliRunner()
    args = ["-p", str(policy), "apply", "-c", "test:///default", "--root", str(tmp_path)]
    driver = libvirt.open("test:///default")
    original = driver.lookupByName("test").XMLDesc(2)
    result = runner.invoke(cli, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "test: would change" in result.output
    assert result.output.rstrip().endswith("1 domains: 0 changed, 1 would change, 0 failed")
    result = runner.invoke(cli, [*args, "-d", "test", "-d", "ghost"])
    assert result.exit_code == 1
    assert "ghost: failed: no persistent domain of that name" in result.stderr
    assert "2 domains: 1 changed, 0 would change, 1 failed (ghost)" in result.output
    driver.defineXML(original)  # the driver's state lives on in this process
    driver.close()


# --- regressions ------------------------------------------------------------------------------


class EditedMeanwhile:
    """The test driver, where an admin edits a domain between ksmpolicy's read and its write:
    the first read of `name` also redefines it with a new <description>."""

    def __init__(self, conn: Any, name: str) -> None:
        self.conn = conn
        self.name = name

    def listAllDomains(self, flags: int = 0) -> list[Any]:
        return [
            self.Domain(d, self) if d.name() == self.name else d
            for d in self.conn.listAllDomains(flags)
        ]

    def defineXML(self, xml: str) -> Any:
        return self.conn.defineXML(xml)

    class Domain:
        def __init__(self, domain: Any, outer: EditedMeanwhile) -> None:
            self.domain = domain
            self.outer = outer
            self.reads = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(self.domain, name)

        def XMLDesc(self, flags: int = 0) -> str:
            xml = str(self.domain.XMLDesc(flags))
            self.reads += 1
            if self.reads == 1:  # the admin's edit lands right after ksmpolicy read it
                edited = xml.replace("</name>", "</name>\n  <description>edited</description>")
                self.outer.conn.defineXML(edited)
            return xml


def test_apply_never_overwrites_an_edit_made_meanwhile(conn: Any, tmp_path: Path) -> None:
    results = {
        r.key: r for r in apply(EditedMeanwhile(conn, "db-orders"), POLICY, backup_dir=tmp_path)
    }
    assert results["db-orders"].status == "failed"
    assert "changed while ksmpolicy was working on it" in (results["db-orders"].error or "")
    current = conn.lookupByName("db-orders").XMLDesc(2)
    assert "<description>edited</description>" in current  # the admin's edit survives
    assert not nosharepages(conn, "db-orders")
    assert results["pg-main"].status == "changed"  # the others go on


def test_catch_up_leaves_definitions_alone_when_enforcement_is_off(
    conn: Any, tmp_path: Path
) -> None:
    from ksmpolicy.libvirt.events import Enforcer

    off = parse_policy(
        "version: 1\nenforcement: off\nlive: false\n"
        "rules:\n  - {match: {names: ['db-*']}, action: exclude}\n"
    )
    before = {d.name(): d.XMLDesc(2) for d in conn.listAllDomains(4)}
    Enforcer(conn, None, tmp_path / "backups").catch_up(off)
    assert {d.name(): d.XMLDesc(2) for d in conn.listAllDomains(4)} == before
    assert not (tmp_path / "backups").exists()
    warn = parse_policy(
        "version: 1\nlive: false\nrules:\n  - {match: {names: ['db-*']}, action: exclude}\n"
    )
    Enforcer(conn, None, tmp_path / "backups").catch_up(warn)
    assert nosharepages(conn, "db-orders")  # the same pass does rewrite when enforcement is on


def test_libvirt_errors_are_not_echoed_on_stderr(tmp_path: Path) -> None:
    """libvirt's default handler printed "libvirt: ... error" on stderr for every error, e.g.
    on the daemon's stderr when no libvirtd ran; the error still raises and is reported once."""
    import subprocess
    import sys

    code = (
        "from ksmpolicy.libvirt.host import connect\n"
        "from ksmpolicy.errors import KsmPolicyError\n"
        "try:\n"
        f"    connect('qemu:///system?socket={tmp_path}/no-such.sock')\n"
        "except KsmPolicyError as exc:\n"
        "    print('raised:', exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.stdout.startswith("raised: cannot connect to libvirt"), result.stdout
    assert result.stderr == ""


@pytest.mark.root
def test_a_domain_on_a_hung_filesystem_fails_alone(conn: Any, tmp_path: Path) -> None:
    """apply gives each domain its own deadline: one whose disk hangs does not stop the rest."""
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError):
        pytest.skip("needs fusepy and libfuse2 (scripts/bootstrap installs them)")
    from lab.slowfs import mounted

    with mounted(tmp_path / "nfs") as nfs:
        stuck = domain_xml("db-stuck").replace(
            "  <os>",
            "  <devices>\n    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{nfs / 'slow.qcow2'}'/><target dev='vda' bus='virtio'/></disk>\n"
            "  </devices>\n  <os>",
        )
        conn.defineXML(stuck)
        try:
            started = time.monotonic()
            results = {
                r.key: r for r in apply(conn, POLICY, backup_dir=tmp_path / "b", deadline_seconds=1)
            }
            took = time.monotonic() - started
        finally:
            conn.lookupByName("db-stuck").undefine()
    assert results["db-stuck"].status == "failed"
    assert results["db-stuck"].error == "reading db-stuck took longer than 1 s"
    assert results["db-orders"].status == "changed"
    assert took < 10
