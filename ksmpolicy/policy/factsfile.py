"""VM facts written by hand in a YAML list, for `explain --facts` and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ksmpolicy.errors import PolicyError, Problem
from ksmpolicy.policy import yamlsource
from ksmpolicy.policy.decide import MemoryRegion, VmFacts

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
        raise PolicyError(doc.problems)
    return vms


def _facts(item: Any, path: yamlsource.Path, doc: yamlsource.Document) -> VmFacts | None:
    if not isinstance(item, dict):
        doc.problem(path, "expected a mapping with at least 'name'")
        return None
    for key in item:
        if key not in _KEYS:
            doc.problem((*path, key), f"unknown key (allowed: {', '.join(_KEYS)})")
    if not isinstance(item.get("name"), str):
        doc.problem((*path, "name"), "missing or not a string")
        return None
    memory = item.get("memory_mib")
    return VmFacts(
        name=item["name"],
        uuid=_opt_str(item.get("uuid")),
        vmid=_opt_str(item.get("vmid")),
        tags=frozenset(str(t) for t in item.get("tags") or ()),
        images=tuple(str(i) for i in item.get("images") or ()),
        memory_bytes=int(memory) * 1024 * 1024 if isinstance(memory, int) else None,
        regions=_regions(item.get("hugepages") is True, item.get("shared_memory") is True),
    )


def _regions(hugepages: bool, shared: bool) -> tuple[MemoryRegion, ...]:
    """`hugepages: true` and `shared_memory: true` describe the whole of guest RAM."""
    if not (hugepages or shared):
        return ()
    return (MemoryRegion("ram", hugepages=hugepages, shared=shared),)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)
