"""A second libvirt host on this machine ("host B"), for migration tests: its own mount
namespace, configuration, state, run and log directories, host UUID, virtlogd and libvirtd.

How it is built (checked here):

* a holder process (`unshare -m --propagation private`, then `sleep`) owns a private mount
  namespace with a tmpfs on /run and bind mounts of B's own directories (under `root`) over
  /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt;
* virtlogd and libvirtd run in the foreground inside it (`nsenter --mount`, which execs them:
  their PIDs are the ones started here, and `stop` ends only those);
* B's /etc/libvirt holds copies of the host's *.conf files, a libvirtd.conf with its own
  `host_uuid` (libvirt refuses a migration between hosts of one UUID) and its own, empty,
  hooks directory: `Lab(hostb, ..., uri=hostb.uri, paths=hostb.paths)` installs B's hook.

Host A (the machine's libvirtd) reaches B at `qemu:///system?socket=ROOT/run/libvirt/
libvirt-sock`, and so does a client in A's namespace: B's directories are visible from A under
`root` (propagation is private, so no mount leaks out). The network and PID namespaces and the
kernel are shared: B's QEMU processes are in A's /proc, migration runs over 127.0.0.1, and KSM
(one ksmd) is global, so a page of a VM on B may merge with a page of a VM on A.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ksmpolicy.paths import HostPaths
from lab.libvirtd import Lab, end, lab_session, mount_namespace, wait_for

# B's own copies are mounted over these (directories that exist on a host with libvirt).
PRIVATE_DIRS = (
    "etc/libvirt",
    "run/libvirt",
    "var/lib/libvirt",
    "var/log/libvirt",
    "var/cache/libvirt",
)


class HostB:
    """The second host: `start` builds and starts it, `stop` ends what it started and removes
    its directories. Also the `daemon` a `lab.libvirtd.Lab` reloads after installing a hook."""

    def __init__(self, workdir: Path) -> None:
        self.root = workdir / "hostb"
        self.workdir = workdir  # B's logs stay here after `stop` removes `root`
        self.host_uuid = str(uuid.uuid4())
        self.holder: subprocess.Popen[bytes] | None = None
        self.daemons: list[subprocess.Popen[bytes]] = []
        self.logs: list[IO[bytes]] = []

    @property
    def socket(self) -> Path:
        return self.root / "run/libvirt/libvirt-sock"

    @property
    def uri(self) -> str:
        """B's libvirtd, for a client in A's namespace (libvirt-python, virsh -c)."""
        return f"qemu:///system?socket={self.socket}"

    @property
    def migrate_uri(self) -> str:
        """B as a migration destination for `virsh migrate` (the client connects to both)."""
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def paths(self) -> HostPaths:
        """B's files as A sees them: hooks, status and PID files of B's domains."""
        return HostPaths(root=self.root)

    def start(self) -> HostB:
        try:
            self._build_tree()
            self._enter_namespace()
            for daemon in ("virtlogd", "libvirtd"):
                self._start_daemon(daemon)
            if not wait_for(self._answers, 60, step=0.3):
                raise RuntimeError(f"host B's libvirtd did not come up: see {self.workdir}")
        except BaseException:
            self.stop()
            raise
        return self

    def _build_tree(self) -> None:
        for relative in PRIVATE_DIRS:
            (self.root / relative).mkdir(mode=0o755, parents=True)
        (self.root / "etc/libvirt/hooks/qemu.d").mkdir(mode=0o755, parents=True)
        for conf in Path("/etc/libvirt").glob("*.conf"):  # not qemu/ (A's definitions), hooks/
            if conf.name != "libvirtd.conf":
                shutil.copy(conf, self.root / "etc/libvirt" / conf.name)
        # QEMU's capabilities as A's libvirtd probed them (libvirt re-probes what is stale): B
        # starts in about a second instead of eight.
        probed = Path("/var/cache/libvirt/qemu/capabilities")
        if probed.is_dir():
            shutil.copytree(probed, self.root / "var/cache/libvirt/qemu/capabilities")
        own = Path("/etc/libvirt/libvirtd.conf")
        text = own.read_text() if own.exists() else ""
        text += f'\n# host B of the ksmpolicy migration lab\nhost_uuid = "{self.host_uuid}"\n'
        (self.root / "etc/libvirt/libvirtd.conf").write_text(text)

    def _enter_namespace(self) -> None:
        binds = "".join(
            f"mount --bind {self.root / d} /{d}; " for d in PRIVATE_DIRS if d != "run/libvirt"
        )
        script = (
            "set -e; mount -t tmpfs -o mode=0755 ksmpolicy-hostb /run; mkdir /run/libvirt; "
            f"mount --bind {self.root / 'run/libvirt'} /run/libvirt; {binds}"
            "echo ready; exec sleep infinity"
        )
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.PIPE,
            stderr=self._log("namespace"),
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"host B's mount namespace failed: see {self.workdir}")

    def _start_daemon(self, name: str) -> None:
        log = self._log(name)
        self.daemons.append(
            subprocess.Popen(self.command([f"/usr/sbin/{name}"]), stdout=log, stderr=log)
        )
        wait_for(lambda: self.daemons[-1].poll() is not None or self._in_namespace(name), 10, 0.1)

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside B's mount namespace (nsenter execs it: the PID is its own)."""
        assert self.holder is not None
        return ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", "--", *argv]

    def _in_namespace(self, name: str) -> bool:
        process = self.daemons[-1]
        try:
            comm = Path(f"/proc/{process.pid}/comm").read_text().strip()
            return comm == name and mount_namespace(process.pid) == self.namespace()
        except OSError:
            return False

    def namespace(self) -> str:
        assert self.holder is not None
        return mount_namespace(self.holder.pid)

    def _log(self, name: str) -> IO[bytes]:
        log = (self.workdir / f"hostb-{name}.log").open("ab")
        self.logs.append(log)
        return log

    def _answers(self) -> bool:
        probe = ["virsh", "-c", self.uri, "version"]
        return subprocess.run(probe, capture_output=True, check=False).returncode == 0

    def libvirtd_pid(self) -> int:
        return self.daemons[-1].pid

    def reload(self) -> None:
        """SIGHUP: B's libvirtd reads its hooks again."""
        os.kill(self.libvirtd_pid(), signal.SIGHUP)
        wait_for(self._answers, 20, step=0.3)

    def qemu_pids(self) -> list[int]:
        """QEMU processes B's libvirtd runs (its PID files)."""
        found = []
        for pid_file in self.paths.libvirt_run.glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text())
                if Path(f"/proc/{pid}/comm").read_text().startswith("qemu"):
                    found.append(pid)
        return found

    def destroy_all(self) -> None:
        """Every domain on B is the lab's: destroy and undefine them all."""
        if not self.socket.exists():
            return
        import libvirt

        conn = libvirt.open(self.uri)
        try:
            for domain in conn.listAllDomains():
                with contextlib.suppress(libvirt.libvirtError):
                    if domain.isActive():
                        domain.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    if domain.isPersistent():
                        domain.undefine()
        finally:
            conn.close()

    def stop(self) -> None:
        """Ends B's domains, then the daemons and the namespace's holder (by the PIDs started
        here), and removes B's directories; the namespace's mounts go with its last process."""
        with contextlib.suppress(Exception):
            if self.daemons and self.daemons[-1].poll() is None:
                self.destroy_all()
        leftover = self.qemu_pids() if self.root.exists() else []
        for process in reversed(self.daemons):
            _end(process)
        for pid in leftover:  # a QEMU B's libvirtd could not destroy: B's own, by its PID file
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.holder is not None:
            _end(self.holder)
            if self.holder.stdout is not None:
                self.holder.stdout.close()
        self.daemons.clear()
        for log in self.logs:
            log.close()
        self.logs.clear()
        if self.root.exists():
            shutil.rmtree(self.root)


def _end(process: subprocess.Popen[bytes]) -> None:
    end(process)


@contextlib.contextmanager
def two_hosts(workdir: Path) -> Iterator[tuple[Lab, Lab, HostB]]:
    """Host A (the machine's libvirtd: `lab_session` in `workdir`/a) and host B (in `workdir`/b),
    each a `Lab`; everything both started is ended after, B first."""
    workdir.chmod(0o755)
    (workdir / "a").mkdir(mode=0o755)
    (workdir / "b").mkdir(mode=0o755)
    session = lab_session(workdir / "a")
    a = next(session)
    hostb = None
    try:
        hostb = HostB(workdir).start()
        b = Lab(hostb, workdir / "b", uri=hostb.uri, paths=hostb.paths)
        try:
            yield a, b, hostb
        finally:
            b.conn.close()
    finally:
        if hostb is not None:
            hostb.stop()  # B's domains, daemons, namespace and directories (its hook with them)
        session.close()  # A's guests and hook, and A's libvirtd if the lab started it
