"""Poison input on a live partition of the real broker.

Bytes no ping decodes from (invalid UTF-8 or JSON, the wrong shape, a tombstone, NaN,
10,000-deep nesting, a 100,000-digit integer, a 2 MiB payload, binary headers) are written
between valid pings on one partition while a worker consumes it. Each poison message must
be dead-lettered on its first attempt with ``DecodeError`` and a reason, every valid ping
before and after it handled exactly once, and the worker must keep running. One line for
the README::

    scenario=poison messages=<N> faults=<K> lost=<L> duplicated=<D> recover_s=<X.X>

``recover_s``: from the first poison message written to the last valid ping after the poison
handled.
"""

from __future__ import annotations

import collections
import json
import time
from typing import Any

import msgspec
import pytest
from confluent_kafka import Producer

from tests.conftest import KafkaHelper, KwTest, wait_for
from tests.integration.test_dlq_kafka import dlq_json

pytestmark = pytest.mark.kafka

MIB = 1024 * 1024
DECODE_ERROR = b"kafkaworkers.errors.DecodeError"
DEEP = b"[" * 10_000 + b"]" * 10_000
BINARY_HEADERS = [("x-binary", b"\xff\xfe\x00\x80"), ("kw-correlation-id", b"\xc3\x28"), ("x-null", None)]

#: name -> (value, headers): each must be dead-lettered on its first attempt.
POISON: dict[str, tuple[bytes | None, list[tuple[str, bytes | None]] | None]] = {
    "invalid-utf8": (b"\xff\xfe\xfd\xfc", None),
    "invalid-json": (b'{"n": 1,', None),
    "wrong-shape": (b'{"n": "seven", "fail": 3}', None),
    "tombstone": (None, None),
    "nan": (b'{"n": NaN}', None),
    "deep-nesting": (b'{"n": ' + DEEP + b"}", None),
    "deep-nesting-in-unknown-field": (b'{"n": 1, "nested": ' + DEEP + b"}", None),
    "100000-digit-int": (b'{"n": ' + b"9" * 100_000 + b"}", None),
    "2mib-payload": (b'{"n": "' + b"x" * (2 * MIB) + b'"}', None),
    "binary-headers": (b"\x00\x01 not json", BINARY_HEADERS),
}


def ping(n: int) -> bytes:
    return msgspec.json.encode({"n": n})


def headers(msg: Any) -> dict[str, bytes]:
    return {k: v if v is not None else b"" for k, v in msg.headers() or []}


def test_poison_messages_are_dead_lettered_on_the_first_attempt_and_the_partition_keeps_flowing(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    kafka.create_topics(kwtest.ping, kwtest.pong, partitions=1)
    dlq = f"{kwtest.group}-dlq"
    worker = kwtest.start()
    producer = Producer(
        {"bootstrap.servers": kafka.bootstrap, "enable.idempotence": True, "message.max.bytes": 4 * MIB, "linger.ms": 5}
    )
    offsets: dict[str, int] = {}

    def send(name: str, value: bytes | None, hdrs: Any = None) -> None:
        def delivered(err: Any, msg: Any) -> None:
            assert err is None, f"{name}: {err}"
            offsets[name] = msg.offset()

        producer.produce(kwtest.ping, value, name.encode(), headers=hdrs, on_delivery=delivered)

    for n in range(10):
        send(f"before-{n}", ping(n))
    assert producer.flush(30) == 0
    wait_for(lambda: kafka.committed(kwtest.group, kwtest.ping, partitions=1) == 10, 60, "the pings before")

    started = time.monotonic()
    for name, (value, hdrs) in POISON.items():
        send(name, value, hdrs)
    send("valid-with-binary-headers", ping(100), BINARY_HEADERS)
    for n in range(10, 20):
        send(f"after-{n}", ping(n))
    assert producer.flush(30) == 0
    expected = [*range(20), 100]
    wait_for(lambda: set(kwtest.handled()) >= set(expected), 120, "every valid ping handled")
    recover_s = time.monotonic() - started
    total = 10 + len(POISON) + 1 + 10
    wait_for(lambda: kafka.committed(kwtest.group, kwtest.ping, partitions=1) == total, 60, "every offset committed")

    assert worker.poll() is None, f"the worker died:\n{kwtest.log()[-3000:]}"
    letters = {m.key().decode(): m for m in kafka.read_all(dlq, len(POISON), timeout=60)}
    counts = collections.Counter(kwtest.handled())
    lost = len(set(expected) - set(counts))
    duplicated = sum(c - 1 for c in counts.values() if c > 1)
    print(
        f"\nscenario=poison messages={total} faults={len(POISON)} lost={lost} duplicated={duplicated}"
        f" recover_s={recover_s:.1f}"
    )

    assert sorted(counts) == sorted(expected) and duplicated == 0
    assert sorted(letters) == sorted(POISON), "one dead letter per poison message, nothing else"
    planned = dlq_json(kafka, kwtest, "replay", "--dry-run")
    assert (planned["matched"], planned["would_replay"]) == (len(POISON), len(POISON) - 1)
    assert planned["skipped_truncated"] == 1, "a dead letter cut to 512 KiB must never be replayed as if whole"
    wrong = {}
    for name, letter in letters.items():
        h = headers(letter)
        if (h["kw-exception"], h["kw-attempt"]) != (DECODE_ERROR, b"1"):
            wrong[name] = (h["kw-exception"], h["kw-attempt"], h["kw-exception-message"][:80])
        assert h["kw-exception-message"], f"{name}: no reason recorded"
        assert h["kw-original-topic"] == kwtest.ping.encode()
        assert int(h["kw-original-offset"]) == offsets[name], name
    assert wrong == {}, f"not dead-lettered on the first attempt as DecodeError: {wrong}"

    big = letters["2mib-payload"]
    assert headers(big)["kw-value-truncated"] == str(len(POISON["2mib-payload"][0] or b"")).encode()
    assert len(big.value()) == 512 * 1024
    assert letters["tombstone"].value() is None
    binary = headers(letters["binary-headers"])
    assert (binary["x-binary"], binary["kw-correlation-id"]) == (b"\xff\xfe\x00\x80", b"\xc3\x28")
    [pong] = [m for m in kafka.read_all(kwtest.pong, len(expected)) if json.loads(m.value())["n"] == 100]
    assert headers(pong)["kw-correlation-id"] == b"\xc3\x28", "the correlation id travels as it came"
    assert "Traceback" not in kwtest.log()
