"""The transport contract: the same tests against the in-memory broker and Apache Kafka.

The worker loop relies on these behaviours of confluent-kafka; the in-memory broker must show
the same ones, so a unit test on it means what it would mean on Kafka. Clients come from the
framework's own factories, with fresh topic and group names per test.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, OFFSET_INVALID, KafkaError, KafkaException, TopicPartition

from kafkaworkers.config import Settings
from kafkaworkers.consumer import create_consumer
from kafkaworkers.producer import create_producer
from kafkaworkers.transports import Consumer, Message, Producer, Transport
from kafkaworkers.transports.kafka import KafkaTransport
from kafkaworkers.transports.memory import MemoryTransport

STRATEGIES = ["range", "cooperative-sticky"]
#: Short sessions and heartbeats, so Kafka's rebalances take a second, not ten.
FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
DEADLINE = 30.0


class Backend:
    """One broker behind the framework's client factories."""

    def __init__(self, name: str, transport: Transport, bootstrap: str) -> None:
        self.name = name
        self.transport = transport
        self.settings = Settings(bootstrap_servers=bootstrap)
        self._clients: list[Consumer] = []

    def topic(self, partitions: int = 1) -> str:
        name = f"contract-{uuid.uuid4().hex[:12]}"
        admin = self.transport.admin({"bootstrap.servers": self.settings.bootstrap_servers})
        assert admin.create_topics([(name, partitions, 1)]) == {name: "created"}
        return name

    def consumer(self, group: str, **extra: Any) -> Consumer:
        consumer = create_consumer(self.settings, group, {**FAST_GROUP, **extra}, self.transport)
        self._clients.append(consumer)
        return consumer

    def producer(self, **extra: Any) -> Producer:
        return create_producer(self.settings, extra, self.transport)

    def produce(self, topic: str, count: int, partition: int = 0, prefix: str = "v") -> None:
        producer = self.producer()
        for i in range(count):
            producer.produce(topic, f"{prefix}{i}".encode(), f"k{i}".encode(), partition=partition)
        assert producer.flush(DEADLINE) == 0

    def expire(self, consumer: Consumer) -> None:
        """End a member's session: on Kafka by not polling it past max.poll.interval.ms (the
        caller drives the others only), on the memory broker by saying so."""
        if isinstance(self.transport, MemoryTransport):
            self.transport.broker.expire(consumer)  # type: ignore[arg-type]

    def close(self) -> None:
        for consumer in self._clients:
            with contextlib.suppress(RuntimeError):  # closed by the test already
                consumer.close()


@pytest.fixture(params=["memory", pytest.param("kafka", marks=pytest.mark.kafka)])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "memory":
        b = Backend("memory", MemoryTransport(), "memory://contract")
    else:
        b = Backend("kafka", KafkaTransport(), request.getfixturevalue("bootstrap"))
    yield b
    b.close()


def group() -> str:
    return f"contract-{uuid.uuid4().hex[:12]}"


class Member:
    """A consumer with its rebalance callbacks recorded, and whether each ran inside consume()."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.events: list[tuple[str, set[int]]] = []
        self.outside: list[str] = []  # callbacks that ran outside consume() (never expected)
        self._inside = False

    def subscribe(self, topic: str) -> Member:
        self.consumer.subscribe(
            [topic], on_assign=self._record("assign"), on_revoke=self._record("revoke"), on_lost=self._record("lost")
        )
        return self

    def _record(self, kind: str) -> Callable[[Any, list[TopicPartition]], None]:
        def callback(consumer: Any, partitions: list[TopicPartition]) -> None:
            self.events.append((kind, {tp.partition for tp in partitions}))
            if not self._inside and kind != "revoke":  # close() revokes outside consume()
                self.outside.append(kind)

        return callback

    def consume(self, num: int = 100, timeout: float = 0.05) -> list[Message]:
        self._inside = True
        try:
            return self.consumer.consume(num, timeout)
        finally:
            self._inside = False

    def owns(self) -> set[int]:
        return {tp.partition for tp in self.consumer.assignment()}

    def changes(self) -> list[tuple[str, set[int]]]:
        """The callbacks that moved a partition (librdkafka also calls on_assign with [])."""
        return [(kind, parts) for kind, parts in self.events if parts]


def drive(
    members: list[Member], until: Callable[[list[Message]], object], what: str, timeout: float = DEADLINE
) -> list[Message]:
    """Consume from ``members`` in turn until ``until(what they returned)`` holds; those messages."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while not until(got):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        for member in members:
            got += member.consume()
    return got


