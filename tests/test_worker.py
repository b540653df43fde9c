"""The worker loop's failure handling on the in-memory broker, through the test Harness.

What a handler failure turns into (a retry topic, the dead-letter topic, a paused
partition), when offsets are stored (only after the handler returned and every produced
message was acknowledged), and that poison input never takes the loop down. The Harness runs
the real loop step by step; the plugins are small ones defined here.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import pytest
from confluent_kafka import OFFSET_INVALID, KafkaError, TopicPartition

from kafkaworkers import Context, PermanentError, Plugin, PluginEnv, PluginError, Retry, RetryPolicy, hookimpl
from kafkaworkers.breaker import CLOSED
from kafkaworkers.clock import ManualClock
from kafkaworkers.config import DEFAULT_PARTITIONS, Settings
from kafkaworkers.errors import ProducerFatal
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
    H_TRUNCATED,
)
from kafkaworkers.plugins import PluginHost
from kafkaworkers.retry import MAX_ERROR_TEXT
from kafkaworkers.testing import Harness
from kafkaworkers.transports.memory import MemoryBroker, MemoryTransport
from kafkaworkers.worker import Worker

MakeHarness = Callable[..., Harness]
DECODE_ERROR = b"kafkaworkers.errors.DecodeError"


class Ping(msgspec.Struct, frozen=True):
    n: int


class Crash(BaseException):
    """Stands for the process dying mid-batch: nothing in the loop catches it."""


def headers(record: Any) -> dict[str, bytes]:
    return dict(record.headers() or [])


def committed(harness: Harness, group: str, topic: str, partition: int = 0) -> int:
    """The group's committed offset (``OFFSET_INVALID`` when none), as the broker has it."""
    reader = harness.transport.consumer({"group.id": group})
    return reader.committed([TopicPartition(topic, partition)])[0].offset


def produce_raw(harness: Harness, topic: str, value: bytes | None, key: bytes = b"k", hdrs: Any = None) -> None:
    """Publish exact bytes (or a null value), as any other client could."""
    producer = harness.transport.producer({})
    producer.produce(topic, value, key, headers=hdrs)
    producer.flush()


def flaky(failures: int, retries: int, delay: float = 0.05) -> tuple[Plugin, list[tuple[int, int]]]:
    """Fails with a retryable error on its first ``failures`` attempts, then echoes to ``out``."""
    plugin = Plugin("flaky", produces={"out": Ping}, retry=RetryPolicy(delays=(delay,) * retries, jitter=0.0))
    calls: list[tuple[int, int]] = []

    @plugin.consumes("in", Ping)
    def handle(ping: Ping, ctx: Context) -> None:
        calls.append((ping.n, ctx.attempt))
        assert ctx.topic == "in", "a retried message must report its original topic"
        if ctx.attempt <= failures:
            raise ConnectionError(f"dependency down (attempt {ctx.attempt})\n" + "detail " * 200)
        ctx.produce("out", ping)

    return plugin, calls


# --- retries and dead letters ------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_handler_failing_k_times_is_retried_once_per_retry_topic_then_succeeds(
    kafkaworkers_harness: MakeHarness, k: int
) -> None:
    plugin, calls = flaky(failures=k, retries=3)
    harness = kafkaworkers_harness(plugin, partitions=1)
    harness.produce("in", Ping(7), key="order-7")
    harness.run_until_idle(wait_for_retries=True)

    assert calls == [(7, attempt) for attempt in range(1, k + 2)]
    for level in (1, 2, 3):
        on_level = harness.records(f"flaky-retry-{level}")
        assert len(on_level) == (1 if level <= k else 0), f"retry topic {level}"
        if on_level:
            assert headers(on_level[0])[H_ATTEMPT] == str(level).encode()
            assert on_level[0].key() == b"order-7"
    assert harness.records("flaky-dlq") == []
    assert harness.values("out", Ping) == [Ping(7)]
    assert committed(harness, "flaky", "in") == 1
    for level in range(1, k + 1):
        assert committed(harness, "flaky-retry", f"flaky-retry-{level}") == 1


