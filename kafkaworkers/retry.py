"""The retry and dead-letter policy: what happens to a message whose handler failed.

Two modes, as Karafka and Spring Kafka offer both:

- ``topics`` (the default): non-blocking retries, as in Spring Kafka's retry topics. A failed
  message is re-published to one of the plugin's retry topics (``<group>-retry-<n>``, one per
  delay level), which the same worker consumes in group ``<group>-retry``, pausing that
  partition until the message is due. Other messages of the source partition carry on, so a
  key's later messages may be handled before its retried one.
- ``pause``: the partition is paused in place and the same message handled again after the
  delay. Nothing overtakes it (per-key order holds), and the partition waits meanwhile.

After the last attempt, or at once for a permanent error, the message goes to ``<group>-dlq``.
Both carry headers naming the original topic, partition, offset and the failure.
:class:`FailureRouter` applies the policy to a failed message.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from kafkaworkers.clock import Clock
from kafkaworkers.errors import DecodeError, MessageTooLarge, PermanentError, PluginError, Retry
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
    H_TRUNCATED,
    PREFIX,
    number,
    parse_headers,
)
from kafkaworkers.transports import Headers, Message

__all__ = [
    "DLQ",
    "DLQ_MAX_VALUE",
    "OUTPUT",
    "RETRY",
    "Decision",
    "FailureRouter",
    "RetryPolicy",
    "dlq_topic",
    "failure_headers",
    "retry_topic",
    "retry_topics",
]

log = logging.getLogger(__name__)

#: Bound on the exception text kept in headers: enough to diagnose, never a whole payload.
MAX_ERROR_TEXT = 512
#: A dead letter larger than this is stored cut, with a header saying so; the original bytes
#: stay in the source topic at the offset the headers name.
DLQ_MAX_VALUE = 512 * 1024
#: What a produced record needs beyond its key, value and headers (librdkafka's framing),
#: kept free when judging whether a copy fits the producer's ``message.max.bytes``.
_RECORD_OVERHEAD = 512

#: What a produced message is, for what to do when the broker refuses it.
OUTPUT, RETRY, DLQ = "output", "retry", "dlq"
Mode = Literal["topics", "pause"]



def retry_topic(group: str, level: int) -> str:
    """The retry topic of a plugin's consumer group for attempt ``level`` (1-based)."""
    return f"{group}-retry-{level}"


def retry_topics(group: str, policy: RetryPolicy) -> list[str]:
    """Every retry topic of a plugin's group: one per delay in ``topics`` mode, none in ``pause`` mode."""
    levels = len(policy.delays) if policy.mode == "topics" else 0
    return [retry_topic(group, level) for level in range(1, levels + 1)]


