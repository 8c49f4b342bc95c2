#!/usr/bin/env python3
"""A stand-in for Proxmox's `qm set`, for the tests: the options ksmpolicy uses, nothing more.

    qm_standin.py ROOT set VMID [--digest SHA1] [--allow-ksm V] [--hookscript V] [--args V]
                                [--delete K1,K2]

Like `qm set`, it changes keys of the main section of ROOT/etc/pve/qemu-server/VMID.conf: a key
that exists is replaced in place, a new key goes where Proxmox's sorted order puts it, deleted
keys disappear, a key's earlier duplicates too (qm writes each key once); every other line
stays as it is. With --digest it refuses, as qemu-server does, a config whose SHA-1 differs
(someone changed it since it was read). It records each call in ROOT/qm.log.
It does not lock, validate values or know pending changes: it is not Proxmox.
"""

import hashlib
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    root, command, vmid, *options = argv
    if command != "set":
        print(f"qm stand-in: only 'set' is supported, not {command!r}", file=sys.stderr)
        return 2
    path = Path(root) / "etc/pve/qemu-server" / f"{vmid}.conf"
    if not path.exists():
        print(
            f"Configuration file 'nodes/test/qemu-server/{vmid}.conf' does not exist",
            file=sys.stderr,
        )
        return 2
    with (Path(root) / "qm.log").open("a") as log:
        log.write(" ".join(["set", vmid, *options]) + "\n")
    changes, deletes = {}, set()
    while options:
        option, value = options.pop(0), options.pop(0)
        if option == "--digest":
            if (
                hashlib.sha1(path.read_bytes()).hexdigest() != value
            ):  # PVE::Tools::assert_if_modified
                print(
                    "detected modified configuration - file changed by other user? Try again.",
                    file=sys.stderr,
                )
                return 255
        elif option == "--delete":
            deletes.update(value.split(","))
        elif option in ("--allow-ksm", "--hookscript", "--args"):
            changes[option[2:]] = value
        else:
            print(f"qm stand-in: unsupported option {option}", file=sys.stderr)
            return 2
    lines = path.read_text().splitlines(keepends=True)
    end = next((i for i, line in enumerate(lines) if line.startswith("[")), len(lines))
    main_lines, rest = lines[:end], lines[end:]
    keyed = {
        line.split(":", 1)[0]: i
        for i, line in enumerate(main_lines)
        if ":" in line and not line.startswith("#")
    }
    for key, value in changes.items():
        if key in keyed:
            main_lines[keyed[key]] = f"{key}: {value}\n"
        else:
            after = [i for k, i in keyed.items() if k < key]
            at = max(after) + 1 if after else sum(1 for line in main_lines if line.startswith("#"))
            main_lines.insert(at, f"{key}: {value}\n")
            keyed = {
                line.split(":", 1)[0]: i
                for i, line in enumerate(main_lines)
                if ":" in line and not line.startswith("#")
            }
    main_lines = [
        line for line in main_lines if line.split(":", 1)[0] not in deletes or line.startswith("#")
    ]
    # qm writes the config it parsed, each key once: the last of duplicated lines is the one
    # qemu-server read, the others are gone.
    last = {
        line.split(":", 1)[0]: i
        for i, line in enumerate(main_lines)
        if ":" in line and not line.startswith("#")
    }
    main_lines = [
        line
        for i, line in enumerate(main_lines)
        if ":" not in line or line.startswith("#") or last[line.split(":", 1)[0]] == i
    ]
    path.write_text("".join(main_lines + rest))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
