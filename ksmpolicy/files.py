"""Files ksmpolicy reads or writes as root: reads that never block, writes that follow no link.

Three rules, one place:

* **Reads** (`open_regular`, `read_regular`) touch only regular files: the path is checked with
  `stat` before it is opened, so a FIFO, socket or device named by a guest or a local user is
  never opened (opening some devices has effects); it is opened non-blocking and checked again
  with `fstat`, so a swap in between is caught; and no more than the caller's limit is read.
* **Writes** (`write_atomic`) go to a new file made with `O_CREAT|O_EXCL|O_NOFOLLOW` beside the
  target, are `fsync`ed, then renamed over the target. A symlink planted at the temporary name
  makes the create fail; one planted at the final name is replaced, never followed. A directory
  others can write to is refused when the caller asks for a private one (backups, caches).
* **Trust** (`untrusted_reason`): a file the hooks act on must be one no one but root can
  change, along its whole path, as sshd's StrictModes and sudo check it.

Only `os`, `stat` and `quoting` are imported: the hook uses this module on every VM start.
"""

from __future__ import annotations

import os
import stat

from ksmpolicy.quoting import run_hint

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from collections.abc import Iterable
    from os import PathLike

    StrPath = str | PathLike[str]
    Buffer = bytes | memoryview

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)
_MAX_LINKS = 40  # as the kernel's own limit on symlinks in one lookup


