"""The Proxmox hookscript's live toggle against real QEMU processes started the way Proxmox
starts them (a QMP socket at /var/run/qemu-server/VMID.qmp under the test's root, server=on,
wait=off), on real ksmd. Debian's QEMU lacks Proxmox's `-id VMID` patch, so the VMID is only
in `-name`. Needs root (CI runs as root); KSM knobs are restored and QEMU stopped by PID.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from ksmpolicy.kernel.scan import read_ksm_stat
from lab.libvirtd import GUEST, wait_for
from tests.conftest import RealKsm
from tests.proxmox.test_node import Node

pytestmark = [pytest.mark.root, pytest.mark.kernel]
IMAGE_PAGES = 48 * 256  # the test guest's image, the same in every guest


def start_qemu(
    node: Node, real_ksm: RealKsm, vmid: str, *, merge: bool = True
) -> subprocess.Popen[str]:
    """QEMU as Proxmox starts it: QMP socket and pid file in /var/run/qemu-server (under the
    node's root); `merge=False` as for `allow-ksm: 0` (mem-merge=off)."""
    socket = node.root / "var/run/qemu-server" / f"{vmid}.qmp"
    socket.parent.mkdir(parents=True, exist_ok=True)
    console = node.root / f"{vmid}.console"
    argv = [
        "qemu-system-x86_64",
        "-name",
        f"vm{vmid},debug-threads=on",
        "-qmp",
        f"unix:{socket},server=on,wait=off",
        "-pidfile",
        str(socket.with_suffix(".pid")),
        "-machine",
        "pc,accel=tcg" + ("" if merge else ",mem-merge=off"),
        "-m",
        "256",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-kernel",
        str(GUEST / "vmlinuz"),
        "-initrd",
        str(GUEST / "initrd.img"),
        "-append",
        "console=ttyS0 quiet",
        "-serial",
        f"file:{console}",
        "-display",
        "none",
    ]
    process = real_ksm.track(
        subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    )
    ready = wait_for(
        lambda: console.exists() and b"ksmpolicy-guest: ready" in console.read_bytes(), 120, 0.5
    )
    assert ready, f"guest {vmid} did not boot"
    return process


def merging(process: subprocess.Popen[str]) -> int:
    stat = read_ksm_stat(Path(f"/proc/{process.pid}/ksm_stat"))
    return (stat.merging_pages or 0) if stat else 0


@pytest.fixture
def node(tmp_path: Path) -> Node:
    if not (GUEST / "initrd.img").exists():
        pytest.skip("the test guest is not built (scripts/build-guest; make test builds it)")
    root = tmp_path / "node"
    root.mkdir()
    root.chmod(0o755)
    return Node(root)


def test_post_start_unmerges_an_excluded_vm_and_merges_it_again(
    node: Node, real_ksm: RealKsm
) -> None:
    node.set_policy("warn")
    node.install()
    node.add("101", "qs-simple1.conf", **{"name: simple": "name: pg-1\ntags: database"})
    node.add("102", "qs-simple1.conf", **{"name: simple": "name: web-1"})
    real_ksm.write("pages_to_scan", 5000)
    real_ksm.write("sleep_millisecs", 10)
    real_ksm.write("run", 1)
    subject = start_qemu(node, real_ksm, "101")
    start_qemu(node, real_ksm, "102")  # shares the image pages with 101
    assert wait_for(lambda: merging(subject) > IMAGE_PAGES * 0.8, 90, 1), merging(subject)
    before = merging(subject)

    result = node.hook("101", "post-start")  # the policy excludes 101 (tagged database)
    assert result.returncode == 0, result.stderr
    assert "ksmpolicy: VM 101: merging switched off live" in result.stderr
    assert wait_for(lambda: merging(subject) < before * 0.02, 30), merging(subject)
    # ... and the decision is written to the config in the background, with `qm set`.
    assert wait_for(lambda: node.qm_log() == ["set 101 --allow-ksm 0"], 30), node.qm_log()
    assert "allow-ksm: 0\n" in node.config("101")

    # The policy changes its mind: the next post-start merges it again (and persists that).
    node.add("101", "qs-simple1.conf", **{"name: simple": "name: pg-1\nallow-ksm: 0"})
    result = node.hook("101", "post-start")
    assert "ksmpolicy: VM 101: merging switched on live" in result.stderr
    assert wait_for(lambda: merging(subject) > before * 0.8, 60, 1), merging(subject)
    assert wait_for(lambda: node.qm_log()[-1:] == ["set 101 --delete allow-ksm"], 30), node.qm_log()


DOMAINS = """\
version: 1
enforcement: warn
domains:
  tenant-a: {}
  tenant-b: {}
vms:
  vmid:101: {domain: tenant-a}
  vmid:102: {domain: tenant-b}
proxmox: {qemu_server_version: "9.2.6"}
"""


def test_the_hookscript_gives_an_idle_scope_to_the_first_domain_only(
    node: Node, real_ksm: RealKsm
) -> None:
    """Two tenants' VMs that boot the same image, started unmergeable (allow-ksm 0). At
    post-start the first claims the host's merge scope and is switched on; the second is left
    off while the first runs, and is switched on once the scope is idle again."""
    for name in ("proc", "sys"):  # the node's root stands in for /etc/pve and /var/run only
        (node.root / name).symlink_to(f"/{name}")
    node.write_policy(DOMAINS)
    node.install()
    node.add("101", "qs-simple1.conf", **{"name: simple": "name: a-web\nallow-ksm: 0"})
    node.add("102", "qs-simple1.conf", **{"name: simple": "name: b-web\nallow-ksm: 0"})
    real_ksm.write("use_zero_pages", 1)
    real_ksm.write("pages_to_scan", 5000)
    real_ksm.write("sleep_millisecs", 10)
    real_ksm.write("run", 1)
    first = start_qemu(node, real_ksm, "101", merge=False)
    second = start_qemu(node, real_ksm, "102", merge=False)

    result = node.hook("101", "post-start")
    assert result.returncode == 0, result.stderr
    assert "ksmpolicy: VM 101: trust domain 'tenant-a' merges in host" in result.stderr
    assert "ksmpolicy: VM 101: merging switched on live" in result.stderr
    result = node.hook("102", "post-start")
    assert result.returncode == 0, result.stderr
    assert "VM 102: merge scope host belongs to trust domain 'tenant-a'" in result.stderr
    assert "switched on" not in result.stderr
    time.sleep(8)  # ksmd at full pace: 101 merges what repeats within it, never with 102
    assert merging(second) == 0
    state = json.loads((node.root / "run/ksmpolicy/domains.json").read_text())
    assert state["scopes"]["host"]["domain"] == "tenant-a"
    assert [m["pid"] for m in state["members"]] == [first.pid]

    real_ksm.stop(first)  # tenant-a's only VM stops: the scope is idle
    result = node.hook("102", "post-start")
    assert "ksmpolicy: VM 102: trust domain 'tenant-b' merges in host" in result.stderr
    assert "ksmpolicy: VM 102: merging switched on live" in result.stderr
