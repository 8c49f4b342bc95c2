"""Image identity of a libvirt disk: the base of its backing chain, from qcow2 headers."""

from __future__ import annotations

import os
import struct


def qcow2_backing_root(path: str, *, max_depth: int = 32) -> tuple[str, str | None]:
    """Follow qcow2 headers from `path` to the base image: (root, error or None).

    A missing or unreadable file ends the chain with an error; its path is still the best
    identity there is. Raw and other formats end the chain (no backing file).
    """
    current = path
    seen: set[str] = set()
    for _ in range(max_depth):
        if current in seen:
            return current, f"backing chain loops back to {current}"
        seen.add(current)
        try:
            with open(current, "rb") as image:  # noqa: PTH123 - pathlib costs the hook an import
                header = image.read(20)
                if header[:4] != b"QFI\xfb" or len(header) < 20:
                    return current, None
                offset, size = struct.unpack(">QI", header[8:20])
                if offset == 0 or size == 0:
                    return current, None
                if size > 4096:
                    return current, f"{current}: implausible backing file name length {size}"
                image.seek(offset)
                name = image.read(size).decode("utf-8", "replace")
        except OSError as exc:
            return current, f"cannot read {current}: {exc.strerror or exc}"
        if name.startswith("json:") or "://" in name:
            return name, None  # a network backing file: its name is the identity
        # A relative name is beside its overlay (os.path: pathlib costs the hook an import).
        current = os.path.join(os.path.dirname(current), name)  # noqa: PTH118, PTH120
    return current, f"backing chain of {path} is deeper than {max_depth}"
