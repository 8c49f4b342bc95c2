"""Proxmox VE guest configs (/etc/pve/qemu-server/VMID.conf): facts, and the KSM rewrite.

A config is `key: value` lines. The main section comes first, its description as leading `#`
lines; `[PENDING]`, `[special:cloudinit]` and one `[name]` section per snapshot follow. Only the
main section is ever edited, one line at a time; everything else is kept byte for byte.
"""

from __future__ import annotations

import itertools
import re

from ksmpolicy.errors import KsmPolicyError
from ksmpolicy.policy.decide import MemoryRegion, VmFacts
from ksmpolicy.records import dataclass

MAX_CONF_BYTES = 16 * 1024 * 1024
# qemu-server 9.0.27 added `allow-ksm`; older versions need `args: -machine mem-merge=off`
# (QEMU merges repeated -machine options).
ALLOW_KSM_SINCE = (9, 0, 27)
MEM_MERGE_OFF = ("-machine", "mem-merge=off")
_SECTION = re.compile(r"^\[([^\]]+)\]\s*$")
_KEY = re.compile(r"^([a-z][a-z0-9_-]*):\s?(.*?)\s*$")
_DISK = re.compile(r"^(ide|sata|scsi|virtio)\d+$")
_TAG_SPLIT = re.compile(r"[;,\s]+")


class ConfError(KsmPolicyError):
    """A Proxmox config ksmpolicy will not read."""


@dataclass(frozen=True)
class Section:
    name: str | None  # None for the main section
    first: int  # index of its first line (the [header] for named sections)
    end: int  # index after its last line
    values: dict[str, str]
    lines_of: dict[str, int]  # key -> line index


@dataclass(frozen=True)
class PveConfig:
    lines: tuple[str, ...]  # with their line endings
    sections: tuple[Section, ...]

    @property
    def main(self) -> Section:
        return self.sections[0]

    def section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.name == name), None)


@dataclass(frozen=True)
class PveFacts:
    vm: VmFacts
    allow_ksm: bool | None  # the `allow-ksm` key, None when absent (default: allowed)
    args_mem_merge_off: bool  # `args` carries -machine mem-merge=off
    hookscript: str | None
    template: bool
    lock: str | None

    @property
    def merging_off(self) -> bool:
        """The config keeps this VM's memory out of KSM (either way)."""
        return self.allow_ksm is False or self.args_mem_merge_off


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


def parse(text: str) -> PveConfig:
    """Split a config into sections; malformed lines are kept, not judged."""
    if len(text) > MAX_CONF_BYTES:
        raise ConfError(f"config is larger than {MAX_CONF_BYTES // 2**20} MB: refusing it")
    if "\0" in text:
        raise ConfError("config contains NUL bytes: not a Proxmox config")
    lines = split_lines(text)
    sections: list[Section] = []
    name: str | None = None
    first = 0
    values: dict[str, str] = {}
    lines_of: dict[str, int] = {}
    for index, line in enumerate(lines):
        header = _SECTION.match(line)
        if header:
            sections.append(Section(name, first, index, values, lines_of))
            name, first, values, lines_of = header.group(1), index, {}, {}
            continue
        match = _KEY.match(line)
        if match and match.group(1) not in values:
            values[match.group(1)] = match.group(2)
            lines_of[match.group(1)] = index
    sections.append(Section(name, first, len(lines), values, lines_of))
    return PveConfig(lines, tuple(sections))


def facts(config: PveConfig, vmid: str, values: dict[str, str] | None = None) -> PveFacts:
    """Facts from the main section (or from `values`, e.g. main with pending changes)."""
    main = config.main.values if values is None else values
    tags = frozenset(t for t in _TAG_SPLIT.split(main.get("tags", "")) if t)
    disks = (_image(v) for k, v in sorted(main.items()) if _DISK.match(k))
    images = tuple(dict.fromkeys(i for i in disks if i))  # in key order, each once
    allow = main.get("allow-ksm")
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
        allow_ksm=None if allow is None else allow.strip() not in ("0", "false", "no"),
        args_mem_merge_off=_find_pair(main.get("args", ""), MEM_MERGE_OFF) is not None,
        hookscript=main.get("hookscript"),
        template=main.get("template", "0").strip() == "1",
        lock=main.get("lock"),
    )


