"""The memory guard on fake /proc/meminfo trees."""

from __future__ import annotations

from pathlib import Path

from ksmpolicy.paths import HostPaths
from ksmpolicy.trust.guard import available_bytes, check


def host(tmp_path: Path, meminfo: str) -> HostPaths:
    (tmp_path / "proc").mkdir(exist_ok=True)
    (tmp_path / "proc/meminfo").write_text(meminfo)
    return HostPaths(tmp_path)


def test_available_counts_free_swap(tmp_path: Path) -> None:
    paths = host(tmp_path, "MemTotal: 8000000 kB\nMemAvailable: 1000 kB\nSwapFree: 24 kB\n")
    assert available_bytes(paths) == 1024 * 1024


def test_a_switch_that_fits_above_the_reserve_passes(tmp_path: Path) -> None:
    paths = host(tmp_path, "MemAvailable: 4194304 kB\nSwapFree: 0 kB\n")  # 4 GiB
    verdict = check(paths, 2 * 2**30, reserve_mib=1024)
    assert verdict.ok
    assert verdict.available_bytes == 3 * 2**30


def test_a_low_memory_host_refuses_and_says_the_numbers(tmp_path: Path) -> None:
    paths = host(tmp_path, "MemTotal: 8388608 kB\nMemAvailable: 524288 kB\nSwapFree: 0 kB\n")
    verdict = check(paths, 400 * 2**20, reserve_mib=256)
    assert not verdict.ok
    assert verdict.message == (
        "unmerging would need 400 MiB but only 256 MiB is available above the 256 MiB reserve "
        "(MemAvailable + SwapFree - isolation.unmerge_reserve_mib): refused"
    )


def test_unknown_memory_refuses_anything_but_nothing(tmp_path: Path) -> None:
    paths = host(tmp_path, "MemTotal: 1 kB\n")  # no MemAvailable (a pre-3.14 kernel)
    assert not check(paths, 4096, reserve_mib=0).ok
    assert check(paths, 0, reserve_mib=0).ok
