"""Safe YAML loading that remembers the source line of every key and list item.

Hostile input is refused early and in linear time:

* the document is composed (libyaml, which limits flow nesting itself) and each composed node
  is converted once: an alias shares the value it points to, as YAML means it, and is never
  expanded. The same pass counts how many nodes the aliases would add, so an alias bomb is
  refused in milliseconds, as are cycles and nesting deeper than any policy needs;
* only plain YAML is read: no tags beyond the standard scalars, no merge keys, no duplicate
  keys; every problem becomes a `Problem` with its line, never an exception;
* YAML 1.1 turns a plain `no` into false, `0101` into 65 and `1_000` into 1000. A mapping key is
  always the text as written, and `Document.written` keeps the written text of every plain
  scalar that YAML read as something other than a string, for values (tags, names) that must
  stay text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from ksmpolicy.errors import Problem

try:  # libyaml is ~10x faster on large policies; the pure-Python loader behaves the same.
    _Base: type[yaml.SafeLoader] = yaml.CSafeLoader  # type: ignore[assignment]
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _Base = yaml.SafeLoader

Path = tuple[str | int, ...]

MAX_ALIAS_NODES = 1_000_000  # nodes that aliases may add beyond the document itself
MAX_DEPTH = 64  # nesting of mappings and lists; a policy needs five

STR = "tag:yaml.org,2002:str"
_SAFE_SCALAR_TAGS = {
    STR,
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:timestamp",
}
# The first characters of plain scalars that YAML 1.1 may read as something else than a string
# (bool, int, float, null, timestamp, merge, value): the resolver's own index, taken once.
_MAYBE_NOT_STR = frozenset(k for k in _Base.yaml_implicit_resolvers if k)
# A resolver for any first character (key None) would make the shortcut wrong: don't take it.
_SHORTCUT = None not in _Base.yaml_implicit_resolvers


class _Loader(_Base):  # type: ignore[valid-type,misc]
    """The safe loader with a fast path for the common case: a plain scalar whose first
    character no implicit resolver looks at is a string (the resolver's own rule, minus a
    Python call per scalar)."""

    def resolve(self, kind: type[yaml.Node], value: Any, implicit: Any) -> str:
        if (
            _SHORTCUT
            and kind is yaml.ScalarNode
            and implicit[0]
            and value
            and value[0] not in _MAYBE_NOT_STR
        ):
            return STR
        return super().resolve(kind, value, implicit)  # type: ignore[no-any-return]


def dotted(path: Path) -> str:
    """`("rules", 0, "action")` -> `rules.0.action`."""
    return ".".join(str(part) for part in path)


@dataclass
class Document:
    """A loaded YAML document: plain values plus the line (1-based) of each path."""

    file: str
    value: Any
    lines: dict[Path, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    # The written text of plain scalars that YAML read as a bool, number, date or null.
    written: dict[Path, str] = field(default_factory=dict)

    def line(self, path: Path) -> int:
        """The line of `path`, or of its nearest ancestor that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)

    def problem(self, path: Path, message: str, *, line: int | None = None) -> None:
        self.problems.append(
            Problem(self.file, self.line(path) if line is None else line, dotted(path), message)
        )

    def text(self, path: Path, value: Any) -> Any:
        """`value` as the user wrote it when it was a plain scalar YAML read as a non-string."""
        return self.written.get(path, value)


def load(text: str, file: str) -> Document:
    """Parse `text`; syntax errors, unsafe tags and duplicate keys become problems, never raise."""
    doc = Document(file, None)
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 1
            what = (exc.problem or exc.context or "invalid YAML").strip()
            doc.problems.append(Problem(file, line, "", f"YAML syntax error: {what}"))
            return doc
        except yaml.reader.ReaderError as exc:
            line = text[: exc.position].count("\n") + 1
            char = exc.character
            code = char if isinstance(char, int) else ord(char[:1] or "?")
            doc.problems.append(
                Problem(file, line, "", f"control character U+{code:04X} is not allowed in YAML")
            )
            return doc
        except yaml.YAMLError as exc:
            doc.problems.append(Problem(file, 1, "", f"YAML error: {str(exc).splitlines()[0]}"))
            return doc
        if node is None:
            return doc
        doc.lines[()] = node.start_mark.line + 1
        converter = _Converter(doc, loader)
        value, expanded = converter.convert(node, (), 1)
        added = expanded - converter.composed
        if converter.refusal is None and added > MAX_ALIAS_NODES:
            converter.refusal = (
                f"YAML aliases expand this document by {added:,} nodes "
                f"(at most {MAX_ALIAS_NODES:,}): an alias bomb?"
            )
        if converter.refusal is not None:
            doc.problems = [Problem(file, node.start_mark.line + 1, "", converter.refusal)]
            return doc
        doc.value = value
    finally:
        loader.dispose()
    return doc


