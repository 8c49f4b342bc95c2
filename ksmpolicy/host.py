"""The host's files: one injectable root for /sys/kernel/mm/ksm and /proc, and typed reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ksmpolicy.errors import HostError

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
RUN_STATES = {0: "stopped", 1: "running", 2: "stopped, unmerged"}


@dataclass(frozen=True)
class HostPaths:
    """Where the host's files are: `/` on a real host, a temporary tree in tests."""

    root: Path = field(default_factory=lambda: Path("/"))

    @property
    def ksm_dir(self) -> Path:
        return self.root / "sys/kernel/mm/ksm"

    @property
    def proc(self) -> Path:
        return self.root / "proc"

    @property
    def meminfo(self) -> Path:
        return self.proc / "meminfo"


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


def _selected(text: str) -> str:
    """`none [scan-time]` -> `scan-time`: sysfs shows the choices with the active one bracketed."""
    if "[" in text and "]" in text:
        return text[text.index("[") + 1 : text.index("]")]
    return text
