"""The in-memory broker keeps confluent-kafka's semantics, so the worker loop runs unchanged on it."""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, KafkaError, KafkaException, TopicPartition

from kafkaworkers.transports.memory import MemoryBroker, MemoryTransport, murmur2

MANUAL = {"enable.auto.offset.store": False, "enable.auto.commit": False}


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.001)


@pytest.fixture
def transport() -> MemoryTransport:
    t = MemoryTransport()
    t.broker.create_topic("orders", 4)
    return t


def consumer(transport, group="g", **config):
    # The framework's protocol; tests/transports/test_contract.py covers both against Kafka.
    return transport.consumer({"group.id": group, "auto.offset.reset": "earliest",
                               "partition.assignment.strategy": "cooperative-sticky", **config})


def produce(transport, n, topic="orders", **kwargs):
    producer = transport.producer({})
    for i in range(n):
        producer.produce(topic, value=f"v{i}", key=f"k{i}", **kwargs)
    assert producer.flush(1) == 0


def drain(c, expected, timeout=5.0):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        got += c.consume(100, 0.05)
    return got


def ids(messages):
    return sorted((m.partition(), m.offset()) for m in messages)


@pytest.mark.parametrize(("data", "java_hash"), [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
    (b"", 275646681),
])
def test_murmur2_matches_kafka_java_reference_vectors(data, java_hash):
    assert ctypes.c_int32(murmur2(data)).value == java_hash


def test_keyed_partition_matches_librdkafka_murmur2_random(transport):
    # Partitions librdkafka's murmur2_random chose for these keys on a 4-partition topic.
    expected = {b"kafka": 0, b"giberish123456789": 0, b"1234": 0, b"": 1, b"foobar": 2, b"abc": 3}
    producer = transport.producer({})
    for key in expected:
        producer.produce("orders", value=b"x", key=key)
    assert {m.key(): m.partition() for m in transport.broker.records("orders")} == expected


def test_key_partitioning_is_stable_and_spreads_over_partitions(transport):
    producer = transport.producer({"bootstrap.servers": "ignored", "linger.ms": 5})
    for _ in range(3):
        producer.produce("orders", value=b"x", key=b"same")
    for i in range(200):
        producer.produce("orders", value=b"x", key=f"key-{i}")
        producer.produce("orders", value=b"x")
    messages = transport.broker.records("orders")
    assert len({m.partition() for m in messages if m.key() == b"same"}) == 1
    assert {m.partition() for m in messages if m.key() not in (None, b"same")} == {0, 1, 2, 3}
    assert {m.partition() for m in messages if m.key() is None} <= {0, 1, 2, 3}


def test_explicit_partition_is_honoured_and_a_missing_one_raises(transport):
    producer = transport.producer({})
    producer.produce("orders", value=b"x", key=b"kafka", partition=3)
    assert [m.partition() for m in transport.broker.records("orders")] == [3]
    with pytest.raises(KafkaException) as raised:
        producer.produce("orders", value=b"x", partition=4)
    assert raised.value.args[0].code() == KafkaError._UNKNOWN_PARTITION


def test_producing_to_an_unknown_topic_fails_the_delivery(transport):
    reports = []
    producer = transport.producer({})
    producer.produce("nope", value=b"x", on_delivery=lambda err, msg: reports.append((err, msg)))
    producer.flush()
    [(err, msg)] = reports
    assert err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
    assert msg.error() is err and msg.offset() is None
    assert "nope" not in transport.admin({}).list_topics()


def test_auto_create_partitions_creates_unknown_topics_on_produce():
    transport = MemoryTransport(MemoryBroker(auto_create_partitions=3))
    produce(transport, 1, topic="fresh")
    assert transport.admin({}).list_topics() == {"fresh": 3}


