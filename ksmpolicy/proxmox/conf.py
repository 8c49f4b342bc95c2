r"""Proxmox VE guest configs (/etc/pve/qemu-server/VMID.conf): facts, and the KSM rewrite.

Read as qemu-server reads them (QemuServer.pm: parse_vm_config, whose rules are quoted here):

* Lines are split at `\n` only. Blank lines are skipped, `#` lines are the description.
* The main section comes first. `[PENDING]` (any case), `[special:cloudinit]` and
  `[special:fleecing]`, and a `[name]` per snapshot follow; any other `[...]` line starts a
  section qemu-server skips. None of them is the current config; a section given twice keeps
  the last.
* A key line is `key: value` (`^([a-z][a-z_-]*\d*):\s*(.+?)\s*$`, whitespace being ASCII's,
  as Perl's `\s` on bytes). A line ending in `snapstate: prepare|delete` is snapstate, whatever
  comes first (that regex is not anchored). A value that fails its type check (a boolean that
  is not 1/0/on/off/yes/no/true/false in any case) is dropped, as if the line were not there.
* A key given twice keeps the last value that passed (`$conf->{$key} = $value`).

Only the main section is ever edited, one line at a time; everything else is kept byte for
byte.
"""

from __future__ import annotations

import re

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.policy.decide import MemoryRegion, VmFacts
from ksmpolicy.proxmox.args import MEM_MERGE_OFF, mem_merge, with_merge_off, without_merge_off
from ksmpolicy.records import dataclass

MAX_CONF_BYTES = 16 * 1024 * 1024
# qemu-server 9.0.27 added `allow-ksm`; older versions need `args: -machine mem-merge=off`
# (QEMU merges repeated -machine options).
ALLOW_KSM_SINCE = (9, 0, 27)
_PENDING = re.compile(r"^\[PENDING\]\s*$", re.I | re.A)
_SPECIAL = re.compile(r"^\[special:(cloudinit|fleecing)\]\s*$", re.I | re.A)
_SNAPSHOT = re.compile(r"^\[([a-z][a-z0-9_\-]+)\]\s*$", re.I | re.A)
_UNKNOWN = re.compile(r"^\[([^\]]*)\]\s*$", re.A)
_BLANK = re.compile(r"^\s*$", re.A)
_SNAPSTATE = re.compile(r"snapstate:\s*(prepare|delete)\s*$", re.A)
_DESCRIPTION = re.compile(r"^description:\s*(.*\S)\s*$", re.A)
_ARGS = re.compile(r"^(args):\s*(.*\S)\s*$", re.A)
_KEY = re.compile(r"^([a-z][a-z_\-]*\d*):\s*(.+?)\s*$", re.A)
# The booleans ksmpolicy reads, checked as check_type checks them.
BOOLEAN_KEYS = frozenset({"allow-ksm", "template", "numa"})
_DISK = re.compile(r"^(ide|sata|scsi|virtio)\d+$")
_TAG_SPLIT = re.compile(r"[;,\s]+")


class ConfError(KsmPolicyError):
    """A Proxmox config ksmpolicy will not read."""


@dataclass(frozen=True)
class Section:
    name: str | None  # None for the main section; the header's text for the others
    first: int  # index of its first line (the [header] for named sections)
    end: int  # index after its last line
    values: dict[str, str]  # each key's value that counts: its last valid one
    lines_of: dict[str, int]  # key -> index of the line that counts
    # key -> indices of its other lines, which qemu-server reads and then overrides or drops
    dead: dict[str, tuple[int, ...]]
    kind: str = "main"  # main, pending, special, snapshot, or unknown (skipped by qemu-server)


@dataclass(frozen=True)
class PveConfig:
    lines: tuple[str, ...]  # with their line endings
    sections: tuple[Section, ...]

    @property
    def main(self) -> Section:
        return self.sections[0]

    @property
    def pending(self) -> Section | None:
        """The `[PENDING]` section qemu-server uses: the last one."""
        return next((s for s in reversed(self.sections) if s.kind == "pending"), None)