def test_a_handler_failing_beyond_the_limit_is_dead_lettered_with_origin_attempts_and_reason(
    kafkaworkers_harness: MakeHarness,
) -> None:
    plugin, calls = flaky(failures=10, retries=2)
    harness = kafkaworkers_harness(plugin, partitions=1)
    harness.produce("in", Ping(1), key="order-1")  # offset 0, handled normally below
    harness.produce("in", Ping(2), key="order-2", headers={"kw-correlation-id": b"corr-2", "trace": b"\xff\x00"})
    before = int(time.time() * 1000)
    harness.run_until_idle(wait_for_retries=True)

    assert [c for c in calls if c[0] == 2] == [(2, 1), (2, 2), (2, 3)]
    [original] = [r for r in harness.records("in") if r.key() == b"order-2"]
    [dead] = [r for r in harness.records("flaky-dlq") if r.key() == b"order-2"]
    h = headers(dead)
    assert dead.value() == original.value()
    assert h[H_ORIGINAL_TOPIC] == b"in"
    assert h[H_ORIGINAL_PARTITION] == str(original.partition()).encode()
    assert h[H_ORIGINAL_OFFSET] == str(original.offset()).encode()
    assert h[H_ORIGINAL_TIMESTAMP] == str(original.timestamp()[1]).encode()
    assert h[H_PLUGIN] == b"flaky"
    assert h[H_ATTEMPT] == b"3"
    assert h[H_EXCEPTION] == b"ConnectionError"
    message = h[H_MESSAGE].decode()
    assert message.startswith("dependency down (attempt 3) detail")
    assert len(message) <= MAX_ERROR_TEXT and "\n" not in message
    assert before <= int(h[H_FIRST_FAILURE]) <= int(h[H_LAST_FAILURE])
    assert H_DUE not in h
    assert h["kw-correlation-id"] == b"corr-2"
    assert h["trace"] == b"\xff\x00"
    assert len(harness.records("flaky-retry-1")) == len(harness.records("flaky-retry-2")) == 2
    assert committed(harness, "flaky", "in") == 2


def test_a_permanent_error_is_dead_lettered_on_the_first_attempt_without_retries(
    kafkaworkers_harness: MakeHarness,
) -> None:
    plugin = Plugin("strict", retry=RetryPolicy(delays=(0.05, 0.05), jitter=0.0))

    @plugin.consumes("in", Ping)
    def handle(ping: Ping, ctx: Context) -> None:
        raise PermanentError(f"order {ping.n} cannot be processed")

    harness = kafkaworkers_harness(plugin, partitions=1)
    harness.produce("in", Ping(3))
    harness.run_until_idle(wait_for_retries=True)
    [dead] = harness.records("strict-dlq")
    assert headers(dead)[H_ATTEMPT] == b"1"
    assert headers(dead)[H_EXCEPTION] == b"kafkaworkers.errors.PermanentError"
    assert harness.records("strict-retry-1") == []


def test_a_retry_not_yet_due_pauses_only_its_retry_partition_while_the_main_partition_flows(
    kafkaworkers_harness: MakeHarness,
) -> None:
    plugin = Plugin("slow", retry=RetryPolicy(delays=(1.0,), jitter=0.0))
    log: list[tuple[int, int, int]] = []

    @plugin.consumes("in", Ping)
    def handle(ping: Ping, ctx: Context) -> None:
        log.append((ping.n, ctx.attempt, int(time.time() * 1000)))
        if ping.n == 1 and ctx.attempt == 1:
            raise TimeoutError("inventory service slow")

    harness = kafkaworkers_harness(plugin, partitions=1)
    runner = harness.worker.runners[0]
    harness.produce("in", Ping(1), key="same-key")
    harness.run_until_idle()
    assert set(runner.paused) == {("slow-retry-1", 0)}, "only the retry partition waits"

    harness.produce("in", Ping(2), key="same-key")
    harness.run_until_idle()
    assert [(n, a) for n, a, _ in log] == [(1, 1), (2, 1)], "the later main-topic message went first"
    assert set(runner.paused) == {("slow-retry-1", 0)}

    harness.run_until_idle(wait_for_retries=True)
    assert [(n, a) for n, a, _ in log] == [(1, 1), (2, 1), (1, 2)]
    [retry] = harness.records("slow-retry-1")
    assert log[-1][2] >= int(headers(retry)[H_DUE]), "the retry was handled before it was due"
    assert runner.paused == {}
    assert committed(harness, "slow-retry", "slow-retry-1") == 1


POISON = {
    "invalid-utf8": b"\xff\xfe\xfd",
    "invalid-json": b'{"n": 1',
    "wrong-shape": b'{"n": "seven"}',
    "wrong-type": b"[1, 2, 3]",
    "missing-field": b"{}",
    "json-null": b"null",
    "nan": b'{"n": NaN}',
    "huge-int": b'{"n": ' + b"9" * 100_000 + b"}",
    "deep-nesting": b"[" * 10_000 + b"]" * 10_000,
    "deep-nesting-in-unknown-field": b'{"n": 1, "extra": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    "tombstone": None,
}


@pytest.mark.parametrize("value", list(POISON.values()), ids=list(POISON))
def test_undecodable_input_is_dead_lettered_on_the_first_attempt_with_decode_error(
    kafkaworkers_harness: MakeHarness, value: bytes | None
) -> None:
    plugin, calls = flaky(failures=0, retries=2)
    harness = kafkaworkers_harness(plugin, partitions=1)
    harness.produce("in", Ping(1))
    produce_raw(harness, "in", value)
    harness.produce("in", Ping(2))
    harness.run_until_idle(wait_for_retries=True)

    assert calls == [(1, 1), (2, 1)], "the messages around the poison one were handled"
    [dead] = harness.records("flaky-dlq")
    h = headers(dead)
    assert (h[H_EXCEPTION], h[H_ATTEMPT]) == (DECODE_ERROR, b"1")
    assert h[H_MESSAGE], "the reason is recorded"
    assert harness.records("flaky-retry-1") == []
    assert committed(harness, "flaky", "in") == 3