def data(messages: list[Message]) -> list[Message]:
    return [m for m in messages if m.error() is None]


# --- offsets -----------------------------------------------------------------------


def test_only_explicitly_stored_offsets_are_committed(backend: Backend) -> None:
    topic, g = backend.topic(), group()
    backend.produce(topic, 5)
    member = Member(backend.consumer(g, **{"enable.auto.commit": False})).subscribe(topic)
    got = data(drive([member], lambda got: len(data(got)) >= 5, "five messages"))
    assert [(m.key(), m.value(), m.offset()) for m in got] == [
        (f"k{i}".encode(), f"v{i}".encode(), i) for i in range(5)
    ]
    tp = TopicPartition(topic, 0)
    assert member.consumer.committed([tp], timeout=10)[0].offset == OFFSET_INVALID
    with pytest.raises(KafkaException) as nothing:
        member.consumer.commit(asynchronous=False)  # consumed but never stored
    assert nothing.value.args[0].code() == KafkaError._NO_OFFSET
    member.consumer.store_offsets(offsets=[TopicPartition(topic, 0, got[1].offset() + 1)])
    assert member.consumer.committed([tp], timeout=10)[0].offset == OFFSET_INVALID  # stored is not committed
    member.consumer.commit(asynchronous=False)
    assert member.consumer.committed([tp], timeout=10)[0].offset == 2
    member.consumer.close()
    again = Member(backend.consumer(g)).subscribe(topic)
    rest = data(drive([again], lambda got: len(data(got)) >= 3, "the uncommitted rest"))
    assert [m.offset() for m in rest] == [2, 3, 4]


def test_assign_reads_a_partition_without_joining_a_group(backend: Backend) -> None:
    topic = backend.topic(2)
    backend.produce(topic, 3, partition=1)
    consumer = backend.consumer(group())
    consumer.assign([TopicPartition(topic, 1, OFFSET_BEGINNING)])
    member = Member(consumer)
    got = data(drive([member], lambda got: len(data(got)) >= 3, "the partition's records"))
    assert [(m.partition(), m.offset()) for m in got] == [(1, 0), (1, 1), (1, 2)]
    assert consumer.position([TopicPartition(topic, 1)])[0].offset == 3
    assert member.events == []


# --- pause, seek, rebalances ---------------------------------------------------------


