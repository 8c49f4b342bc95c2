"""The package's shape: no import circles, modules of a readable size, a light hook path, and
nothing but what users run in what they install."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "ksmpolicy"
MAX_LINES = 600
MAX_CLI_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def imports_of(name: str) -> set[str]:
    """ksmpolicy modules that `name` imports at run time, at module level or inside functions
    (the hook's lazy imports count); imports only for type checkers do not."""
    return {m for m in runtime_imports(name) if m in MODULES and m != name}


def runtime_imports(name: str) -> set[str]:
    """Every module `name` imports at run time (ksmpolicy's or not)."""
    tree = ast.parse(MODULES[name].read_text())
    found: set[str] = set()
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if _type_checking_block(node):
            skipped |= {id(child) for child in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return found


def test_the_import_reader_sees_lazy_imports_and_skips_type_only_ones() -> None:
    hook = imports_of("ksmpolicy.libvirt.hook")
    assert "ksmpolicy.hookcore" in hook  # module level
    assert "ksmpolicy.libvirt.images" in hook  # inside a method
    assert "ksmpolicy.policy.decide" in hook  # inside a method, not only for types
    assert "ksmpolicy.policy.model" not in hook  # for types only
    assert "ksmpolicy.cli.main" not in hook
    assert imports_of("ksmpolicy.cli.main") >= {"ksmpolicy.cli.policy", "ksmpolicy.cli.common"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package() -> None:
    graph = {name: imports_of(name) for name in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_readable(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    limit = MAX_CLI_LINES if name.startswith("ksmpolicy.cli.") else MAX_LINES
    assert lines <= limit, f"{name} has {lines} lines (at most {limit})"


def test_every_part_has_its_folder() -> None:
    parts = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert parts == {
        "policy",
        "libvirt",
        "proxmox",
        "kernel",
        "runtime",
        "trust",
        "platforms",
        "inventory",
        "control",
        "report",
        "placement",
        "cli",
    }


def test_libvirt_is_imported_only_by_its_adapter() -> None:
    users = {
        name
        for name, path in MODULES.items()
        if any(
            isinstance(node, ast.Import) and any(a.name == "libvirt" for a in node.names)
            for node in ast.walk(ast.parse(path.read_text()))
        )
    }
    assert users == {"ksmpolicy.libvirt.host"}


HOST_ROOTS = ("/etc/", "/run/", "/var/", "/sys/", "/proc/", "/dev/", "/usr/", "/lib/", "/opt/")


def test_host_paths_are_spelled_in_paths_py_only() -> None:
    """Every host path is a HostPaths property (one injectable root, tests point it at a tree):
    a string constant that is an absolute host path anywhere else is a path that ignores it.
    Docstrings and messages may name paths: only constants that are whole paths count."""
    spelled = []
    for name, path in MODULES.items():
        if name == "ksmpolicy.paths":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and node.value.startswith(HOST_ROOTS)
                and " " not in node.value
            ):
                spelled.append(f"{name}:{node.lineno}: {node.value}")
    assert not spelled, spelled


def test_the_fake_guest_is_not_in_the_package() -> None:
    assert not list(PACKAGE.rglob("simguest*"))
    assert (REPO / "lab/simguest.py").exists()
    users = {
        name
        for name in MODULES
        if {m.split(".")[0] for m in runtime_imports(name)} & {"lab", "tests", "bench", "demo"}
    }
    assert not users, f"the package imports test equipment: {sorted(users)}"
    assert "lab.simguest" in runtime_imports_of_file(REPO / "tests/kernel/test_scan.py")


def runtime_imports_of_file(path: Path) -> set[str]:
    return {
        node.module
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module
    }


# --- the hook's imports ------------------------------------------------------------------------

# What `prepare begin` needs on a cached policy. Anything new here costs every VM start.
HOOK_MODULES = {
    "ksmpolicy",
    "ksmpolicy.hook",
    "ksmpolicy.hookcore",
    "ksmpolicy.quoting",
    "ksmpolicy.records",
    "ksmpolicy.errors",
    "ksmpolicy.paths",
    "ksmpolicy.files",
    "ksmpolicy.deadline",
    "ksmpolicy.policy",
    "ksmpolicy.policy.model",
    "ksmpolicy.policy.load",
    "ksmpolicy.policy.decide",
    "ksmpolicy.policy.identity",
    "ksmpolicy.libvirt",
    "ksmpolicy.libvirt.hook",
    "ksmpolicy.libvirt.domain",
    "ksmpolicy.libvirt.images",
}
# Costly modules the hook must never load (measured: each costs milliseconds).
HEAVY = {"yaml", "pathlib", "json", "logging", "dataclasses", "inspect", "typing", "socket"}
HEAVY |= {"subprocess", "tempfile", "click", "threading", "shlex", "asyncio", "libvirt"}


def hook_imports(tmp_path: Path, operation: str) -> set[str]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nenforcement: block\nrules:\n- {match: {tags: [db]}, action: exclude}\n"
    )
    policy.chmod(0o644)
    xml = (REPO / "tests/data/libvirt/ksm-tagged-database.xml").read_bytes()
    # The hook's work runs in a forked child whose stderr is /dev/null: here the child keeps
    # the parent's stderr (os.dup2 onto fd 2 is skipped), so that its imports are listed too.
    keep_stderr = (
        "import os, runpy; dup2 = os.dup2; "
        "os.dup2 = lambda a, b, *k: None if b == 2 else dup2(a, b, *k); "
        "runpy.run_module('ksmpolicy.hook', run_name='__main__', alter_sys=True)"
    )
    argv = [sys.executable, "-X", "importtime", "-I", "-c", keep_stderr]
    argv += ["--policy", str(policy), "--run-dir", str(tmp_path / "run")]
    argv += ["libvirt", "vm", *operation.split(), "-"]
    for _ in range(2):  # the first run compiles the policy cache; the second is the usual one
        result = subprocess.run(argv, input=xml, capture_output=True, timeout=20, check=False)
    lines = result.stderr.decode().splitlines()
    return {
        line.split("|")[-1].strip()
        for line in lines
        if line.startswith("import time:") and "imported package" not in line
    }


def test_prepare_begin_imports_only_what_it_needs(tmp_path: Path) -> None:
    loaded = hook_imports(tmp_path, "prepare begin")
    ours = {m for m in loaded if m.split(".")[0] == "ksmpolicy"}
    assert "ksmpolicy.libvirt.domain" in ours  # the reader works: the XML was parsed
    assert ours <= HOOK_MODULES, f"new on the hook path: {sorted(ours - HOOK_MODULES)}"
    assert not loaded & HEAVY, f"heavy imports on the hook path: {sorted(loaded & HEAVY)}"


def test_a_note_imports_no_policy(tmp_path: Path) -> None:
    loaded = hook_imports(tmp_path, "started begin")
    assert "ksmpolicy.runtime.notify" in loaded
    assert not {m for m in loaded if m.startswith(("ksmpolicy.policy", "ksmpolicy.libvirt."))} - {
        "ksmpolicy.libvirt.hook"
    }
    assert not loaded & HEAVY


# The package's parts in the order they may import each other: each imports only parts before
# it (docs/architecture.md's table, with the shared modules first). A new folder or top-level
# module must be placed here.
LAYERS = (
    "ksmpolicy",  # __init__: the version
    "records",
    "quoting",
    "deadline",
    "errors",
    "paths",
    "files",
    "hookshim",
    "policy",
    "kernel",
    "runtime",
    "trust",
    "hookcore",
    "apply",
    "platforms",
    "libvirt",
    "proxmox",
    "hook",
    "inventory",
    "report",
    "placement",
    "control",
    "cli",
    "__main__",
)


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_parts_import_only_the_parts_before_them() -> None:
    assert {part_of(m) for m in MODULES} == set(LAYERS)
    rank = {part: i for i, part in enumerate(LAYERS)}
    wrong = sorted(
        f"{module} imports {imported}"
        for module in MODULES
        for imported in imports_of(module)
        if rank[part_of(imported)] > rank[part_of(module)]
    )
    assert not wrong, wrong
