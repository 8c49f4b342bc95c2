"""A real libvirtd with real QEMU guests (TCG), for the demo and the tests: started if none
runs, stopped after.

The guests boot Debian's kernel with a busybox initramfs (scripts/build-guest) whose image pages
are the same in every guest, or with a real-content image (scripts/build-guest-real: "web",
Flask on python3, or "database", PostgreSQL 15, unpacked from Debian's packages); they say
`ksmpolicy-guest: ready` on their serial console.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, Protocol

from ksmpolicy.libvirt.install import install, uninstall
from ksmpolicy.paths import HostPaths

REPO = Path(__file__).resolve().parent.parent

GUEST = REPO / ".cache/guest"
REAL_GUEST = REPO / ".cache/guest-real"
REAL_IMAGES = ("web", "database")
HOOK_NAME = "ksmpolicy-test"
PREFIX = "ksmpolicy-test-"
NAMESPACE = "urn:ksmpolicy:vm:1"
READY = b"ksmpolicy-guest: ready"  # what a test guest says once it (and its program) runs


def wait_for(condition: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def mount_namespace(pid: int | str) -> str:
    """The mount namespace a process is in (`mnt:[INODE]`)."""
    return str(Path(f"/proc/{pid}/ns/mnt").readlink())


def _pids(name: str) -> list[str]:
    found = subprocess.run(["pidof", name], capture_output=True, text=True, check=False)
    return found.stdout.split()


def _virsh_ok() -> bool:
    return (
        subprocess.run(
            ["virsh", "-c", "qemu:///system", "version"], capture_output=True, check=False
        ).returncode
        == 0
    )


class Libvirtd:
    """Connects to the system libvirtd, starting virtlogd and libvirtd (foreground children,
    so their PIDs are known) when none runs; `stop` ends only what it started."""

    def __init__(self, workdir: Path, *, own: bool = False) -> None:
        self.started: list[subprocess.Popen[bytes]] = []
        self.workdir = workdir
        if own and (_virsh_ok() or _pids("libvirtd")):
            raise RuntimeError(
                f"a libvirtd is running (pid {' '.join(_pids('libvirtd')) or '?'}): the demo "
                "starts a throwaway one of its own and would disturb it; stop it, or run the "
                "demo on a test machine"
            )
        if not _virsh_ok():
            for daemon in ("virtlogd", "libvirtd"):
                if shutil.which(daemon) is None and not Path(f"/usr/sbin/{daemon}").exists():
                    raise RuntimeError(f"{daemon} is not installed (make test installs it)")
                log = (workdir / f"{daemon}.log").open("wb")
                self.started.append(
                    subprocess.Popen([f"/usr/sbin/{daemon}"], stdout=log, stderr=log)
                )
                time.sleep(0.5)
            if not wait_for(_virsh_ok, 30):
                self.stop()
                raise RuntimeError("libvirtd did not come up: see its log in " + str(workdir))

    def libvirtd_pid(self) -> int:
        if self.started:
            return self.started[-1].pid
        # A second host's libvirtd (lab.twohosts) has another mount namespace: not ours.
        ours = mount_namespace("self")
        for pid in _pids("libvirtd"):
            with contextlib.suppress(OSError):
                if mount_namespace(pid) == ours:
                    return int(pid)
        raise RuntimeError("no libvirtd runs in this mount namespace")

    def reload(self) -> None:
        """SIGHUP: libvirtd reads its hooks again."""
        os.kill(self.libvirtd_pid(), signal.SIGHUP)
        time.sleep(1.0)
        wait_for(_virsh_ok, 20)

    def stop(self) -> None:
        for process in reversed(self.started):
            end(process)
        self.started.clear()


def end(process: subprocess.Popen[Any]) -> None:
    """End a process this lab started: SIGTERM, then SIGKILL after 20 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def two_domains_policy(a_names: str, b_names: str) -> str:
    """A policy with two trust domains, tenant-a (priority 10) over tenant-b (5), whose VMs
    are named by the globs given, and a fast pace for the tests."""
    return f"""\
version: 1
enforcement: block
domains:
  tenant-a: {{priority: 10}}
  tenant-b: {{priority: 5}}
groups:
  a: {{names: ["{a_names}"], domain: tenant-a}}
  b: {{names: ["{b_names}"], domain: tenant-b}}
reconciler: {{interval_seconds: 1, target_scan_seconds: 10, max_ksmd_cpu_percent: 60}}
"""


