"""Safe YAML loading that remembers the source line of every key and list item."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from ksmpolicy.errors import Problem

try:  # libyaml is ~10x faster on large policies; the pure-Python loader behaves the same.
    _Loader: type[yaml.SafeLoader] = yaml.CSafeLoader  # type: ignore[assignment]
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _Loader = yaml.SafeLoader

Path = tuple[str | int, ...]

# Aliases may point at the same node many times ("billion laughs"); cap the expanded size.
MAX_NODES = 2_000_000

_SAFE_SCALAR_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:timestamp",
}


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


def load(text: str, file: str) -> Document:
    """Parse `text`; syntax errors, unsafe tags and duplicate keys become problems, never raise."""
    doc = Document(file, None)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        what = exc.problem or exc.context or "invalid YAML"
        doc.problems.append(Problem(file, line, "", f"YAML syntax error: {what}"))
        return doc
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or "?")
        doc.problems.append(
            Problem(file, line, "", f"control character U+{code:04X} is not allowed in YAML")
        )
        return doc
    except yaml.YAMLError as exc:
        doc.problems.append(Problem(file, 1, "", f"YAML error: {str(exc).splitlines()[0]}"))
        return doc
    try:
        if node is not None:
            doc.lines[()] = node.start_mark.line + 1
            doc.value = _convert(node, (), doc, loader, [MAX_NODES])
    finally:
        loader.dispose()
    return doc


def _convert(
    node: yaml.Node, path: Path, doc: Document, loader: yaml.SafeLoader, budget: list[int]
) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        if budget[0] == -1:
            doc.problem(path, f"document expands to more than {MAX_NODES} nodes (alias bomb?)")
        return None
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        if node.tag != "tag:yaml.org,2002:map":
            doc.problem(path, f"unsupported YAML tag {node.tag}: use plain YAML", line=line)
            return None
        result: dict[Any, Any] = {}
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                doc.problem(path, "a key must be a plain string", line=key_line)
                continue
            if key_node.tag == "tag:yaml.org,2002:merge":
                doc.problem(path, "YAML merge keys ('<<') are not supported", line=key_line)
                continue
            key = _scalar(key_node, path, doc, loader)
            if isinstance(key, int | float | bool) or key is None:
                key = str(key) if not isinstance(key, bool) else str(key).lower()
            if key in first_line:
                doc.problem(
                    (*path, key),
                    f"duplicate key (first defined at line {first_line[key]})",
                    line=key_line,
                )
                continue
            first_line[key] = key_line
            doc.lines[(*path, key)] = key_line
            result[key] = _convert(value_node, (*path, key), doc, loader, budget)
        return result
    if isinstance(node, yaml.SequenceNode):
        if node.tag != "tag:yaml.org,2002:seq":
            doc.problem(path, f"unsupported YAML tag {node.tag}: use plain YAML", line=line)
            return None
        items = []
        for index, item in enumerate(node.value):
            doc.lines[(*path, index)] = item.start_mark.line + 1
            items.append(_convert(item, (*path, index), doc, loader, budget))
        return items
    return _scalar(node, path, doc, loader)


def _scalar(node: yaml.Node, path: Path, doc: Document, loader: yaml.SafeLoader) -> Any:
    if node.tag not in _SAFE_SCALAR_TAGS:
        doc.problem(
            path, f"unsupported YAML tag {node.tag}: use plain YAML", line=node.start_mark.line + 1
        )
        return None
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        doc.problem(path, f"bad value: {exc}", line=node.start_mark.line + 1)
        return None
