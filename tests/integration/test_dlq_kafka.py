"""Retry topics, the dead-letter topic and the ``dlq`` tooling on the real broker.

The kwtest echo plugin runs as a real worker process; pings ask it to fail permanently
(``fail=permanent``), to fail twice before succeeding (``fail=retry``), or hit a dependency
that is down while ``KWTEST_OUTAGE_FILE`` exists. The ``dlq`` commands run as processes too:
``kafkaworkers dlq`` once the command is wired into the CLI, until then the same click group
invoked the way ``main()`` does (entry points loaded into a ``PluginHost``).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition

import kafkaworkers.cli
from tests.conftest import KW, KafkaHelper, KwTest, wait_for

pytestmark = pytest.mark.kafka

PERMANENT = b"kafkaworkers.errors.PermanentError"
#: ``main()`` for the dlq group alone: what ``kafkaworkers dlq`` runs once it is wired.
DLQ_MAIN = (
    "import sys\n"
    "import kafkaworkers.cli\n"
    "from kafkaworkers.dlq import dlq\n"
    "from kafkaworkers.plugins import PluginHost\n"
    "host = PluginHost()\n"
    "host.load_entry_points()\n"
    "dlq.main(args=sys.argv[1:], prog_name='kafkaworkers dlq', obj=host)\n"
)


def dlq_cli(kw: KwTest, *args: str) -> subprocess.CompletedProcess[str]:
    wired = "dlq" in kafkaworkers.cli.cli.commands
    command = [KW, "dlq", *args] if wired else [sys.executable, "-c", DLQ_MAIN, *args]
    return subprocess.run(command, env=kw.env(), capture_output=True, text=True, timeout=120)


def dlq_json(kafka: KafkaHelper, kw: KwTest, *args: str) -> Any:
    result = dlq_cli(kw, *args, "--plugin", "echo", "--group-id", kw.group, "-b", kafka.bootstrap, "--format", "json")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


def ping(n: int, fail: str = "") -> bytes:
    return msgspec.json.encode({"n": n, "fail": fail} if fail else {"n": n})


def stored(kafka: KafkaHelper, topic: str) -> int:
    """How many records a topic holds (0 if it does not exist)."""
    metadata = kafka.admin.list_topics(topic, timeout=15).topics.get(topic)
    if metadata is None or metadata.error is not None:
        return 0
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": f"count-{uuid.uuid4().hex}"})
    try:
        total = 0
        for p in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
            total += high - low
        return total
    except KafkaException:
        return -1  # a topic created a moment ago may have no leader yet; callers poll again
    finally:
        consumer.close()


def headers(msg: Any) -> dict[str, bytes]:
    return {k: v if v is not None else b"" for k, v in msg.headers() or []}


def positions(kafka: KafkaHelper, topic: str, expected: int) -> dict[int, tuple[int, int]]:
    """n -> (partition, offset) of every ping on ``topic``."""
    return {json.loads(m.value())["n"]: (m.partition(), m.offset()) for m in kafka.read_all(topic, expected)}


def test_permanent_failures_are_dead_lettered_at_once_with_their_origin_and_reason(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    kafka.create_topics(kwtest.ping, kwtest.pong)
    kafka.produce(kwtest.ping, [ping(n, "permanent" if n in (2, 5, 8) else "") for n in range(10)])
    kwtest.start()
    dlq = f"{kwtest.group}-dlq"
    wait_for(lambda: kafka.committed(kwtest.group, kwtest.ping) == 10, 60, "10 committed offsets")

    assert sorted(kwtest.handled()) == [0, 1, 3, 4, 6, 7, 9]
    where = positions(kafka, kwtest.ping, 10)
    letters = kafka.read_all(dlq, 3)
    assert len(letters) == 3
    for letter in letters:
        h = headers(letter)
        n = json.loads(letter.value())["n"]
        assert n in (2, 5, 8)
        assert letter.key() == str(n).encode()
        assert h["kw-original-topic"] == kwtest.ping.encode()
        assert (int(h["kw-original-partition"]), int(h["kw-original-offset"])) == where[n]
        assert int(h["kw-original-timestamp"]) > 0
        assert (h["kw-plugin"], h["kw-attempt"], h["kw-exception"]) == (b"echo", b"1", PERMANENT)
        assert h["kw-exception-message"] == f"ping {n} asked to fail".encode()
        assert int(h["kw-first-failure"]) <= int(h["kw-last-failure"])
        assert "kw-due-at" not in h
    assert stored(kafka, f"{kwtest.group}-retry-1") == 0
    assert "Traceback" not in kwtest.log()


def test_retryable_failures_go_through_both_retry_topics_and_succeed_on_the_third_attempt(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    kafka.create_topics(kwtest.ping, kwtest.pong)
    kafka.produce(kwtest.ping, [ping(n, "retry") for n in range(5)])
    kwtest.start()
    wait_for(lambda: kafka.committed(kwtest.group, kwtest.ping) == 5, 60, "5 pings failed once and committed")
    wait_for(
        lambda: kafka.committed(f"{kwtest.group}-retry", f"{kwtest.group}-retry-2") == 5,
        60,
        "the second retries committed",
    )

    for level in (1, 2):
        retried = kafka.read_all(f"{kwtest.group}-retry-{level}", 5)
        assert len(retried) == 5, f"retry topic {level}"
        assert {headers(m)["kw-attempt"] for m in retried} == {str(level).encode()}
        assert {headers(m)["kw-exception"] for m in retried} == {b"kafkaworkers.errors.Retry"}
        assert all(int(headers(m)["kw-due-at"]) > 0 for m in retried)
    assert stored(kafka, f"{kwtest.group}-dlq") == 0
    assert sorted(json.loads(m.value())["n"] for m in kafka.read_all(kwtest.pong, 5)) == list(range(5))
    assert sorted(kwtest.handled()) == list(range(5)), "each ping handled exactly once"


def test_dlq_list_show_and_replay_each_letter_once(kafka: KafkaHelper, kwtest: KwTest, tmp_path: Path) -> None:
    bug = tmp_path / "the-bug-is-there"
    dlq, ledger, retry = f"{kwtest.group}-dlq", f"{kwtest.group}-dlq-replayed", f"{kwtest.group}-retry-1"
    kafka.create_topics(kwtest.ping, kwtest.pong)
    kafka.produce(kwtest.ping, [ping(n, "permanent" if n >= 10 else "") for n in (0, 1, 2, 10, 11, 12)])
    kwtest.start(KWTEST_BUG_FILE=str(bug))
    wait_for(lambda: stored(kafka, dlq) == 3, 60, "3 dead letters")

    [summary] = dlq_json(kafka, kwtest, "list")
    assert (summary["plugin"], summary["dlq_topic"], summary["dead"], summary["replayed"]) == ("echo", dlq, 3, 0)
    [by_topic] = summary["topics"]
    assert by_topic["topic"] == kwtest.ping
    assert by_topic["dead"] == 3
    assert by_topic["exceptions"] == {PERMANENT.decode(): 3}
    assert by_topic["oldest"] <= by_topic["newest"]

    shown = dlq_json(kafka, kwtest, "show", "--limit", "10")
    assert sorted(json.loads(s["value"])["n"] for s in shown) == [10, 11, 12]
    for letter in shown:
        names = dict(letter["headers"])
        assert names["kw-original-topic"] == kwtest.ping
        assert names["kw-exception"] == PERMANENT.decode()
        assert letter["topic"] == dlq and letter["replayed"] is False

    planned = dlq_json(kafka, kwtest, "replay", "--dry-run")
    assert (planned["matched"], planned["would_replay"], planned["replayed"]) == (3, 3, 0)
    assert stored(kafka, retry) == 0 and stored(kafka, ledger) == 0, "a dry run publishes nothing"
    assert dlq_json(kafka, kwtest, "replay", "--filter-exception", "LookupError")["matched"] == 0
    assert dlq_json(kafka, kwtest, "replay", "--since", "2999-01-01T00:00:00Z")["matched"] == 0

    # A bug: one ping fails three times and is dead-lettered; the bug is fixed, it is replayed.
    bug.touch()
    kafka.produce(kwtest.ping, [ping(20)], key=lambda i: b"twenty")
    wait_for(lambda: stored(kafka, dlq) == 4, 60, "the ping that met the bug dead-lettered")
    bug.unlink()
    retried = stored(kafka, retry)
    fixed = dlq_json(kafka, kwtest, "replay", "--filter-exception", "LookupError")
    assert (fixed["matched"], fixed["replayed"], fixed["to"]) == (1, 1, "group")
    wait_for(lambda: 20 in kwtest.handled(), 60, "the replayed ping handled once the dependency is back")

    # Into the group's own first retry topic, due at once, from where it came, as a fresh start.
    [replayed] = [m for m in kafka.read_all(retry, retried + 1) if "kw-replayed-from" in headers(m)]
    audit = headers(replayed)
    first_letters = kafka.read_all(dlq, 4)
    [letter] = [m for m in first_letters if m.key() == b"twenty"]
    assert replayed.key() == b"twenty"
    assert audit["kw-replayed-from"] == f"{dlq}:{letter.partition()}:{letter.offset()}".encode()
    assert abs(int(audit["kw-replayed-at"]) - time.time() * 1000) < 120_000
    assert int(audit["kw-due-at"]) <= int(audit["kw-replayed-at"])
    assert audit["kw-original-topic"] == kwtest.ping.encode()
    assert audit["kw-original-offset"] == headers(letter)["kw-original-offset"]
    assert not {"kw-attempt", "kw-exception"} & set(audit)
    assert json.loads(replayed.value()) == {"n": 20}

    # With the worker stopped, nothing new is dead-lettered between two replays.
    kwtest.stop_all()
    everything = dlq_json(kafka, kwtest, "replay")
    assert (everything["matched"], everything["replayed"], everything["skipped_already_replayed"]) == (4, 3, 1)
    again = dlq_json(kafka, kwtest, "replay")
    assert (again["matched"], again["replayed"], again["skipped_already_replayed"]) == (4, 0, 4)
    assert stored(kafka, kwtest.ping) == 7, "the 6 pings and the one that met the bug: nothing replayed there"
    assert stored(kafka, retry) == retried + 4

    # The permanent ones fail again, each as a new first attempt, and are dead again.
    kwtest.start(KWTEST_BUG_FILE=str(bug))
    wait_for(lambda: stored(kafka, dlq) == 7, 60, "the replayed permanent pings dead-lettered again")
    seen = {(m.partition(), m.offset()) for m in first_letters}
    newest = [m for m in kafka.read_all(dlq, 7) if (m.partition(), m.offset()) not in seen]
    assert sorted(json.loads(m.value())["n"] for m in newest) == [10, 11, 12]
    assert {headers(m)["kw-attempt"] for m in newest} == {b"1"}
    [summary] = dlq_json(kafka, kwtest, "list")
    assert (summary["dead"], summary["replayed"]) == (7, 4)
    assert sorted(kwtest.handled()) == [0, 1, 2, 20]


def test_a_replay_reaches_only_the_group_that_failed_never_another_group_reading_the_same_topic(
    kafka: KafkaHelper, kwtest: KwTest, tmp_path: Path
) -> None:
    bug = tmp_path / "the-bug-is-there"
    other_group, other_ledger = f"{kwtest.group}-other", tmp_path / "other-ledger.sqlite3"
    dlq = f"{kwtest.group}-dlq"
    kafka.create_topics(kwtest.ping, kwtest.pong)
    bug.touch()
    kwtest.start(KWTEST_BUG_FILE=str(bug))
    # The same plugin in another group, without the bug: a second reader of the ping topic.
    kwtest.start("--group-id", other_group, KWTEST_LEDGER=str(other_ledger))
    kafka.produce(kwtest.ping, [ping(n) for n in range(3)])
    wait_for(lambda: stored(kafka, dlq) == 3, 60, "3 pings dead-lettered after their retries")
    wait_for(lambda: kafka.committed(other_group, kwtest.ping) == 3, 60, "the other group done with the 3 pings")
    assert kwtest.handled() == []

    bug.unlink()
    replayed = dlq_json(kafka, kwtest, "replay")
    assert (replayed["matched"], replayed["replayed"], replayed["to"]) == (3, 3, "group")
    wait_for(lambda: len(kwtest.handled()) == 3, 60, "the failing group handled the replayed pings")
    wait_for(lambda: stored(kafka, kwtest.pong) == 6, 60, "a pong per ping and group")

    assert sorted(kwtest.handled()) == [0, 1, 2], "the failing group handled each once"
    assert stored(kafka, kwtest.ping) == 3, "nothing went back to the shared topic"
    assert kafka.committed(other_group, kwtest.ping) == 3
    with sqlite3.connect(other_ledger) as db:
        assert sorted(n for (n,) in db.execute("SELECT n FROM handled")) == [0, 1, 2], "the other group: once each"
    assert sorted(json.loads(m.value())["n"] for m in kafka.read_all(kwtest.pong, 6)) == [0, 0, 1, 1, 2, 2]


def test_dlq_errors_are_one_line_without_a_traceback(kafka: KafkaHelper, kwtest: KwTest) -> None:
    unknown = dlq_cli(kwtest, "show", "--plugin", "nope", "-b", "127.0.0.1:1")
    assert unknown.returncode == 1
    assert "Traceback" not in unknown.stderr
    assert [line for line in unknown.stderr.splitlines() if line.startswith("kafkaworkers: error: ")] == [
        line for line in unknown.stderr.splitlines() if line.strip()
    ]
    assert "unknown plugin 'nope'; installed:" in unknown.stderr and "echo" in unknown.stderr

    unreachable = dlq_cli(kwtest, "list", "--plugin", "echo", "-b", "127.0.0.1:1")
    assert unreachable.returncode == 1
    assert "Traceback" not in unreachable.stderr
    assert "kafkaworkers: error: cannot reach Kafka at 127.0.0.1:1" in unreachable.stderr

    missing = dlq_cli(kwtest, "replay", "--plugin", "echo", "--group-id", kwtest.group, "-b", kafka.bootstrap)
    assert missing.returncode == 1
    assert missing.stderr.splitlines() == [
        f"kafkaworkers: error: dead-letter topic {kwtest.group}-dlq does not exist: group {kwtest.group} has"
        " dead-lettered nothing (if the plugin runs under another group, pass its --group-id)"
    ]

    bad_time = dlq_cli(kwtest, "replay", "--plugin", "echo", "--since", "yesterday")
    assert bad_time.returncode == 2
    assert "neither ISO-8601" in bad_time.stderr
