"""Loading the policy: the file read safely, the trust check, and a compiled cache for hooks.

Validation of the YAML lives in `ksmpolicy.policy.validate`, imported only when a file is
parsed: the hook, which runs on every VM start, normally reads the compiled cache instead.
"""

from __future__ import annotations

import marshal
import os
import stat

from ksmpolicy.errors import PolicyError, Problem
from ksmpolicy.files import (
    NotRegularFile,
    make_private_dir,
    open_regular,
    read_fd,
    untrusted_reason,
    write_atomic,
)
from ksmpolicy.paths import DEFAULT_POLICY_PATH
from ksmpolicy.policy.model import (
    Action,
    Domain,
    Enforcement,
    Group,
    IdentitySettings,
    IsolationSettings,
    Match,
    Policy,
    ProxmoxSettings,
    ReconcilerSettings,
    Rule,
)

MAX_POLICY_BYTES = 32 * 1024 * 1024

TYPE_CHECKING = False  # typing costs the hook an import; mypy reads this one the same way
if TYPE_CHECKING:
    from typing import Any


# --- loading -------------------------------------------------------------------------------


def load_policy(
    path: str | os.PathLike[str],
    *,
    check_trust: bool | None = None,
    cache_dir: str | None = None,
) -> Policy:
    """Read and validate a policy file; raise PolicyError listing every problem.

    `check_trust` refuses files others could have written; by default it is on when running as
    root, because the hooks run as root and act on what this file says. With `cache_dir` (a
    root-only directory) the validated policy is kept there in compiled form and reused while
    the file's identity (device, inode, size, times) is unchanged.
    """
    file = os.fspath(path)
    if check_trust is None:
        check_trust = os.geteuid() == 0
    fd, st = _open(file)
    try:
        if check_trust:
            _check_trust(file)
        key = (file, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if cache_dir is not None:
            cached = _read_cache(cache_dir, key)
            if cached is not None:
                return cached
        try:
            data = read_fd(fd, MAX_POLICY_BYTES + 1)
        except OSError as exc:
            raise _single(file, f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    policy = parse_policy(_text(file, data), file)
    if cache_dir is not None:
        _write_cache(cache_dir, key, policy)
    return policy


def _open(file: str) -> tuple[int, os.stat_result]:
    """The policy file, opened as a regular file; a PolicyError that says why it cannot be."""
    try:
        return open_regular(file)
    except FileNotFoundError:
        hint = (
            " (`ksmpolicy check` says what to do, or pass --policy)"
            if file == DEFAULT_POLICY_PATH
            else ""
        )
        raise _single(file, f"no such file{hint}") from None
    except IsADirectoryError:
        raise _single(file, "is a directory, expected a policy file") from None
    except NotRegularFile as exc:
        raise _single(file, f"{exc.strerror}: expected a policy file") from None
    except PermissionError:
        raise _single(file, "permission denied (run as root or make it readable)") from None
    except OSError as exc:
        raise _single(file, f"cannot read: {exc.strerror}") from None


def _text(file: str, data: bytes) -> str:
    """The policy's bytes as text: at most MAX_POLICY_BYTES, UTF-8."""
    if len(data) > MAX_POLICY_BYTES:
        raise _single(file, f"larger than {MAX_POLICY_BYTES // (1024 * 1024)} MB: not a policy")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PolicyError(
            [Problem(file, line, "", f"not valid UTF-8 (byte {exc.start}): save it as UTF-8")]
        ) from None


BUILTIN_NAME = "built-in default"


def builtin_policy(missing: str = DEFAULT_POLICY_PATH) -> Policy:
    """The shipped default (ksmpolicy/policy/default.yaml, package data) with enforcement and
    live switching off: it paces ksmd for what is mergeable and changes no VM. Its `source`
    says which file was missing, so every command can tell the operator."""
    from importlib.resources import files  # noqa: PLC0415

    from ksmpolicy.records import replace  # noqa: PLC0415

    text = files("ksmpolicy.policy").joinpath("default.yaml").read_text(encoding="utf-8")
    return replace(
        parse_policy(text, f"<{BUILTIN_NAME}>"),
        enforcement=Enforcement.OFF,
        live=False,
        source=f"{BUILTIN_NAME} (no file at {missing})",
    )


def load_policy_or_builtin(path: str | os.PathLike[str], *, explicit: bool) -> Policy:
    """`load_policy`, or the built-in default when no policy was named (`explicit` False: no
    --policy, no $KSMPOLICY_POLICY) and no file exists at `path`. A file that exists but
    cannot be used is an error, never a silent fall-back."""
    file = os.fspath(path)
    if not explicit and not os.path.lexists(file):
        return builtin_policy(file)
    return load_policy(file)


def parse_policy(text: str, file: str = "<policy>") -> Policy:
    """Validate policy text; raise PolicyError listing every problem found, in line order."""
    from ksmpolicy.policy.validate import parse  # noqa: PLC0415 - YAML and validation load on demand

    return parse(text, file)


# --- the compiled cache --------------------------------------------------------------------

# Bump when a field keeps its name but changes meaning (6: `vms:` keys became typed identities).
# A field added, removed or renamed needs no bump: the record classes' field names are part of
# the cache's key (`_SCHEMA`), so a cache written by another version is simply not used.
_CACHE_FORMAT = 6
_RECORDS: dict[str, Any] = {
    cls.__name__: cls
    for cls in (
        Policy,
        Group,
        Rule,
        Match,
        Domain,
        ReconcilerSettings,
        IsolationSettings,
        ProxmoxSettings,
        IdentitySettings,
    )
}
_CHOICES: dict[str, Any] = {cls.__name__: cls for cls in (Action, Enforcement)}
_SCHEMA = tuple((name, cls.__match_args__) for name, cls in _RECORDS.items())
_VERSION = (_CACHE_FORMAT, _SCHEMA)


def _cache_path(cache_dir: str, key: tuple[object, ...]) -> str:
    """One cache file per policy path, overwritten when the policy changes."""
    name = str(key[0]).replace("%", "%25").replace("/", "%2F")
    return os.path.join(cache_dir, f"policy-{name}.cache")  # noqa: PTH118


def load_last_good(path: str | os.PathLike[str], cache_dir: str) -> Policy | None:
    """The policy last compiled from `path` into `cache_dir`, whatever the file is now, or
    None. The hooks fall back to it when the file cannot be used (see hookcore)."""
    file = os.fspath(path)
    stored = _read_cache_file(_cache_path(cache_dir, (file,)))
    if not isinstance(stored, tuple) or len(stored) != 3 or stored[0] != _VERSION:
        return None
    key = stored[1]
    if not isinstance(key, tuple) or not key or key[0] != file:
        return None
    return _thaw_policy(stored[2])


def _read_cache(cache_dir: str, key: tuple[object, ...]) -> Policy | None:
    stored = _read_cache_file(_cache_path(cache_dir, key))
    if not isinstance(stored, tuple) or stored[:2] != (_VERSION, key):
        return None
    return _thaw_policy(stored[2])


def _read_cache_file(path: str) -> object:
    """The unmarshalled cache, or None. Only a regular file owned by us and writable by no one
    else is read (the hook runs as root); a symlink at its name is not followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return None
        return marshal.loads(read_fd(fd, MAX_POLICY_BYTES))
    except (OSError, EOFError, ValueError, TypeError):
        return None
    finally:
        os.close(fd)


def _write_cache(cache_dir: str, key: tuple[object, ...], policy: Policy) -> None:
    """Best effort: a cache that cannot be written only costs the next hook some time."""
    try:
        make_private_dir(cache_dir)
        data = marshal.dumps((_VERSION, key, freeze(policy)))  # type: ignore[arg-type]
        write_atomic(_cache_path(cache_dir, key), data, 0o600, private_dir=True)
    except OSError:
        pass


def freeze(value: object) -> object:
    """A policy (or any of its parts) as plain values marshal can store, by field name: a
    record is ("r", class, ((field, value), ...)), a choice ("c", class, value), a tuple
    ("t", items), a mapping ("m", ((key, value), ...)); str, numbers, bools and None as they
    are."""
    kind = type(value)
    name = kind.__name__
    if _RECORDS.get(name) is kind:
        fields = kind.__match_args__
        return ("r", name, tuple((f, freeze(getattr(value, f))) for f in fields))
    if _CHOICES.get(name) is kind:
        return ("c", name, value.value)  # type: ignore[attr-defined]
    if isinstance(value, tuple):
        return ("t", tuple(freeze(v) for v in value))
    if isinstance(value, dict):
        return ("m", tuple((k, freeze(v)) for k, v in value.items()))
    if value is None or isinstance(value, str | int | float):
        return value
    raise TypeError(f"cannot store {name} in the policy cache")


def thaw(data: object) -> object:
    """The inverse of `freeze`. Raises TypeError, ValueError or KeyError on anything else."""
    if not isinstance(data, tuple):
        if data is None or isinstance(data, str | int | float):
            return data
        raise TypeError(f"unexpected {type(data).__name__} in the policy cache")
    tag = data[0]
    if tag == "r":
        _tag, name, fields = data
        return _RECORDS[name](**{f: thaw(v) for f, v in fields})
    if tag == "c":
        return _CHOICES[data[1]](data[2])
    if tag == "t":
        return tuple(thaw(v) for v in data[1])
    if tag == "m":
        return {k: thaw(v) for k, v in data[1]}
    raise ValueError(f"unknown tag {tag!r} in the policy cache")


def _thaw_policy(data: object) -> Policy | None:
    try:
        policy = thaw(data)
    except (TypeError, ValueError, KeyError):
        return None
    return policy if isinstance(policy, Policy) else None


def _single(file: str, message: str) -> PolicyError:
    return PolicyError([Problem(file, None, "", message)])


def _check_trust(file: str) -> None:
    """Refuse a policy that anyone but root could change, anywhere along its path."""
    reason = untrusted_reason(file)
    if reason is not None:
        raise _single(file, f"refusing it: hooks run as root and act on it, but {reason}")
