"""Log formatting for the CLI: readable text for a person, one JSON object per line for machines.

Library modules only call ``logging.getLogger(__name__)``; :func:`configure` is called by
the CLI alone. The worker passes ``plugin``, ``topic``, ``partition``, ``offset`` and
``correlation_id`` as ``extra`` where it knows them, and the JSON format emits them.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

__all__ = ["JsonFormatter", "configure"]

_CONTEXT_FIELDS = ("plugin", "topic", "partition", "offset", "correlation_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the message context."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Send every log record to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