def dlq_topic(group: str) -> str:
    """The dead-letter topic of a plugin's consumer group."""
    return f"{group}-dlq"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a failed message: ``retry`` after ``delay`` seconds, or ``dead``.

    ``level`` is the retry topic (1-based) in ``topics`` mode.
    """

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
    :param mode: ``topics`` re-publishes a failed message to a retry topic and carries on with
        the partition; ``pause`` pauses the partition and handles the same message again
        after the delay, keeping per-key order (see the module docstring).
    """

    delays: tuple[float, ...] = (1.0, 10.0, 60.0)
    jitter: float = 0.2
    permanent: tuple[type[BaseException], ...] = ()
    retryable: tuple[type[BaseException], ...] = (Exception,)
    mode: Mode = "topics"
    _random: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if any(d < 0 for d in self.delays) or not 0 <= self.jitter < 1:
            raise PluginError("retry delays must be >= 0 and jitter in [0, 1)")
        if self.mode not in ("topics", "pause"):
            raise PluginError(f"retry mode must be 'topics' or 'pause', not {self.mode!r}")

    @classmethod
    def exponential(cls, first: float = 1.0, factor: float = 10.0, attempts: int = 3, **options: object) -> RetryPolicy:
        """``attempts`` retries waiting ``first``, ``first * factor``, ... seconds."""
        return cls(delays=tuple(first * factor**i for i in range(attempts)), **options)  # type: ignore[arg-type]

    def decide(self, error: BaseException, attempt: int) -> Decision:
        """Retry or dead-letter a message that failed on its ``attempt``-th delivery (1-based).

        The delay of attempt ``n`` is ``delays[n - 1]``, and in ``topics`` mode it goes to retry
        topic ``n``. A handler's ``Retry(delay=X)`` waits ``X`` instead; in ``topics`` mode it goes
        to the first retry topic whose delay is at least ``X``, so that it never waits behind
        messages due later than itself by more than that topic's own delay (a retry topic is
        consumed in order). ``X`` beyond the longest delay is cut to it, with a warning.
        """
        if isinstance(error, (DecodeError | PermanentError | PluginError, self.permanent)):
            return Decision("dead")
        if not isinstance(error, Retry) and not isinstance(error, self.retryable):
            return Decision("dead")
        if attempt > len(self.delays):
            return Decision("dead")
        if isinstance(error, Retry) and error.delay is not None:
            return self._asked(error.delay, attempt)
        delay = self.delays[attempt - 1]
        if self.jitter:
            delay *= self._random.uniform(1 - self.jitter, 1 + self.jitter)
        return Decision("retry", delay, attempt)

    def _asked(self, delay: float, attempt: int) -> Decision:
        if self.mode == "pause":
            return Decision("retry", delay, attempt)
        fitting = [(level_delay, level) for level, level_delay in enumerate(self.delays, 1) if level_delay >= delay]
        if fitting:
            return Decision("retry", delay, min(fitting)[1])
        longest = max(self.delays)
        log.warning(
            "Retry(delay=%s) is longer than the longest retry delay (%s s): waiting %s s; add a longer delay"
            " to the plugin's RetryPolicy to wait longer", delay, longest, longest,
        )  # fmt: skip
        return Decision("retry", longest, len(self.delays))


Write = Callable[[str, "bytes | None", "bytes | None", Headers, str], None]