@dataclass(frozen=True)
class PveFacts:
    vm: VmFacts
    allow_ksm: bool | None  # the `allow-ksm` key, None when absent (default: allowed)
    args_mem_merge: bool | None  # the last `-machine ...mem-merge=` in `args`, None: not said
    hookscript: str | None
    template: bool
    lock: str | None

    @property
    def merging_off(self) -> bool:
        """QEMU will start with merging off: `args` comes last on its command line, so what it
        says wins; else `allow-ksm: 0`."""
        if self.args_mem_merge is not None:
            return not self.args_mem_merge
        return self.allow_ksm is False


def pve_bool(value: str | None) -> bool | None:
    """A boolean as qemu-server's check_type reads it (after the line's whitespace is
    stripped): `1`, or on/yes/true in any case; `0`, or off/no/false in any case; None for
    anything else (dropped with a warning) or absent."""
    if value is None:
        return None
    if value == "1" or value.lower() in ("on", "yes", "true"):
        return True
    if value == "0" or value.lower() in ("off", "no", "false"):
        return False
    return None


def split_lines(text: str) -> tuple[str, ...]:
    """Lines as qemu-server splits them: at `\n` only, each with its ending (`\r\n` stays).

    `str.splitlines` would also split at `\v`, `\f`, `\x1c`-`\x1e`, `\x85` and U+2028, so
    that a description or a VM name holding one could smuggle in a key Proxmox never sees.
    """
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return tuple(lines)


def _header(line: str) -> tuple[str, str] | None:
    """(kind, name) of a section header line, in qemu-server's order of tests, or None."""
    for kind, pattern in (
        ("pending", _PENDING),
        ("special", _SPECIAL),
        ("snapshot", _SNAPSHOT),
        ("unknown", _UNKNOWN),
    ):
        if pattern.match(line):
            return kind, line.strip()[1:-1]
    return None


def _key_value(line: str) -> tuple[str, str] | None:
    """(key, value) of a key line as qemu-server reads it, or None (not a key line, or a value
    its type check drops)."""
    if _BLANK.match(line) or line.startswith("#") or _DESCRIPTION.match(line):
        return None
    if _SNAPSTATE.search(line):
        return None
    match = _ARGS.match(line) or _KEY.match(line)
    if match is None:
        return None
    key, value = match.group(1), match.group(2)
    if key in BOOLEAN_KEYS and pve_bool(value) is None:
        return None
    return key, value


class _Builder:
    """One section's keys as the lines go by."""

    def __init__(self, name: str | None, first: int, kind: str) -> None:
        self.name, self.first, self.kind = name, first, kind
        self.values: dict[str, str] = {}
        self.lines_of: dict[str, int] = {}
        self.dead: dict[str, list[int]] = {}

    def line(self, index: int, line: str) -> None:
        shape = _KEY.match(line)
        if shape:
            self.dead.setdefault(shape.group(1), []).append(index)  # until it proves to count
        found = _key_value(line)
        if found is None:
            return
        key, value = found
        self.values[key] = value
        self.lines_of[key] = index

    def section(self, end: int) -> Section:
        dead = {
            key: tuple(i for i in indices if i != self.lines_of.get(key))
            for key, indices in self.dead.items()
        }
        dead = {key: indices for key, indices in dead.items() if indices}
        return Section(self.name, self.first, end, self.values, self.lines_of, dead, self.kind)


def parse(text: str) -> PveConfig:
    """Split a config into sections and read their keys as qemu-server does; malformed lines
    are kept, not judged."""
    if len(text) > MAX_CONF_BYTES:
        raise ConfError(f"config is larger than {MAX_CONF_BYTES // 2**20} MB: refusing it")
    if "\0" in text:
        raise ConfError("config contains NUL bytes: not a Proxmox config")
    lines = split_lines(text)
    sections: list[Section] = []
    current = _Builder(None, 0, "main")
    for index, line in enumerate(lines):
        header = _header(line)
        if header is not None:
            sections.append(current.section(index))
            current = _Builder(header[1], index, header[0])
            continue
        current.line(index, line)
    sections.append(current.section(len(lines)))
    return PveConfig(lines, tuple(sections))