def test_delivery_reports_are_served_only_by_poll_and_flush(transport):
    served = []
    producer = transport.producer({"on_delivery": lambda err, msg: served.append(("default", err))})
    producer.produce("orders", value=b"a", callback=lambda err, msg: served.append(("cb", err)))
    producer.produce("orders", value=b"b")
    assert served == [] and len(producer) == 2
    assert len(transport.broker.records("orders")) == 2  # in the log before the report
    assert producer.poll(0) == 2
    assert served == [("cb", None), ("default", None)] and len(producer) == 0
    assert producer.poll(0) == 0


def test_delivery_callback_runs_on_the_polling_thread(transport):
    threads = []
    producer = transport.producer({})
    worker = threading.Thread(target=producer.produce, args=("orders", b"x"),
                              kwargs={"on_delivery": lambda e, m: threads.append(threading.get_ident())})
    worker.start()
    worker.join()
    assert producer.poll(5) == 1 and threads == [threading.get_ident()]


def test_failed_deliveries_report_an_error_and_skip_the_log(transport):
    transport.broker.fail_deliveries("orders", 2)
    reports = []
    producer = transport.producer({})
    for i in range(3):
        producer.produce("orders", value=f"{i}", on_delivery=lambda err, msg: reports.append(err))
    producer.flush()
    assert [e and e.code() for e in reports] == [KafkaError._MSG_TIMED_OUT] * 2 + [None]
    assert [m.value() for m in transport.broker.records("orders")] == [b"2"]


def test_headers_and_timestamps_round_trip(transport):
    producer = transport.producer({})
    producer.produce("orders", value="é", key="k", partition=0, timestamp=1_700_000_000_123,
                     headers=[("trace", b"\x00\x01"), ("kind", "order"), ("empty", None)])
    before = int(time.time() * 1000)
    producer.produce("orders", value=b"v", partition=0, headers={"a": "b"})
    c = consumer(transport)
    c.subscribe(["orders"])
    first, second = drain(c, 2)
    assert (first.key(), first.value(), len(first)) == (b"k", "é".encode(), 2)
    assert first.headers() == [("trace", b"\x00\x01"), ("kind", b"order"), ("empty", None)]
    assert first.timestamp() == (TIMESTAMP_CREATE_TIME, 1_700_000_000_123)
    assert second.headers() == [("a", b"b")] and second.error() is None
    assert before <= second.timestamp()[1] <= int(time.time() * 1000)


def test_a_new_consumer_resumes_after_the_groups_last_commit(transport):
    produce(transport, 20)
    first = consumer(transport, **MANUAL)
    first.subscribe(["orders"])
    got = drain(first, 20)
    for msg in got[:10]:
        first.store_offsets(message=msg)
    first.commit(asynchronous=False)
    first.close()
    second = consumer(transport)
    second.subscribe(["orders"])
    rest = drain(second, 10)
    assert ids(rest) == ids(got[10:]) and second.consume(10, 0) == []


def test_group_members_share_partitions_and_get_every_message_once(transport):
    produce(transport, 200)
    members = [consumer(transport), consumer(transport)]
    for c in members:
        c.subscribe(["orders"])
    results = [[], []]

    def run(i):
        deadline = time.monotonic() + 5
        while sum(map(len, results)) < 200 and time.monotonic() < deadline:
            results[i] += members[i].consume(100, 0.01)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assignments = [{tp.partition for tp in c.assignment()} for c in members]
    assert assignments[0].isdisjoint(assignments[1]) and assignments[0] | assignments[1] == {0, 1, 2, 3}
    assert all(len(a) == 2 for a in assignments)
    all_ids = ids(results[0] + results[1])
    assert len(all_ids) == 200 and len(set(all_ids)) == 200
    for got, assigned in zip(results, assignments, strict=True):
        assert {m.partition() for m in got} <= assigned


