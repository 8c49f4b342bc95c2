"""The policy: frozen values, loading with the trust check, and a compiled cache for hooks.

Validation of the YAML lives in `ksmpolicy.validate`, imported only when a file is parsed: the
hook, which runs on every VM start, normally reads the compiled cache instead.
"""

from __future__ import annotations

import enum
import marshal
import os
import stat

from ksmpolicy.errors import PolicyError, Problem
from ksmpolicy.records import dataclass, field

TYPE_CHECKING = False  # typing's constant costs an import; mypy reads this one the same way
if TYPE_CHECKING:
    from collections.abc import Mapping

DEFAULT_POLICY_PATH = "/etc/ksmpolicy/policy.yaml"
MAX_POLICY_BYTES = 10 * 1024 * 1024
SUPPORTED_VERSION = 1


class Action(enum.Enum):
    MERGE = "merge"
    EXCLUDE = "exclude"


class Enforcement(enum.Enum):
    """What a start-time hook does when a VM's definition disagrees with its decision."""

    OFF = "off"
    WARN = "warn"
    BLOCK = "block"


@dataclass(frozen=True)
class Match:
    """Criteria of a rule: keys are AND-ed, the items of one key OR-ed. Empty means "any"."""

    names: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    images: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    name: str
    match: Match
    action: Action
    line: int = 0


@dataclass(frozen=True)
class Group:
    """VMs expected to share pages: a VM belongs if any of its images, tags or its name match."""

    name: str
    images: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReconcilerSettings:
    interval_seconds: float = 10.0
    target_scan_seconds: float = 120.0
    max_ksmd_cpu_percent: float = 20.0
    memory_pressure_percent: float = 20.0  # MemAvailable below this share of RAM raises the pace
    kernel_advisor: bool = False  # hand pacing to the kernel's scan-time advisor where it exists


@dataclass(frozen=True)
class ProxmoxSettings:
    # The qemu-server version to write configs for, when dpkg's answer is not wanted (e.g. a
    # cluster mid-upgrade): below 9.0.27 there is no `allow-ksm` and `args` is used instead.
    qemu_server_version: str | None = None


@dataclass(frozen=True)
class Policy:
    version: int = SUPPORTED_VERSION
    enforcement: Enforcement = Enforcement.WARN
    live: bool = True
    default: Action = Action.MERGE
    groups: tuple[Group, ...] = ()
    rules: tuple[Rule, ...] = ()
    # Tags given to VMs by the policy itself, keyed by libvirt name, UUID or Proxmox VMID.
    vms: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    reconciler: ReconcilerSettings = ReconcilerSettings()
    proxmox: ProxmoxSettings = ProxmoxSettings()
    source: str = "<builtin>"


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
    try:
        with open(file, "rb") as handle:  # noqa: PTH123 - pathlib costs the hook an import
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise _single(file, "not a regular file")
            if check_trust:
                _check_trust(file, st)
            key = (file, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if cache_dir is not None:
                cached = _read_cache(cache_dir, key)
                if cached is not None:
                    return cached
            data = handle.read(MAX_POLICY_BYTES + 1)
    except FileNotFoundError:
        hint = " (copy one from policies/ or pass --policy)" if file == DEFAULT_POLICY_PATH else ""
        raise _single(file, f"no such file{hint}") from None
    except IsADirectoryError:
        raise _single(file, "is a directory, expected a policy file") from None
    except PermissionError:
        raise _single(file, "permission denied (run as root or make it readable)") from None
    except OSError as exc:
        raise _single(file, f"cannot read: {exc.strerror}") from None
    if len(data) > MAX_POLICY_BYTES:
        raise _single(file, f"larger than {MAX_POLICY_BYTES // (1024 * 1024)} MB: not a policy")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PolicyError(
            [Problem(file, line, "", f"not valid UTF-8 (byte {exc.start}): save it as UTF-8")]
        ) from None
    policy = parse_policy(text, file)
    if cache_dir is not None:
        _write_cache(cache_dir, key, policy)
    return policy


def parse_policy(text: str, file: str = "<policy>") -> Policy:
    """Validate policy text; raise PolicyError listing every problem found, in line order."""
    from ksmpolicy.validate import parse  # noqa: PLC0415 - YAML and validation load on demand

    return parse(text, file)


# --- the compiled cache --------------------------------------------------------------------

_CACHE_FORMAT = 2


def _cache_path(cache_dir: str, key: tuple[object, ...]) -> str:
    """One cache file per policy path, overwritten when the policy changes."""
    name = str(key[0]).replace("%", "%25").replace("/", "%2F")
    return os.path.join(cache_dir, f"policy-{name}.cache")  # noqa: PTH118


def _read_cache(cache_dir: str, key: tuple[object, ...]) -> Policy | None:
    try:
        with open(_cache_path(cache_dir, key), "rb") as handle:  # noqa: PTH123
            st = os.fstat(handle.fileno())
            # Only a root-owned file nobody else can write: the hook runs as root.
            if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                return None
            stored = marshal.load(handle)
    except (OSError, EOFError, ValueError, TypeError):
        return None
    if not isinstance(stored, tuple) or stored[:2] != (_CACHE_FORMAT, key):
        return None
    try:
        return _thaw(stored[2])
    except (TypeError, ValueError, IndexError):
        return None


def _write_cache(cache_dir: str, key: tuple[object, ...], policy: Policy) -> None:
    """Best effort: a cache that cannot be written only costs the next hook some time."""
    path = _cache_path(cache_dir, key)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)  # noqa: PTH103
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            marshal.dump((_CACHE_FORMAT, key, _freeze(policy)), handle)  # type: ignore[arg-type]
        os.replace(temporary, path)  # noqa: PTH105
    except OSError:
        try:  # noqa: SIM105 - contextlib is one more import for the hook
            os.unlink(temporary)  # noqa: PTH108
        except OSError:
            pass


