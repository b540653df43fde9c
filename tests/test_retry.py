"""The retry policy and the failure headers, without a broker.

``RetryPolicy.decide`` is the whole decision between "try again later" and "dead-letter
now"; ``failure_headers`` is what an operator later reads to find out where a dead letter
came from and why it died. Both are pure functions, so they are tested directly.
"""

from __future__ import annotations

import random

import pytest

from kafkaworkers import DecodeError, PermanentError, PluginError, Retry, RetryPolicy
from kafkaworkers.headers import (
    H_ATTEMPT,
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
)
from kafkaworkers.retry import MAX_ERROR_TEXT, bounded_text, dlq_topic, failure_headers, retry_topic


class PaymentDeclined(Exception):
    """A business outcome a plugin declares permanent."""


class CardExpired(PaymentDeclined):
    pass


class Unprintable(Exception):
    """An exception from some library whose ``__str__`` itself fails."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


def fixed(*delays: float, **options: object) -> RetryPolicy:
    return RetryPolicy(delays=delays, jitter=0.0, **options)  # type: ignore[arg-type]


# --- topic names ------------------------------------------------------------------------


def test_retry_and_dead_letter_topics_are_named_after_the_group() -> None:
    assert retry_topic("fraude", 1) == "fraude-retry-1"
    assert retry_topic("fraude", 3) == "fraude-retry-3"
    assert dlq_topic("fraude") == "fraude-dlq"


# --- decide -----------------------------------------------------------------------------


def test_retry_with_a_delay_is_retried_after_exactly_that_delay_without_jitter() -> None:
    policy = RetryPolicy(delays=(1.0, 10.0), jitter=0.5)
    decision = policy.decide(Retry("rate limited", delay=2.5), attempt=1)
    assert (decision.action, decision.delay) == ("retry", 2.5)


def test_retry_without_a_delay_uses_the_policy_delay_of_its_attempt() -> None:
    policy = fixed(1.0, 10.0, 60.0)
    assert [policy.decide(Retry(), attempt=a).delay for a in (1, 2, 3)] == [1.0, 10.0, 60.0]
    assert [policy.decide(Retry(), attempt=a).level for a in (1, 2, 3)] == [1, 2, 3]


def test_any_exception_is_retried_by_default() -> None:
    decision = fixed(1.0).decide(ConnectionError("refused"), attempt=1)
    assert (decision.action, decision.level) == ("retry", 1)


@pytest.mark.parametrize(
    "error",
    [PermanentError("no such customer"), DecodeError("not a valid Order"), PluginError("no handler")],
    ids=["PermanentError", "DecodeError", "PluginError"],
)
def test_permanent_errors_are_dead_lettered_on_the_first_attempt(error: Exception) -> None:
    assert fixed(1.0, 10.0).decide(error, attempt=1).action == "dead"


def test_declared_permanent_types_and_their_subclasses_are_dead_lettered_at_once() -> None:
    policy = fixed(1.0, permanent=(PaymentDeclined,))
    assert policy.decide(PaymentDeclined("declined"), attempt=1).action == "dead"
    assert policy.decide(CardExpired("expired"), attempt=1).action == "dead"
    assert policy.decide(TimeoutError("slow"), attempt=1).action == "retry"


def test_types_outside_retryable_are_dead_lettered_but_retry_requests_still_retry() -> None:
    policy = fixed(1.0, retryable=(ConnectionError, TimeoutError))
    assert policy.decide(ValueError("bad amount"), attempt=1).action == "dead"
    assert policy.decide(ConnectionRefusedError("down"), attempt=1).action == "retry"
    assert policy.decide(Retry("asked for"), attempt=1).action == "retry"


def test_a_failure_after_the_last_retry_is_dead_lettered() -> None:
    policy = fixed(1.0, 2.0)
    assert policy.decide(ConnectionError(), attempt=2).action == "retry"
    assert policy.decide(ConnectionError(), attempt=3).action == "dead"
    assert policy.decide(Retry(delay=0.1), attempt=3).action == "dead", "an explicit delay must not extend the limit"


def test_no_delays_dead_letters_every_failure() -> None:
    assert RetryPolicy(delays=()).decide(ConnectionError(), attempt=1).action == "dead"


def test_jitter_scales_each_delay_within_its_bounds_and_spreads_them() -> None:
    policy = RetryPolicy(delays=(10.0,), jitter=0.2, _random=random.Random(42))
    delays = [policy.decide(ConnectionError(), attempt=1).delay for _ in range(2000)]
    assert all(8.0 <= d <= 12.0 for d in delays)
    assert min(delays) < 8.5 and max(delays) > 11.5, "jitter should spread over the whole range"


def test_zero_jitter_keeps_delays_exact() -> None:
    assert {fixed(3.0).decide(ConnectionError(), attempt=1).delay for _ in range(50)} == {3.0}


@pytest.mark.parametrize("options", [{"delays": (-1.0,)}, {"jitter": 1.0}, {"jitter": -0.1}])
def test_negative_delays_and_jitter_outside_zero_to_one_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(PluginError, match="retry delays must be >= 0"):
        RetryPolicy(**options)  # type: ignore[arg-type]


def test_exponential_multiplies_each_delay_and_passes_options_through() -> None:
    policy = RetryPolicy.exponential(first=0.5, factor=2.0, attempts=4, jitter=0.0, permanent=(KeyError,))
    assert policy.delays == (0.5, 1.0, 2.0, 4.0)
    assert policy.jitter == 0.0
    assert policy.decide(KeyError("x"), attempt=1).action == "dead"
    assert RetryPolicy.exponential().delays == (1.0, 10.0, 100.0)


# --- failure headers --------------------------------------------------------------------


def first_failure(error: BaseException, source: dict[str, bytes] | None = None, **kw: object) -> dict[str, bytes]:
    args: dict[str, object] = dict(
        topic="pedido-novo", partition=2, offset=41, timestamp_ms=1_700_000_000_000, plugin="fraude", attempt=1
    )
    args.update(kw)
    return dict(failure_headers(source or {}, error=error, **args))  # type: ignore[arg-type]


def test_first_failure_names_the_origin_the_plugin_the_attempt_and_the_reason() -> None:
    headers = first_failure(ConnectionError("refused"), due_ms=1_700_000_001_000)
    assert headers[H_ORIGINAL_TOPIC] == b"pedido-novo"
    assert headers[H_ORIGINAL_PARTITION] == b"2"
    assert headers[H_ORIGINAL_OFFSET] == b"41"
    assert headers[H_ORIGINAL_TIMESTAMP] == b"1700000000000"
    assert headers[H_PLUGIN] == b"fraude"
    assert headers[H_ATTEMPT] == b"1"
    assert headers[H_EXCEPTION] == b"ConnectionError"
    assert headers[H_MESSAGE] == b"refused"
    assert headers[H_DUE] == b"1700000001000"
    assert headers[H_FIRST_FAILURE] == headers[H_LAST_FAILURE]


def test_exception_type_is_qualified_by_its_module_unless_builtin() -> None:
    assert first_failure(PermanentError("x"))[H_EXCEPTION] == b"kafkaworkers.errors.PermanentError"
    assert first_failure(PaymentDeclined("x"))[H_EXCEPTION] == b"tests.test_retry.PaymentDeclined"


def test_retries_keep_the_first_origin_and_first_failure_time() -> None:
    first = first_failure(ConnectionError("refused"), due_ms=1)
    second = first_failure(
        TimeoutError("slow"), source=first, topic="pedido-novo", partition=0, offset=7, timestamp_ms=5, attempt=2
    )
    assert second[H_ORIGINAL_TOPIC] == b"pedido-novo"
    assert (second[H_ORIGINAL_PARTITION], second[H_ORIGINAL_OFFSET]) == (b"2", b"41"), "the retry topic's position"
    assert second[H_ORIGINAL_TIMESTAMP] == b"1700000000000"
    assert second[H_FIRST_FAILURE] == first[H_FIRST_FAILURE]
    assert int(second[H_LAST_FAILURE]) >= int(first[H_LAST_FAILURE])
    assert (second[H_ATTEMPT], second[H_EXCEPTION], second[H_MESSAGE]) == (b"2", b"TimeoutError", b"slow")


def test_a_dead_letter_carries_no_stale_due_time_from_its_last_retry() -> None:
    retried = first_failure(ConnectionError(), due_ms=123)
    dead = first_failure(ConnectionError(), source=retried, attempt=2)
    assert H_DUE not in dead


def test_the_message_own_headers_and_correlation_id_are_kept_other_kw_headers_dropped() -> None:
    source = {"traceparent": b"00-abc", "kw-correlation-id": b"c-1", "kw-something-else": b"x", "bin": b"\xff\x00"}
    headers = failure_headers(
        source, topic="t", partition=0, offset=0, timestamp_ms=0, plugin="p", attempt=1, error=ValueError()
    )
    names = [name for name, _ in headers]
    assert len(names) == len(set(names)), "a header name appears twice"
    as_dict = dict(headers)
    assert as_dict["traceparent"] == b"00-abc"
    assert as_dict["kw-correlation-id"] == b"c-1"
    assert as_dict["bin"] == b"\xff\x00"
    assert "kw-something-else" not in as_dict
    assert all(isinstance(v, bytes) for _, v in headers)


def test_long_multi_line_exception_text_is_bounded_to_one_line() -> None:
    error = RuntimeError("first line\nsecond\tline\r\n" + "x" * 10_000)
    text = first_failure(error)[H_MESSAGE].decode()
    assert len(text) == MAX_ERROR_TEXT
    assert text.startswith("first line second line xxx")
    assert text.endswith("…")
    assert "\n" not in text and "\r" not in text and "\t" not in text


def test_an_exception_quoting_a_password_is_still_bounded_and_on_one_line() -> None:
    error = ConnectionError("login failed for dsn postgres://app:s3cr3t-P4ssw0rd@db/orders\n" + "detail " * 500)
    text = first_failure(error)[H_MESSAGE].decode()
    assert len(text) <= MAX_ERROR_TEXT
    assert "\n" not in text


def test_non_ascii_exception_text_is_valid_utf8_and_bounded_in_characters() -> None:
    text = first_failure(ValueError("ção" * 1000))[H_MESSAGE].decode("utf-8")
    assert len(text) == MAX_ERROR_TEXT


def test_an_exception_whose_str_fails_still_gets_failure_headers() -> None:
    """A handler's exception with a broken ``__str__`` must not take the worker down with it:
    the worker builds these headers inside its failure path, where any exception escapes the loop."""
    text = bounded_text(Unprintable())
    assert isinstance(text, str) and len(text) <= MAX_ERROR_TEXT
    assert first_failure(Unprintable())[H_EXCEPTION] == b"tests.test_retry.Unprintable"
