"""The host's files: one injectable root for /sys/kernel/mm/ksm and /proc, and typed reads."""

from __future__ import annotations

import os

from ksmpolicy.errors import HostError
from ksmpolicy.records import dataclass, field

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Knobs and counters of /sys/kernel/mm/ksm, in the kernel's names. Older kernels lack some.
KSM_KNOBS = (
    "run",
    "pages_to_scan",
    "sleep_millisecs",
    "merge_across_nodes",
    "use_zero_pages",
    "max_page_sharing",
    "smart_scan",
    "advisor_mode",
    "advisor_target_scan_time",
    "advisor_max_cpu",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
)
KSM_COUNTERS = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_scanned",
    "pages_skipped",
    "full_scans",
    "general_profit",
    "ksm_zero_pages",
    "stable_node_chains",
    "stable_node_dups",
)


RUN_DIR = "run/ksmpolicy"
NOTIFY_SOCKET = "notify.sock"  # in the run directory
DEFAULT_POLICY_RELATIVE = "etc/ksmpolicy/policy.yaml"


def default_run_dir() -> str:
    """HostPaths().run_dir as a string, for the hook (which spares itself pathlib's import)."""
    return os.path.join("/", RUN_DIR)  # noqa: PTH118


@dataclass(frozen=True)
class HostPaths:
    """Where the host's files are: `/` on a real host, a temporary tree in tests."""

    root: Path = field(default_factory=lambda: _path("/"))
    run_override: Path | None = None  # another runtime directory (tests beside a live daemon)
    state_override: Path | None = None  # another directory for backups (tests)

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
    def run_dir(self) -> Path:
        """Root-only runtime directory: the daemon's socket for hook notes, the policy cache."""
        return self.run_override or self.root / RUN_DIR

    @property
    def notify_socket(self) -> Path:
        return self.run_dir / NOTIFY_SOCKET

    @property
    def state_dir(self) -> Path:
        """Backups of definitions ksmpolicy changed."""
        return self.state_override or self.root / "var/lib/ksmpolicy"

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

    def pve_lock(self, vmid: str) -> Path:
        return self.root / "var/lock/qemu-server" / f"lock-{vmid}.conf"

    def policy_search(self) -> tuple[Path, ...]:
        """Where the policy is looked for when none is given: the cluster-wide one first."""
        return (self.pve_ksmpolicy / "policy.yaml", self.root / DEFAULT_POLICY_RELATIVE)


@dataclass(frozen=True)
class KsmState:
    """A snapshot of /sys/kernel/mm/ksm: every knob and counter this kernel has."""

    values: dict[str, int | str]
    page_size: int = 4096

    def get(self, name: str) -> int | None:
        value = self.values.get(name)
        return value if isinstance(value, int) else None

    @property
    def saved_pages(self) -> int:
        """Pages KSM saves: sharers of KSM pages plus zero pages mapped to the zero page."""
        return (self.get("pages_sharing") or 0) + (self.get("ksm_zero_pages") or 0)

    @property
    def saved_bytes(self) -> int:
        return self.saved_pages * self.page_size


def read_ksm(paths: HostPaths) -> KsmState | None:
    """Every KSM file present, or None when this kernel has no KSM (no CONFIG_KSM)."""
    directory = paths.ksm_dir
    if not directory.is_dir():
        return None
    values: dict[str, int | str] = {}
    for name in (*KSM_KNOBS, *KSM_COUNTERS):
        try:
            text = (directory / name).read_text().strip()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise HostError(f"cannot read {directory / name}: {exc.strerror}") from exc
        try:
            values[name] = int(text)
        except ValueError:
            values[name] = _selected(text)
    return KsmState(values)


def read_meminfo(paths: HostPaths) -> dict[str, int]:
    """/proc/meminfo in bytes, keyed by its field names (MemTotal, MemAvailable, ...)."""
    try:
        text = paths.meminfo.read_text()
    except OSError as exc:
        raise HostError(f"cannot read {paths.meminfo}: {exc.strerror}") from exc
    result = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            scale = 1024 if fields[1:2] == ["kB"] else 1
            result[key] = int(fields[0]) * scale
    return result


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


def _path(text: str) -> Path:
    from pathlib import Path  # noqa: PLC0415 - imported on first use: the hook needs none

    return Path(text)


def _selected(text: str) -> str:
    """`none [scan-time]` -> `scan-time`: sysfs shows the choices with the active one bracketed."""
    if "[" in text and "]" in text:
        return text[text.index("[") + 1 : text.index("]")]
    return text


# --- writing knobs ---------------------------------------------------------------------------

