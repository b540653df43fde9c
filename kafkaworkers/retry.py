"""The retry and dead-letter policy: what happens to a message whose handler failed.

Retries are non-blocking, as in Spring Kafka's retry topics: a failed message is
re-published to the plugin's retry topic for its attempt (``<group>-retry-<n>``), which the
same worker consumes (in group ``<group>-retry``), pausing that partition until the message
is due. After the last
attempt, or at once for a permanent error, it goes to ``<group>-dlq``. Both carry headers
naming the original topic, partition, offset and the failure.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from kafkaworkers.errors import DecodeError, PermanentError, PluginError, Retry
from kafkaworkers.headers import (
    H_ATTEMPT,
    H_CORRELATION_ID,
    H_DUE,
    H_EXCEPTION,
    H_FIRST_FAILURE,
    H_LAST_FAILURE,
    H_MESSAGE,
    H_ORIGINAL_OFFSET,
    H_ORIGINAL_PARTITION,
    H_ORIGINAL_TIMESTAMP,
    H_ORIGINAL_TOPIC,
    H_PLUGIN,
    PREFIX,
)

__all__ = ["Decision", "RetryPolicy", "dlq_topic", "failure_headers", "retry_topic"]

#: Bound on the exception text kept in headers: enough to diagnose, never a whole payload.
MAX_ERROR_TEXT = 512



def retry_topic(group: str, level: int) -> str:
    """The retry topic of a plugin's consumer group for attempt ``level`` (1-based)."""
    return f"{group}-retry-{level}"


def dlq_topic(group: str) -> str:
    """The dead-letter topic of a plugin's consumer group."""
    return f"{group}-dlq"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a failed message: ``retry`` after ``delay`` seconds, or ``dead``."""

    action: str
    delay: float = 0.0
    level: int = 0


@dataclass(frozen=True)
class RetryPolicy:
    """A plugin's retry policy.

    :param delays: the wait before each retry; their count is the number of retries and of
        retry topics. ``()`` dead-letters every failure at once.
    :param jitter: each delay is scaled by a random factor in ``[1 - jitter, 1 + jitter]``
        so that failures of one burst do not all come back at the same moment.
    :param permanent: exception types that are dead-lettered without a retry (in addition
        to :class:`~kafkaworkers.PermanentError` and undecodable messages).
    :param retryable: exception types that are retried; any other is permanent.
    """

    delays: tuple[float, ...] = (1.0, 10.0, 60.0)
    jitter: float = 0.2
    permanent: tuple[type[BaseException], ...] = ()
    retryable: tuple[type[BaseException], ...] = (Exception,)
    _random: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if any(d < 0 for d in self.delays) or not 0 <= self.jitter < 1:
            raise PluginError("retry delays must be >= 0 and jitter in [0, 1)")

    @classmethod
    def exponential(cls, first: float = 1.0, factor: float = 10.0, attempts: int = 3, **options: object) -> RetryPolicy:
        """``attempts`` retries waiting ``first``, ``first * factor``, ... seconds."""
        return cls(delays=tuple(first * factor**i for i in range(attempts)), **options)  # type: ignore[arg-type]

    def decide(self, error: BaseException, attempt: int) -> Decision:
        """Retry or dead-letter a message that failed on its ``attempt``-th delivery (1-based)."""
        if isinstance(error, (DecodeError | PermanentError | PluginError, self.permanent)):
            return Decision("dead")
        if not isinstance(error, Retry) and not isinstance(error, self.retryable):
            return Decision("dead")
        if attempt > len(self.delays):
            return Decision("dead")
        delay = self.delays[attempt - 1]
        if isinstance(error, Retry) and error.delay is not None:
            delay = error.delay
        elif self.jitter:
            delay *= self._random.uniform(1 - self.jitter, 1 + self.jitter)
        return Decision("retry", delay, attempt)


def failure_headers(
    source: dict[str, bytes],
    *,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int,
    plugin: str,
    attempt: int,
    error: BaseException,
    due_ms: int | None = None,
) -> list[tuple[str, bytes]]:
    """Headers for a retried or dead-lettered copy: the source's own headers, then where it came
    from and why it failed. The first source is kept across retries."""
    now = str(int(time.time() * 1000)).encode()
    kept = {k: v for k, v in source.items() if not k.startswith(PREFIX) or k == H_CORRELATION_ID}
    origin = {
        H_ORIGINAL_TOPIC: source.get(H_ORIGINAL_TOPIC) or topic.encode(),
        H_ORIGINAL_PARTITION: source.get(H_ORIGINAL_PARTITION) or str(partition).encode(),
        H_ORIGINAL_OFFSET: source.get(H_ORIGINAL_OFFSET) or str(offset).encode(),
        H_ORIGINAL_TIMESTAMP: source.get(H_ORIGINAL_TIMESTAMP) or str(timestamp_ms).encode(),
        H_FIRST_FAILURE: source.get(H_FIRST_FAILURE) or now,
    }
    failure = {
        H_PLUGIN: plugin.encode(),
        H_ATTEMPT: str(attempt).encode(),
        H_LAST_FAILURE: now,
        H_EXCEPTION: _qualname(error).encode(),
        H_MESSAGE: bounded_text(error).encode("utf-8", "replace"),
    }
    if due_ms is not None:
        failure[H_DUE] = str(due_ms).encode()
    return list({**kept, **origin, **failure}.items())


def bounded_text(error: BaseException) -> str:
    """The exception's message cut to :data:`MAX_ERROR_TEXT` characters, on one line."""
    try:
        text = " ".join(str(error).split())
    except Exception:
        text = f"<unprintable {type(error).__name__}>"
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 1] + "…"


def _qualname(error: BaseException) -> str:
    cls = type(error)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
