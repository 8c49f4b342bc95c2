"""The hooks' entry point: `python -m ksmpolicy.hook (libvirt ARGS... | proxmox VMID PHASE)`.

The installed shims (`ksmpolicy install libvirt`, `ksmpolicy proxmox install`) call `leave`
here; it only reads the arguments and hands over to the platform's hook, importing nothing
else, so that a VM start pays for what its operation needs and no more.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import IO

USAGE = (
    "usage: ksmpolicy-hook [--policy FILE] (libvirt NAME OPERATION SUBOPERATION EXTRA"
    " | proxmox VMID PHASE)"
)
_OPTIONS = ("--policy", "--run-dir", "--root", "--qm")


def main(argv: Sequence[str] | None = None, *, stdin: IO[bytes] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    options: dict[str, str] = {}
    while args and args[0].startswith("--"):
        option = args.pop(0)
        if option not in _OPTIONS or not args:
            print(USAGE, file=sys.stderr)
            return 2
        options[option] = args.pop(0)
    policy = options.get("--policy") or os.environ.get("KSMPOLICY_POLICY")
    if args[:1] == ["libvirt"] and len(args) >= 4:
        from ksmpolicy.libvirt.hook import LibvirtHook  # noqa: PLC0415

        stream = stdin if stdin is not None else getattr(sys.stdin, "buffer", None)
        hook = LibvirtHook(args[1], policy, options.get("--run-dir"))
        return hook.run(args[2], args[3], stream, sys.stdout, sys.stderr)  # type: ignore[arg-type]
    if args[:1] == ["proxmox"] and len(args) >= 3:
        from ksmpolicy.proxmox.hook import ProxmoxHook  # noqa: PLC0415

        proxmox = ProxmoxHook(
            args[1],
            policy,
            root=options.get("--root", "/"),
            run_dir=options.get("--run-dir"),
            qm=options.get("--qm", "qm"),
        )
        return proxmox.run(args[2], sys.stdout, sys.stderr)
    print(USAGE, file=sys.stderr)
    return 2


def leave(argv: Sequence[str] | None = None) -> None:
    """`main`, then exit at once: the hook has flushed and closed everything it wrote, and
    skipping the interpreter's shutdown saves 3-5 ms of every VM start (measured here). The
    installed shims call this; `main` stays for shims written by older versions."""
    status = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    leave()
