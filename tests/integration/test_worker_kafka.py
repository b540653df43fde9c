"""The runtime's delivery guarantees on the real broker, with workers as real processes."""

from __future__ import annotations

import collections
import json
import signal

import msgspec
import pytest

from tests.conftest import KafkaHelper, KwTest, wait_for

pytestmark = pytest.mark.kafka


def pings(start: int, stop: int) -> list[bytes]:
    return [msgspec.json.encode({"n": n}) for n in range(start, stop)]


def pong_numbers(kafka: KafkaHelper, kw: KwTest, expected: int) -> list[int]:
    return [json.loads(m.value())["n"] for m in kafka.read_all(kw.pong, expected)]


def test_worker_consumes_produces_commits_and_resumes_after_last_commit(kafka: KafkaHelper, kwtest: KwTest) -> None:
    kafka.create_topics(kwtest.ping, kwtest.pong)
    kafka.produce(kwtest.ping, pings(0, 100))
    worker = kwtest.start()
    wait_for(lambda: kafka.committed(kwtest.group, kwtest.ping) == 100, 60, "100 committed offsets")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, kwtest.log()

    kafka.produce(kwtest.ping, pings(100, 150))
    kwtest.start()
    wait_for(lambda: kafka.committed(kwtest.group, kwtest.ping) == 150, 60, "150 committed offsets")

    assert sorted(kwtest.handled()) == list(range(150)), "a committed message was handled again, or one was lost"
    assert sorted(pong_numbers(kafka, kwtest, 150)) == list(range(150))


def test_sigkill_between_handling_and_commit_redelivers_and_loses_nothing(kafka: KafkaHelper, kwtest: KwTest) -> None:
    kafka.create_topics(kwtest.ping, kwtest.pong)
    kafka.produce(kwtest.ping, pings(0, 300))
    killed = kwtest.start(KWTEST_KILL_AT="150")
    assert killed.wait(60) == -signal.SIGKILL
    assert 150 in kwtest.handled()

    kwtest.start()
    wait_for(lambda: kafka.committed(kwtest.group, kwtest.ping) == 300, 90, "300 committed offsets")

    counts = collections.Counter(kwtest.handled())
    assert set(counts) == set(range(300)), "a message was lost"
    assert counts[150] == 2, "the message handled just before the kill was not re-delivered"
    assert set(pong_numbers(kafka, kwtest, 300)) == set(range(300))


def test_sigterm_under_load_loses_nothing_and_handles_nothing_twice(kafka: KafkaHelper, kwtest: KwTest) -> None:
    kafka.create_topics(kwtest.ping, kwtest.pong)
    kafka.produce(kwtest.ping, pings(0, 5000))
    worker = kwtest.start("--log-level", "INFO")
    wait_for(lambda: len(kwtest.handled()) >= 1000, 60, "1,000 handled messages")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, kwtest.log()
    assert len(kwtest.handled()) < 5000, "the worker finished before the signal: the test proved nothing"

    kwtest.start()
    wait_for(lambda: kafka.committed(kwtest.group, kwtest.ping) == 5000, 120, "5,000 committed offsets")

    counts = collections.Counter(kwtest.handled())
    assert set(counts) == set(range(5000)), "a message was lost"
    assert [n for n, c in counts.items() if c > 1] == [], "SIGTERM left handled work uncommitted"


def test_third_party_plugin_found_through_its_entry_point_is_listed_and_runs(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    listed = kwtest.cli("plugins", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    [echo] = [p for p in json.loads(listed.stdout) if p["name"] == "echo"]
    assert echo["distribution"] == "kwtest-plugins"
    assert echo["consumes"] == {kwtest.ping: "kwtest.Ping"}
    assert echo["produces"] == {kwtest.pong: "kwtest.Ping"}

    created = kwtest.cli("topics", "create", "--partitions", "2", "-b", kafka.bootstrap)
    assert created.returncode == 0, created.stderr
    assert f"created  {kwtest.ping}" in created.stdout

    sent = kwtest.cli("produce", kwtest.ping, "-b", kafka.bootstrap, input='{"n": 1}\n{"n": 2}\n')
    assert sent.returncode == 0, sent.stderr
    kwtest.start()
    assert sorted(pong_numbers(kafka, kwtest, 2)) == [1, 2]
