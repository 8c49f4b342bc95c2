"""What a command line runs, and the identity the policy decides for: one list of VMM binaries
and one map from argv (and the unit it runs in) to kind and name.

The process scan uses it for running processes, `ksmpolicy exec` for the command it is about
to exec (same PID, same cgroup, same argv, so the same answer), and the proc-connector watch
for which new processes are worth a look at once.

* QEMU (`qemu-system-*`, `qemu-kvm`, Proxmox's `kvm`; by argv[0] or the kernel's comm) is kind
  `qemu`, named by `-name` (or `kata-ID` in a kata sandbox), with `-uuid`, Proxmox's `-id`, the
  RAM of `-m` and the last `mem-merge=` of its `-machine` options.
* Firecracker (`--id`), Cloud Hypervisor (`--api-socket`) and crosvm (`--socket`, the socket's
  name without `.sock`) are their own kinds; Firecracker's jailer runs the binary its
  `--exec-file` names with its `--id`, so it is that VMM. Any of them in a kata sandbox (files
  under /run/vc/vm/ID/) is kind `kata`, named `kata-ID`.
* Anything else is kind `service` in a system `.service` unit (named by the unit), else
  `process` (no name of its own).
"""

from __future__ import annotations

import itertools
import os
import re

from ksmpolicy.kernel.qemuopts import machine_mem_merge, option_map
from ksmpolicy.records import dataclass

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

# libvirt runs qemu-system-ARCH (comm truncated to 15 characters), RHEL qemu-kvm, Proxmox kvm.
_QEMU_BINARY = re.compile(r"^(qemu-system-.*|qemu-kvm|kvm)$")
# VMMs other than QEMU, by their binary's name; what names a VM on their command lines.
_VMMS = {"firecracker": "--id", "cloud-hypervisor": "--api-socket", "crosvm": "--socket"}
_JAILER = "jailer"  # Firecracker's: execs `--exec-file` as VM `--id`
_SIZE_UNITS = {"": 2**20, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_KATA_SANDBOX = re.compile(r"/vc/vm/([0-9A-Za-z_.-]{1,128})/")
# Options that start a confidential guest: its memory is private to it, not the host's to merge.
CONFIDENTIAL_ARGS = ("confidential-guest-support", "sev-guest", "sev-snp-guest", "tdx-guest")


@dataclass(frozen=True)
class Command:
    """What a command line runs, as the policy sees it."""

    kind: str  # qemu, firecracker, cloud-hypervisor, crosvm, kata, service, process
    name: str | None  # the name it gives itself (a VM's); the unit's for a service; else None
    uuid: str | None = None
    vmid: str | None = None  # Proxmox `-id`
    ram_bytes: int | None = None  # guest RAM from `-m`
    mem_merge: bool | None = None  # QEMU's `-machine mem-merge=`
    confidential: bool = False  # started as a confidential guest (SEV, SEV-SNP, TDX)


def is_vmm_binary(name: str) -> bool:
    """Whether a binary's (or comm's) name is one of the VMMs above, QEMU's or another's."""
    return bool(_QEMU_BINARY.match(name)) or name in _VMMS or name == _JAILER


def classify(argv: Sequence[str], comm: str | None = None, unit: str | None = None) -> Command:
    """The kind and identity of `argv` (run as `comm`, in systemd unit `unit`)."""
    binary = os.path.basename(argv[0]) if argv else ""  # noqa: PTH119
    if _QEMU_BINARY.match(binary) or (comm is not None and _QEMU_BINARY.match(comm)):
        name, uuid, vmid, ram, mem_merge = parse_qemu_cmdline(argv)
        sandbox = _kata_sandbox(argv)
        if sandbox and not name:
            name = f"kata-{sandbox}"
        confidential = any(c in arg for arg in argv for c in CONFIDENTIAL_ARGS)
        return Command("qemu", name, uuid, vmid, ram, mem_merge, confidential)
    kind, name = vmm_identity(binary, argv)
    if kind is not None:
        return Command(kind, name)
    if unit is not None and unit.endswith(".service"):
        return Command("service", unit.removesuffix(".service"))
    return Command("process", None)


def vmm_identity(binary: str, argv: Sequence[str]) -> tuple[str | None, str | None]:
    """(kind, name) of a non-QEMU VMM from its command line: Firecracker's `--id`, Cloud
    Hypervisor's `--api-socket` and crosvm's `--socket` (the socket's name, without `.sock`); a
    VMM in a kata sandbox (its sockets under /run/vc/vm/ID/) is kind `kata`, named `kata-ID`.
    (None, None) for anything else."""
    if binary == _JAILER:
        binary = os.path.basename(_option(argv, "--exec-file") or "")  # noqa: PTH119
    flag = _VMMS.get(binary)
    if flag is None:
        return None, None
    sandbox = _kata_sandbox(argv)
    if sandbox:
        return "kata", f"kata-{sandbox}"
    value = _option(argv, flag)
    if value and flag != "--id":
        value = value.removeprefix("path=").split(",", 1)[0]
        value = os.path.basename(value).removesuffix(".sock") or None  # noqa: PTH119
    return binary, value


def parse_qemu_cmdline(
    argv: Sequence[str],
) -> tuple[str | None, str | None, str | None, int | None, bool | None]:
    """(name, uuid, vmid, ram_bytes, mem_merge) from a QEMU command line."""
    name = uuid = vmid = None
    ram = None
    for flag, value in itertools.pairwise(argv):
        if flag == "-name":
            props = option_map(value)
            name = props.get("guest") or props.get("")
        elif flag == "-uuid":
            uuid = value.lower()
        elif flag == "-id":
            vmid = value
        elif flag == "-m":
            props = option_map(value)
            ram = _size(props.get("size") or props.get(""))
    return name, uuid, vmid, ram, machine_mem_merge(argv)


def _size(text: str | None) -> int | None:
    """QEMU's `-m` size in bytes; None for anything a real QEMU would not have started with."""
    match = re.fullmatch(r"(\d{1,15}(?:\.\d{1,15})?)([bkmgtBKMGT]?)", text or "")
    if not match:
        return None
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _option(argv: Sequence[str], flag: str) -> str | None:
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1 :]
    return None


def _kata_sandbox(argv: Sequence[str]) -> str | None:
    """kata runs its VMMs with sockets and files under /run/vc/vm/SANDBOX-ID/."""
    for arg in argv:
        found = _KATA_SANDBOX.search(arg)
        if found:
            return found.group(1)
    return None
