"""The daemon's log lines: journald's `<N>` priority prefixes when not on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import ClassVar

from ksmpolicy.quoting import one_line


class OneLineFormatter(logging.Formatter):
    """Every message on one line: VM names, paths and process names are whatever someone
    wrote, so unprintable characters are escaped whatever part of a message they came from
    (a traceback under --debug stays as it is)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


class JournalFormatter(OneLineFormatter):
    """`<N>message` with syslog levels, which journald reads as the priority."""

    PRIORITIES: ClassVar[dict[str, int]] = {
        "DEBUG": 7,
        "INFO": 6,
        "WARNING": 4,
        "ERROR": 3,
        "CRITICAL": 2,
    }

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITIES.get(record.levelname, 6)}>{super().format(record)}"


def configure_daemon_logging(debug: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for handler in root.handlers:
        if sys.stderr.isatty():
            handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(message)s"))
        else:
            handler.setFormatter(JournalFormatter("%(message)s"))
