"""Validation of the policy YAML: every key checked, every problem reported with its line."""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable
from typing import Any, TypeVar

from ksmpolicy.errors import PolicyError, Problem
from ksmpolicy.policy import identity, yamlsource
from ksmpolicy.policy.decide import gc_paused
from ksmpolicy.policy.model import (
    DEFAULT_DOMAIN,
    NAME,
    NAME_RULE,
    RESERVED_DOMAINS,
    SUPPORTED_VERSION,
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
    valid_qemu_server_version,
)
from ksmpolicy.policy.yamlsource import Document
from ksmpolicy.policy.yamlsource import Path as KeyPath


def parse(text: str, file: str = "<policy>") -> Policy:
    """Validate policy text; raise PolicyError listing every problem found, in line order."""
    with gc_paused():
        return _parse(text, file)


def _parse(text: str, file: str) -> Policy:
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        raise PolicyError([Problem(file, line, "", "contains a NUL byte: not a text file")])
    doc = yamlsource.load(text, file)
    policy = _Validator(doc).policy() if not doc.problems or doc.value is not None else None
    if doc.problems or policy is None:
        # The first problem of a key says what is wrong; a second (a value YAML could not read
        # is then also "not a number") would only repeat it.
        first: dict[tuple[int | None, str], Problem] = {}
        for problem in doc.problems:
            first.setdefault((problem.line, problem.key), problem)
        problems = sorted(first.values(), key=lambda p: p.line or 0)
        raise PolicyError(problems or [Problem(file, 1, "", "invalid policy")])
    return policy


def enforcement_in(text: str) -> Enforcement | None:
    """The enforcement a policy's text asks for, read as the validator reads it, even when the
    rest of the file is invalid; None when it does not say or cannot be read. For the hooks'
    fallback when no policy can be used (the file broken, and no last good one)."""
    text = text.removeprefix("\ufeff")
    doc = yamlsource.load(text, "<policy>")
    if isinstance(doc.value, dict):
        return _choice(doc.value.get("enforcement"), Enforcement)
    if doc.value is not None:
        return None
    # Not even YAML: the top-level line, with the quoting and case YAML and the validator allow.
    for line in text.splitlines():
        found = _ENFORCEMENT_LINE.match(line)
        if found:
            return _choice(found.group("value"), Enforcement)
    return None


_ENFORCEMENT_LINE = re.compile(
    r"""^(?P<q>["']?)enforcement(?P=q)[ \t]*:[ \t]*(?P<v>["']?)(?P<value>[^"'#\s]*)(?P=v)"""
    r"""[ \t]*(?:#.*)?$"""
)


def _choice(value: Any, kind: type[E]) -> E | None:
    """The member a policy value names, as the validator accepts it (any case; a bare YAML
    `off`, which YAML 1.1 reads as false, is "off"), or None."""
    if value is False and "off" in {m.value for m in kind}:
        value = "off"
    if isinstance(value, str):
        for member in kind:
            if member.value == value.lower():
                return member
    return None


_TOP_KEYS = (
    "version",
    "enforcement",
    "live",
    "default",
    "groups",
    "rules",
    "vms",
    "reconciler",
    "proxmox",
    "domains",
    "isolation",
    "identity",
)
_RULE_KEYS = ("name", "match", "action", "description")
_MATCH_KEYS = ("names", "tags", "groups", "images", "domains", "kinds", "units")
KINDS = ("qemu", "firecracker", "cloud-hypervisor", "crosvm", "kata", "service", "process")
_GROUP_KEYS = ("images", "tags", "names", "domain", "description")
_VM_KEYS = ("tags", "domain", "description")
_DOMAIN_KEYS = ("priority", "nodes", "description")
_ISOLATION_LIMITS = {
    "unmerge_reserve_mib": (0.0, 2.0**30),
    "stickiness_percent": (0.0, 1000.0),
    "min_hold_seconds": (0.0, 7 * 86400.0),
    "audit_interval_seconds": (10.0, 86400.0),
}
_ISOLATION_KEYS = (*_ISOLATION_LIMITS, "merge_across_nodes")
_MAX_NODE = 1023  # the kernel's MAX_NUMNODES is at most 1024
_RECONCILER_LIMITS = {
    "interval_seconds": (0.1, 3600.0),
    "target_scan_seconds": (1.0, 86400.0),
    "max_ksmd_cpu_percent": (0.1, 100.0),
    "memory_pressure_percent": (0.0, 100.0),
}
_RECONCILER_KEYS = (*_RECONCILER_LIMITS, "kernel_advisor", "use_zero_pages")
_TAG_FORBIDDEN = set(" \t\r\n;,")

