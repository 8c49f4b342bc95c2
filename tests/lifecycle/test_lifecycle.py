"""The package's whole life on Debian 12 and 13 with systemd as PID 1 (a container, see
container.py): install the .deb `make deb` built with apt, start the daemon and see it drive the
real ksmd, upgrade to a newer build with the daemon running (it runs again, on the new code)
and stopped (it stays stopped), remove (the daemon is gone, the KSM knobs are as it found them,
VMs still start), purge (no file of the package left, a directory that was there before kept).
On Debian 13 (systemd 257) also `ksmpolicy systemd-dropin` for real: a service started under
its drop-in is mergeable (`ksm_merge_any` in /proc/PID/ksm_stat, read from the host), an
excluded one is not. Root; `make test` builds the package first (CI too)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import IS_ROOT, REPO, RealKsm, saved_knobs
from tests.lifecycle.container import Container

pytestmark = [pytest.mark.root, pytest.mark.kernel]
DEBS = sorted(REPO.glob("dist/ksmpolicy_*_all.deb"))
UNIT = "ksmpolicy.service"
# What the test sets before the daemon's first start, so that the daemon's own values show.
FOUND = {"run": 0, "pages_to_scan": 123, "sleep_millisecs": 45}
# A process made mergeable by `ksmpolicy exec` (the default policy merges it): 64 MiB of
# identical pages, so the daemon has a footprint to pace ksmd for.
LOAD = (
    "import mmap, time; m = mmap.mmap(-1, 64 << 20); m.write(b'\\x5a' * (64 << 20)); "
    "time.sleep(3600)"
)
PREEXISTING = "/etc/libvirt/hooks"  # the admin's, before the package came
METRICS_URL = "http://127.0.0.1:19573/metrics"
METRICS_DROPIN = """[Service]
ExecStart=
ExecStart=/usr/bin/ksmpolicy daemon --restore-on-exit --metrics 19573
"""
HOOK = "/etc/libvirt/hooks/qemu.d/ksmpolicy"  # postinst writes it in a directory it makes


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def newer(deb: Path, version: str, workdir: Path) -> Path:
    """The same package as `version` (control, md5sums and ksmpolicy.__version__), repacked
    with dpkg-deb: what a newer build looks like to dpkg and to the running code."""
    tree = workdir / f"tree-{version}"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN/control"
    control.write_text(re.sub(r"(?m)^Version: .*$", f"Version: {version}", control.read_text()))
    init = tree / "usr/lib/python3/dist-packages/ksmpolicy/__init__.py"
    text = init.read_text()
    init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', text))
    assert init.read_text() != text, "ksmpolicy/__init__.py has no __version__ line"
    files = sorted(p for p in tree.rglob("*") if p.is_file() and "DEBIAN" not in p.parts)
    sums = subprocess.run(
        ["md5sum", *(str(p.relative_to(tree)) for p in files)],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    (tree / "DEBIAN/md5sums").write_text(sums.stdout)
    out = workdir / f"ksmpolicy_{version}_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-b", str(tree), str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture
def deb() -> Path:
    if not IS_ROOT:
        pytest.skip("needs root for containers (CI runs as root)")
    if not DEBS:
        if os.environ.get("CI"):
            pytest.fail("dist/ has no ksmpolicy .deb: `make test` builds it with `make deb`")
        pytest.skip("no package built: run `make deb` (make test does)")
    for tool in ("mmdebstrap", "systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt install mmdebstrap systemd-container)")
    return DEBS[-1]


@pytest.fixture
def container(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Container]:
    with Container.booted(request.param, tmp_path / "container") as box:
        yield box


class Daemon:
    """The packaged daemon in the container, seen from both sides."""

    def __init__(self, box: Container) -> None:
        self.box = box

    def active(self) -> bool:
        return self.box.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "active"

    def main_pid(self) -> int:
        shown = self.box.run("systemctl", "show", "-p", "MainPID", "--value", UNIT).stdout
        return int(shown.strip())

    def version(self) -> str:
        """The version of the code it runs, from its sign of life (rewritten every 2 s)."""
        shown = self.box.run("cat", "/run/ksmpolicy/daemon.json", check=False).stdout
        try:
            return str(json.loads(shown)["version"])
        except (ValueError, KeyError):
            return ""


def paths_in(deb: Path) -> set[str]:
    """Every path the package holds (files, links and directories), as dpkg-deb lists it."""
    listing = subprocess.run(
        ["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True
    )
    paths = {line.split(None, 5)[5].split(" -> ")[0] for line in listing.stdout.splitlines()}
    return {path.removeprefix(".").rstrip("/") for path in paths} - {""}


def ksm_stat(pid: int) -> dict[str, str]:
    """/proc/PID/ksm_stat as the kernel writes it: `ksm_rmap_items 0`, `ksm_merge_any: yes`."""
    lines = Path(f"/proc/{pid}/ksm_stat").read_text().splitlines()
    return {key.rstrip(":"): value for key, value in (line.split(None, 1) for line in lines)}


@pytest.mark.parametrize("container", ["bookworm", "trixie"], indirect=True)
def test_install_upgrade_remove_purge(
    deb: Path, container: Container, real_ksm: RealKsm, tmp_path: Path
) -> None:
    box, daemon = container, Daemon(container)
    # Before the package: an admin's (empty) hooks directory, and the knobs as the daemon will
    # find them.
    box.run("install", "-d", "-m", "0750", PREEXISTING)
    listed = paths_in(deb)
    there_before = {path for path in listed if (box.root / path.lstrip("/")).exists()}
    for name, value in FOUND.items():
        real_ksm.write(name, value)
    found = saved_knobs()
    versions = ["0.1.0+lifecycle1", "0.1.0+lifecycle2"]
    for path in (deb, newer(deb, versions[0], tmp_path), newer(deb, versions[1], tmp_path)):
        shutil.copy(path, box.root / "root" / path.name)
    box.run("apt-get", "update", "-qq")

    # Install: the hook in place, the daemon enabled, not started.
    box.run("apt-get", "install", "-y", "-qq", f"/root/{deb.name}")
    assert (box.root / HOOK.lstrip("/")).read_text().startswith("#!/usr/bin/python3 -IS\n")
    assert box.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    assert not daemon.active(), "the install started the daemon"
    files = box.run("dpkg", "-L", "ksmpolicy").stdout.split()
    assert "/usr/share/doc/ksmpolicy/policy.md.gz" in files
    assert "/usr/share/doc/ksmpolicy/README.md.gz" in files

    # Start it beside a mergeable process: it paces the real ksmd.
    load = ("--name", "lifecycle-load", "--", "/usr/bin/python3", "-c", LOAD)
    box.run("systemd-run", "--unit=lifecycle-load", "/usr/bin/ksmpolicy", "exec", *load)
    # With metrics, as docs/install.md says to turn them on (the host shares the network).
    dropin = box.root / "etc/systemd/system/ksmpolicy.service.d/metrics.conf"
    dropin.parent.mkdir()
    dropin.write_text(METRICS_DROPIN)
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "start", UNIT)
    assert daemon.active()
    first = daemon.main_pid()
    journal = box.run("journalctl", "-u", UNIT, "-o", "cat").stdout
    assert f"metrics on {METRICS_URL}" in journal, journal
    with urllib.request.urlopen(METRICS_URL, timeout=10) as answer:
        assert "# TYPE ksmpolicy_ksm_available gauge" in answer.read().decode()
    assert wait_for(lambda: real_ksm.read("run") == 1, 30), "the daemon did not start ksmd"

    # Upgrade with the daemon running: it runs again, on the new code.
    box.run("apt-get", "install", "-y", "-qq", f"/root/ksmpolicy_{versions[0]}_all.deb")
    assert daemon.active(), "the upgrade left the daemon stopped"
    second = daemon.main_pid()
    assert second != first
    assert wait_for(lambda: daemon.version() == versions[0], 10), daemon.version()
    assert wait_for(lambda: real_ksm.read("run") == 1, 30)

    # Upgrade with the daemon stopped: it stays stopped; its stop restored the knobs.
    box.run("systemctl", "stop", UNIT)
    assert saved_knobs() == found
    box.run("apt-get", "install", "-y", "-qq", f"/root/ksmpolicy_{versions[1]}_all.deb")
    assert not daemon.active(), "the upgrade started a stopped daemon"
    assert box.run("dpkg-query", "-W", "-f=${Version}", "ksmpolicy").stdout == versions[1]

    # Remove: the daemon stops (prerm) and puts the knobs back; VMs still start.
    box.run("systemctl", "start", UNIT)
    third = box.host_pid(daemon.main_pid())
    assert wait_for(lambda: real_ksm.read("run") == 1, 30)
    box.run("apt-get", "remove", "-y", "-qq", "ksmpolicy")
    assert not daemon.active()
    assert not Path(f"/proc/{third}").exists(), "the daemon outlived the package"
    assert saved_knobs() == found, "the knobs are not as the daemon found them"
    # The hook would run removed code at every VM start: gone, with the directory made for it.
    assert not (box.root / HOOK.lstrip("/")).exists(), "remove left the libvirt hook"
    assert not (box.root / HOOK.lstrip("/")).parent.exists()

    # Purge: nothing of the package left, the admin's directory kept.
    box.run("apt-get", "purge", "-y", "-qq", "ksmpolicy")
    left = {path for path in listed if (box.root / path.lstrip("/")).exists()}
    assert sorted(left - there_before) == [], "purge left files of the package"
    assert sorted(there_before - left) == [], "purge removed what was there before"
    assert (box.root / PREEXISTING.lstrip("/")).is_dir(), "purge removed the admin's directory"
    assert oct((box.root / PREEXISTING.lstrip("/")).stat().st_mode & 0o777) == "0o750"
    for gone in ("var/lib/ksmpolicy", "run/ksmpolicy", "etc/ksmpolicy"):
        assert not (box.root / gone).exists(), gone
    wants = box.root / "etc/systemd/system/multi-user.target.wants" / UNIT
    assert not wants.is_symlink()


DROPIN_UNIT = """[Service]
ExecStart=/usr/bin/python3 -c "{load}"
"""


def python_of(box: Container, unit: str, timeout: float = 30.0) -> int:
    """The host's PID of the unit's main process once it runs python3: right after `systemctl
    start` it can still be systemd's executor, before MemoryKSM= is applied (a race CI hit)."""
    deadline = time.monotonic() + timeout
    while True:
        main = int(box.run("systemctl", "show", "-p", "MainPID", "--value", unit).stdout)
        pid = box.host_pid(main) if main else None
        if pid is not None and Path(f"/proc/{pid}/comm").read_text().strip() == "python3":
            return pid
        assert time.monotonic() < deadline, f"{unit}: its main process never ran python3"
        time.sleep(0.2)