@pytest.mark.parametrize(
    "bad",
    [(H_ATTEMPT, b"x"), (H_ATTEMPT, b"\xff\xfe"), (H_ATTEMPT, b"9" * 5000), (H_DUE, b"9" * 5000)],
    ids=["attempt-not-a-number", "attempt-not-utf8", "attempt-5000-digits", "due-at-5000-digits"],
)
def test_garbage_failure_headers_on_a_retry_topic_do_not_crash_the_worker(
    kafkaworkers_harness: MakeHarness, bad: tuple[str, bytes]
) -> None:
    """Retry topics are ordinary topics: anything may be written to them."""
    plugin, calls = flaky(failures=0, retries=1)
    harness = kafkaworkers_harness(plugin, partitions=1)
    produce_raw(harness, "flaky-retry-1", b"not json", hdrs=[(H_ORIGINAL_TOPIC, b"in"), bad])
    produce_raw(harness, "flaky-retry-1", b'{"n": 5}', hdrs=[(H_ORIGINAL_TOPIC, b"in"), (H_ATTEMPT, b"1")])
    harness.run_until_idle(timeout=5)
    assert calls == [(5, 2)]
    assert len(harness.records("flaky-dlq")) == 1


def test_a_retry_message_whose_original_topic_is_not_consumed_is_dead_lettered_and_the_rest_still_handled(
    kafkaworkers_harness: MakeHarness,
) -> None:
    """The plugin stopped consuming a topic while retries of it were in flight: that letter has
    no handler, but the messages behind it on the same retry partition must still be handled."""
    plugin, calls = flaky(failures=0, retries=1)
    harness = kafkaworkers_harness(plugin, partitions=1)
    produce_raw(harness, "flaky-retry-1", b'{"n": 1}', hdrs=[(H_ORIGINAL_TOPIC, b"gone"), (H_ATTEMPT, b"1")])
    produce_raw(harness, "flaky-retry-1", b'{"n": 2}', hdrs=[(H_ORIGINAL_TOPIC, b"in"), (H_ATTEMPT, b"1")])
    harness.run_until_idle()
    produce_raw(harness, "flaky-retry-1", b'{"n": 3}', hdrs=[(H_ORIGINAL_TOPIC, b"in"), (H_ATTEMPT, b"1")])
    harness.run_until_idle()

    [dead] = harness.records("flaky-dlq")
    assert headers(dead)[H_EXCEPTION] == b"kafkaworkers.errors.PluginError"
    assert [n for n, _ in calls] == [2, 3], "n=2 was skipped although its offset is now committed: lost"
    assert committed(harness, "flaky-retry", "flaky-retry-1") == 3


def test_a_main_topic_message_carrying_origin_headers_is_dead_lettered_with_its_real_origin(
    kafkaworkers_harness: MakeHarness,
) -> None:
    """Origin headers are the worker's own bookkeeping on its retry topics; on a main topic they
    were copied or forged by some producer and must not redirect the dead letter (nor a replay)."""
    plugin, _ = flaky(failures=0, retries=1)
    harness = kafkaworkers_harness(plugin, partitions=1)
    forged = [(H_ORIGINAL_TOPIC, b"elsewhere"), (H_ORIGINAL_OFFSET, b"999"), (H_FIRST_FAILURE, b"1")]
    produce_raw(harness, "in", b"not json", hdrs=forged)
    harness.run_until_idle()
    [dead] = harness.records("flaky-dlq")
    h = headers(dead)
    assert (h[H_ORIGINAL_TOPIC], h[H_ORIGINAL_OFFSET]) == (b"in", b"0")
    assert int(h[H_FIRST_FAILURE]) > 1


# --- delivery failures, breakers, offsets ------------------------------------------------


def echo(name: str = "echo", fail_with: BaseException | None = None) -> tuple[Plugin, list[int]]:
    plugin = Plugin(name, produces={"out": Ping}, retry=RetryPolicy(delays=(0.05,), jitter=0.0))
    calls: list[int] = []

    @plugin.consumes("in", Ping)
    def handle(ping: Ping, ctx: Context) -> None:
        calls.append(ping.n)
        if fail_with is not None:
            raise fail_with
        ctx.produce("out", ping)

    return plugin, calls


@pytest.mark.parametrize(
    ("failing_topic", "fail_with", "lands_on"),
    [("out", None, "out"), ("echo-dlq", PermanentError("bad order"), "echo-dlq")],
    ids=["handler-output", "dead-letter"],
)
def test_a_failed_delivery_stores_no_offset_and_the_batch_is_handled_again(
    kafkaworkers_harness: MakeHarness, failing_topic: str, fail_with: BaseException | None, lands_on: str
) -> None:
    plugin, calls = echo(fail_with=fail_with)
    harness = kafkaworkers_harness(plugin, partitions=1)
    harness.broker.fail_deliveries(failing_topic, 1)
    harness.produce("in", Ping(1))
    harness.produce("in", Ping(2))

    assert harness.worker.run_once(timeout=0.5) == 2
    assert calls == [1, 2]
    assert len(harness.records(lands_on)) == 1, "one of the two deliveries failed"
    harness.worker.run_once(timeout=0.01)
    assert committed(harness, "echo", "in") == OFFSET_INVALID, "an offset was stored although a delivery failed"
    assert ("in", 0) in harness.worker.runners[0].paused

    harness.run_until_idle(wait_for_retries=True)
    assert calls == [1, 2, 1, 2], "the whole batch is handled again"
    assert len(harness.records(lands_on)) == 3, "nothing lost (at-least-once: the acknowledged one twice)"
    assert committed(harness, "echo", "in") == 2


