"""Where the host's files are: one injectable root for every path ksmpolicy reads or writes.

`HostPaths()` is the real host; tests point `root` at a temporary tree. No other module spells
a host path (tests/test_structure.py checks it). Beside them, the kernel's page size. The hook
imports this module, so it stays free of pathlib until a path is built.
"""

from __future__ import annotations

import os

from ksmpolicy.records import dataclass, field

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from pathlib import Path

# The policy when none is given. Proxmox VE nodes look in /etc/pve first (PVE_POLICY_PATH).
DEFAULT_POLICY_PATH = "/etc/ksmpolicy/policy.yaml"
PVE_POLICY_PATH = "/etc/pve/ksmpolicy/policy.yaml"
RUN_DIR = "/run/ksmpolicy"  # root-only: the daemon's socket for hook notes, the policy cache
STATE_DIR = "/var/lib/ksmpolicy"  # backups of definitions ksmpolicy changed, the fleet index
FLEET_KEY = "/etc/ksmpolicy/fleet.key"  # the key sketches are hashed under (placement)
NOTIFY_SOCKET = "notify.sock"  # in the run directory
FLEET_INDEX = "fleet-index"  # in the state directory: the sketches `place --index` reads
SYSTEMD_SYSTEM_DIR = "/etc/systemd/system"  # where `systemd-dropin` writes unit drop-ins

# The kernel's page size, which KSM merges in: 4 KiB on x86_64, but 16 or 64 KiB on some arm64
# and ppc64 kernels. Every page count ksmpolicy turns into bytes uses this one.
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class HostPaths:
    """Where the host's files are: `/` on a real host, a temporary tree in tests."""

    root: Path = field(default_factory=lambda: _path("/"))
    run_override: Path | None = None  # another runtime directory (tests beside a live daemon)
    state_override: Path | None = None  # another directory for backups (tests)

    def under_root(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    @property
    def ksm_dir(self) -> Path:
        return self.root / "sys/kernel/mm/ksm"

    @property
    def proc(self) -> Path:
        return self.root / "proc"

    @property
    def meminfo(self) -> Path:
        return self.proc / "meminfo"

    @property
    def numa_nodes(self) -> Path:
        """The host's NUMA nodes (has_memory, nodeN/)."""
        return self.root / "sys/devices/system/node"

    @property
    def run_dir(self) -> Path:
        return self.run_override or self.under_root(RUN_DIR)

    @property
    def notify_socket(self) -> Path:
        return self.run_dir / NOTIFY_SOCKET

    @property
    def state_dir(self) -> Path:
        return self.state_override or self.under_root(STATE_DIR)

    @property
    def backup_dir(self) -> Path:
        """Definitions as they were before ksmpolicy changed them (root-only)."""
        return self.state_dir / "backups"

    @property
    def fleet_index(self) -> Path:
        """The fleet's sketches, read and checked once, for `place --index` (root-only)."""
        return self.state_dir / FLEET_INDEX

    def daemon_writes(self) -> tuple[Path, ...]:
        """Every place the daemon writes: the KSM knobs, its runtime directory (the hooks'
        notify socket) and the backups of definitions it rewrites. The systemd unit allows
        these and nothing else (tests/control/test_unit.py checks it)."""
        return (self.ksm_dir, self.notify_socket, self.backup_dir)

    @property
    def libvirt_hooks(self) -> Path:
        return self.root / "etc/libvirt/hooks"

    @property
    def libvirt_run(self) -> Path:
        """libvirtd's status files of running domains (NAME.xml)."""
        return self.root / "run/libvirt/qemu"

    # --- Proxmox VE

    @property
    def pve(self) -> Path:
        """pmxcfs: replicated to every node of a cluster."""
        return self.root / "etc/pve"

    def pve_config(self, vmid: str) -> Path:
        return self.pve / "qemu-server" / f"{vmid}.conf"

    @property
    def pve_storage_cfg(self) -> Path:
        return self.pve / "storage.cfg"

    @property
    def pve_ksmpolicy(self) -> Path:
        """Cluster-wide ksmpolicy files: the policy, chained hookscripts."""
        return self.pve / "ksmpolicy"

    def qmp_socket(self, vmid: str) -> Path:
        return self.root / "var/run/qemu-server" / f"{vmid}.qmp"

    def libvirt_pidfile(self, name: str) -> Path:
        """The running QEMU's PID, as libvirt writes it."""
        return self.libvirt_run / f"{name}.pid"

    def pve_pidfile(self, vmid: str) -> Path:
        """The running QEMU's PID, as qemu-server writes it."""
        return self.root / "var/run/qemu-server" / f"{vmid}.pid"

    def pve_lock(self, vmid: str) -> Path:
        return self.root / "var/lock/qemu-server" / f"lock-{vmid}.conf"

    def policy_search(self) -> tuple[Path, ...]:
        """Where the policy is looked for when none is given: the cluster-wide one first."""
        return (self.under_root(PVE_POLICY_PATH), self.under_root(DEFAULT_POLICY_PATH))


def default_policy(paths: HostPaths) -> str:
    """The policy to use when none is given: $KSMPOLICY_POLICY, else the first that exists of
    /etc/pve/ksmpolicy/policy.yaml (cluster-wide on Proxmox VE) and /etc/ksmpolicy/policy.yaml,
    else the latter (whose error then says it is missing)."""
    from_env = os.environ.get("KSMPOLICY_POLICY")
    if from_env:
        return from_env
    candidates = paths.policy_search()
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    return str(candidates[-1])


def default_policy_fast() -> str:
    """`default_policy(HostPaths())` without pathlib, for the hooks."""
    from_env = os.environ.get("KSMPOLICY_POLICY")
    if from_env:
        return from_env
    return PVE_POLICY_PATH if os.path.exists(PVE_POLICY_PATH) else DEFAULT_POLICY_PATH  # noqa: PTH110


def _path(text: str) -> Path:
    from pathlib import Path  # noqa: PLC0415 - imported on first use: the hook needs none

    return Path(text)
