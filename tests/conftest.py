"""Shared fixtures and markers: root-only tests skip with a reason when not root."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("root") and not IS_ROOT:
            item.add_marker(pytest.mark.skip(reason="needs root (CI runs as root)"))


@pytest.fixture
def write_policy(tmp_path: Path) -> Callable[..., Path]:
    """Write policy text to a root-trustable file (mode 0644 in a private directory)."""

    def write(text: str, name: str = "policy.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        path.chmod(0o644)
        return path

    return write