def test_pause_then_seek_back_delivers_again_from_the_seek_offset(backend: Backend) -> None:
    topic = backend.topic()
    backend.produce(topic, 6)
    member = Member(backend.consumer(group())).subscribe(topic)
    first = data(drive([member], lambda got: data(got), "the first records"))
    tp = TopicPartition(topic, 0, first[0].offset())  # the message whose handling failed
    member.consumer.pause([tp])
    member.consumer.seek(tp)
    assert data(member.consume(100, 1.0)) == []  # what was prefetched before the pause is not handed out
    member.consumer.resume([tp])
    again = data(drive([member], lambda got: len(data(got)) >= 6 - tp.offset, "the re-delivery"))
    assert [m.offset() for m in again] == list(range(tp.offset, 6))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_paused_partition_stays_paused_when_it_comes_back_to_the_same_consumer(
    backend: Backend, strategy: str
) -> None:
    topic, g = backend.topic(2), group()
    a = Member(backend.consumer(g, **{"partition.assignment.strategy": strategy})).subscribe(topic)
    drive([a], lambda _: a.owns() == {0, 1}, "A's assignment")
    a.consumer.pause([TopicPartition(topic, 0), TopicPartition(topic, 1)])
    b = Member(backend.consumer(g, **{"partition.assignment.strategy": strategy})).subscribe(topic)
    drive([a, b], lambda _: len(a.owns()) == 1 and len(b.owns()) == 1, "A and B sharing the topic")
    [moved] = b.owns()
    backend.produce(topic, 1, partition=0, prefix="first")
    backend.produce(topic, 1, partition=1, prefix="first")
    # The pause belongs to A: B reads the partition it took over.
    got = data(drive([a, b], lambda got: any(m.partition() == moved for m in data(got)), "B reading"))
    assert {m.partition() for m in got} == {moved}
    b.consumer.close()
    drive([a], lambda _: a.owns() == {0, 1}, "A taking the partition back")
    revoked = [parts for kind, parts in a.changes() if kind == "revoke"]
    assert any(moved in parts for parts in revoked), a.events
    if strategy == "range":  # eager: the partition A kept was revoked and assigned again too
        assert revoked[0] == {0, 1}, a.events
    backend.produce(topic, 1, partition=0, prefix="second")
    backend.produce(topic, 1, partition=1, prefix="second")
    assert data(a.consume(100, 1.0)) == []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert data(a.consume(100, 0.1)) == [], "a partition came back unpaused"
    a.consumer.resume([TopicPartition(topic, 0), TopicPartition(topic, 1)])
    after = data(drive([a], lambda got: {m.partition() for m in data(got)} == {0, 1}, "A reading after resume"))
    assert {m.partition() for m in after} == {0, 1}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_callbacks_when_a_member_joins_and_leaves(backend: Backend, strategy: str) -> None:
    topic, g = backend.topic(2), group()
    config = {"partition.assignment.strategy": strategy}
    a = Member(backend.consumer(g, **config)).subscribe(topic)
    drive([a], lambda _: a.owns() == {0, 1}, "A's assignment")
    b = Member(backend.consumer(g, **config)).subscribe(topic)
    drive([a, b], lambda _: len(a.owns()) == 1 and len(b.owns()) == 1, "A and B sharing the topic")
    [kept], [moved] = a.owns(), b.owns()
    b.consumer.close()
    drive([a], lambda _: a.owns() == {0, 1}, "A taking the partition back")
    if strategy == "range":
        expected = [("assign", {0, 1}), ("revoke", {0, 1}), ("assign", {kept}), ("revoke", {kept}), ("assign", {0, 1})]
    else:
        expected = [("assign", {0, 1}), ("revoke", {moved}), ("assign", {moved})]
    assert a.changes() == expected
    assert b.changes() == [("assign", {moved}), ("revoke", {moved})]
    assert a.outside == b.outside == []


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_rebalance_runs_inside_consume_before_it_returns_messages(backend: Backend, strategy: str) -> None:
    topic, g = backend.topic(2), group()
    backend.produce(topic, 300, partition=0)
    backend.produce(topic, 300, partition=1)
    config = {"partition.assignment.strategy": strategy}
    a = Member(backend.consumer(g, **config)).subscribe(topic)
    drive([a], lambda got: {m.partition() for m in data(got)} == {0, 1}, "A reading both partitions")
    b = Member(backend.consumer(g, **config)).subscribe(topic)
    calls: list[tuple[int, list[Message], set[int]]] = []
    deadline = time.monotonic() + DEADLINE
    while not any(kind == "revoke" for kind, _ in a.changes()):
        assert time.monotonic() < deadline, "A never revoked anything"
        b.consume(1, 0)
        before = len(a.events)
        got = data(a.consume(10, 0.05))  # from both partitions, with more of each left for the next call
        calls.append((before, got, a.owns()))
    revoked_in = next(i for i, (before, _, _) in enumerate(calls) if any(k == "revoke" for k, _ in a.events[before:]))
    for _, got, owned in calls:
        assert {m.partition() for m in got} <= owned
    revoked = next(parts for kind, parts in a.changes() if kind == "revoke")
    _, got, owned = calls[revoked_in]
    assert not {m.partition() for m in got} & (revoked - owned)
    assert a.outside == []


