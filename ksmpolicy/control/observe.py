"""One look at the host for the control law: ksmd's counters, memory, and the mergeable
footprint of the VMM processes (reads only)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ksmpolicy.control.law import Observation
from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.kernel.ksm import read_ksm
from ksmpolicy.kernel.procfs import ksmd_pid, process_cpu_seconds, read_meminfo
from ksmpolicy.kernel.scan import ProcessScanner, VmProcess, footprint_bytes
from ksmpolicy.paths import HostPaths


@dataclass
class Observer:
    """Collects one Observation from the host (reads only)."""

    paths: HostPaths
    scanner: ProcessScanner
    clock: Callable[[], float] = time.monotonic
    _ksmd: int | None = None
    processes: list[VmProcess] = field(default_factory=list)

    def observe(self, *, notes: int = 0, refresh: bool = False) -> Observation:
        state = read_ksm(self.paths)
        if state is None:
            raise KsmPolicyError(
                f"{self.paths.ksm_dir} does not exist: this kernel has no KSM (CONFIG_KSM)"
            )
        meminfo = read_meminfo(self.paths)
        if self._ksmd is None:
            self._ksmd = ksmd_pid(self.paths)
        cpu = process_cpu_seconds(self.paths, self._ksmd) if self._ksmd else None
        # New processes are re-read on every pass anyway; `refresh` re-reads all of them.
        self.processes = self.scanner.scan(refresh=refresh)
        page = state.page_size
        return Observation(
            time=self.clock(),
            footprint_pages=footprint_bytes(self.processes) // page,
            full_scans=state.get("full_scans") or 0,
            saved_pages=state.saved_pages,
            mem_total=meminfo.get("MemTotal", 0),
            mem_available=meminfo.get("MemAvailable", meminfo.get("MemFree", 0)),
            ksmd_cpu_seconds=cpu,
            pages_scanned=state.get("pages_scanned"),
            pages_skipped=state.get("pages_skipped"),
            pages_seen=state.pages_seen,
            notes=notes,
            has_advisor="advisor_mode" in state.values,
            advisor_on=state.values.get("advisor_mode") == "scan-time",
            has_use_zero_pages="use_zero_pages" in state.values,
        )