@pytest.mark.parametrize("container", ["trixie"], indirect=True)
def test_systemd_dropin_on_systemd_257(deb: Path, container: Container, real_ksm: RealKsm) -> None:
    # real_ksm: the KSM lock and the knobs restored, though nothing here writes them.
    """MemoryKSM= (systemd >= 254) as `ksmpolicy systemd-dropin` writes it: the service it
    lets merge is mergeable from its first instruction, the excluded one is not."""
    box = container
    shutil.copy(deb, box.root / "root" / deb.name)
    box.run("apt-get", "update", "-qq")
    box.run("apt-get", "install", "-y", "-qq", "--no-install-recommends", f"/root/{deb.name}")
    units = box.root / "etc/systemd/system"
    for name in ("lifecycle-web", "lifecycle-db"):
        (units / f"{name}.service").write_text(DROPIN_UNIT.format(load=LOAD))
    box.run("ksmpolicy", "systemd-dropin", "lifecycle-web.service")
    box.run("ksmpolicy", "systemd-dropin", "lifecycle-db.service", "--tag", "database")
    web = (units / "lifecycle-web.service.d/50-ksmpolicy.conf").read_text()
    db = (units / "lifecycle-db.service.d/50-ksmpolicy.conf").read_text()
    assert "MemoryKSM=yes" in web
    assert "MemoryKSM=no" in db
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "start", "lifecycle-web.service", "lifecycle-db.service")
    try:
        stats = {name: ksm_stat(python_of(box, name)) for name in ("lifecycle-web", "lifecycle-db")}
        assert stats["lifecycle-web"]["ksm_merge_any"] == "yes", stats
        assert stats["lifecycle-db"]["ksm_merge_any"] == "no", stats
    finally:
        box.run("systemctl", "stop", "lifecycle-web.service", "lifecycle-db.service")
