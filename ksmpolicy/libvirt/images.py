"""Image identity of a libvirt disk: the base of its backing chain, read from declared formats.

A guest writes its disk's contents, including the first sector of a raw disk. Reading a header
from a file whose format nobody declared would let a guest forge one (`QFI\\xfb` and a backing
name of its choosing) and so pick its image identity, its group and its rule, and make the root
hook open any host path. QEMU and libvirt closed that hole long ago by never probing formats;
so does this module:

* a header is read only from a disk whose format libvirt declares as qcow2
  (`<driver type='qcow2'/>`);
* a backing file is followed only when the qcow2 image declares its format in the
  `backing_fmt` header extension, and only while that format is qcow2. A raw layer, or one
  whose format is not declared, ends the chain: its name (written into the overlay's header by
  qemu-img, not by the guest) is the identity, and it is never opened;
* only regular files are opened, non-blocking and checked with `fstat` (`files.open_regular`),
  and no more is read than the header needs: 112 bytes, the header extensions within the first
  cluster (at most 64 KiB), and a backing name of at most 1023 bytes (QEMU's own limit).
"""

from __future__ import annotations

import os
import struct

from ksmpolicy.files import open_regular, read_fd

QCOW2_MAGIC = b"QFI\xfb"
BACKING_FORMAT_EXTENSION = 0xE2792ACA
MAX_BACKING_NAME = 1023  # QEMU refuses longer backing file names
MAX_EXTENSION_AREA = 64 * 1024
MAX_DEPTH = 16
_HEADER = struct.Struct(">4sIQIIQ")  # magic, version, backing offset, backing size, cluster bits
_V3_HEADER_LENGTH = struct.Struct(">I")  # at offset 100


class ImageError(ValueError):
    """A qcow2 header that is not what its declared format says."""


def qcow2_backing_root(path: str, declared: str | None = "qcow2") -> tuple[str, str | None]:
    """The identity of a disk image: (the base of its backing chain, why it ended early or None).

    `declared` is the format libvirt declares for `path`. Anything but qcow2 is its own base and
    is not opened. A missing or unreadable file ends the chain with an error; its path is still
    the best identity there is.
    """
    current = path
    seen: set[str] = set()
    fmt = declared
    for _ in range(MAX_DEPTH):
        if fmt != "qcow2":
            why = None if fmt == "raw" else _undeclared(current, fmt)
            return current, why
        if current in seen:
            return current, f"backing chain loops back to {current}"
        seen.add(current)
        try:
            backing, fmt = read_qcow2_backing(current)
        except (OSError, ImageError) as exc:
            what = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return current, f"cannot read {current}: {what}"
        if backing is None:
            return current, None
        if backing.startswith("json:") or "://" in backing or _protocol(backing):
            return backing, None  # a network backing file: its name is the identity
        current = os.path.normpath(os.path.join(os.path.dirname(current), backing))  # noqa: PTH118, PTH120
    return current, f"backing chain of {path} is deeper than {MAX_DEPTH}"


def read_qcow2_backing(path: str) -> tuple[str | None, str | None]:
    """(backing file name, its declared format) from a qcow2 header; (None, None) without one."""
    fd, st = open_regular(path)
    try:
        header = read_fd(fd, 112, 0)
        if len(header) < 72 or header[:4] != QCOW2_MAGIC:
            raise ImageError("declared qcow2, but it has no qcow2 header")
        _magic, version, offset, size, cluster_bits, _size = _HEADER.unpack_from(header)
        if version not in (2, 3) or not 9 <= cluster_bits <= 21:
            raise ImageError(f"unsupported qcow2 header (version {version})")
        if offset == 0 or size == 0:
            return None, None
        cluster = 1 << cluster_bits
        if size > MAX_BACKING_NAME or offset + size > min(cluster, st.st_size):
            raise ImageError("implausible backing file name in the qcow2 header")
        start = 72
        if version == 3:
            if len(header) < 104:
                raise ImageError("truncated qcow2 version 3 header")
            (start,) = _V3_HEADER_LENGTH.unpack_from(header, 100)
            if not 104 <= start <= cluster:
                raise ImageError("implausible qcow2 header length")
        end = min(offset if offset > start else cluster, cluster, start + MAX_EXTENSION_AREA)
        fmt = _backing_format(read_fd(fd, max(0, end - start), start))
        name = read_fd(fd, size, offset)
    finally:
        os.close(fd)
    if len(name) != size or b"\0" in name:
        raise ImageError("truncated or malformed backing file name")
    return name.decode("utf-8", "replace"), fmt


def _backing_format(area: bytes) -> str | None:
    """The `backing_fmt` header extension, if the image has one."""
    at = 0
    while at + 8 <= len(area):
        kind, length = struct.unpack_from(">II", area, at)
        if kind == 0:
            return None
        data = area[at + 8 : at + 8 + length]
        if len(data) < length:
            return None
        if kind == BACKING_FORMAT_EXTENSION:
            return data.decode("ascii", "replace").strip("\0") or None
        at += 8 + (length + 7) // 8 * 8
    return None


def _protocol(name: str) -> bool:
    """`nbd:host:port`, `rbd:pool/image`, `gluster+tcp:...`: QEMU's protocol prefixes."""
    prefix, sep, _rest = name.partition(":")
    return bool(sep) and "/" not in prefix and prefix.replace("+", "").isalpha()


def _undeclared(path: str, fmt: str | None) -> str:
    if fmt is None:
        return f"{path}: its format is not declared, so its backing chain is not followed"
    return f"{path}: format {fmt}, whose backing chain is not followed"