E = TypeVar("E", Action, Enforcement)


class _Validator:
    """Walks the loaded document once and records every problem instead of stopping."""

    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.written: dict[str, str] = {}  # `vms:` keys: canonical -> as the file writes it

    def policy(self) -> Policy | None:
        doc = self.doc
        if doc.value is None:
            doc.problem((), "policy is empty: start it with 'version: 1' (see policies/)")
            return None
        top = self.mapping(doc.value, (), _TOP_KEYS)
        if top is None:
            return None
        if "version" not in top:
            doc.problem(("version",), "missing: add 'version: 1' as the first line", line=1)
        elif top["version"] != SUPPORTED_VERSION or isinstance(top["version"], bool):
            doc.problem(
                ("version",),
                f"unsupported version {top['version']!r}: this ksmpolicy reads version 1",
            )
        domains = self.domains(top.get("domains"))
        known = [DEFAULT_DOMAIN, *(d.name for d in domains)]
        groups = self.groups(top.get("groups"), known)
        group_names = [g.name for g in groups]
        rules = self.rules(top.get("rules"), group_names, known)
        vms, vm_domains = self.vms(top.get("vms"), known)
        settings = self.identity(top.get("identity"))
        self.tenant_bindings(settings, groups, vms, vm_domains)
        return Policy(
            enforcement=self.enum(top, "enforcement", Enforcement, Enforcement.WARN),
            live=self.boolean(top, "live", default=True),
            default=self.enum(top, "default", Action, Action.MERGE),
            groups=tuple(groups),
            rules=tuple(rules),
            vms=vms,
            reconciler=self.reconciler(top.get("reconciler")),
            proxmox=self.proxmox(top.get("proxmox")),
            source=doc.file,
            domains=tuple(domains),
            vm_domains=vm_domains,
            isolation=self.isolation(top.get("isolation")),
            identity=settings,
        )

    # --- sections

    def domains(self, value: Any) -> list[Domain]:
        section = self.mapping(value, ("domains",), None) if value is not None else None
        result = []
        for name, body in (section or {}).items():
            path: KeyPath = ("domains", name)
            if not NAME.fullmatch(str(name)):
                self.doc.problem(path, f"a domain name is {NAME_RULE}")
                continue
            if name in RESERVED_DOMAINS:
                self.doc.problem(
                    path,
                    f"{name!r} is ksmpolicy's own ({DEFAULT_DOMAIN!r}: VMs the policy puts in no "
                    "domain; 'host': processes that are no VM): choose another name",
                )
                continue
            spec = self.mapping(body if body is not None else {}, path, _DOMAIN_KEYS)
            if spec is None:
                continue
            priority = 0
            if "priority" in spec:
                number = self.number(spec["priority"], (*path, "priority"), -1000, 1000)
                if number is not None and number != int(number):
                    self.doc.problem((*path, "priority"), f"expected a whole number, got {number}")
                priority = int(number) if number is not None else 0
            nodes = self.nodes(spec, (*path, "nodes"))
            result.append(Domain(str(name), priority, nodes, self.doc.line(path)))
        return result

    def nodes(self, spec: dict[str, Any], path: KeyPath) -> tuple[int, ...]:
        if path[-1] not in spec:
            return ()
        value = spec[path[-1]]
        items = value if isinstance(value, list) else [value]
        found = []
        for index, item in enumerate(items):
            item_path = (*path, index) if isinstance(value, list) else path
            if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= _MAX_NODE:
                self.doc.problem(
                    item_path, f"expected a NUMA node number (0-{_MAX_NODE}), got {item!r}"
                )
                continue
            found.append(item)
        if isinstance(value, list) and not value:
            self.doc.problem(path, "empty list: remove the key or name the nodes")
        return tuple(sorted(set(found)))

    def domain_name(self, spec: dict[str, Any], path: KeyPath, known: list[str]) -> str | None:
        if "domain" not in spec:
            return None
        value = self.doc.text((*path, "domain"), spec["domain"])
        if not isinstance(value, str) or value not in known:
            hint = _did_you_mean(value, known) if isinstance(value, str) else ""
            self.doc.problem(
                (*path, "domain"),
                f"domain {value!r} is not declared under 'domains:'{hint}",
            )
            return None
        return value

    def groups(self, value: Any, domains: list[str]) -> list[Group]:
        section = self.mapping(value, ("groups",), None) if value is not None else None
        result = []
        for name, body in (section or {}).items():
            path: KeyPath = ("groups", name)
            if not NAME.fullmatch(str(name)):
                self.doc.problem(path, f"a group name is {NAME_RULE}")
                continue
            spec = self.mapping(body, path, _GROUP_KEYS)
            if spec is None:
                continue
            group = Group(
                name=str(name),
                images=self.globs(spec, (*path, "images"), _check_image_glob),
                tags=self.tags(spec, (*path, "tags")),
                names=self.globs(spec, (*path, "names"), _check_name_glob),
                domain=self.domain_name(spec, path, domains),
            )
            if not (group.images or group.tags or group.names):
                self.doc.problem(path, "a group needs at least one of: images, tags, names")
            result.append(group)
        return result

    def rules(self, value: Any, group_names: list[str], domains: list[str]) -> list[Rule]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.doc.problem(("rules",), f"expected a list of rules, got {kind_of(value)}")
            return []
        result = []
        seen: dict[str, int] = {}
        for index, body in enumerate(value):
            path: KeyPath = ("rules", index)
            spec = self.mapping(body, path, _RULE_KEYS)
            if spec is None:
                continue
            line = self.doc.line(path)
            name = spec.get("name", f"rules.{index}")
            if not isinstance(name, str) or not name:
                self.doc.problem((*path, "name"), "expected a non-empty string")
                name = f"rules.{index}"
            elif name in seen:
                self.doc.problem(
                    (*path, "name"), f"duplicate rule name (first used at line {seen[name]})"
                )
            seen[name] = line
            if "action" not in spec:
                self.doc.problem(path, "missing 'action': add 'action: exclude' or 'action: merge'")
            action = self.enum(spec, "action", Action, Action.MERGE, path=path)
            match = self.match(spec, (*path, "match"), group_names, domains)
            result.append(Rule(name=name, match=match, action=action, line=line))
        return result

    def match(
        self, rule: dict[str, Any], path: KeyPath, group_names: list[str], domains: list[str]
    ) -> Match:
        if "match" not in rule:
            self.doc.problem(
                path[:-1],
                "missing 'match': say which VMs the rule is for (names, tags, groups, images, "
                "domains, kinds, units); "
                "use 'default:' for all others",
            )
            return Match()
        spec = self.mapping(rule["match"], path, _MATCH_KEYS)
        if spec is None:
            return Match()
        match = Match(
            names=self.globs(spec, (*path, "names"), _check_name_glob),
            tags=self.tags(spec, (*path, "tags")),
            groups=self.strings(spec, (*path, "groups")),
            images=self.globs(spec, (*path, "images"), _check_image_glob),
            domains=self.strings(spec, (*path, "domains")),
            kinds=self.strings(spec, (*path, "kinds")),
            units=self.globs(spec, (*path, "units"), _check_name_glob),
        )
        for index, kind in enumerate(match.kinds):
            if kind not in KINDS:
                self.doc.problem(
                    (*path, "kinds", index),
                    f"unknown kind {kind!r}{_did_you_mean(kind, list(KINDS))}: one of "
                    + ", ".join(KINDS),
                )
        for index, domain in enumerate(match.domains):
            if domain not in domains:
                hint = _did_you_mean(domain, domains)
                self.doc.problem(
                    (*path, "domains", index),
                    f"domain {domain!r} is not declared under 'domains:'{hint}",
                )
        for index, group in enumerate(match.groups):
            if group not in group_names:
                hint = _did_you_mean(group, group_names)
                self.doc.problem(
                    (*path, "groups", index),
                    f"group {group!r} is not defined under 'groups:'{hint}",
                )
        if not spec:
            self.doc.problem(path, "empty match would match every VM: use 'default:' for that")
        return match

    def vms(
        self, value: Any, domains: list[str]
    ) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
        """Entries by typed identity (policy/identity.py): `uuid:…`, `vmid:…`, `name:…`."""
        section = self.mapping(value, ("vms",), None) if value is not None else None
        tags: dict[str, tuple[str, ...]] = {}
        in_domain: dict[str, str] = {}
        first: dict[str, KeyPath] = {}
        for key, body in (section or {}).items():
            path: KeyPath = ("vms", key)
            spec = self.mapping(body, path, _VM_KEYS)
            if spec is None:
                continue
            if "tags" not in spec and "domain" not in spec:
                self.doc.problem(path, "missing 'tags' or 'domain': say what the entry gives")
            parsed = identity.parse_key(str(key))  # the key as written (`no`, `0101` as text)
            if isinstance(parsed, str):
                self.doc.problem(path, parsed)
                continue
            _kind, vm_key = parsed
            if vm_key in first:
                self.doc.problem(
                    path,
                    f"names the same VM as the entry at line {self.doc.line(first[vm_key])} "
                    f"({vm_key}): merge the two",
                )
                continue
            first[vm_key] = path
            self.written[vm_key] = str(key)
            if "tags" in spec:
                tags[vm_key] = self.tags(spec, (*path, "tags"))
            domain = self.domain_name(spec, path, domains)
            if domain is not None:
                in_domain[vm_key] = domain
        return tags, in_domain

    def identity(self, value: Any) -> IdentitySettings:
        if value is None:
            return IdentitySettings()
        spec = self.mapping(value, ("identity",), ("tenant_controlled",))
        if spec is None or "tenant_controlled" not in spec:
            return IdentitySettings()
        path: KeyPath = ("identity", "tenant_controlled")
        fields = list(identity.ALWAYS_TENANT_CONTROLLED)
        for index, item in enumerate(self.strings(spec, path)):
            if item not in identity.FIELDS:
                hint = _did_you_mean(item, identity.FIELDS)
                allowed = ", ".join(identity.FIELDS)
                self.doc.problem((*path, index), f"unknown field {item!r}{hint}: one of {allowed}")
            elif item not in fields:
                fields.append(item)
        return IdentitySettings(tuple(fields))

    def tenant_bindings(
        self,
        settings: IdentitySettings,
        groups: list[Group],
        tags: dict[str, tuple[str, ...]],
        in_domain: dict[str, str],
    ) -> None:
        """Refuse every trust-domain binding that rests on a field tenants control here."""
        found = identity.tenant_bindings(settings.tenant_controlled, groups, tags, in_domain)
        for section, name, key, message in found:
            written = self.written.get(name, name) if section == "vms" else name
            self.doc.problem((section, written, key), message)

    def reconciler(self, value: Any) -> ReconcilerSettings:
        if value is None:
            return ReconcilerSettings()
        spec = self.mapping(value, ("reconciler",), _RECONCILER_KEYS)
        if spec is None:
            return ReconcilerSettings()
        numbers = {}
        for key, (low, high) in _RECONCILER_LIMITS.items():
            if key in spec:
                number = self.number(spec[key], ("reconciler", key), low, high)
                if number is not None:
                    numbers[key] = number
        advisor = self.boolean(spec, "kernel_advisor", default=False, path=("reconciler",))
        zero = self.boolean(spec, "use_zero_pages", default=True, path=("reconciler",))
        return ReconcilerSettings(**numbers, kernel_advisor=advisor, use_zero_pages=zero)

    def isolation(self, value: Any) -> IsolationSettings:
        if value is None:
            return IsolationSettings()
        spec = self.mapping(value, ("isolation",), _ISOLATION_KEYS)
        if spec is None:
            return IsolationSettings()
        numbers = {}
        for key, (low, high) in _ISOLATION_LIMITS.items():
            if key in spec:
                number = self.number(spec[key], ("isolation", key), low, high)
                if number is not None:
                    numbers[key] = number
        across = None
        if "merge_across_nodes" in spec:
            across = self.boolean(spec, "merge_across_nodes", default=True, path=("isolation",))
        return IsolationSettings(merge_across_nodes=across, **numbers)

    def proxmox(self, value: Any) -> ProxmoxSettings:
        if value is None:
            return ProxmoxSettings()
        spec = self.mapping(value, ("proxmox",), ("qemu_server_version",))
        if spec is None or "qemu_server_version" not in spec:
            return ProxmoxSettings()
        version = self.doc.text(("proxmox", "qemu_server_version"), spec["qemu_server_version"])
        text = version if isinstance(version, str) else ""
        if isinstance(version, bool) or not valid_qemu_server_version(text):
            self.doc.problem(
                ("proxmox", "qemu_server_version"),
                f"expected a version like 8.4.1 (quote it), got {version!r}",
            )
            return ProxmoxSettings()
        return ProxmoxSettings(text)

    # --- typed getters: each records a problem and returns a safe value on bad input

    def mapping(
        self, value: Any, path: KeyPath, known: tuple[str, ...] | None
    ) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.doc.problem(path, f"expected a mapping (key: value lines), got {kind_of(value)}")
            return None
        if known is not None:
            for key in value:
                if key not in known:
                    hint = _did_you_mean(key, known)
                    allowed = "" if hint else f" (allowed: {', '.join(known)})"
                    self.doc.problem((*path, key), f"unknown key{hint}{allowed}")
            return {k: v for k, v in value.items() if k in known}
        return value

    def enum(
        self,
        spec: dict[str, Any],
        key: str,
        kind: type[E],
        default: E,
        *,
        path: KeyPath = (),
    ) -> E:
        if key not in spec:
            return default
        value = spec[key]
        member = _choice(value, kind)
        if member is not None:
            return member
        choices = [m.value for m in kind]
        hint = _did_you_mean(value, choices) if isinstance(value, str) else ""
        self.doc.problem((*path, key), f"expected one of {', '.join(choices)}, got {value!r}{hint}")
        return default

    def boolean(self, spec: dict[str, Any], key: str, *, default: bool, path: KeyPath = ()) -> bool:
        value = spec.get(key, default)
        if isinstance(value, bool):
            return value
        self.doc.problem((*path, key), f"expected true or false, got {value!r}")
        return default

    def number(self, value: Any, path: KeyPath, low: float, high: float) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.doc.problem(path, f"expected a number, got {kind_of(value)}")
            return None
        if not low <= value <= high:
            self.doc.problem(path, f"{value} is out of range: use {low:g} to {high:g}")
            return None
        return float(value)

    def strings(self, spec: dict[str, Any], path: KeyPath) -> tuple[str, ...]:
        """A list of strings; a single string counts as a list of one."""
        if path[-1] not in spec:
            return ()
        value = spec[path[-1]]
        items = value if isinstance(value, list) else [value]
        if not isinstance(items, list):
            self.doc.problem(path, f"expected a list of strings, got {kind_of(value)}")
            return ()
        if not items:
            self.doc.problem(path, "empty list matches nothing: remove the key or add items")
        result = []
        for index, found in enumerate(items):
            item_path = (*path, index) if isinstance(value, list) else path
            item = self.doc.text(item_path, found)  # `no`, `0101`: the text as written
            if not isinstance(item, str):
                self.doc.problem(item_path, f"expected a string, got {kind_of(item)}")
                continue
            result.append(item)
        return tuple(result)

    def tags(self, spec: dict[str, Any], path: KeyPath) -> tuple[str, ...]:
        tags = self.strings(spec, path)
        for index, tag in enumerate(tags):
            bad = sorted(set(tag) & _TAG_FORBIDDEN)
            if not tag or bad:
                what = "is empty" if not tag else f"contains {''.join(bad)!r}"
                self.doc.problem((*path, index), f"tag {tag!r} {what}: no VM can carry such a tag")
        return tuple(tag.lower() for tag in tags)

    def globs(
        self, spec: dict[str, Any], path: KeyPath, check: Callable[[str], str | None]
    ) -> tuple[str, ...]:
        patterns = self.strings(spec, path)
        for index, pattern in enumerate(patterns):
            why = _never_matches(pattern) or check(pattern)
            if why:
                self.doc.problem((*path, index), f"glob {pattern!r} can never match: {why}")
        return patterns


def _never_matches(pattern: str) -> str | None:
    if not pattern:
        return "it is empty"
    if "\n" in pattern or "\0" in pattern:
        return "it contains a newline or NUL"
    if "(?!)" in fnmatch.translate(pattern):
        return "a character range like [z-a] is empty"
    return None


def _check_name_glob(pattern: str) -> str | None:
    if "/" in pattern:
        return "VM names never contain '/'"
    return None


def _check_image_glob(pattern: str) -> str | None:
    if pattern.startswith(("/", "*", "?", "[")) or ":" in pattern:
        return None
    return (
        "images are absolute paths (libvirt) or STORAGE:VOLUME ids (Proxmox); "
        f"did you mean '*/{pattern}'?"
    )


def _did_you_mean(word: object, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def kind_of(value: Any) -> str:
    """What a YAML value is, for an error message: "a list", "a string ('x')", ..."""
    if value is None:
        return "nothing"
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a list"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    noun = "string" if isinstance(value, str) else type(value).__name__
    return f"a {noun} ({value!r})"