def test_a_joining_member_gets_partitions_only_after_the_owner_revokes_them(transport):
    events = []
    first = consumer(transport)
    first.subscribe(["orders"], on_assign=lambda c, ps: events.append(("a1", ps)),
                    on_revoke=lambda c, ps: events.append(("r1", ps)))
    first.consume(1, 0)
    second = consumer(transport)
    second.subscribe(["orders"], on_assign=lambda c, ps: events.append(("a2", ps)))
    assert second.consume(1, 0) == [] and second.assignment() == []
    first.consume(1, 0)
    second.consume(1, 0)
    parts = [(name, [tp.partition for tp in ps]) for name, ps in events]
    # As librdkafka: every member of a rebalanced group hears on_assign, [] if it gains nothing.
    assert parts == [("a1", [0, 1, 2, 3]), ("a2", []), ("r1", [2, 3]), ("a1", []), ("a2", [2, 3])]


def test_a_closing_member_hands_its_partitions_over_through_the_callbacks(transport):
    produce(transport, 40)
    calls = []

    def record(name):
        return lambda c, ps: calls.append((name, threading.get_ident(), [tp.partition for tp in ps]))

    stay = consumer(transport)
    leave = consumer(transport)
    stay.subscribe(["orders"], on_assign=record("assign-stay"), on_revoke=record("revoke-stay"))
    leave.subscribe(["orders"], on_assign=record("assign-leave"), on_revoke=record("revoke-leave"))
    stop = threading.Event()
    got = []

    def run():
        while not stop.is_set():
            got.extend(stay.consume(100, 0.05))

    worker = threading.Thread(target=run)
    worker.start()
    read = leave.consume(1, 0)
    leave.close()
    # The leaver auto-committed what it read; the stayer picks up right after it.
    wait_until(lambda: len(got) == 40 - len(read))
    stop.set()
    worker.join()
    me, them = threading.get_ident(), worker.ident
    assert ("revoke-leave", me, [2, 3]) in calls
    assert [c for c in calls if c[0] == "assign-stay"] == [("assign-stay", them, [0, 1]),
                                                           ("assign-stay", them, [2, 3])]
    assert not any(c[0] == "revoke-stay" for c in calls)
    assert len(set(ids(got + read))) == 40


def test_members_joining_and_leaving_under_load_never_share_a_partition(transport):
    owners, violations, got = {}, [], []
    guard, stop = threading.Lock(), threading.Event()

    def on_assign(c, partitions):
        with guard:
            violations.extend(tp.partition for tp in partitions if tp.partition in owners)
            owners.update((tp.partition, c) for tp in partitions)

    def on_revoke(c, partitions):
        with guard:
            violations.extend(tp.partition for tp in partitions if owners.pop(tp.partition) is not c)

    def member(until):
        c = consumer(transport)
        c.subscribe(["orders"], on_assign=on_assign, on_revoke=on_revoke)
        while not until():
            got.extend(c.consume(50, 0.01))
        c.close()

    threads = [threading.Thread(target=produce, args=(transport, 600)),
               threading.Thread(target=member, args=(stop.is_set,)),
               threading.Thread(target=member, args=(lambda: len(got) >= 300,))]
    for t in threads:
        t.start()
    wait_until(lambda: len(got) >= 150)
    threads.append(threading.Thread(target=member, args=(stop.is_set,)))
    threads[-1].start()
    wait_until(lambda: len(got) >= 600)
    stop.set()
    for t in threads:
        t.join()
    assert violations == [] and owners == {}
    # Auto-stored offsets are committed on revoke, so a handover neither loses nor repeats.
    assert len(ids(got)) == len(set(ids(got))) == 600


def test_separate_groups_each_get_every_message(transport):
    produce(transport, 30)
    for group in ("billing", "audit"):
        c = consumer(transport, group)
        c.subscribe(["orders"])
        assert len(set(ids(drain(c, 30)))) == 30


def test_auto_offset_reset_latest_skips_earlier_messages(transport):
    produce(transport, 5)
    c = transport.consumer({"group.id": "late"})
    c.subscribe(["orders"])
    assert c.consume(10, 0) == []
    produce(transport, 3)
    assert len(drain(c, 3)) == 3