def with_pending(config: PveConfig) -> dict[str, str] | None:
    """The main section as it will be once pending changes apply, or None without any."""
    pending = config.section("PENDING")
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

    Exclude: `allow-ksm: 0` (qemu-server >= 9.0.27), else `-machine mem-merge=off` added to
    `args`. Allow: the `allow-ksm: 0` line is removed (the default is 1) and the token pair
    taken out of `args`. Only main-section lines change.
    """
    config = parse(text)
    lines: list[str | None] = list(config.lines)
    main = config.main
    newline = newline_of(config.lines)
    edits: list[tuple[int, str | None]] = []  # (line index, new line or None to delete)
    inserts: list[tuple[int, str]] = []
    allow_value = main.values.get("allow-ksm")
    allow_off = allow_value is not None and allow_value.strip() in ("0", "false", "no")
    args = main.values.get("args")
    pair = _find_pair(args or "", MEM_MERGE_OFF)
    if allow:
        if allow_off:
            edits.append((main.lines_of["allow-ksm"], None))
        if args is not None and pair is not None:
            index = main.lines_of["args"]
            edits.append((index, _without_pair(config.lines[index], args, pair)))
    elif allow_off or pair is not None:
        pass  # merging is off already, one way or the other
    elif use_allow_ksm:
        setting = f"allow-ksm: 0{newline}"
        if allow_value is not None:
            edits.append((main.lines_of["allow-ksm"], setting))
        else:
            inserts.append((sorted_position(config, "allow-ksm"), setting))
    elif args is None:
        inserts.append(
            (sorted_position(config, "args"), f"args: {' '.join(MEM_MERGE_OFF)}{newline}")
        )
    else:
        index = main.lines_of["args"]
        edits.append((index, _with_pair(config.lines[index])))
    if not edits and not inserts:
        return text
    for index, edited in edits:
        lines[index] = edited
    for index, added in sorted(inserts, reverse=True):
        lines.insert(index, added)
    return "".join(line for line in lines if line is not None)


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


def _tokens(args: str) -> list[tuple[int, int, str]]:
    """Shell-like words of `args` with their spans; quoted words keep their quotes out."""
    tokens = []
    for match in re.finditer(r"""(?:[^\s'"\\]|\\.|'[^']*'|"(?:[^"\\]|\\.)*")+""", args):
        word = match.group(0)
        plain = word if not re.search(r"['\"\\]", word) else None
        tokens.append((match.start(), match.end(), plain if plain is not None else "\0" + word))
    return tokens


def _find_pair(args: str, pair: tuple[str, str]) -> tuple[int, int] | None:
    """Span of the unquoted token pair in `args` (e.g. `-machine mem-merge=off`), or None."""
    tokens = _tokens(args)
    for (start, _end, first), (_s, end, second) in itertools.pairwise(tokens):
        if (first, second) == pair:
            return start, end
    return None


def _without_pair(line: str, args: str, span: tuple[int, int]) -> str | None:
    """The args line without the pair and one space next to it; None if args ends up empty."""
    start, end = span
    if end < len(args) and args[end] == " ":
        end += 1
    elif start > 0 and args[start - 1] == " ":
        start -= 1
    remaining = args[:start] + args[end:]
    if not remaining.strip():
        return None
    offset = line.index(args, line.index(":") + 1)
    return line[:offset] + remaining + line[offset + len(args) :]


def _with_pair(line: str) -> str:
    body = line.rstrip("\r\n")
    return body + " " + " ".join(MEM_MERGE_OFF) + line[len(body) :]
