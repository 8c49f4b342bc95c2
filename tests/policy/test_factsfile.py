"""`explain --facts`: every key read as its type; a value of another type is a FILE:LINE
problem naming the key, never turned into something else."""

from __future__ import annotations

from pathlib import Path

import pytest

from ksmpolicy.cli.main import main
from ksmpolicy.errors import PolicyError
from ksmpolicy.policy.factsfile import load_facts


def facts_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "vms.yaml"
    path.write_text(text)
    return str(path)


def test_one_string_is_one_tag_or_image(tmp_path: Path) -> None:
    (vm,) = load_facts(
        facts_file(tmp_path, "- name: pg\n  tags: database\n  images: /img/a.qcow2\n  vmid: 101\n")
    )
    assert vm.tags == frozenset({"database"})
    assert vm.images == ("/img/a.qcow2",)
    assert vm.vmid == "101"


@pytest.mark.parametrize(
    ("line", "key", "message"),
    [
        ("tags: 5", "0.tags", "expected a string or a list of strings, got a number (5)"),
        ("tags: [web, 5]", "0.tags.1", "expected a string, got a number (5)"),
        ("tags: {a: b}", "0.tags", "expected a string or a list of strings, got a mapping"),
        ("images: [[/a]]", "0.images.0", "expected a string, got a list"),
        ("uuid: 5", "0.uuid", "expected a string, got a number (5)"),
        ("vmid: web", "0.vmid", "expected a VMID (a whole number), got a string ('web')"),
        ("vmid: true", "0.vmid", "expected a VMID (a whole number), got a boolean (true)"),
        ("memory_mib: true", "0.memory_mib", "expected a whole number above 0, got a boolean"),
        ("memory_mib: '2048'", "0.memory_mib", "expected a whole number above 0, got a string"),
        ("memory_mib: 0", "0.memory_mib", "expected a whole number above 0, got a number (0)"),
        ("hugepages: 'true'", "0.hugepages", "expected true or false, got a string ('true')"),
        ("shared_memory: 1", "0.shared_memory", "expected true or false, got a number (1)"),
    ],
)
def test_a_value_of_the_wrong_type_is_a_problem_at_its_line(
    tmp_path: Path, line: str, key: str, message: str
) -> None:
    path = facts_file(tmp_path, f"- name: web-1\n  {line}\n")
    with pytest.raises(PolicyError) as caught:
        load_facts(path)
    (problem,) = caught.value.problems
    assert (problem.line, problem.key) == (2, key)
    assert problem.message.startswith(message), problem.message


def test_a_name_that_is_no_string_is_said(tmp_path: Path) -> None:
    path = facts_file(tmp_path, "- name: 42\n- tags: [web]\n")
    with pytest.raises(PolicyError) as caught:
        load_facts(path)
    assert [str(p) for p in caught.value.problems] == [
        f"{path}:1: 0.name: expected a string, got a number (42) (quote it if you mean the text)",
        f"{path}:2: 1: missing 'name'",
    ]


def test_explain_facts_says_file_line_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = facts_file(tmp_path, "- name: web-1\n  tags: [web]\n- name: db\n  tags: 5\n")
    assert main(["explain", "--facts", path]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"{path}:4: 1.tags: expected a string or a list of strings, got a number (5) "
        "(quote it if you mean the text)\n"
    )