def test_a_member_that_stops_polling_loses_its_partitions(backend: Backend) -> None:
    topic, g = backend.topic(2), group()
    config = {"partition.assignment.strategy": "cooperative-sticky", "max.poll.interval.ms": 6000}
    a = Member(backend.consumer(g, **config)).subscribe(topic)
    b = Member(backend.consumer(g, **config)).subscribe(topic)
    drive([a, b], lambda _: len(a.owns()) == 1 and len(b.owns()) == 1, "A and B sharing the topic")
    [held] = a.owns()
    backend.expire(a.consumer)
    drive([b], lambda _: b.owns() == {0, 1}, "B taking over A's partition")
    # librdkafka may return the error before or after it runs on_lost.
    errors = drive([a], lambda got: got and ("lost", {held}) in a.events, "A hearing it is out of the group")
    assert ("revoke", {held}) not in a.events
    assert [m.error().code() for m in errors] == [KafkaError._MAX_POLL_EXCEEDED]
    drive([a, b], lambda _: len(a.owns()) == 1 and len(b.owns()) == 1, "A back in the group")


# --- producing -------------------------------------------------------------------------


def test_a_record_over_message_max_bytes_is_refused_by_produce(backend: Backend) -> None:
    topic = backend.topic()
    producer = backend.producer(**{"message.max.bytes": 1000})
    # librdkafka sizes a record as key + value + headers + 36 bytes of record framing.
    cases = [
        (None, None, 964),
        (b"k" * 10, None, 954),
        (None, [("h", b"v" * 10)], 951),
        (None, [("hh", b"v" * 10), ("a", None)], 947),
    ]
    for key, headers, largest in cases:
        producer.produce(topic, b"x" * largest, key, headers=headers)
        with pytest.raises(KafkaException) as raised:
            producer.produce(topic, b"x" * (largest + 1), key, headers=headers)
        err = raised.value.args[0]
        assert err.code() == KafkaError.MSG_SIZE_TOO_LARGE
        assert not err.fatal() and not err.retriable()
    assert producer.flush(DEADLINE) == 0


def test_a_delivery_to_a_missing_topic_fails_through_on_delivery(backend: Backend) -> None:
    missing = f"contract-missing-{uuid.uuid4().hex[:12]}"
    # Kafka waits topic.metadata.propagation.max.ms (30 s) for a topic to appear; 0.1 s here.
    producer = backend.producer(**{"topic.metadata.propagation.max.ms": 100})
    reports: list[tuple[Any, Any]] = []
    producer.produce(missing, b"x", on_delivery=lambda err, msg: reports.append((err, msg)))
    assert producer.flush(DEADLINE) == 0
    [(err, msg)] = reports
    assert err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
    assert not err.fatal() and not err.retriable()  # confluent-kafka sets neither on delivery reports
    assert (msg.topic(), msg.offset(), msg.error()) == (missing, None, err)


# --- consumer errors -----------------------------------------------------------------


def test_subscribing_to_a_missing_topic_reports_unknown_topic(backend: Backend) -> None:
    missing = f"contract-missing-{uuid.uuid4().hex[:12]}"
    member = Member(backend.consumer(group())).subscribe(missing)
    [msg] = drive([member], lambda got: got, "the error")
    err = msg.error()
    assert err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART and not err.fatal()
    assert msg.topic() == missing and msg.offset() is None
    assert member.consumer.assignment() == []