class Scope:
    """An ``around_batch`` scope that records what the handlers and the output topic looked like."""

    def __init__(self, harness: Callable[[], Harness], fail_commits: int = 0) -> None:
        self.harness = harness
        self.fail_commits = fail_commits
        self.log: list[str] = []

    def __call__(self, state: object) -> Scope:
        return self

    def __enter__(self) -> None:
        self.log.append("begin")

    def __exit__(self, *exc: object) -> None:
        self.log.append(
            f"end: {len(self.harness().records('out'))} out, {len(self.harness().records('scoped-dlq'))} dlq"
        )
        if self.fail_commits:
            self.fail_commits -= 1
            raise OSError("disk full")


def scoped(fail_commits: int = 0) -> tuple[Plugin, Scope, list[Harness]]:
    plugin = Plugin("scoped", produces={"out": Ping}, retry=RetryPolicy(delays=(), jitter=0.0))
    made: list[Harness] = []
    scope = Scope(lambda: made[0], fail_commits)
    plugin.around_batch(scope)

    @plugin.consumes("in", Ping)
    def handle(ping: Ping, ctx: Context) -> None:
        scope.log.append(f"handle {ping.n}")
        ctx.produce("out", ping)
        if ping.n < 0:
            raise PermanentError("negative, found after producing")

    return plugin, scope, made


def test_around_batch_wraps_the_handlers_and_their_messages_are_produced_only_after_it_committed(
    kafkaworkers_harness: MakeHarness,
) -> None:
    plugin, scope, made = scoped()
    made.append(harness := kafkaworkers_harness(plugin, partitions=1))
    for n in (1, -1, 2):
        harness.produce("in", Ping(n))

    assert harness.worker.run_once(timeout=0.5) == 3
    assert scope.log == ["begin", "handle 1", "handle -1", "handle 2", "end: 0 out, 0 dlq"]
    assert [p.n for p in harness.values("out", Ping)] == [1, 2], "what the failed message produced is dropped"
    assert len(harness.records("scoped-dlq")) == 1
    harness.worker.run_once(timeout=0.01)
    assert committed(harness, "scoped", "in") == 3


def test_a_batch_scope_that_fails_to_commit_produces_nothing_stores_nothing_and_the_batch_is_handled_again(
    kafkaworkers_harness: MakeHarness,
) -> None:
    plugin, scope, made = scoped(fail_commits=1)
    made.append(harness := kafkaworkers_harness(plugin, partitions=1))
    harness.produce("in", Ping(1))
    harness.produce("in", Ping(-1))

    assert harness.worker.run_once(timeout=0.5) == 2
    assert harness.records("out") == [] and harness.records("scoped-dlq") == []
    harness.worker.run_once(timeout=0.01)
    assert committed(harness, "scoped", "in") == OFFSET_INVALID
    assert ("in", 0) in harness.worker.runners[0].paused

    harness.run_until_idle(wait_for_retries=True)
    assert scope.log.count("handle 1") == 2, "the whole batch is handled again"
    assert [p.n for p in harness.values("out", Ping)] == [1], "and its messages produced once"
    assert len(harness.records("scoped-dlq")) == 1
    assert committed(harness, "scoped", "in") == 2


def test_an_open_breaker_pauses_the_partition_without_retry_or_dead_letter_and_resumes_after_its_wait(
    kafkaworkers_harness: MakeHarness,
) -> None:
    plugin = Plugin("guarded", retry=RetryPolicy(delays=(0.05,), jitter=0.0))
    breaker = plugin.breaker("stock-api", wait=0.3, window=1, min_calls=1, failure_rate=1.0, probes=1, timeout=2.0)
    reached: list[tuple[int, float]] = []

    @plugin.consumes("in", Ping)
    def handle(ping: Ping, ctx: Context) -> None:
        breaker.call(lambda: reached.append((ping.n, time.monotonic())))

    harness = kafkaworkers_harness(plugin, partitions=1)
    breaker.force_open()
    opened_at = time.monotonic()
    harness.produce("in", Ping(1))
    harness.produce("in", Ping(2))
    harness.run_until_idle()

    runner = harness.worker.runners[0]
    assert reached == []
    assert set(runner.paused) == {("in", 0)}
    assert committed(harness, "guarded", "in") == OFFSET_INVALID

    harness.run_until_idle(wait_for_retries=True)
    assert [n for n, _ in reached] == [1, 2], "both handled, in order, once the breaker let a probe through"
    assert reached[0][1] >= opened_at + 0.3
    assert breaker.state == CLOSED
    assert harness.records("guarded-retry-1") == [] and harness.records("guarded-dlq") == []
    assert committed(harness, "guarded", "in") == 2


