"""Host adapter reads: a fake tree for exact figures, the real kernel read-only."""

from __future__ import annotations

from pathlib import Path

import pytest

from ksmpolicy.kernel.ksm import KSM_COUNTERS, KSM_KNOBS, read_ksm
from ksmpolicy.kernel.procfs import read_meminfo
from ksmpolicy.paths import HostPaths


def test_old_kernel_without_newer_files(tmp_path: Path) -> None:
    ksm = tmp_path / "sys/kernel/mm/ksm"
    ksm.mkdir(parents=True)
    for name, value in {"run": "0", "pages_to_scan": "100", "pages_sharing": "7"}.items():
        (ksm / name).write_text(value + "\n")
    state = read_ksm(HostPaths(tmp_path))
    assert state is not None
    assert state.values == {"run": 0, "pages_to_scan": 100, "pages_sharing": 7}
    assert state.get("ksm_zero_pages") is None
    assert state.saved_pages == 7
    assert state.pages_seen is None  # pages_shared, pages_unshared, pages_volatile missing


def test_saved_pages_counts_zero_pages(tmp_path: Path) -> None:
    ksm = tmp_path / "sys/kernel/mm/ksm"
    ksm.mkdir(parents=True)
    (ksm / "pages_sharing").write_text("10\n")
    (ksm / "ksm_zero_pages").write_text("5\n")
    state = read_ksm(HostPaths(tmp_path))
    assert state is not None
    assert (state.saved_pages, state.saved_bytes) == (15, 15 * 4096)


def test_pages_seen_sums_what_ksmd_tracks(tmp_path: Path) -> None:
    ksm = tmp_path / "sys/kernel/mm/ksm"
    ksm.mkdir(parents=True)
    counts = {"pages_shared": 3, "pages_sharing": 10, "pages_unshared": 20, "pages_volatile": 7}
    for name, value in counts.items():
        (ksm / name).write_text(f"{value}\n")
    state = read_ksm(HostPaths(tmp_path))
    assert state is not None
    assert state.pages_seen == 40


def test_no_ksm_at_all(tmp_path: Path) -> None:
    assert read_ksm(HostPaths(tmp_path)) is None


def test_meminfo_in_bytes(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text(
        "MemTotal:       24000000 kB\nMemAvailable:   12000000 kB\nHugePages_Total:       0\n"
    )
    assert read_meminfo(HostPaths(tmp_path)) == {
        "MemTotal": 24000000 * 1024,
        "MemAvailable": 12000000 * 1024,
        "HugePages_Total": 0,
    }


@pytest.mark.kernel
def test_real_kernel_read_only() -> None:
    """Reads the real /sys/kernel/mm/ksm: every file this kernel has is parsed."""
    real = HostPaths()
    if not real.ksm_dir.is_dir():
        pytest.skip("this kernel has no KSM")
    state = read_ksm(real)
    assert state is not None
    present = {p.name for p in real.ksm_dir.iterdir()} & set(KSM_KNOBS + KSM_COUNTERS)
    assert set(state.values) == present
    assert state.get("run") in (0, 1, 2)
    assert read_meminfo(real)["MemTotal"] > 0
