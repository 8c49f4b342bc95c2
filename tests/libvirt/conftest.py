"""The lab every libvirt test module uses: a real libvirtd (started if none runs, stopped
after), the test hook, and test guests, one lab per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab import realguests
from lab.libvirtd import GUEST, Lab, lab_session
from tests.conftest import IS_ROOT


def need_guests(*, real: bool = False) -> None:
    """Skip unless root, libvirt-python and the test guest are here; `real`: also build the
    real-content images (scripts/build-guest-real, cached) when they are missing."""
    if not IS_ROOT:
        pytest.skip("needs root to run libvirtd and QEMU (CI runs as root)")
    if not (GUEST / "initrd.img").exists():
        pytest.skip("the test guest is not built (scripts/build-guest; make test builds it)")
    pytest.importorskip("libvirt")
    if real:
        realguests.build_images()


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    need_guests()
    workdir = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    workdir.chmod(0o755)
    yield from lab_session(workdir)
