"""The Debian package, for real: the .deb `make deb` built (dist/), installed with apt on this
machine beside Debian's ksmtuned, checked (files, the hook called by a real libvirtd, the
daemon as its unit runs it, `doctor` healthy), then purged: nothing of ours left, ksmtuned
back as it was. Root; `make test` builds the package first (CI too)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.libvirtd import GUEST, Lab, lab_session
from tests.conftest import IS_ROOT, REPO, RealKsm
from tests.control.test_daemon import wait_for

pytestmark = [pytest.mark.root, pytest.mark.kernel]
DEBS = sorted(REPO.glob("dist/ksmpolicy_*_all.deb"))
SYSTEM = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"}
KSMTUNED_WANTS = Path("/etc/systemd/system/multi-user.target.wants/ksmtuned.service")
POLICY_RC = Path("/usr/sbin/policy-rc.d")


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv), capture_output=True, text=True, env=SYSTEM, timeout=600, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)}: {result.returncode}\n{result.stdout}{result.stderr}"
        )
    return result


def installed(package: str) -> bool:
    found = run("dpkg-query", "-W", "-f=${Status}", package, check=False)
    return "install ok installed" in found.stdout


@pytest.fixture
def deb() -> Path:
    if not IS_ROOT:
        pytest.skip("needs root to install packages (CI runs as root)")
    if not DEBS:
        if os.environ.get("CI"):
            pytest.fail("dist/ has no ksmpolicy .deb: `make test` builds it with `make deb`")
        pytest.skip("no package built: run `make deb` (make test does)")
    if installed("ksmpolicy"):
        pytest.skip("ksmpolicy is installed on this host: the test would purge it")
    return DEBS[-1]


@pytest.fixture
def ksmtuned_enabled() -> Iterator[None]:
    """Debian's ksmtuned installed and enabled, as on a host ksmpolicy comes to, without
    letting it start here (policy-rc.d). Removed afterwards if the test installed it."""
    had = installed("ksmtuned")
    made_policy_rc = not POLICY_RC.exists()
    if made_policy_rc:
        POLICY_RC.write_text("#!/bin/sh\nexit 101\n")  # no service starts during the installs
        POLICY_RC.chmod(0o755)
    try:
        if not had:
            run("apt-get", "install", "-y", "-qq", "--no-install-recommends", "ksmtuned")
        if not KSMTUNED_WANTS.is_symlink():
            run("deb-systemd-helper", "enable", "ksmtuned.service")
        assert KSMTUNED_WANTS.is_symlink()
        yield
    finally:
        if not had:
            run("apt-get", "purge", "-y", "-qq", "ksmtuned", check=False)
        if made_policy_rc:
            POLICY_RC.unlink()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    if not (GUEST / "initrd.img").exists():
        pytest.skip("the test guest is not built (scripts/build-guest; make test builds it)")
    pytest.importorskip("libvirt")
    workdir = tmp_path / "libvirt"
    workdir.mkdir()
    workdir.chmod(0o755)
    yield from lab_session(workdir)


def test_install_check_and_purge_the_package(
    deb: Path, ksmtuned_enabled: None, lab: Lab, real_ksm: RealKsm
) -> None:
    files: list[str] = []
    daemon = None
    try:
        # libvirtd runs already (the lab's): postinst makes it read the new hook.
        run("apt-get", "install", "-y", "-qq", "--no-install-recommends", str(deb))
        files = [f for f in run("dpkg", "-L", "ksmpolicy").stdout.splitlines() if Path(f).is_file()]
        assert not KSMTUNED_WANTS.exists(), "ksmtuned was left enabled"
        hook = Path("/etc/libvirt/hooks/qemu.d/ksmpolicy")
        assert hook.read_text().startswith("#!/usr/bin/python3 -IS\n")
        assert os.access(hook, os.X_OK)
        assert run("/usr/bin/ksmpolicy", "--version").stdout.startswith("ksmpolicy, version ")
        check = run("/usr/bin/ksmpolicy", "check")
        assert check.stdout.startswith("/etc/ksmpolicy/policy.yaml: ok"), check.stdout
        for path in (
            "/usr/share/man/man1/ksmpolicy.1.gz",
            "/usr/share/man/man1/ksmpolicy-doctor.1.gz",
            "/usr/share/bash-completion/completions/ksmpolicy",
            "/usr/share/ksmpolicy/proxmox/ksmpolicy-hook",
            "/usr/share/doc/ksmpolicy/examples/vps-domains.yaml",
        ):
            assert path in files, path
        unit = Path("/lib/systemd/system/ksmpolicy.service")
        exec_start = [
            line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")
        ]
        assert exec_start == ["ExecStart=/usr/bin/ksmpolicy daemon --restore-on-exit"]
        if shutil.which("systemd-analyze"):
            verify = run("systemd-analyze", "verify", str(unit), check=False)
            assert (verify.returncode, verify.stderr) == (0, ""), verify.stderr
        # A guest started by the real libvirtd: the package's hook is called.
        called = Path("/run/ksmpolicy/hook-called")
        lab.define("deb-1")
        lab.start("deb-1")
        assert called.exists(), "libvirtd did not call the package's hook"
        # The daemon, as the unit runs it; then doctor finds a healthy host.
        daemon = real_ksm.track(
            subprocess.Popen(
                [*exec_start[0].removeprefix("ExecStart=").split()],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=SYSTEM,
            )
        )
        assert wait_for(lambda: Path("/run/ksmpolicy/daemon.json").exists(), 30)
        assert wait_for(lambda: real_ksm.read("run") == 1, 30)  # the guest is mergeable
        doctor = run("/usr/bin/ksmpolicy", "doctor", "--json", check=False)
        report = json.loads(doctor.stdout)
        assert (doctor.returncode, report["ok"]) == (0, True), doctor.stdout
        assert any("seen by libvirt" in c["what"] for c in report["checks"])
        assert any(c["subject"].endswith("deb-1") for c in report["checks"])
    finally:
        if daemon is not None:
            real_ksm.stop(daemon)
        defined = [d.name() for d in lab.conn.listAllDomains()]
        if lab.prefix + "deb-1" in defined:  # not when the test failed before defining it
            lab.stop("deb-1")
        purge = run("apt-get", "purge", "-y", "-qq", "ksmpolicy", check=False)
    assert purge.returncode == 0, purge.stderr
    left = [f for f in files if Path(f).exists()]
    assert not left, f"purge left {left}"
    assert not Path("/run/ksmpolicy").exists()
    assert not Path("/etc/libvirt/hooks/qemu.d/ksmpolicy").exists(), "the hook was left"
    assert not Path("/var/lib/ksmpolicy").exists()
    assert KSMTUNED_WANTS.is_symlink(), "ksmtuned was not turned back on"
