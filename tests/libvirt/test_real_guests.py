"""Guests that hold a real OS (scripts/build-guest-real) on real libvirtd and real ksmd: two
"web" guests share far more with each other than with the "database" guest, and the estimate
made before ksmd runs comes close to what it then saves.

Needs root (CI runs as root). Builds the images when missing (cached in .cache/guest-real; a
cold build downloads about 50 MiB of Debian packages and takes a few minutes). The figures
bench/results/real-guests.json records come from the same scenario (lab/realguests.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab import realguests
from lab.libvirtd import Lab, lab_session
from tests.conftest import RealKsm
from tests.libvirt.conftest import need_guests

pytestmark = [pytest.mark.root, pytest.mark.kernel, pytest.mark.slow]

# Within an image the guests share their whole userspace; across images the kernel, libc and the
# base packages: 117.6 MiB against 74.6 MiB in the first run here (1.58x).
WITHIN_OVER_ACROSS = 1.25
# The estimate against the converged savings, per VM and host-wide (issue 24's target; measured
# within 0.01 %: the guests are idle once ready, so nothing changes between the two).
ESTIMATE_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    need_guests(real=True)
    workdir = tmp_path_factory.mktemp("real")
    workdir.chmod(0o755)
    yield from lab_session(workdir)


def test_real_guests_share_within_an_image_and_the_estimate_holds(
    lab: Lab, real_ksm: RealKsm
) -> None:
    found = realguests.run(lab, real_ksm)
    within = found["images"]["web+web"]["shared_mib"]
    across = found["images"]["database+web"]["shared_mib"]
    assert within >= 32, found  # the web image's userspace alone is larger than this
    assert within >= WITHIN_OVER_ACROSS * across, found
    assert across > 0, found  # the kernel and libc are the same in both images
    for vm in [*found["vms"], found["host"]]:
        assert vm["measured_saved_mib"] > 0, vm
        error = vm["predicted_saved_mib"] - vm["measured_saved_mib"]
        assert abs(error) <= ESTIMATE_TOLERANCE * vm["measured_saved_mib"], vm