class _Converter:
    """Builds plain values from the composed graph, each node once: where an alias points to
    a node already built, the value is shared (YAML's own meaning of an alias), so converting is
    linear in the composed graph whatever the aliases do. It also counts how many nodes the
    aliases would add if expanded, so that a bomb can be refused, and refuses cycles and depth."""

    def __init__(self, doc: Document, loader: yaml.SafeLoader) -> None:
        self.doc = doc
        self.loader = loader
        self.built: dict[int, tuple[Any, int]] = {}  # node id -> (value, expanded size)
        self.building: set[int] = set()
        self.composed = 0
        self.refusal: str | None = None

    def convert(self, node: yaml.Node, path: Path, depth: int) -> tuple[Any, int]:
        """(value, expanded node count) of `node`."""
        if self.refusal is not None:
            return None, 1
        key = id(node)
        done = self.built.get(key)
        if done is not None:
            return done
        if not isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            self.composed += 1
            value = _scalar(node, path, self.doc, self.loader)
            self.built[key] = (value, 1)
            return value, 1
        if key in self.building:
            self.refusal = "a YAML alias refers to a node that contains it: not a policy"
            return None, 1
        if depth > MAX_DEPTH:
            self.refusal = f"nested deeper than {MAX_DEPTH} levels: not a policy"
            return None, 1
        self.composed += 1
        self.building.add(key)
        if isinstance(node, yaml.MappingNode):
            value, size = self.mapping(node, path, depth)
        else:
            value, size = self.sequence(node, path, depth)
        self.building.discard(key)
        self.built[key] = (value, size)
        return value, size

    def mapping(self, node: yaml.MappingNode, path: Path, depth: int) -> tuple[Any, int]:
        doc = self.doc
        line = node.start_mark.line + 1
        if node.tag != "tag:yaml.org,2002:map":
            doc.problem(path, f"unsupported YAML tag {node.tag}: use plain YAML", line=line)
            return None, 1
        result: dict[Any, Any] = {}
        first_line: dict[Any, int] = {}
        size = 1
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                doc.problem(path, "a key must be a plain string", line=key_line)
                continue
            if key_node.tag == "tag:yaml.org,2002:merge":
                doc.problem(path, "YAML merge keys ('<<') are not supported", line=key_line)
                continue
            if key_node.tag not in _SAFE_SCALAR_TAGS:
                doc.problem(path, f"unsupported YAML tag {key_node.tag}: use plain YAML", line=line)
                continue
            key = key_node.value  # the key as written: `no`, `0101`, `1_000` stay text
            if key in first_line:
                doc.problem(
                    (*path, key),
                    f"duplicate key (first defined at line {first_line[key]})",
                    line=key_line,
                )
                continue
            first_line[key] = key_line
            doc.lines[(*path, key)] = key_line
            result[key], count = self.convert(value_node, (*path, key), depth + 1)
            size += 1 + count
        return result, size

    def sequence(self, node: yaml.SequenceNode, path: Path, depth: int) -> tuple[Any, int]:
        if node.tag != "tag:yaml.org,2002:seq":
            line = node.start_mark.line + 1
            self.doc.problem(path, f"unsupported YAML tag {node.tag}: use plain YAML", line=line)
            return None, 1
        items = []
        size = 1
        for index, item in enumerate(node.value):
            self.doc.lines[(*path, index)] = item.start_mark.line + 1
            value, count = self.convert(item, (*path, index), depth + 1)
            items.append(value)
            size += count
        return items, size


def _scalar(node: yaml.Node, path: Path, doc: Document, loader: yaml.SafeLoader) -> Any:
    if node.tag == STR:
        return node.value
    if node.tag not in _SAFE_SCALAR_TAGS:
        doc.problem(
            path, f"unsupported YAML tag {node.tag}: use plain YAML", line=node.start_mark.line + 1
        )
        return None
    if isinstance(node, yaml.ScalarNode) and not node.style:  # plain: None, or '' from libyaml
        doc.written[path] = node.value
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, OverflowError) as exc:
        # e.g. an integer beyond Python's digit limit, or a date that does not exist
        what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, ValueError) and "int_max_str_digits" in what:
            what = f"a number of {len(node.value)} characters; no setting needs one that long"
        doc.problem(path, f"bad value {_short(node.value)}: {what}", line=node.start_mark.line + 1)
        return None


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")