class FailureRouter:
    """Applies a plugin's :class:`RetryPolicy` to a failed message: retry topic, pause or dead letter.

    :param plugin: the plugin's name, written into the failure headers.
    :param group: the plugin's consumer group, which names its retry and dead-letter topics.
    :param policy: the plugin's retry policy.
    :param clock: the wall clock of the due times written into retry headers.
    :param max_message_bytes: the producer's ``message.max.bytes``: a copy that would not fit
        is dead-lettered cut instead of refused by the producer.
    """

    def __init__(
        self, plugin: str, group: str, policy: RetryPolicy, clock: Clock, max_message_bytes: int = 1_000_000
    ) -> None:
        self.plugin = plugin
        self.policy = policy
        self.clock = clock
        self.retry_topics = retry_topics(group, policy)
        self.dlq = dlq_topic(group)
        self.max_bytes = max_message_bytes - _RECORD_OVERHEAD
        self.max_dead_value = min(DLQ_MAX_VALUE, self.max_bytes)
        self._retry_set = frozenset(self.retry_topics)

    def fail(self, msg: Message, topic: str, error: BaseException, write: Write, attempt: int = 0) -> Decision:
        """Re-publish ``msg`` (consumed for ``topic``) to a retry topic or the dead-letter topic.

        :param attempt: in ``pause`` mode, which delivery of the message failed (the loop
            counts them); otherwise read from the message's headers.
        :return: the decision; a ``retry`` in ``pause`` mode wrote nothing, the caller pauses.
        """
        from_retry = msg.topic() in self._retry_set
        source = _source_headers(msg, from_retry)
        if not attempt:
            attempt = number(source.get(H_ATTEMPT)) + 1 if from_retry else 1
        decision = self.policy.decide(error, attempt)
        if decision.action == "retry" and self.policy.mode == "pause":
            self._log_retry(msg, topic, attempt, decision.delay, error, "paused in place, again")
            return decision
        if decision.action == "retry":
            value = msg.value()
            if self._fits(value, msg.key(), source):
                headers = self._headers(msg, topic, source, attempt, error, due=decision.delay)
                write(retry_topic_of(self.retry_topics, decision.level), value, msg.key(), headers, RETRY)
                self._log_retry(msg, topic, attempt, decision.delay, error, "retry")
                return decision
            limit = self.max_bytes + _RECORD_OVERHEAD
            error = MessageTooLarge(
                f"{len(value or b'')} bytes do not fit a retry topic (producer message.max.bytes {limit})"
                f" after: {type(error).__name__}: {bounded_text(error)}"
            )
        self.dead_letter(msg, topic, error, write, attempt)
        return Decision("dead")

    def dead_letter(
        self, msg: Message, topic: str, error: BaseException, write: Write, attempt: int = 0, keep: int | None = None
    ) -> None:
        """Write ``msg`` to the dead-letter topic, cut to ``keep`` bytes (by default what fits)."""
        from_retry = msg.topic() in self._retry_set
        source = _source_headers(msg, from_retry)
        if not attempt:
            attempt = number(source.get(H_ATTEMPT)) + 1 if from_retry else 1
        headers = self._headers(msg, topic, source, attempt, error)
        value = msg.value()
        limit = self.max_dead_value if keep is None else keep
        if value is not None and len(value) > limit:
            headers.append((H_TRUNCATED, str(len(value)).encode()))
            value = value[:limit]
        write(self.dlq, value, msg.key(), headers, DLQ)
        log.warning(
            "%s: %s[%d]@%d dead-lettered after %d attempt(s): %s: %s",
            self.plugin, msg.topic(), msg.partition(), msg.offset(), attempt, type(error).__name__, error,
            extra=log_fields(self.plugin, msg),
        )  # fmt: skip

    def _fits(self, value: bytes | None, key: bytes | None, headers: dict[str, bytes]) -> bool:
        size = len(value or b"") + len(key or b"") + sum(len(k) + len(v) for k, v in headers.items())
        return size <= self.max_bytes - 2 * MAX_ERROR_TEXT

    def _headers(
        self, msg: Message, topic: str, source: dict[str, bytes], attempt: int, error: BaseException, due: float = -1
    ) -> Headers:
        partition, offset = msg.partition(), msg.offset()
        assert partition is not None and offset is not None  # only records fail, never consumer errors
        return failure_headers(
            source,
            topic=topic,
            partition=partition,
            offset=offset,
            timestamp_ms=msg.timestamp()[1],
            plugin=self.plugin,
            attempt=attempt,
            error=error,
            due_ms=int((self.clock.time() + due) * 1000) if due >= 0 else None,
        )

    def _log_retry(self, msg: Message, topic: str, attempt: int, delay: float, error: BaseException, how: str) -> None:
        log.info(
            "%s: %s[%d]@%d failed (attempt %d), %s in %.1f s: %s: %s",
            self.plugin, msg.topic(), msg.partition(), msg.offset(), attempt, how, delay, type(error).__name__, error,
            extra=log_fields(self.plugin, msg),
        )  # fmt: skip


def retry_topic_of(topics: list[str], level: int) -> str:
    """The retry topic of a 1-based level."""
    return topics[level - 1]


def _source_headers(msg: Message, from_retry: bool) -> dict[str, bytes]:
    source = parse_headers(msg.headers())
    if from_retry:
        return source
    # kw- bookkeeping on a main topic was copied or forged: the origin is this message.
    return {k: v for k, v in source.items() if not k.startswith(PREFIX) or k == H_CORRELATION_ID}


def log_fields(plugin: str, msg: Message) -> dict[str, Any]:
    """The structured fields of a log line about one message (JSON logs)."""
    correlation = None
    for key, value in msg.headers() or ():
        if key == H_CORRELATION_ID and value is not None:
            correlation = value.decode("utf-8", "replace")
    return {
        "plugin": plugin,
        "topic": msg.topic(),
        "partition": msg.partition(),
        "offset": msg.offset(),
        "correlation_id": correlation,
    }


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
) -> Headers:
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