def test_subscribing_to_a_missing_topic_gets_partitions_once_it_exists(transport):
    c = consumer(transport)
    c.subscribe(["later"])
    [missing] = c.consume(1, 0)
    assert missing.error().code() == KafkaError.UNKNOWN_TOPIC_OR_PART and missing.topic() == "later"
    assert c.consume(1, 0) == [] and c.assignment() == []
    transport.admin({}).create_topics([("later", 2, 1)])
    produce(transport, 4, topic="later")
    assert len(drain(c, 4)) == 4
    assert [tp.partition for tp in c.assignment()] == [0, 1]


def test_fetch_round_robins_so_a_hot_partition_does_not_starve_others(transport):
    producer = transport.producer({})
    for _ in range(50):
        producer.produce("orders", value=b"hot", partition=0)
    producer.produce("orders", value=b"cold", partition=1)
    c = consumer(transport)
    c.subscribe(["orders"])
    assert sorted(m.partition() for m in c.consume(2, 1)) == [0, 1]


def test_pause_stops_a_partition_and_resume_restarts_it(transport):
    c = consumer(transport)
    c.subscribe(["orders"])
    c.consume(1, 0)
    c.pause([TopicPartition("orders", 1)])
    produce(transport, 1, partition=1)
    produce(transport, 1, partition=2)
    assert [m.partition() for m in drain(c, 2, timeout=0.2)] == [2]
    c.resume([TopicPartition("orders", 1)])
    assert [m.partition() for m in c.consume(10, 1)] == [1]


def test_seek_rewinds_the_fetch_position(transport):
    produce(transport, 3, partition=0)
    c = consumer(transport)
    c.subscribe(["orders"])
    assert [m.offset() for m in drain(c, 3)] == [0, 1, 2]
    assert c.position([TopicPartition("orders", 0)])[0].offset == 3
    assert c.get_watermark_offsets(TopicPartition("orders", 0)) == (0, 3)
    c.seek(TopicPartition("orders", 0, 1))
    assert [m.offset() for m in drain(c, 2)] == [1, 2]
    with pytest.raises(KafkaException):
        c.get_watermark_offsets(TopicPartition("nope", 0))


def test_only_stored_offsets_are_committed(transport):
    produce(transport, 5, partition=0)
    c = consumer(transport, **MANUAL)
    c.subscribe(["orders"])
    got = drain(c, 5)
    tp0 = TopicPartition("orders", 0)
    with pytest.raises(KafkaException) as nothing:
        c.commit(asynchronous=False)
    assert nothing.value.args[0].code() == KafkaError._NO_OFFSET
    c.store_offsets(message=got[1])
    assert c.committed([tp0])[0].offset == -1001  # stored is not committed
    done = c.commit(asynchronous=False)
    assert [(tp.partition, tp.offset) for tp in done] == [(0, 2), (1, -1001), (2, -1001), (3, -1001)]
    assert c.committed([tp0])[0].offset == 2
    c.store_offsets(offsets=[TopicPartition("orders", 0, 4)])
    assert c.commit() is None and c.committed([tp0])[0].offset == 4


def test_storing_offsets_is_refused_when_unassigned_or_automatic(transport):
    produce(transport, 1)
    c = consumer(transport, **MANUAL)
    c.subscribe(["orders"])
    with pytest.raises(KafkaException) as unassigned:
        c.store_offsets(offsets=[TopicPartition("other", 0, 1)])
    assert unassigned.value.args[0].code() == KafkaError._STATE
    auto = consumer(transport, "auto")
    auto.subscribe(["orders"])
    [msg] = drain(auto, 1)
    with pytest.raises(KafkaException) as automatic:
        auto.store_offsets(message=msg)
    assert automatic.value.args[0].code() == KafkaError._INVALID_ARG