# The only knobs ksmpolicy ever writes. `run` is further limited to 0 and 1: 2 unmerges every
# page at once, which can need a lot of memory in one go.
WRITABLE_KNOBS = frozenset(
    {
        "run",
        "pages_to_scan",
        "sleep_millisecs",
        "advisor_mode",
        "advisor_target_scan_time",
        "advisor_max_cpu",
        "advisor_min_pages_to_scan",
        "advisor_max_pages_to_scan",
    }
)


class KsmKnobs:
    """Writes allow-listed KSM knobs, skips unchanged values, and can restore what it found.

    The values found when it first touches a knob are remembered, so `restore()` puts the host
    back as it was (a `run=2` found at start is restored as `0`: never unmerge everything).
    """

    def __init__(self, paths: HostPaths) -> None:
        self.paths = paths
        self.original: dict[str, int | str] = {}
        self._last: dict[str, int | str] = {}

    def read(self, name: str) -> int | str:
        path = self._path(name)
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise HostError(f"cannot read {path}: {exc.strerror}") from exc
        return int(text) if text.lstrip("-").isdigit() else _selected(text)

    def write(self, name: str, value: int | str) -> bool:
        """Write one knob; return whether it changed. Raises HostError on refusal or failure."""
        if name not in WRITABLE_KNOBS:
            raise HostError(f"refusing to write {name}: not a knob ksmpolicy manages")
        if name == "run" and value not in (0, 1):
            raise HostError(f"refusing to write run={value}: ksmpolicy only writes 0 or 1")
        current = self.read(name)
        if name not in self.original:
            self.original[name] = current
        if current == value:
            self._last[name] = current
            return False
        path = self._path(name)
        try:
            path.write_text(f"{value}\n")
        except OSError as exc:
            why = exc.strerror or str(exc)
            hint = " (run as root)" if isinstance(exc, PermissionError) else ""
            raise HostError(f"cannot write {value} to {path}: {why}{hint}") from exc
        self._last[name] = value
        import logging  # noqa: PLC0415 - the hook imports this module and never logs

        logging.getLogger(__name__).info("ksm %s: %s -> %s", name, current, value)
        return True

    def apply(self, knobs: Iterable[tuple[str, int | str]]) -> list[str]:
        """Write knobs in the given order (the order matters, see reconciler.plan)."""
        return [name for name, value in knobs if self.write(name, value)]

    def restore(self) -> None:
        """Put back every knob this object touched: a stop first, a start last."""
        originals = dict(self.original)
        run = originals.pop("run", None)
        if run is not None and run != 1:
            self.write("run", 0)  # found stopped (2 is restored as 0): stop before anything else
            run = None
        advisor = originals.pop("advisor_mode", None)
        if advisor == "scan-time":
            # pages_to_scan cannot be written while the advisor is on, and the advisor sets it.
            originals.pop("pages_to_scan", None)
        elif advisor is not None:
            self.write("advisor_mode", advisor)  # off first, so pages_to_scan can be written
        for name, value in originals.items():
            self.write(name, value)
        if advisor == "scan-time":
            self.write("advisor_mode", advisor)
        if run is not None:
            self.write("run", run)

    def _path(self, name: str) -> Path:
        return self.paths.ksm_dir / name


# --- ksmd and other processes ----------------------------------------------------------------


def ksmd_pid(paths: HostPaths) -> int | None:
    """The PID of the ksmd kernel thread, or None (no KSM, or /proc not mounted)."""
    for entry in _pids(paths):
        try:
            if (entry / "comm").read_text().strip() == "ksmd":
                return int(entry.name)
        except OSError:
            continue
    return None


def process_cpu_seconds(paths: HostPaths, pid: int) -> float | None:
    """CPU time of a process in seconds: /proc/PID/schedstat (nanoseconds) where the kernel has
    it, else utime + stime (fields 14 and 15 of /proc/PID/stat, in clock ticks)."""
    try:
        return int((paths.proc / str(pid) / "schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        text = (paths.proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def processes_named(paths: HostPaths, names: Iterable[str]) -> list[int]:
    """PIDs whose comm is one of `names` (e.g. to warn that ksmtuned runs alongside)."""
    wanted = set(names)
    found = []
    for entry in _pids(paths):
        try:
            if (entry / "comm").read_text().strip() in wanted:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _pids(paths: HostPaths) -> Iterator[Path]:
    try:
        entries = list(os.scandir(paths.proc))
    except OSError:
        return
    for entry in entries:
        if entry.name.isdigit():
            yield _path(entry.path)
