"""JSON logs and the correlation id of a real worker process on the real broker."""

from __future__ import annotations

import json
import signal
from datetime import datetime

import msgspec
import pytest
from confluent_kafka import Producer

from kafkaworkers.headers import H_CORRELATION_ID as CORRELATION
from kafkaworkers.retry import dlq_topic, retry_topic
from tests.conftest import KafkaHelper, KwTest, wait_for

pytestmark = pytest.mark.kafka


def produce_with_correlation(kafka: KafkaHelper, topic: str, pings: list[tuple[dict, str]]) -> None:
    producer = Producer({"bootstrap.servers": kafka.bootstrap})
    for value, correlation in pings:
        producer.produce(topic, msgspec.json.encode(value), b"k", headers=[(CORRELATION, correlation.encode())])
    assert producer.flush(30) == 0


def test_json_logs_parse_line_by_line_and_a_dead_letter_carries_its_message_context(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    kafka.create_topics(kwtest.ping, kwtest.pong)
    worker = kwtest.start("-b", kafka.bootstrap, "--log-format", "json", "--log-level", "INFO")
    produce_with_correlation(kafka, kwtest.ping, [({"n": 1, "fail": "permanent"}, "corr-dead-1")])
    wait_for(lambda: "dead-lettered" in kwtest.log(), 60, "the dead-letter warning in the worker's log")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, kwtest.log()

    lines = kwtest.log().splitlines()
    entries = []
    for number, line in enumerate(lines, start=1):
        try:
            entries.append(json.loads(line))
        except ValueError:
            pytest.fail(f"log line {number} is not JSON: {line!r}")
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
        datetime.fromisoformat(entry["time"])
    [dead] = [e for e in entries if "dead-lettered" in e["message"]]
    print(f"\n{len(entries)} JSON log lines; the dead letter: {json.dumps(dead)}")
    assert dead["level"] == "WARNING"
    assert dead["logger"] == "kafkaworkers.retry", "failure routing logs from the retry policy's module"
    assert dead["plugin"] == "echo"
    assert dead["topic"] == kwtest.ping
    assert dead["partition"] in (0, 1, 2)
    assert dead["offset"] == 0
    assert dead["correlation_id"] == "corr-dead-1"
    assert "PermanentError: ping 1 asked to fail" in dead["message"]
    assert any(e["message"] == "worker stopped" for e in entries)

    [letter] = kafka.read_all(dlq_topic(kwtest.group), 1)
    assert dict(letter.headers())[CORRELATION] == b"corr-dead-1"


def test_the_correlation_id_travels_to_produced_messages_also_through_retries(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    kafka.create_topics(kwtest.ping, kwtest.pong)
    produce_with_correlation(
        kafka,
        kwtest.ping,
        [({"n": 1}, "corr-1"), ({"n": 2, "fail": "retry"}, "corr-2"), ({"n": 3}, "corr-3")],
    )
    kwtest.start("-b", kafka.bootstrap)
    pongs = kafka.read_all(kwtest.pong, 3)
    got = {json.loads(m.value())["n"]: dict(m.headers() or [])[CORRELATION] for m in pongs}
    print(f"\npong correlation ids: {got}")
    assert got == {1: b"corr-1", 2: b"corr-2", 3: b"corr-3"}
    # Ping 2 failed twice and went through both retry topics, with its id, before its pong was produced.
    for level in (1, 2):
        [retried] = kafka.read_all(retry_topic(kwtest.group, level), 1)
        assert dict(retried.headers())[CORRELATION] == b"corr-2"
