"""Which running VMs a host sketches, and in which domain: only VMs whose identity is believed
(a process a local user starts and calls qemu-system-x86_64 is left out, whatever name it
claims), each in its policy domain, merging only when its domain is the one that merges; and
no sketch at all from a policy that does not load (every VM would fall into `default`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ksmpolicy.cli.main import main
from ksmpolicy.placement.sketch import subjects_of
from ksmpolicy.policy.load import parse_policy
from ksmpolicy.report.status import collect
from lab.libvirtd import two_domains_policy
from tests.fakehost import FakeHost

UUID = "6f1c4e2a-0b3d-4c5e-8f7a-9b0c1d2e3f40"


def qemu(host: FakeHost, pid: int, name: str, uid: int = 0) -> None:
    argv = ["/usr/bin/qemu-system-x86_64", "-name", f"guest={name},debug-threads=on", "-m", "64"]
    host.process(
        pid, [*argv, "-uuid", UUID] if name == "a-web" else argv, "qemu-system-x86", uid=uid
    )


def test_only_believed_vms_are_sketched_in_their_domain(tmp_path: Path) -> None:
    host = FakeHost(tmp_path).ksm(run=1)
    qemu(host, 100, "a-web")
    qemu(host, 101, "b-db")
    qemu(host, 102, "a-impostor", uid=1000)  # a local user's process
    policy = parse_policy(two_domains_policy("a-*", "b-*"), "policy.yaml")
    vms = collect(host.paths, policy, sample_seconds=0, pagemap=False).vms
    chosen = {s.name: s for s in subjects_of(vms, ("tenant-a",))}
    assert sorted(chosen) == ["a-web", "b-db"]
    assert (chosen["a-web"].domain, chosen["a-web"].active) == ("tenant-a", True)
    assert (chosen["b-db"].domain, chosen["b-db"].active) == ("tenant-b", False)
    assert chosen["a-web"].uuid == UUID and chosen["b-db"].uuid is None
    assert all(s.active for s in subjects_of(vms, None))  # no trust domains: all merge
    assert [s.name for s in subjects_of(vms, (), ["b-db"])] == ["b-db"]


def test_no_sketch_from_a_policy_that_does_not_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "policy.yaml"
    broken.write_text("version: 1\ndomains: [\n")
    assert main(["sketch", "--root", str(tmp_path), "--policy", str(broken)]) == 1
    err = capsys.readouterr().err
    assert str(broken) in err and "a sketch records each VM's trust domain" in err, err
