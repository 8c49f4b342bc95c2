"""A fake host under a directory, for tests that need no root: KSM's sysfs, /proc (memory,
the kernel's release, ksmd, processes) and NUMA nodes, laid out as the kernel lays them out.
The one place the tests know that layout; `HostPaths(root)` reads it like the real host."""

from __future__ import annotations

from pathlib import Path

from ksmpolicy.paths import HostPaths

PF_KTHREAD = 0x00200000


class FakeHost:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc = root / "proc"
        self.ksm_dir = root / "sys/kernel/mm/ksm"
        self.proc.mkdir(parents=True, exist_ok=True)

    @property
    def paths(self) -> HostPaths:
        return HostPaths(self.root, self.root / "run")

    def ksm(self, **knobs: object) -> FakeHost:
        """KSM's files (knobs and counters) with these values; an old kernel lacks the rest."""
        self.ksm_dir.mkdir(parents=True, exist_ok=True)
        for name, value in knobs.items():
            (self.ksm_dir / name).write_text(f"{value}\n")
        return self

    def meminfo(self, total_kb: int = 1000, available_kb: int = 900) -> FakeHost:
        (self.proc / "meminfo").write_text(
            f"MemTotal: {total_kb} kB\nMemAvailable: {available_kb} kB\n"
        )
        return self

    def kernel(self, release: str) -> FakeHost:
        (self.proc / "sys/kernel").mkdir(parents=True, exist_ok=True)
        (self.proc / "sys/kernel/osrelease").write_text(f"{release}\n")
        return self

    def ksmd(self, pid: int = 42, cpu_ns: int = 12_500_000_000) -> FakeHost:
        """The ksmd kernel thread: no command line, PF_KTHREAD in its flags."""
        entry = self.proc / str(pid)
        entry.mkdir()
        (entry / "comm").write_text("ksmd\n")
        (entry / "cmdline").write_text("")
        (entry / "schedstat").write_text(f"{cpu_ns} 0 0\n")
        flags = f" 0 0 0 0 {PF_KTHREAD | 0x40}"  # pgrp, session, tty, tpgid, flags
        (entry / "stat").write_text(f"{pid} (ksmd) S 2" + flags + " 0" * 40 + "\n")
        return self

    def process(
        self,
        pid: int,
        argv: list[str],
        comm: str,
        smaps: bytes = b"",
        ksm_stat: str | None = None,
        uid: int = 0,
    ) -> Path:
        """A process: started 1000 + PID clock ticks after boot (so PID and start name it)."""
        entry = self.proc / str(pid)
        entry.mkdir(parents=True)
        (entry / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (entry / "comm").write_text(comm + "\n")
        (entry / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
        fields = ["S", "1"] + ["0"] * 17 + [str(1000 + pid)] + ["0"] * 20
        (entry / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields) + "\n")
        (entry / "smaps").write_bytes(smaps)
        if ksm_stat is not None:
            (entry / "ksm_stat").write_text(ksm_stat)
        return entry

    def numa(self, nodes: int, *, has_memory: bool = True) -> FakeHost:
        node_dir = self.root / "sys/devices/system/node"
        for n in range(nodes):
            (node_dir / f"node{n}").mkdir(parents=True, exist_ok=True)
        if has_memory:
            (node_dir / "has_memory").write_text(f"0-{nodes - 1}\n" if nodes > 1 else "0\n")
        return self