def test_offsets_are_stored_only_after_the_handler_returned_and_its_output_was_acknowledged(
    kafkaworkers_harness: MakeHarness,
) -> None:
    plugin = Plugin("ordered", produces={"out": Ping})
    calls: list[int] = []
    crash_at = {2}

    @plugin.consumes("in", Ping)
    def handle(ping: Ping, ctx: Context) -> None:
        calls.append(ping.n)
        ctx.produce("out", ping)
        if ping.n in crash_at:
            crash_at.clear()
            raise Crash("the process dies after producing, before the flush")

    harness = kafkaworkers_harness(plugin, partitions=1)
    for n in range(5):
        harness.produce("in", Ping(n))
    with pytest.raises(Crash):
        harness.run_until_idle()
    assert calls == [0, 1, 2]
    harness.worker.close()
    assert committed(harness, "ordered", "in") == OFFSET_INVALID, "handled but unflushed work was committed"

    restarted = Worker(list(harness.host.plugins.values()), harness.settings, harness.host, transport=harness.transport)
    restarted.start(broker_wait=0)
    try:
        while restarted.run_once(timeout=0.05):
            pass
        restarted.run_once(timeout=0.01)
    finally:
        restarted.close()
    assert calls == [0, 1, 2, 0, 1, 2, 3, 4], "the uncommitted batch is handled again after the restart"
    assert sorted(p.n for p in harness.values("out", Ping)) == [0, 0, 1, 1, 2, 2, 3, 4]
    assert committed(harness, "ordered", "in") == 5


# --- observers never change delivery ------------------------------------------------------