def test_storing_the_offset_of_a_consumer_error_is_refused_as_librdkafka_does(transport):
    c = consumer(transport, **MANUAL)
    c.subscribe(["orders"])
    c.consume(1, 0)
    transport.broker.inject_consumer_error("g", KafkaError._TRANSPORT, topic="orders", partition=0)
    [err] = c.consume(1, 0)
    with pytest.raises(KafkaException) as refused:
        c.store_offsets(message=err)
    assert refused.value.args[0].code() == KafkaError._INVALID_ARG
    assert "Cannot store offsets for message with error" in refused.value.args[0].str()


def test_auto_commit_commits_auto_stored_offsets_on_the_next_consume(transport):
    produce(transport, 1, partition=0)
    c = consumer(transport)
    c.subscribe(["orders"])
    drain(c, 1)
    tp0 = TopicPartition("orders", 0)
    assert c.committed([tp0])[0].offset == -1001
    c.consume(1, 0)
    assert c.committed([tp0])[0].offset == 1


def test_consume_timeout_returns_empty_without_busy_waiting(transport):
    c = consumer(transport)
    c.subscribe(["orders"])
    c.consume(1, 0)
    wall, cpu = time.monotonic(), time.process_time()
    assert c.consume(10, 0.3) == []
    assert time.monotonic() - wall >= 0.3
    assert time.process_time() - cpu < 0.1


def test_a_waiting_consume_wakes_when_a_message_arrives(transport):
    c = consumer(transport)
    c.subscribe(["orders"])
    c.consume(1, 0)
    threading.Thread(target=produce, args=(transport, 1)).start()
    start = time.monotonic()
    assert len(c.consume(1, 10)) == 1
    assert time.monotonic() - start < 5


def test_closed_consumer_raises_runtime_error_and_close_is_idempotent(transport):
    c = consumer(transport)
    c.close()
    c.close()
    with pytest.raises(RuntimeError, match="Consumer closed"):
        c.consume(1, 0)
    with pytest.raises(RuntimeError):
        c.assignment()


def test_consumer_requires_a_group_and_a_valid_reset_policy(transport):
    with pytest.raises(ValueError, match=r"group\.id"):
        transport.consumer({"bootstrap.servers": "memory://"})
    with pytest.raises(KafkaException):
        transport.consumer({"group.id": "g", "auto.offset.reset": "sideways"})


def test_named_transports_share_one_broker_and_admin_reports_topics():
    first, second = MemoryTransport.named("test-shared"), MemoryTransport.named("test-shared")
    assert first.broker is second.broker and first.name == "memory"
    assert MemoryTransport.named("test-other").broker is not first.broker
    admin = first.admin({})
    assert admin.create_topics([("shared", 2, 1)]) == {"shared": "created"}
    assert second.admin({}).create_topics([("shared", 5, 1)]) == {"shared": "exists"}
    assert second.admin({}).list_topics()["shared"] == 2


def test_fail_deliveries_reports_the_error_given_with_its_flags(transport):
    fatal = KafkaError(KafkaError._FATAL, "fenced", fatal=True)
    transport.broker.fail_deliveries("orders", 1, fatal)
    reports = []
    producer = transport.producer({})
    producer.produce("orders", value=b"x", on_delivery=lambda err, msg: reports.append(err))
    producer.flush()
    [err] = reports
    assert err is fatal and err.fatal()
    assert transport.broker.records("orders") == []


def test_injected_consumer_errors_come_before_messages_once(transport):
    c = consumer(transport)
    c.subscribe(["orders"])
    c.consume(1, 0)
    transport.broker.inject_consumer_error("g", KafkaError._TRANSPORT, topic="orders", partition=0)
    produce(transport, 1)
    [err] = c.consume(10, 0)
    assert err.error().code() == KafkaError._TRANSPORT and not err.error().fatal()
    assert (err.topic(), err.partition(), err.offset()) == ("orders", 0, None)
    [msg] = drain(c, 1)
    assert msg.error() is None
