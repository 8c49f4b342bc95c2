"""The manual holds together: every relative link in the README, docs/ and contrib/ points at a
file that exists, and the README stays the front door (at most 300 lines)."""

from __future__ import annotations

import re

from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *REPO.glob("contrib/*/*.md")]
LINK = re.compile(r"\]\((?P<target>[^)#\s]+)(?:#[^)]*)?\)")


def test_every_relative_link_points_at_a_file() -> None:
    broken = []
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for found in LINK.finditer(line):
                target = found["target"]
                if re.match(r"^[a-z]+:", target):
                    continue  # https:, mailto:
                if not (page.parent / target).exists():
                    broken.append(f"{page.relative_to(REPO)}:{number}: {target}")
    assert not broken, broken


def test_the_readme_is_the_front_door() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    # it starts with the two commands
    assert [line.split()[:2] for line in lines[3:5]] == [["make", "demo"], ["make", "test"]]


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    unlinked = [p.name for p in (REPO / "docs").glob("*.md") if f"docs/{p.name}" not in readme]
    assert not unlinked, unlinked