class FaultyObserver:
    """An installed observer whose every per-message and per-batch hook raises."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def kafkaworkers_batch_received(self, plugin: Plugin, messages: list[Any]) -> None:
        self.calls.append("batch_received")
        raise RuntimeError("observer bug in batch_received")

    @hookimpl
    def kafkaworkers_message_handled(self, plugin: Plugin, message: Any, value: Any) -> None:
        self.calls.append("message_handled")
        raise RuntimeError("observer bug in message_handled")

    @hookimpl
    def kafkaworkers_message_failed(self, plugin: Plugin, message: Any, error: BaseException, outcome: str) -> None:
        self.calls.append("message_failed")
        raise RuntimeError("observer bug in message_failed")


def test_a_raising_observer_neither_retries_a_handled_message_nor_stops_the_loop_and_is_counted(
    kafkaworkers_harness: MakeHarness, tmp_path: Any
) -> None:
    plugin, calls = echo()
    scope_log: list[str] = []

    @plugin.around_batch
    def batch(state: object) -> Any:
        return _logged(scope_log)

    observer = FaultyObserver()
    harness = kafkaworkers_harness(plugin, observer, partitions=1)
    harness.produce("in", Ping(1))
    harness.produce("in", Ping(2))
    harness.run_until_idle()

    assert calls == [1, 2], "each handler ran once"
    assert harness.values("out", Ping) == [Ping(1), Ping(2)], "each output produced once"
    assert harness.records("echo-retry-1") == [] and harness.records("echo-dlq") == []
    assert committed(harness, "echo", "in") == 2, "the batch was stored, not rewound"
    assert scope_log == ["begin", "commit"], "the batch scope committed once"
    assert set(observer.calls) == {"batch_received", "message_handled"}
    counted = {
        sample.labels["hook"]: sample.value
        for metric in harness.metrics.registry.collect()
        if metric.name == "kafkaworkers_observer_errors"
        for sample in metric.samples
        if sample.name.endswith("_total")
    }
    assert counted == {"kafkaworkers_batch_received": 1, "kafkaworkers_message_handled": 2}


@contextmanager
def _logged(log: list[str]) -> Iterator[None]:
    log.append("begin")
    yield
    log.append("commit")


def test_a_raising_message_failed_observer_leaves_the_failure_routed_once(kafkaworkers_harness: MakeHarness) -> None:
    plugin, calls = echo(fail_with=PermanentError("bad order"))
    observer = FaultyObserver()
    harness = kafkaworkers_harness(plugin, observer, partitions=1)
    harness.produce("in", Ping(1))
    harness.run_until_idle()

    assert calls == [1]
    assert len(harness.records("echo-dlq")) == 1
    assert committed(harness, "echo", "in") == 1
    assert "message_failed" in observer.calls


# --- retry delays, retry modes and sizes ---------------------------------------------------


def test_a_short_requested_retry_is_not_held_behind_a_longer_one(kafkaworkers_harness: MakeHarness) -> None:
    clock = ManualClock()
    plugin = Plugin("asks", produces={"out": Ping}, retry=RetryPolicy(delays=(0.1, 5.0, 60.0), jitter=0.0))
    handled: list[tuple[int, int]] = []

    @plugin.consumes("in")
    def handle(ping: Ping, ctx: Context) -> None:
        if ctx.attempt == 1:
            raise Retry("rate limited", delay=2.0 if ping.n == 1 else 0.05)
        handled.append((ping.n, ctx.attempt))
        ctx.produce("out", ping)

    harness = kafkaworkers_harness(plugin, partitions=1, clock=clock)
    harness.produce("in", Ping(1))
    harness.produce("in", Ping(2))
    harness.run_until_idle()
    assert [len(harness.records(f"asks-retry-{level}")) for level in (1, 2, 3)] == [1, 1, 0]

    clock.advance(0.06)
    harness.run_until_idle()
    assert handled == [(2, 2)], "the 0.05 s retry waited behind the 2 s one"
    clock.advance(2.0)
    harness.run_until_idle()
    assert handled == [(2, 2), (1, 2)]


def test_a_requested_delay_beyond_the_longest_retry_waits_the_longest_one() -> None:
    decision = RetryPolicy(delays=(1.0, 10.0), jitter=0.0).decide(Retry(delay=600.0), attempt=1)
    assert (decision.action, decision.delay, decision.level) == ("retry", 10.0, 2)


def test_retry_mode_pause_handles_the_same_message_again_in_place_keeping_order_then_dead_letters(
    kafkaworkers_harness: MakeHarness,
) -> None:
    clock = ManualClock()
    plugin = Plugin("inplace", produces={"out": Ping}, retry=RetryPolicy(delays=(1.0, 1.0), jitter=0.0, mode="pause"))
    handled: list[tuple[int, int]] = []

    @plugin.consumes("in")
    def handle(ping: Ping, ctx: Context) -> None:
        handled.append((ping.n, ctx.attempt))
        if (ping.n == 1 and ctx.attempt < 3) or ping.n == 3:
            raise ConnectionError("gateway down")
        ctx.produce("out", ping)

    harness = kafkaworkers_harness(plugin, partitions=1, clock=clock)
    for n in (1, 2, 3, 4):
        harness.produce("in", Ping(n), key="same-order")
    harness.run_until_idle()
    assert handled == [(1, 1)], "nothing overtakes a message retried in place"
    assert harness.worker.runners[0].paused and committed(harness, "inplace", "in") == OFFSET_INVALID
    assert harness.broker.list_topics().get("inplace-retry-1") is None, "pause mode has no retry topics"

    clock.advance(1.0)
    harness.run_until_idle()
    assert handled == [(1, 1), (1, 2)]
    clock.advance(1.0)
    harness.run_until_idle()
    assert handled == [(1, 1), (1, 2), (1, 3), (2, 1), (3, 1)]
    clock.advance(1.0)
    harness.run_until_idle()
    clock.advance(1.0)
    harness.run_until_idle()
    assert handled[5:] == [(3, 2), (3, 3), (4, 1)]
    assert harness.values("out", Ping) == [Ping(1), Ping(2), Ping(4)]
    [letter] = harness.records("inplace-dlq")
    assert headers(letter)[H_ATTEMPT] == b"3" and headers(letter)[H_ORIGINAL_OFFSET] == b"2"
    assert committed(harness, "inplace", "in") == 4


def test_a_retry_too_large_for_the_producer_is_dead_lettered_cut_with_the_reason_not_a_crash(
    kafkaworkers_harness: MakeHarness,
) -> None:
    plugin, calls = echo(fail_with=ConnectionError("down"))
    harness = kafkaworkers_harness(plugin, partitions=1, producer={"message.max.bytes": 20_000})
    big = Ping(1)
    produce_raw(harness, "in", msgspec.json.encode(big)[:-1] + b" " * 50_000 + b"}")
    harness.run_until_idle()

    assert calls == [1]
    assert harness.records("echo-retry-1") == []
    [letter] = harness.records("echo-dlq")
    assert headers(letter)[H_EXCEPTION] == b"kafkaworkers.errors.MessageTooLarge"
    assert b"ConnectionError: down" in headers(letter)[H_MESSAGE]
    assert len(letter.value()) < 20_000 and int(headers(letter)[H_TRUNCATED]) > 50_000
    assert committed(harness, "echo", "in") == 1


def test_an_output_too_large_for_the_producer_dead_letters_the_message_that_produced_it(
    kafkaworkers_harness: MakeHarness,
) -> None:
    plugin = Plugin("bloat", produces={"out": Blob}, retry=RetryPolicy(delays=(0.05,), jitter=0.0))
    calls: list[int] = []

    @plugin.consumes("in")
    def handle(ping: Ping, ctx: Context) -> None:
        calls.append(ping.n)
        ctx.produce("out", Blob("x" * (30_000 if ping.n == 1 else 10)))

    harness = kafkaworkers_harness(plugin, partitions=1, producer={"message.max.bytes": 20_000})
    harness.produce("in", Ping(1))
    harness.produce("in", Ping(2))
    harness.run_until_idle()

    assert calls == [1, 2], "too large is permanent: no retry"
    [letter] = harness.records("bloat-dlq")
    assert headers(letter)[H_EXCEPTION] == b"kafkaworkers.errors.MessageTooLarge"
    assert harness.values("out", Blob) == [Blob("x" * 10)]
    assert committed(harness, "bloat", "in") == 2


def test_an_output_the_broker_refuses_after_the_produce_dead_letters_only_its_own_source(
    kafkaworkers_harness: MakeHarness,
) -> None:
    plugin = Plugin("judged", produces={"out": Ping}, retry=RetryPolicy(delays=(0.05,), jitter=0.0))

    @plugin.consumes("in")
    def handle(ping: Ping, ctx: Context) -> None:
        if ping.n == 2:  # the broker takes the produce and refuses this one output in its delivery report
            harness.broker.fail_deliveries("out", 1, KafkaError.MSG_SIZE_TOO_LARGE)
        ctx.produce("out", Ping(ping.n * 10))

    harness = kafkaworkers_harness(plugin, partitions=1)
    for n in (1, 2, 3):
        harness.produce("in", Ping(n))
    harness.run_until_idle()

    [letter] = harness.records("judged-dlq")
    assert msgspec.json.decode(letter.value(), type=Ping) == Ping(2), "the message whose output was refused"
    assert headers(letter)[H_EXCEPTION] == b"kafkaworkers.errors.MessageTooLarge"
    assert harness.values("out", Ping) == [Ping(10), Ping(30)], "the other messages' outputs, once each"
    assert committed(harness, "judged", "in") == 3


class Blob(msgspec.Struct, frozen=True):
    text: str


# --- start-up and readiness ----------------------------------------------------------------


def test_ready_is_false_until_the_worker_joined_and_readiness_says_why(tmp_path: Any) -> None:
    plugin, _ = echo()
    host = PluginHost()
    host.register(plugin, plugin.name)
    worker = Worker([plugin], Settings(bootstrap_servers="memory://ready-test", data_dir=str(tmp_path)), host)
    assert not worker.ready
    assert worker.readiness() == (False, "broker not reached yet")


def test_a_plugin_failing_to_start_is_named_and_the_plugins_started_before_it_are_stopped(tmp_path: Any) -> None:
    stopped: list[str] = []
    first: Plugin[str] = Plugin("first")
    second: Plugin[str] = Plugin("second")

    @first.on_start
    def start_first(env: PluginEnv) -> str:
        return "first-state"

    @first.on_stop
    def stop_first(state: str) -> None:
        stopped.append(state)

    @second.on_start
    def start_second(env: PluginEnv) -> str:
        raise OSError("cannot open the database")

    host = PluginHost()
    for plugin in (first, second):
        host.register(plugin, plugin.name)
    worker = Worker([first, second], Settings(bootstrap_servers="memory://start-fail", data_dir=str(tmp_path)), host)
    with pytest.raises(PluginError, match="plugin 'second' failed to start: OSError: cannot open the database"):
        worker.run(broker_wait=0)
    assert stopped == ["first-state"]


def test_retry_and_dead_letter_topics_of_a_plugin_whose_sources_do_not_exist_get_the_default_size(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    plugin = Plugin("early", retry=RetryPolicy(delays=(1.0,), jitter=0.0))

    @plugin.consumes("not-yet", Ping)
    def handle(ping: Ping, ctx: Context) -> None:
        """Never called: nothing is published."""

    host = PluginHost()
    host.register(plugin, plugin.name)
    transport = MemoryTransport(MemoryBroker())
    worker = Worker([plugin], Settings(bootstrap_servers="memory://early", data_dir=str(tmp_path)), host, transport)
    with caplog.at_level(logging.WARNING, logger="kafkaworkers.worker"):
        worker.start(broker_wait=0)
    worker.close()

    assert transport.broker.list_topics() == {"early-retry-1": DEFAULT_PARTITIONS, "early-dlq": DEFAULT_PARTITIONS}
    assert f"creating them with {DEFAULT_PARTITIONS} partitions" in caplog.text


# --- producer faults and rebalances inside a fetch ----------------------------------------


@pytest.mark.parametrize(
    "error",
    # librdkafka flags fatal() only on error_cb errors; delivery reports after it carry the _FATAL code.
    [KafkaError(KafkaError._FATAL, "producer fenced", fatal=True), KafkaError(KafkaError._FATAL, "producer fenced")],
    ids=["flagged", "code"],
)
def test_a_fatal_producer_error_stops_the_worker_with_one_clear_error_and_stores_nothing(
    kafkaworkers_harness: MakeHarness, error: KafkaError
) -> None:
    plugin, calls = echo()
    harness = kafkaworkers_harness(plugin, partitions=1)
    harness.broker.fail_deliveries("out", 1, error)
    harness.produce("in", Ping(1))

    with pytest.raises(ProducerFatal, match="the producer failed fatally"):
        harness.worker.run_once(timeout=0.5)
    assert calls == [1]
    assert committed(harness, "echo", "in") == OFFSET_INVALID
    assert harness.records("echo-retry-1") == [] and harness.records("echo-dlq") == []


class LateJoin:
    """A transport whose consumers see nothing on a fetch's first call and let another member
    join the group right after its second: a rebalance lands between two consume calls of one fetch."""

    def __init__(self, transport: MemoryTransport, group: str, topics: list[str]) -> None:
        self.transport = transport
        self.name = transport.name
        self.group = group
        self.topics = topics
        self.joined: list[Any] = []
        self._calls = 0

    def consumer(self, config: Any) -> Any:
        inner = self.transport.consumer(config)
        if config["group.id"] != self.group:
            return inner
        late = self

        class Consumer:
            def __getattr__(self, name: str) -> Any:
                return getattr(inner, name)

            def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]:
                late._calls += 1
                if late._calls == 1:
                    return []
                messages = inner.consume(num_messages, timeout)
                if late._calls == 2:
                    newcomer = late.transport.consumer({**config, "stats_cb": None})
                    newcomer.subscribe(late.topics)
                    late.joined.append(newcomer)
                return messages

        return Consumer()

    def producer(self, config: Any) -> Any:
        return self.transport.producer(config)

    def admin(self, config: Any) -> Any:
        return self.transport.admin(config)


@pytest.mark.parametrize("assignor", ["range", "cooperative-sticky"])
def test_a_message_of_a_partition_revoked_between_two_consume_calls_of_a_fetch_is_not_handled(
    tmp_path: Any, assignor: str
) -> None:
    plugin = Plugin("late", retry=RetryPolicy(delays=(), jitter=0.0))
    handled: list[tuple[int, int]] = []

    @plugin.consumes("in")
    def handle(ping: Ping, ctx: Context) -> None:
        handled.append((ctx.partition, ping.n))

    broker = MemoryBroker()
    broker.create_topic("in", 2)
    memory = MemoryTransport(broker)
    producer = memory.producer({})
    producer.produce("in", msgspec.json.encode(Ping(1)), b"k", partition=1)
    producer.flush()
    transport = LateJoin(memory, "late", ["in"])
    host = PluginHost()
    host.register(plugin, plugin.name)
    settings = Settings(
        bootstrap_servers="memory://late", data_dir=str(tmp_path), batch_size=2,
        consumer={"partition.assignment.strategy": assignor},
    )  # fmt: skip
    worker = Worker([plugin], settings, host, transport=transport)
    worker.start(broker_wait=0)
    try:
        worker.run_once(timeout=0.5)
        [newcomer] = transport.joined
        kept = {tp.partition for tp in worker.runners[0].consumer.assignment()}
        assert 1 not in kept, "the rebalance did not move the partition with the message: the test proves nothing"
        assert handled == [], "handled a message of a partition revoked inside the fetch"
        newcomer.close()
    finally:
        worker.close()


@pytest.mark.parametrize("assignor", ["range", "cooperative-sticky"])
def test_a_paused_partition_handed_back_by_a_rebalance_flows_again(tmp_path: Any, assignor: str) -> None:
    clock = ManualClock()
    plugin = Plugin("back", retry=RetryPolicy(delays=(5.0,), jitter=0.0))
    attempts: list[int] = []

    @plugin.consumes("in")
    def handle(ping: Ping, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ConnectionError("try later")

    broker = MemoryBroker()
    broker.create_topic("in", 1)
    transport = MemoryTransport(broker)
    host = PluginHost()
    host.register(plugin, plugin.name)
    settings = Settings(
        bootstrap_servers="memory://back", data_dir=str(tmp_path), consumer={"partition.assignment.strategy": assignor}
    )
    producer = transport.producer({})
    producer.produce("in", msgspec.json.encode(Ping(1)), b"k")
    producer.flush()
    first = Worker([plugin], settings, host, transport=transport, clock=clock)
    first.start(broker_wait=0)
    second = Worker([plugin], settings, host, transport=transport, clock=clock)
    try:
        for _ in range(5):
            first.run_once(timeout=0.01)
        assert first.runners[0].paused, "the retry partition waits for its message to come due"
        second.start(broker_wait=0)
        for _ in range(5):
            first.run_once(timeout=0.01)
            second.run_once(timeout=0.01)
        second.close()
        clock.advance(5.0)
        for _ in range(10):
            first.run_once(timeout=0.01)
        assert attempts == [1, 2], "the retried message was never handled: its partition stayed paused"
    finally:
        first.close()
        second.close()


@pytest.fixture
def python_gc_defaults() -> Iterator[None]:
    """CPython's own collector thresholds for the test, and whatever was there before it after."""
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        yield
    finally:
        gc.set_threshold(*before)


@pytest.mark.parametrize(
    ("chosen", "after_start"),
    [(None, (100_000, 10, 10)), ((5_000, 20, 20), (5_000, 20, 20))],
    ids=["python-default", "plugin-chose"],
)
def test_the_worker_collects_young_garbage_less_often_unless_a_plugin_chose_its_own_thresholds(
    kafkaworkers_harness: MakeHarness, python_gc_defaults: None, chosen: Any, after_start: tuple[int, int, int]
) -> None:
    plugin, _ = echo()
    if chosen is not None:
        plugin.on_start(lambda env: gc.set_threshold(*chosen))
    kafkaworkers_harness(plugin, partitions=1)
    assert gc.get_threshold() == after_start