def facts(
    config: PveConfig,
    vmid: str,
    values: dict[str, str] | None = None,
    *,
    use_allow_ksm: bool = True,
) -> PveFacts:
    """Facts from the main section (or from `values`, e.g. main with pending changes).
    `use_allow_ksm` False: a qemu-server before 9.0.27, which drops `allow-ksm` as unknown."""
    main = config.main.values if values is None else values
    tags = frozenset(t for t in _TAG_SPLIT.split(main.get("tags", "")) if t)
    disks = (_image(v) for k, v in sorted(main.items()) if _DISK.match(k))
    images = tuple(dict.fromkeys(i for i in disks if i))  # in key order, each once
    memory = _memory(main.get("memory"))
    # qemu-server backs every guest NUMA node the same way: `hugepages:` all of them with
    # hugetlbfs, a virtiofs share all of them with shared memfd. One region says it.
    hugepages = main.get("hugepages", "") not in ("", "0")
    shared = any(re.match(r"^virtiofs\d+$", k) for k in main)
    vm = VmFacts(
        name=main.get("name") or f"VM {vmid}",
        vmid=vmid,
        tags=tags,
        images=images,
        memory_bytes=memory,
        regions=(MemoryRegion("ram", memory, hugepages, shared),) if hugepages or shared else (),
    )
    return PveFacts(
        vm=vm,
        allow_ksm=pve_bool(main.get("allow-ksm")) if use_allow_ksm else None,
        args_mem_merge=mem_merge(main.get("args")),
        hookscript=main.get("hookscript"),
        template=pve_bool(main.get("template")) is True,
        lock=main.get("lock"),
    )


def with_pending(config: PveConfig) -> dict[str, str] | None:
    """The main section as it will be once pending changes apply, or None without any."""
    pending = config.pending
    if pending is None:
        return None
    values = dict(config.main.values)
    for key in _TAG_SPLIT.split(pending.values.get("delete", "")):
        values.pop(key.lstrip("!"), None)
    values.update({k: v for k, v in pending.values.items() if k != "delete"})
    return values


def _memory(value: str | None) -> int | None:
    mib = memory_mib(value)
    return mib * 2**20 if mib is not None else None


_MEMORY = re.compile(r"(?:^|current=)([0-9]{1,12})(?![0-9])")


def memory_mib(value: str | None) -> int | None:
    """`memory: 4096` or `memory: current=4096` (qemu-server 8.1+) in MiB; None when absent or
    not a number qemu-server would have written (a config is text anyone with the right to
    edit it wrote: no digits beyond what a host's RAM needs)."""
    match = _MEMORY.search(value.strip()) if value else None
    return int(match.group(1)) if match else None


def _image(value: str) -> str | None:
    """Image identity of a disk: a linked clone's base volume, else the volume itself."""
    spec = value.split(",")
    if any(part.strip() == "media=cdrom" for part in spec[1:]):
        return None
    volume = spec[0].removeprefix("file=").strip()
    if not volume or volume == "none":
        return None
    storage, sep, volname = volume.partition(":")
    if sep and "/" in volname:
        # local-lvm:base-9000-disk-0/vm-101-disk-0, local:9000/base-9000-disk-0.qcow2/101/vm-...
        parts = volname.split("/")
        for index, part in enumerate(parts[:-1]):
            if part.startswith("base-"):
                return f"{storage}:{'/'.join(parts[: index + 1])}"
    return volume


# --- the rewrite -----------------------------------------------------------------------------


# A qemu-server package version as the policy and the command line take it: 8.4.1, 9.0.27-1.
def qemu_server_supports_allow_ksm(version: str | None) -> bool:
    """`allow-ksm` needs qemu-server >= 9.0.27; an unknown version is taken as current."""
    if not version:
        return True
    numbers = tuple(int(n) for n in re.findall(r"[0-9]{1,9}", version.split("-")[0])[:3])
    return numbers >= ALLOW_KSM_SINCE


