"""VM facts written by hand in a YAML list, for `explain --facts` and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ksmpolicy.errors import PolicyError, Problem
from ksmpolicy.policy import yamlsource
from ksmpolicy.policy.decide import MemoryRegion, VmFacts
from ksmpolicy.policy.validate import kind_of

_KEYS = ("name", "uuid", "vmid", "tags", "images", "memory_mib", "hugepages", "shared_memory")


def load_facts(path: str) -> list[VmFacts]:
    """Read a YAML list of VMs, e.g. `- {name: web-1, tags: [web], images: [/img/a.qcow2]}`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError([Problem(path, None, "", "no such file")]) from None
    except OSError as exc:
        raise PolicyError([Problem(path, None, "", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise PolicyError(
            [Problem(path, None, "", f"not valid UTF-8 (byte {exc.start})")]
        ) from None
    doc = yamlsource.load(text, path)
    if not doc.problems and not isinstance(doc.value, list):
        doc.problem((), "expected a list of VMs (lines starting with '- name: ...')")
    vms = []
    for index, item in enumerate(doc.value if isinstance(doc.value, list) else []):
        vm = _facts(item, (index,), doc)
        if vm is not None:
            vms.append(vm)
    if doc.problems:
        raise PolicyError(sorted(doc.problems, key=lambda p: p.line or 0))
    return vms


def _facts(item: Any, path: yamlsource.Path, doc: yamlsource.Document) -> VmFacts | None:
    """One VM, every key checked for its type (each wrong one a FILE:LINE problem)."""
    if not isinstance(item, dict):
        doc.problem(path, "expected a mapping with at least 'name'")
        return None
    for key in item:
        if key not in _KEYS:
            doc.problem((*path, key), f"unknown key (allowed: {', '.join(_KEYS)})")
    field = _Fields(item, path, doc)
    name = field.string("name")
    if name is None:
        if "name" not in item:
            doc.problem(path, "missing 'name'")
        return None
    memory = field.number("memory_mib")
    return VmFacts(
        name=name,
        uuid=field.string("uuid"),
        vmid=field.vmid(),
        tags=frozenset(field.strings("tags")),
        images=field.strings("images"),
        memory_bytes=memory * 1024 * 1024 if memory is not None else None,
        regions=_regions(field.flag("hugepages"), field.flag("shared_memory")),
    )


class _Fields:
    """The keys of one VM, read as their types; a value of another type is a problem at its
    line, never turned into something else (`tags: database` is one tag, not eight)."""

    def __init__(self, item: dict[str, Any], path: yamlsource.Path, doc: yamlsource.Document):
        self.item, self.path, self.doc = item, path, doc

    def _wrong(self, key: str, expected: str, value: Any, where: yamlsource.Path = ()) -> None:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        quoted = " (quote it if you mean the text)" if number and "string" in expected else ""
        self.doc.problem(
            (*self.path, key, *where), f"expected {expected}, got {kind_of(value)}{quoted}"
        )

    def string(self, key: str) -> str | None:
        value = self.item.get(key)
        if value is None or isinstance(value, str):
            return value
        self._wrong(key, "a string", value)
        return None

    def strings(self, key: str) -> tuple[str, ...]:
        """A list of strings; one string is a list of one."""
        value = self.item.get(key)
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list):
            self._wrong(key, "a string or a list of strings", value)
            return ()
        found = []
        for index, entry in enumerate(value):
            if isinstance(entry, str):
                found.append(entry)
            else:
                self._wrong(key, "a string", entry, (index,))
        return tuple(found)

    def number(self, key: str) -> int | None:
        value = self.item.get(key)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        self._wrong(key, "a whole number above 0", value)
        return None

    def flag(self, key: str) -> bool:
        value = self.item.get(key, False)
        if isinstance(value, bool):
            return value
        self._wrong(key, "true or false", value)
        return False

    def vmid(self) -> str | None:
        """A Proxmox VMID: a number as written (`101`), or its digits quoted (`'101'`)."""
        value = self.item.get("vmid")
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return str(value)
        if isinstance(value, str) and value.isascii() and value.isdigit():
            return value
        self._wrong("vmid", "a VMID (a whole number)", value)
        return None


def _regions(hugepages: bool, shared: bool) -> tuple[MemoryRegion, ...]:
    """`hugepages: true` and `shared_memory: true` describe the whole of guest RAM."""
    if not (hugepages or shared):
        return ()
    return (MemoryRegion("ram", hugepages=hugepages, shared=shared),)
