"""Every ``kw-*`` header the framework writes or reads, and the one parser of its numbers.

Retried and dead-lettered copies carry where they came from and why they failed; replayed
dead letters carry where they were replayed from; the correlation id ties one business flow
together across services.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "H_ATTEMPT",
    "H_CORRELATION_ID",
    "H_DUE",
    "H_EXCEPTION",
    "H_FIRST_FAILURE",
    "H_LAST_FAILURE",
    "H_MESSAGE",
    "H_ORIGINAL_OFFSET",
    "H_ORIGINAL_PARTITION",
    "H_ORIGINAL_TIMESTAMP",
    "H_ORIGINAL_TOPIC",
    "H_PLUGIN",
    "H_REPLAYED_AT",
    "H_REPLAYED_FROM",
    "H_TRUNCATED",
    "PREFIX",
    "number",
    "parse_headers",
]

#: Every framework header starts with this; a copy keeps a source's own headers, not these.
PREFIX = "kw-"

#: The id that ties every event of one business flow together; copied onto what a handler produces.
H_CORRELATION_ID = "kw-correlation-id"

# Where a retried or dead-lettered message first came from (kept across retries).
H_ORIGINAL_TOPIC = "kw-original-topic"
H_ORIGINAL_PARTITION = "kw-original-partition"
H_ORIGINAL_OFFSET = "kw-original-offset"
H_ORIGINAL_TIMESTAMP = "kw-original-timestamp"
H_FIRST_FAILURE = "kw-first-failure"

# The latest failure.
H_PLUGIN = "kw-plugin"
H_ATTEMPT = "kw-attempt"
H_LAST_FAILURE = "kw-last-failure"
H_EXCEPTION = "kw-exception"
H_MESSAGE = "kw-exception-message"
#: When a retried message is due, in milliseconds since the epoch.
H_DUE = "kw-due-at"
#: On a dead letter stored cut: the length of the original value.
H_TRUNCATED = "kw-value-truncated"

# A replayed dead letter: which letter it was, and when.
H_REPLAYED_FROM = "kw-replayed-from"
H_REPLAYED_AT = "kw-replayed-at"


def number(raw: bytes | None) -> int:
    """A non-negative integer header (attempt, due time, length); 0 when absent or not a sane number."""
    return int(raw) if raw and raw.isdigit() and len(raw) <= 18 else 0


def parse_headers(raw: Iterable[tuple[str, bytes | None]] | None) -> dict[str, bytes]:
    """Kafka headers as a dict; a null header value becomes ``b""``; for a repeated name the last wins."""
    if not raw:
        return {}
    return {k: v if v is not None else b"" for k, v in raw}
