"""Log formatting for the CLI: readable text for a person, one JSON object per line for machines.

Library modules only call ``logging.getLogger(__name__)``; :func:`configure` is called by
the CLI alone. The worker passes ``plugin``, ``topic``, ``partition``, ``offset`` and
``correlation_id`` as ``extra`` where it knows them, and the JSON format emits them.

In JSON mode, Python warnings and uncaught exceptions (in any thread) are logged too, so a
traceback arrives as one JSON line with an ``exception`` field instead of many text lines.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType

__all__ = ["LIBRDKAFKA_LOGGER", "JsonFormatter", "RepeatSummary", "configure"]

_CONTEXT_FIELDS = ("plugin", "topic", "partition", "offset", "correlation_id")
#: The logger the clients hand librdkafka's own log lines to (``kafkaworkers.consumer``, ``.producer``).
LIBRDKAFKA_LOGGER = "kafkaworkers.librdkafka"


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
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: str = "INFO", fmt: str = "text", librdkafka_debug: bool = False) -> None:
    """Send every log record at ``level`` or above to stderr in the chosen format.

    librdkafka writes debug lines only for the contexts its ``debug`` property names, and
    logs them at DEBUG: ``librdkafka_debug`` (that property is set) shows them at any level,
    since asking for them and then dropping them would only be a silent surprise.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    librdkafka = logging.getLogger(LIBRDKAFKA_LOGGER)
    librdkafka.setLevel(logging.DEBUG if librdkafka_debug else logging.NOTSET)
    librdkafka.filters[:] = [] if librdkafka_debug else [RepeatSummary()]
    json_mode = fmt == "json"
    logging.captureWarnings(json_mode)
    sys.excepthook = _log_uncaught if json_mode else sys.__excepthook__
    threading.excepthook = _log_uncaught_in_thread if json_mode else threading.__excepthook__


class RepeatSummary(logging.Filter):
    """Let one line of each kind through per interval, then say how many like it were held back.

    During an outage librdkafka logs a failed connect for every broker and retry, about twenty
    lines a second; what matters is that it keeps failing, and how often. Lines of one kind
    differ only in their numbers (ports, milliseconds, client ids).

    :param interval: seconds between two lines of one kind.
    :param clock: the monotonic clock (tests pass their own).
    """

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._seen: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        kind = _DIGITS.sub("#", record.getMessage())
        now = self.clock()
        last, held = self._seen.get(kind, (-self.interval, 0))
        if now - last < self.interval:
            self._seen[kind] = (last, held + 1)
            return False
        self._seen[kind] = (now, 0)
        if held:
            record.msg = f"{record.getMessage()} ({held} more like it in the last {now - last:.0f} s)"
            record.args = None
        return True


_DIGITS = re.compile(r"\d+")


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("kafkaworkers").critical("uncaught exception: %s", value, exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread else "?"
    logging.getLogger("kafkaworkers").critical(
        "uncaught exception in thread %s: %s",
        name,
        args.exc_value,
        # The exception carries its own traceback (the same as args.exc_traceback).
        exc_info=args.exc_value,
    )