class NotRegularFile(OSError):
    """A path that names something other than a regular file; never opened for reading."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"{path} is {kind}, not a regular file")
        self.strerror = f"is {kind}, not a regular file"
        self.filename = path


def kind_of(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def open_regular(path: StrPath) -> tuple[int, os.stat_result]:
    """Open a regular file for reading without blocking; (fd, its fstat). Raises OSError, and
    NotRegularFile for anything else (which is then never opened)."""
    name = os.fspath(path)
    before = os.stat(name)  # noqa: PTH116 - pathlib costs the hook an import
    if stat.S_ISDIR(before.st_mode):
        raise IsADirectoryError(21, "is a directory", name)
    if not stat.S_ISREG(before.st_mode):
        raise NotRegularFile(name, kind_of(before.st_mode))
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(name, flags)
    try:
        after = os.fstat(fd)
        if not stat.S_ISREG(after.st_mode) or (after.st_dev, after.st_ino) != (
            before.st_dev,
            before.st_ino,
        ):
            raise NotRegularFile(name, "replaced while it was opened")
    except BaseException:
        os.close(fd)
        raise
    return fd, after


def read_fd(fd: int, limit: int, offset: int | None = None) -> bytes:
    """Up to `limit` bytes from `fd` (from `offset` with pread), in as few reads as it takes."""
    parts = []
    remaining = limit
    position = offset
    while remaining > 0:
        size = min(remaining, 1 << 20)
        chunk = os.read(fd, size) if position is None else os.pread(fd, size, position)
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
        if position is not None:
            position += len(chunk)
    return b"".join(parts)


def read_regular(path: StrPath, limit: int) -> bytes:
    """At most `limit + 1` bytes of a regular file (callers refuse a longer one by its length)."""
    fd, _st = open_regular(path)
    try:
        return read_fd(fd, limit + 1)
    finally:
        os.close(fd)


def write_atomic(
    path: StrPath, data: bytes, mode: int = 0o644, *, private_dir: bool = False
) -> None:
    """Replace `path` with `data`, atomically, following no symlink.

    `private_dir` refuses a directory that anyone but this user can write (others could swap
    the file after it is written) or that is a symlink.
    """
    write_atomic_parts(path, (data,), mode, private_dir=private_dir)


def write_atomic_parts(
    path: StrPath, parts: Iterable[Buffer], mode: int = 0o644, *, private_dir: bool = False
) -> None:
    """`write_atomic` of the concatenation of `parts`, each written as it is (a large array
    as a memoryview of itself: never copied into one bytes object first)."""
    target = os.fspath(path)
    directory = os.path.dirname(target) or "."  # noqa: PTH120 - pathlib costs the hook an import
    if private_dir:
        reason = _unsafe_directory(directory)
        if reason:
            raise PermissionError(f"refusing to write {target}: {reason}")
    base = os.path.basename(target)  # noqa: PTH119
    temporary = os.path.join(directory, f".{base}.{os.urandom(6).hex()}.tmp")  # noqa: PTH118
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, mode)
    try:
        try:
            _set_mode(fd, mode)
            for part in parts:
                view = memoryview(part).cast("B")
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, target)  # noqa: PTH105 - replaces a link at target, never follows it
    except BaseException:
        try:  # noqa: SIM105 - contextlib is one more import for the hook
            os.unlink(temporary)  # noqa: PTH108
        except OSError:
            pass
        raise
    _fsync_directory(directory)


def _set_mode(fd: int, mode: int) -> None:
    """The mode the caller asked for, whatever the umask. pmxcfs (/etc/pve) refuses chmod and
    sets its own modes: that is accepted when the file is no more open than asked."""
    try:
        os.fchmod(fd, mode)
    except OSError:
        if stat.S_IMODE(os.fstat(fd).st_mode) & ~mode:
            raise


def make_private_dir(path: StrPath) -> None:
    """Create a directory only this user can use (0700), or check that an existing one is so."""
    directory = os.fspath(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)  # noqa: PTH103
    reason = _unsafe_directory(directory)
    if reason:
        raise PermissionError(reason)


def _unsafe_directory(directory: str) -> str | None:
    try:
        st = os.lstat(directory)
    except OSError as exc:
        return f"cannot inspect {directory}: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{directory} is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is {kind_of(st.st_mode)}"
    if st.st_uid != os.geteuid():
        return f"{directory} belongs to uid {st.st_uid}, not to uid {os.geteuid()}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"{directory} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            + run_hint("chmod", "go-w", directory)
        )
    return None


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_own_file(path: StrPath, limit: int) -> bytes | None:
    """The content of a regular file at `path` itself (a symlink there is not followed), or None
    when there is nothing there. For "was this written by ksmpolicy?" checks before replacing."""
    name = os.fspath(path)
    try:
        st = os.lstat(name)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(name, kind_of(st.st_mode))
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return read_fd(fd, limit)
    finally:
        os.close(fd)


def carries_marker(path: StrPath, marker: str) -> bool | None:
    """Whether the regular file at `path` (not followed if a symlink) holds `marker` in its
    first 4 KiB, i.e. ksmpolicy wrote it; None when nothing is there. A symlink, FIFO or device
    at `path` is never ours. OSError when it cannot be read."""
    try:
        data = read_own_file(path, 4096)
    except NotRegularFile:
        return False
    return None if data is None else marker.encode() in data


# --- trust along a whole path -----------------------------------------------------------------


def untrusted_reason(path: StrPath, *, owner: int = 0) -> str | None:
    """Why a local user other than `owner` (root) could change what `path` names, or None.

    Every directory from `/` down must belong to `owner` and be writable by no one else; a
    sticky directory others can write to (like /tmp) is accepted only for an entry `owner`
    owns, since others can add names there but not replace or remove it. Every symlink on the
    way must belong to `owner`, sit in such a directory, and its target is checked the same
    way. The file itself must belong to `owner` and be writable by no one else.
    """
    name = os.path.abspath(os.fspath(path))  # noqa: PTH100
    try:
        return _TrustWalk(name, owner).reason()
    except OSError as exc:
        return f"cannot inspect {exc.filename or name}: {exc.strerror}"


class _TrustWalk:
    """The walk of `untrusted_reason`, one path component at a time, symlinks followed."""

    def __init__(self, name: str, owner: int) -> None:
        self.name = name
        self.owner = owner
        self.pending = [part for part in name.split("/") if part]
        self.current = "/"
        self.parent = os.lstat("/")
        self.links = 0

    def reason(self) -> str | None:
        reason = _directory_reason("/", self.parent, self.owner)
        while reason is None and self.pending:
            part = self.pending.pop(0)
            if part == "..":
                self.current = os.path.dirname(self.current)  # noqa: PTH120
                self.parent = os.lstat(self.current)
            elif part != ".":
                reason = self._step(os.path.join(self.current, part))  # noqa: PTH118
        return reason

    def _step(self, entry: str) -> str | None:
        st = os.lstat(entry)
        reason = _entry_reason(self.current, self.parent, entry, st, self.owner)
        if reason:
            return reason
        if stat.S_ISLNK(st.st_mode):
            return self._follow(entry)
        if stat.S_ISDIR(st.st_mode):
            return self._enter(entry, st)
        if self.pending:
            return f"{entry} is {kind_of(st.st_mode)}, not a directory"
        return _file_reason(entry, st)

    def _enter(self, directory: str, st: os.stat_result) -> str | None:
        reason = _directory_reason(directory, st, self.owner)
        if reason and self.pending:
            return reason
        self.current, self.parent = directory, st
        return None

    def _follow(self, link: str) -> str | None:
        self.links += 1
        if self.links > _MAX_LINKS:
            return f"{self.name}: too many symbolic links"
        target = os.readlink(link)  # noqa: PTH115
        if target.startswith("/"):
            self.current = "/"
            self.parent = os.lstat("/")
        self.pending = [p for p in target.split("/") if p] + self.pending
        return None


def _file_reason(entry: str, st: os.stat_result) -> str | None:
    """The file at the end of the path, if others could write to it."""
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "everyone" if st.st_mode & stat.S_IWOTH else "its group"
        return f"{entry} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}); " + run_hint(
            "chmod", "go-w", entry
        )
    return None


def _directory_reason(directory: str, st: os.stat_result, owner: int) -> str | None:
    """A directory on the way that others could use to swap what is below it."""
    if st.st_uid != owner:
        return (
            f"{directory} belongs to uid {st.st_uid}, who could replace what is in it; "
            + run_hint("chown", "root", directory)
        )
    return None


def _entry_reason(
    directory: str, parent: os.stat_result, entry: str, st: os.stat_result, owner: int
) -> str | None:
    """Could someone other than `owner` replace or remove `entry` in `directory`?"""
    if st.st_uid != owner:
        what = "symbolic link" if stat.S_ISLNK(st.st_mode) else kind_of(st.st_mode).split()[-1]
        return f"{entry} ({what}) belongs to uid {st.st_uid}; " + run_hint(
            "chown", "-h", "root", entry
        )
    if parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not parent.st_mode & stat.S_ISVTX:
        who = "everyone" if parent.st_mode & stat.S_IWOTH else "its group"
        return (
            f"{directory} is writable by {who} (mode {stat.S_IMODE(parent.st_mode):04o}), who "
            f"could replace {entry}; " + run_hint("chmod", "go-w", directory)
        )
    return None