def set_merging(text: str, allow: bool, *, use_allow_ksm: bool = True) -> str:
    """The config with KSM allowed or not for this VM; the input text when it complies.

    Exclude: `allow-ksm: 0` (qemu-server >= 9.0.27; older ones drop the key as unknown, so
    there `args` alone counts), and when `args` would still turn merging on (or on an older
    qemu-server, unless it turns merging off), `-machine mem-merge=off` at its end, where it
    wins. Allow: the `allow-ksm: 0` line goes (the default is 1), and ksmpolicy's own
    `-machine mem-merge=off` pairs leave `args`; any other way `args` says mem-merge=off is the
    operator's and stays (the hook and status then say the config turns KSM off).

    The line that counts is the one edited; other lines of `allow-ksm` or `args` in the main
    section, which qemu-server reads and then overrides or drops, are removed whenever the text
    changes, so no reader is misled by them. Only main-section lines change.
    """
    config = parse(text)
    main = config.main
    inserts: list[tuple[int, str]] = []
    if allow:
        edits = _allow_edits(config)
    else:
        edits, inserts = _exclude_edits(config, use_allow_ksm=use_allow_ksm)
    if not edits and not inserts:
        return text
    for key in ("allow-ksm", "args"):
        edits.update(dict.fromkeys(main.dead.get(key, ())))
    lines: list[str | None] = list(config.lines)
    for index, edited in edits.items():
        lines[index] = edited
    for index, added in sorted(inserts, reverse=True):
        lines.insert(index, added)
    return "".join(line for line in lines if line is not None)


Edits = dict[int, str | None]  # line index -> new line, or None to delete it


def _allow_edits(config: PveConfig) -> Edits:
    """Let it merge: no `allow-ksm: 0`, and none of ksmpolicy's own mem-merge=off in args."""
    main = config.main
    edits: Edits = {}
    args = main.values.get("args")
    if pve_bool(main.values.get("allow-ksm")) is False:
        edits[main.lines_of["allow-ksm"]] = None
    kept = without_merge_off(args) if args is not None and mem_merge(args) is False else args
    if kept != args:
        edits[main.lines_of["args"]] = _args_line(config, kept or "")
    return edits


def _exclude_edits(
    config: PveConfig, *, use_allow_ksm: bool
) -> tuple[Edits, list[tuple[int, str]]]:
    """Keep it from merging: `allow-ksm: 0`, and mem-merge=off at the end of args when args
    would turn merging on (or says nothing, on a qemu-server without allow-ksm)."""
    main = config.main
    edits: Edits = {}
    inserts: list[tuple[int, str]] = []
    newline = newline_of(config.lines)
    args = main.values.get("args")
    said = mem_merge(args)
    if use_allow_ksm and pve_bool(main.values.get("allow-ksm")) is not False and said is not False:
        setting = f"allow-ksm: 0{newline}"
        if "allow-ksm" in main.lines_of:
            edits[main.lines_of["allow-ksm"]] = setting
        else:
            inserts.append((sorted_position(config, "allow-ksm"), setting))
    if said is True or (not use_allow_ksm and said is None):
        if args is None:
            pair = " ".join(MEM_MERGE_OFF)
            inserts.append((sorted_position(config, "args"), f"args: {pair}{newline}"))
        else:
            edits[main.lines_of["args"]] = _args_line(config, _merge_off(args))
    return edits, inserts


def _merge_off(args: str) -> str:
    new = with_merge_off(args)
    if new is None:
        raise ConfError(
            f"args: {args!r} ends inside a quote or with a backslash, so "
            f"`{' '.join(MEM_MERGE_OFF)}` cannot be added after it: fix args by hand"
        )
    return new


def _args_line(config: PveConfig, args: str) -> str | None:
    """The `args` line that counts, with a new value (its key, spacing and ending kept); None
    when the value is empty."""
    line = config.lines[config.main.lines_of["args"]]
    old = config.main.values["args"]
    if not args.strip():
        return None
    offset = line.index(old, line.index(":") + 1)
    return line[:offset] + args + line[offset + len(old) :]


def newline_of(lines: tuple[str, ...]) -> str:
    return "\r\n" if lines and lines[0].endswith("\r\n") else "\n"


def sorted_position(config: PveConfig, key: str) -> int:
    """Where Proxmox would put `key`: main-section keys are sorted, after the description."""
    main = config.main
    for other, index in sorted(main.lines_of.items(), key=lambda item: item[1]):
        if other > key:
            return index
    last = max(main.lines_of.values(), default=-1)
    if last >= 0:
        return last + 1
    # No keys at all: after the description comments.
    index = 0
    while index < main.end and config.lines[index].startswith("#"):
        index += 1
    return index