def _freeze(p: Policy) -> tuple[object, ...]:
    return (
        p.enforcement.value,
        p.live,
        p.default.value,
        tuple((g.name, g.images, g.tags, g.names) for g in p.groups),
        tuple(
            (
                r.name,
                (r.match.names, r.match.tags, r.match.groups, r.match.images),
                r.action.value,
                r.line,
            )
            for r in p.rules
        ),
        tuple(p.vms.items()),
        (
            p.reconciler.interval_seconds,
            p.reconciler.target_scan_seconds,
            p.reconciler.max_ksmd_cpu_percent,
            p.reconciler.memory_pressure_percent,
            p.reconciler.kernel_advisor,
        ),
        p.proxmox.qemu_server_version,
        p.source,
    )


def _thaw(data: tuple[object, ...]) -> Policy:
    enforcement, live, default, groups, rules, vms, reconciler, qemu_server, source = data
    return Policy(
        enforcement=Enforcement(enforcement),
        live=bool(live),
        default=Action(default),
        groups=tuple(Group(*g) for g in groups),  # type: ignore[attr-defined]
        rules=tuple(
            Rule(name, Match(*match), Action(action), line)
            for name, match, action, line in rules  # type: ignore[attr-defined]
        ),
        vms=dict(vms),  # type: ignore[call-overload]
        reconciler=ReconcilerSettings(*reconciler),  # type: ignore[misc]
        proxmox=ProxmoxSettings(None if qemu_server is None else str(qemu_server)),
        source=str(source),
    )


def _single(file: str, message: str) -> PolicyError:
    return PolicyError([Problem(file, None, "", message)])


def _check_trust(file: str, st: os.stat_result) -> None:
    fix = f"run: chown root:root {file} && chmod go-w {file}"
    if st.st_uid != 0:
        raise _single(file, f"refusing a policy not owned by root (uid {st.st_uid}); {fix}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "world" if st.st_mode & stat.S_IWOTH else "group"
        raise _single(
            file,
            f"refusing a {who}-writable policy (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"hooks run as root and trust it; {fix}",
        )
    parent = os.path.dirname(os.path.realpath(file))  # noqa: PTH120
    try:
        pst = os.stat(parent)  # noqa: PTH116
    except OSError:
        return
    writable = pst.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if (pst.st_uid != 0 or writable) and not pst.st_mode & stat.S_ISVTX:
        raise _single(
            file,
            f"refusing a policy in {parent}, which others can write (anyone could replace the "
            f"file); run: chown root:root {parent} && chmod go-w {parent}",
        )
