"""The loop's hardening on the real broker, with workers in this process stepped by the test.

What only librdkafka shows: the producer refusing a message over its ``message.max.bytes``
synchronously, the broker refusing one over the topic's in the delivery report, and a
partition's pause flag surviving an eager rebalance that hands the partition back to the
same consumer.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import msgspec
import pytest
from confluent_kafka.admin import NewTopic

from kafkaworkers import Context, Plugin, RetryPolicy
from kafkaworkers.headers import H_EXCEPTION, H_TRUNCATED
from kafkaworkers.retry import dlq_topic, retry_topic
from tests.conftest import KafkaHelper
from tests.integration.conftest import Loop, Ping

pytestmark = pytest.mark.kafka


def test_a_retry_over_the_producers_size_limit_is_dead_lettered_cut_instead_of_crashing_the_worker(
    kafka: KafkaHelper, bootstrap: str, tmp_path: Path, loops: list[Loop]
) -> None:
    name = f"big-{uuid.uuid4().hex[:8]}"
    source, out = f"{name}.in", f"{name}.out"
    kafka.create_topics(source, out, partitions=1)
    plugin = Plugin(name, produces={out: Ping}, retry=RetryPolicy(delays=(0.1,), jitter=0.0))
    calls: list[int] = []

    @plugin.consumes(source)
    def handle(ping: Ping, ctx: Context) -> None:
        calls.append(ping.n)
        if ping.n == 1:
            raise ConnectionError("downstream refused")
        ctx.produce(out, ping)

    loop = Loop(bootstrap, tmp_path, plugin, producer={"message.max.bytes": 20_000}, group_id=name)
    loops.append(loop)
    kafka.produce(source, [msgspec.json.encode(Ping(1, "x" * 50_000)), msgspec.json.encode(Ping(2))])
    loop.add()
    loop.until(lambda: kafka.committed(name, source, partitions=1) == 2, 60, "both offsets committed")

    assert calls == [1, 2]
    [letter] = kafka.read_all(dlq_topic(name), 1)
    headers = dict(letter.headers())
    assert headers[H_EXCEPTION] == b"kafkaworkers.errors.MessageTooLarge"
    assert int(headers[H_TRUNCATED]) > 50_000 and len(letter.value()) < 20_000
    assert kafka.read_all(retry_topic(name, 1), 0, timeout=1) == []
    assert [msgspec.json.decode(m.value(), type=Ping).n for m in kafka.read_all(out, 1)] == [2]


def test_an_output_the_broker_refuses_in_its_delivery_report_dead_letters_the_message_that_produced_it(
    kafka: KafkaHelper, bootstrap: str, tmp_path: Path, loops: list[Loop]
) -> None:
    name = f"refused-{uuid.uuid4().hex[:8]}"
    source, out = f"{name}.in", f"{name}.out"
    kafka.create_topics(source, partitions=1)
    # The topic's limit is the broker's, below the producer's: produce() takes the output and the
    # delivery report refuses it, which the batch must trace back to the message that produced it.
    created = kafka.admin.create_topics([NewTopic(out, 1, 1, config={"max.message.bytes": "2000"})])
    for future in created.values():
        future.result(30)
    plugin = Plugin(name, produces={out: Ping}, retry=RetryPolicy(delays=(0.1,), jitter=0.0))

    @plugin.consumes(source)
    def handle(ping: Ping, ctx: Context) -> None:
        ctx.produce(out, Ping(ping.n, "x" * 5_000 if ping.n == 2 else ""))

    # One message per batch: each output in a produce request of its own, refused or not by itself.
    loop = Loop(bootstrap, tmp_path, plugin, batch_size=1, group_id=name)
    loops.append(loop)
    kafka.produce(source, [msgspec.json.encode(Ping(n)) for n in (1, 2, 3)])
    loop.add()
    loop.until(lambda: kafka.committed(name, source, partitions=1) == 3, 60, "every offset committed")

    [letter] = kafka.read_all(dlq_topic(name), 1)
    assert msgspec.json.decode(letter.value(), type=Ping).n == 2
    assert dict(letter.headers())[H_EXCEPTION] == b"kafkaworkers.errors.MessageTooLarge"
    assert [msgspec.json.decode(m.value(), type=Ping).n for m in kafka.read_all(out, 2)] == [1, 3]


@pytest.mark.parametrize("assignor", ["range", "cooperative-sticky"])
def test_a_paused_retry_partition_handed_back_by_a_rebalance_is_handled_when_due(
    kafka: KafkaHelper, bootstrap: str, tmp_path: Path, loops: list[Loop], assignor: str
) -> None:
    name = f"back-{uuid.uuid4().hex[:8]}"
    source = f"{name}.in"
    kafka.create_topics(source, partitions=1)
    plugin = Plugin(name, retry=RetryPolicy(delays=(2.0,), jitter=0.0))
    attempts: list[int] = []

    @plugin.consumes(source)
    def handle(ping: Ping, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ConnectionError("try later")

    loop = Loop(bootstrap, tmp_path, plugin, group_id=name, consumer={"partition.assignment.strategy": assignor})
    loops.append(loop)
    kafka.produce(source, [msgspec.json.encode(Ping(1))])
    first = loop.add()
    loop.until(lambda: first.runners[0].paused, 60, "the retry partition paused until its message is due")

    second = loop.add()
    loop.until(lambda: all(r.joined for r in second.runners), 60, "the second member joined")
    loop.workers.remove(second)
    second.close()
    loop.until(lambda: attempts == [1, 2], 60, "the retried message handled once it was due")
    loop.until(lambda: kafka.committed(f"{name}-retry", retry_topic(name, 1), partitions=1) == 1, 30, "commit")
    assert first.runners[0].paused == {}
