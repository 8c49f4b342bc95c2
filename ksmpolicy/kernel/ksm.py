"""KSM in sysfs: every knob and counter of /sys/kernel/mm/ksm, typed reads, and guarded writes."""

from __future__ import annotations

import logging

from ksmpolicy.errors import HostError
from ksmpolicy.paths import PAGE_SIZE
from ksmpolicy.records import dataclass

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from ksmpolicy.paths import HostPaths

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class KsmState:
    """A snapshot of /sys/kernel/mm/ksm: every knob and counter this kernel has."""

    values: dict[str, int | str]
    page_size: int = PAGE_SIZE

    def get(self, name: str) -> int | None:
        value = self.values.get(name)
        return value if isinstance(value, int) else None

    @property
    def saved_pages(self) -> int:
        """Pages KSM saves: sharers of KSM pages plus zero pages mapped to the zero page."""
        return (self.get("pages_sharing") or 0) + (self.get("ksm_zero_pages") or 0)

    @property
    def pages_seen(self) -> int | None:
        """Pages ksmd has scanned at least once and still tracks (its rmap items): merged,
        in the unstable tree, or volatile. None when a counter is missing."""
        counts = [
            self.get(name)
            for name in ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile")
        ]
        if any(count is None for count in counts):
            return None
        return sum(count for count in counts if count is not None)

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
        "use_zero_pages",
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
        log.info("ksm %s: %s -> %s", name, current, value)
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

    def switch_merge_across_nodes(self, across: bool) -> None:
        """Change the merge scope (merge_across_nodes), which the kernel allows only with no
        page merged: unmerge everything first (run=2; the write returns once it is done),
        then write the knob, and leave ksmd stopped for the caller to start again. The only
        place ksmpolicy writes run=2: the caller has checked the memory guard."""
        if "run" not in self.original:
            self.original["run"] = self.read("run")  # (merge_across_nodes is never restored:
        for name, value in (("run", 2), ("merge_across_nodes", int(across)), ("run", 0)):
            path = self._path(name)  # that would need everything unmerged once more)
            try:
                path.write_text(f"{value}\n")
            except OSError as exc:
                why = exc.strerror or str(exc)
                raise HostError(f"cannot write {value} to {path}: {why}") from exc
            self._last[name] = value
            log.info("ksm %s: -> %s", name, value)

    def _path(self, name: str) -> Path:
        return self.paths.ksm_dir / name
