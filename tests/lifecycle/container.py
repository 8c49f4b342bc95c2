"""A Debian release booted with systemd as PID 1 in a container (systemd-nspawn), for tests
that need a real systemd: the package's maintainer scripts, the unit, `systemd-dropin`.

The root filesystem is made once per release with mmdebstrap and kept under
/var/cache/ksmpolicy-tests/ (keyed by release and recipe; delete the directory to refresh it).
Each boot runs on an overlay of it, so nothing a test does reaches the cache. Packages apt
downloads inside are kept in a cache directory beside it (bind-mounted as
/var/cache/apt/archives): a rerun resolves against the mirror but downloads nothing.
`/sys` is read-only in the container: /sys/kernel/mm/ksm is bind-mounted read-write, so a
daemon inside drives the host's real ksmd.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

CACHE = Path("/var/cache/ksmpolicy-tests")
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3")
SYSTEM = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"}
KSM = "/sys/kernel/mm/ksm"


def cached_root(release: str) -> Path:
    """The release's root filesystem, made with mmdebstrap the first time (about 20 s)."""
    recipe = f"minbase {','.join(PACKAGES)}"
    key = hashlib.sha256(recipe.encode()).hexdigest()[:8]
    root = CACHE / f"{release}-{key}"
    if root.is_dir():
        return root
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            *("mmdebstrap", "--quiet", "--variant=minbase"),
            *(f"--include={','.join(PACKAGES)}", release, str(partial)),
        ],
        check=True,
        env=SYSTEM,
        timeout=600,
    )
    partial.rename(root)
    return root


class Container:
    """One boot of a cached root on an overlay under `workdir`; `stop()` ends it (by the
    nspawn PID) and unmounts it."""

    def __init__(self, release: str, workdir: Path, read_only: Sequence[str] = ()) -> None:
        self.release = release
        self.read_only = read_only  # binds, "HOST:CONTAINER" or "PATH", read-only inside
        self.lower = cached_root(release)
        self.archives = CACHE / f"{release}-apt-archives"
        (self.archives / "partial").mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.root = workdir / "root"
        self.log = workdir / "console.log"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.init_pid = 0
        self.mounted = False

    @classmethod
    @contextlib.contextmanager
    def booted(
        cls, release: str, workdir: Path, read_only: Sequence[str] = ()
    ) -> Iterator[Container]:
        """A container booted in `workdir` (made here), stopped after whatever happens."""
        box = cls(release, workdir, read_only)
        workdir.mkdir()
        try:
            box.boot()
            yield box
        finally:
            box.stop()

    def boot(self, timeout: float = 60.0) -> None:
        for name in ("upper", "work", "root"):
            (self.workdir / name).mkdir()
        upper, work = self.workdir / "upper", self.workdir / "work"
        options = f"lowerdir={self.lower},upperdir={upper},workdir={work}"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(self.root)], check=True
        )
        self.mounted = True
        with self.log.open("wb") as console:
            self.nspawn = subprocess.Popen(
                [
                    *("systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "-b"),
                    *("-D", str(self.root), "--bind", KSM),
                    *("--bind", f"{self.archives}:/var/cache/apt/archives"),
                    *(f"--bind-ro={bind}" for bind in self.read_only),
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=SYSTEM,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited: {self.log.read_text()[-2000:]}")
            self.init_pid = self.init_pid or self._find_init()
            if self.init_pid:
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.2)
        raise AssertionError(f"{self.release} did not boot in {timeout} s")

    def _find_init(self) -> int:
        """The container's PID 1 as the host numbers it: nspawn's child running systemd."""
        assert self.nspawn is not None
        pid = self.nspawn.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            for child in children:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        except OSError:
            pass
        return 0

    def run(
        self, *argv: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """A command inside (every namespace of the container's PID 1), with a clean
        environment."""
        command = ["nsenter", "-t", str(self.init_pid), "-a", "env", "-i"]
        command += [f"{k}={v}" for k, v in SYSTEM.items()] + list(argv)
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{self.release}: {' '.join(argv)}: exit {result.returncode}\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def host_pid(self, pid: int) -> int:
        """The host's PID of the container's process `pid`."""
        namespace = Path(f"/proc/{self.init_pid}/ns/pid").readlink()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (entry / "ns/pid").readlink() != namespace:
                    continue
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("NSpid:") and int(line.split()[-1]) == pid:
                        return int(entry.name)
            except (OSError, ValueError):
                continue
        raise AssertionError(f"no host process for {self.release}'s PID {pid}")

    def stop(self) -> None:
        """Power it off (nspawn turns SIGTERM into a clean shutdown), killed after 30 s."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.terminate()
            try:
                self.nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()
        if self.mounted:
            subprocess.run(["umount", str(self.root)], check=True)
            self.mounted = False
