"""What ``kafkaworkers inspect`` reports, on the in-memory broker through the test Harness."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import msgspec

from kafkaworkers import Context, Plugin, Retry, RetryPolicy
from kafkaworkers.clock import ManualClock
from kafkaworkers.headers import H_DUE
from kafkaworkers.inspect import Identity, Partition, client_id, lag, parse_client_id, retries, workers
from kafkaworkers.testing import Harness

MakeHarness = Callable[..., Harness]


class Ping(msgspec.Struct, frozen=True):
    n: int


def plugin(fail: bool = False) -> Plugin:
    p = Plugin("probe", retry=RetryPolicy(delays=(30.0,), jitter=0.0))

    @p.consumes("in", Ping)
    def handle(ping: Ping, ctx: Context) -> None:
        if fail:
            raise Retry(f"ping {ping.n} not yet")

    return p


def test_a_client_id_carries_host_pid_and_process_index_and_others_parse_to_none() -> None:
    who = Identity("web-1.example.com", 4321, 2)
    assert client_id(who) == "kafkaworkers/web-1.example.com/4321/2"
    assert parse_client_id(client_id(who)) == who
    assert who.worker == "web-1.example.com/4321"
    for other in ("rdkafka", "kafkaworkers/h/pid/0", "kafkaworkers/h/1", "other/h/1/0"):
        assert parse_client_id(other) is None


def test_workers_lists_the_worker_in_its_group_and_retry_group_with_what_it_owns(
    kafkaworkers_harness: MakeHarness,
) -> None:
    p = plugin()
    harness = kafkaworkers_harness(p, partitions=2)
    harness.run_until_idle()
    rows = workers(harness.settings, [p], transport=harness.transport)
    assert [(m.group, m.plugin) for m in rows] == [("probe", "probe"), ("probe-retry", "probe")]
    assert rows[0].partitions == [Partition("in", 0), Partition("in", 1)]
    assert rows[1].partitions == [Partition("probe-retry-1", 0), Partition("probe-retry-1", 1)]
    for m in rows:
        assert (m.host, m.pid, m.process) == (socket.gethostname(), os.getpid(), 0)
        assert m.worker == f"{socket.gethostname()}/{os.getpid()}"


def test_lag_is_produced_minus_committed_per_partition(kafkaworkers_harness: MakeHarness) -> None:
    p = plugin()
    harness = kafkaworkers_harness(p, partitions=1)
    for n in range(5):
        harness.produce("in", Ping(n))
    harness.run_until_idle()
    for n in range(3):
        harness.produce("in", Ping(n))
    [main, retry] = lag(harness.settings, [p], transport=harness.transport)
    assert (main.group, main.topic, main.committed, main.end, main.lag) == ("probe", "in", 5, 8, 3)
    assert (retry.group, retry.topic, retry.committed, retry.end, retry.lag) == (
        "probe-retry",
        "probe-retry-1",
        None,
        0,
        0,
    )


def test_retries_counts_the_uncommitted_retry_messages_and_their_due_times(kafkaworkers_harness: MakeHarness) -> None:
    clock = ManualClock()
    p = plugin(fail=True)
    harness = kafkaworkers_harness(p, partitions=1, clock=clock)
    harness.produce("in", Ping(1))
    harness.run_until_idle()
    clock.advance(5)
    harness.produce("in", Ping(2))
    harness.run_until_idle()
    [row] = retries(harness.settings, [p], transport=harness.transport)
    assert (row.group, row.topic, row.partition, row.waiting) == ("probe-retry", "probe-retry-1", 0, 2)
    start_ms = int((clock.time() - 5) * 1000)
    assert (row.next_due_ms, row.last_due_ms) == (start_ms + 30_000, start_ms + 35_000)


def test_retries_with_a_sample_reads_due_times_from_the_first_and_last_waiting_messages_only(
    kafkaworkers_harness: MakeHarness,
) -> None:
    p = plugin()
    harness = kafkaworkers_harness(p, partitions=1)
    producer = harness.transport.producer({})
    dues = [1_000 + n for n in range(50)]
    dues[25] = 1  # in the middle: a whole read sees it, a sample of ten at each end does not
    for due in dues:
        producer.produce("probe-retry-1", b"{}", b"k", headers=[(H_DUE, str(due).encode())])
    producer.flush()

    [whole] = retries(harness.settings, [p], transport=harness.transport)
    [sampled] = retries(harness.settings, [p], transport=harness.transport, sample=10)
    [short] = retries(harness.settings, [p], transport=harness.transport, sample=30)

    assert (whole.waiting, whole.next_due_ms, whole.last_due_ms) == (50, 1, 1_049)
    assert (sampled.waiting, sampled.next_due_ms, sampled.last_due_ms) == (50, 1_000, 1_049)
    assert (short.next_due_ms, short.last_due_ms) == (1, 1_049), "heads and tails overlap: every message read"
