"""The inventory: what runs on this host, once, for every part that needs it (status, doctor,
the metrics, the audit, the daemon and its keeper).

One look (`take`) reads KSM's state and who controls it, scans /proc for every QEMU and every
other process with mergeable memory (kernel/scan.py), asks the platforms (libvirt, Proxmox VE,
plain processes; platforms/base.py) who each one is, and decides each with the policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ksmpolicy.inventory.host import host_status
from ksmpolicy.inventory.model import HostStatus, VmStatus
from ksmpolicy.inventory.vms import vm_status
from ksmpolicy.kernel.ksm import read_ksm
from ksmpolicy.kernel.procfs import ksmd_pid, process_cpu_seconds
from ksmpolicy.kernel.scan import ProcessScanner, VmProcess
from ksmpolicy.libvirt.platform import Libvirt
from ksmpolicy.paths import HostPaths
from ksmpolicy.platforms.base import Platform
from ksmpolicy.platforms.process import Process
from ksmpolicy.policy.decide import Decider
from ksmpolicy.policy.model import Policy
from ksmpolicy.proxmox.platform import Proxmox


def platforms(libvirt_connect: Callable[[], Any] | None = None) -> tuple[Platform, ...]:
    """The platforms, in the order they are asked who a process is: Proxmox VE (a QEMU with
    `-id VMID` and its config), libvirt (its status file), and the process itself."""
    return (Proxmox(), Libvirt(libvirt_connect), Process())


def platform_named(name: str, found: Sequence[Platform] | None = None) -> Platform:
    """The platform a VM's `source` names."""
    for platform in found or platforms():
        if platform.name == name:
            return platform
    raise KeyError(f"no platform {name!r}")


@dataclass(frozen=True)
class Inventory:
    host: HostStatus
    vms: tuple[VmStatus, ...]
    processes: tuple[VmProcess, ...]  # what the scan found, in the same order as `vms`


def take(
    paths: HostPaths,
    policy: Policy | None,
    *,
    sample_seconds: float = 0.0,
    scanner: ProcessScanner | None = None,
    refresh: bool = False,
    found: Sequence[Platform] | None = None,
) -> Inventory:
    """One look at the host. `sample_seconds` measures ksmd's CPU share over that long (0:
    not measured); `refresh` re-reads every process's smaps (before a page-map walk)."""
    state = read_ksm(paths)
    ksmd = ksmd_pid(paths) if state is not None else None
    cpu_before = process_cpu_seconds(paths, ksmd) if ksmd else None
    started = time.monotonic()
    processes = tuple((scanner or ProcessScanner(paths)).scan(refresh=refresh))
    decider = Decider(policy) if policy is not None else None
    adapters = found or platforms()
    vms = tuple(vm_status(paths, p, decider, adapters) for p in processes)
    if cpu_before is not None and sample_seconds > 0:
        time.sleep(max(0.0, sample_seconds - (time.monotonic() - started)))
    elapsed = time.monotonic() - started
    cpu_after = process_cpu_seconds(paths, ksmd) if ksmd else None
    share = None
    if cpu_before is not None and cpu_after is not None and elapsed > 0 and sample_seconds > 0:
        share = 100 * (cpu_after - cpu_before) / elapsed
    return Inventory(host_status(paths, state, share, cpu_after), vms, processes)
