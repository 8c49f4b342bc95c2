"""The one exception hierarchy of ksmpolicy."""

from __future__ import annotations

from ksmpolicy.quoting import one_line
from ksmpolicy.records import dataclass


class KsmPolicyError(Exception):
    """Base of every error ksmpolicy raises on purpose; the CLI prints its message and exits 1."""


@dataclass(frozen=True)
class Problem:
    """One problem in a file: where it is, which key, and what is wrong."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        """One line, whatever the file's name, key or message holds (see `quoting.one_line`)."""
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        text = f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"
        return one_line(text)


class PolicyError(KsmPolicyError):
    """A policy file that cannot be used; carries every problem found, one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class HostError(KsmPolicyError):
    """Reading or writing host state (sysfs, /proc) failed."""