class Reloads(Protocol):
    def reload(self) -> None: ...


class Lab:
    """Test guests, the test hook and the policy it reads."""

    def __init__(
        self,
        daemon: Reloads,
        workdir: Path,
        *,
        prefix: str = PREFIX,
        hook_name: str = HOOK_NAME,
        uri: str = "qemu:///system",
        paths: HostPaths | None = None,
    ) -> None:
        """`uri` and `paths` name another libvirt host than this machine's (lab.twohosts)."""
        import libvirt

        libvirt.registerErrorHandler(lambda _ctx, _error: None, None)  # errors raise; no echo
        self.libvirt = libvirt
        self.daemon = daemon
        self.workdir = workdir
        self.prefix = prefix
        self.hook_name = hook_name
        self.policy = workdir / "policy.yaml"
        self.uri = uri
        self.paths = paths or HostPaths()
        self.conn = libvirt.open(uri)
        self.defined: list[str] = []

    # --- policy and hook

    def write_policy(self, text: str) -> None:
        temporary = self.policy.with_suffix(".tmp")
        temporary.write_text(text)
        temporary.chmod(0o644)
        temporary.rename(self.policy)  # a new inode: the hook's cache sees the change

    def install_hook(self, run_dir: Path | None = None, *, reload: bool = True) -> Path:
        """The hook, with its notes and policy cache in `run_dir` (default: the lab's own)."""
        path = install(
            self.paths,
            name=self.hook_name,
            policy=str(self.policy),
            run_dir=str(run_dir or self.workdir / "run"),
            python=sys.executable,
        )
        if reload:
            self.daemon.reload()
        return path

    def uninstall_hook(self, *, reload: bool = True) -> None:
        uninstall(self.paths, name=self.hook_name)
        if reload:
            self.daemon.reload()

    # --- guests

    def console(self, name: str) -> Path:
        return self.workdir / f"{name}.console"

    def define(
        self,
        name: str,
        *,
        tags: tuple[str, ...] = (),
        nosharepages: bool = False,
        memory_backing: str = "",
        image: str | None = None,
        memory_mib: int | None = None,
    ) -> Any:
        """A test guest; `memory_backing` is more <memoryBacking> content (memfd, access).
        `image` picks a real-content image (REAL_IMAGES; default: the tiny guest), whose RAM
        defaults to 512 MiB (the tiny guest's to 256)."""
        full = self.prefix + name
        cmdline = "console=ttyS0 quiet"
        if image is None:
            initrd, memory_mib = GUEST / "initrd.img", memory_mib or 256
        elif image in REAL_IMAGES:
            initrd, memory_mib = REAL_GUEST / f"{image}.img", memory_mib or 512
            # the root tmpfs holds at most half the RAM left beside the loaded initrd (the
            # 166 MiB database image failed "Initramfs unpacking failed: write error"): ramfs
            cmdline += " rootfstype=ramfs"
        else:
            raise ValueError(f"no guest image {image!r}: one of {', '.join(REAL_IMAGES)}")
        metadata = ""
        if tags:
            inner = "".join(f"<k:tag>{t}</k:tag>" for t in tags)
            metadata = (
                f"  <metadata>\n    <k:vm xmlns:k='{NAMESPACE}'>{inner}</k:vm>\n  </metadata>\n"
            )
        inner = ("<nosharepages/>" if nosharepages else "") + memory_backing
        backing = f"  <memoryBacking>{inner}</memoryBacking>\n" if inner else ""
        xml = (
            f"<domain type='qemu'>\n  <name>{full}</name>\n{metadata}"
            f"  <memory unit='MiB'>{memory_mib}</memory>\n{backing}  <vcpu>1</vcpu>\n"
            "  <features><acpi/></features>\n"
            "  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n"
            f"    <kernel>{GUEST / 'vmlinuz'}</kernel>\n"
            f"    <initrd>{initrd}</initrd>\n"
            f"    <cmdline>{cmdline}</cmdline>\n  </os>\n"
            "  <devices>\n"
            f"    <serial type='file'><source path='{self.console(full)}'/></serial>\n"
            "    <memballoon model='none'/>\n"
            "  </devices>\n</domain>\n"
        )
        domain = self.conn.defineXML(xml)
        if full not in self.defined:
            self.defined.append(full)
        return domain

    def domain(self, name: str) -> Any:
        return self.conn.lookupByName(self.prefix + name)

    def start(self, name: str) -> Any:
        domain = self.domain(name)
        console = self.console(self.prefix + name)
        if console.exists():
            console.unlink()
        domain.create()
        return domain

    def says(self, name: str, line: bytes) -> bool:
        """Whether the guest's console has said `line` since it started."""
        console = self.console(self.prefix + name)
        return console.exists() and line in console.read_bytes()

    def wait_ready(self, name: str, timeout: float = 120) -> None:
        console = self.console(self.prefix + name)
        # a real-content guest says so when its program does not start
        ok = wait_for(
            lambda: self.says(name, READY) or self.says(name, b"ksmpolicy-guest: service failed"),
            timeout,
            step=0.5,
        )
        if not ok or not self.says(name, READY):
            tail = console.read_bytes()[-2000:].decode(errors="replace") if console.exists() else ""
            raise AssertionError(f"guest {name} did not get ready in {timeout} s:\n{tail}")

    def pid(self, name: str) -> int:
        return int((self.paths.libvirt_run / f"{self.prefix}{name}.pid").read_text())

    def cmdline(self, name: str) -> str:
        return Path(f"/proc/{self.pid(name)}/cmdline").read_bytes().replace(b"\0", b" ").decode()

    def ksm_stat(self, name: str) -> dict[str, str]:
        text = Path(f"/proc/{self.pid(name)}/ksm_stat").read_text()
        return dict(line.replace(":", "").split(None, 1) for line in text.splitlines())

    def merging(self, name: str) -> int:
        return int(self.ksm_stat(name)["ksm_merging_pages"])

    def stop(self, name: str) -> None:
        domain = self.domain(name)
        if domain.isActive():
            domain.destroy()

    def cleanup(self) -> None:
        """End and undefine the guests it defined, and the test guests that arrived here by a
        migration or a restore (else their QEMU outlives the lab's libvirtd)."""
        for full in self.defined:
            try:
                domain = self.conn.lookupByName(full)
            except self.libvirt.libvirtError:
                continue
            if domain.isActive():
                domain.destroy()
            domain.undefine()
        for domain in self.conn.listAllDomains(0):
            if domain.name().startswith(self.prefix):
                persistent = domain.isPersistent()  # a transient one is gone once destroyed
                if domain.isActive():
                    domain.destroy()
                if persistent:
                    domain.undefine()
        self.conn.close()


@contextlib.contextmanager
def temporary_lab(prefix: str = "ksmpolicy-bench-") -> Iterator[Lab]:
    """A lab in a temporary directory, for the benchmarks; everything it started ended after."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        session = lab_session(workdir)
        try:
            yield next(session)
        finally:
            session.close()


def lab_session(workdir: Path) -> Generator[Lab, None, None]:
    daemon = Libvirtd(workdir)
    lab = None
    try:
        lab = Lab(daemon, workdir)
        yield lab
    finally:
        try:
            if lab is not None:
                lab.cleanup()
                if (HostPaths().libvirt_hooks / "qemu.d" / lab.hook_name).exists():
                    lab.uninstall_hook()
        finally:  # a failing clean-up must not leave the daemons it started running
            daemon.stop()
