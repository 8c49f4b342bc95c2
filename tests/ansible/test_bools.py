"""The role's boolean variables pass through `| bool` wherever it uses them: a value given as
`-e name=false` or on an INI inventory's host line arrives as the string "false", which the
argument spec accepts but leaves a string, and which Jinja takes for true."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO

ROLE = REPO / "contrib/ansible/roles/ksmpolicy"


def booleans() -> list[str]:
    specs = yaml.safe_load((ROLE / "meta/argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    return [name for name, option in options.items() if option.get("type") == "bool"]


def test_every_boolean_variable_is_read_through_bool() -> None:
    names = booleans()
    assert "ksmpolicy_service_started" in names
    raw = []
    used = set()
    for path in sorted([*ROLE.glob("tasks/*.yml"), *ROLE.glob("handlers/*.yml")]):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name in names:
                for found in re.finditer(rf"\b{name}\b(?P<rest>\s*\|\s*bool\b)?", line):
                    used.add(name)
                    if not found["rest"]:
                        raw.append(f"{path.relative_to(REPO)}:{number}: {name}")
    assert not raw, "used without `| bool`: " + ", ".join(raw)
    assert used == set(names), f"never used: {set(names) - used}"
