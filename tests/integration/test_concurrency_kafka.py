"""``--concurrency`` on the real broker, with workers as real processes and a shared ledger.

The kwtest echo plugin records every handling in a SQLite ledger (``handled``: one row per
handling, so a duplicate shows; ``effects``: the idempotent effect, once per ping) and, with
``KWTEST_DELAY_MS``, waits a random 0..M ms per ping, as an I/O-bound handler does.
"""

from __future__ import annotations

import collections
import json
import signal
import time

import msgspec
import pytest

from kafkaworkers.retry import dlq_topic
from tests.conftest import SEED, KafkaHelper, KwTest, wait_for

pytestmark = pytest.mark.kafka

KEYS = 50


def pings(start: int, stop: int, fail: str = "", every: int = 0) -> list[bytes]:
    return [
        msgspec.json.encode({"n": n, "fail": fail if every and n % every == 0 else ""}) for n in range(start, stop)
    ]


def key_of(n: int) -> bytes:
    return f"key-{n % KEYS}".encode()


def committed_all(kafka: KafkaHelper, kwtest: KwTest, total: int, timeout: float = 120.0) -> None:
    wait_for(lambda: kafka.committed(kwtest.group, kwtest.ping) == total, timeout, f"{total} committed offsets", 0.2)


def effects(kwtest: KwTest) -> int:
    import sqlite3

    with sqlite3.connect(kwtest.ledger, timeout=30) as db:
        return int(db.execute("SELECT COUNT(*) FROM effects").fetchone()[0])


def test_key_order_holds_at_concurrency_64_with_random_handler_delays(kafka: KafkaHelper, kwtest: KwTest) -> None:
    print(f"seed {SEED}")
    total = 3000
    kafka.create_topics(kwtest.ping, kwtest.pong)
    kafka.produce(kwtest.ping, pings(0, total), key=key_of)
    started = time.monotonic()
    kwtest.start("--concurrency", "64", KWTEST_DELAY_MS="20")
    committed_all(kafka, kwtest, total)
    elapsed = time.monotonic() - started

    pongs = kafka.read_all(kwtest.pong, total)
    by_key: dict[bytes, list[int]] = collections.defaultdict(list)
    for pong in sorted(pongs, key=lambda m: (m.partition(), m.offset())):
        by_key[pong.key()].append(json.loads(pong.value())["n"])
    assert sum(len(ns) for ns in by_key.values()) == total
    for key, ns in by_key.items():
        assert ns == sorted(ns), f"{key!r}: outputs out of order"
    assert sorted(kwtest.handled()) == list(range(total)), "lost or handled twice"
    # One at a time this is ~30 s of handler time (3000 x 10 ms on average); 64 at once finish it far sooner.
    print(f"CONCURRENCY 64: {total} pings with 0-20 ms handlers in {elapsed:.1f} s")
    assert elapsed < 20, "the handlers did not run concurrently"


def test_sigkill_mid_flight_at_concurrency_64_loses_nothing_and_each_effect_happens_once(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    total = 3000
    kafka.create_topics(kwtest.ping, kwtest.pong)
    kafka.produce(kwtest.ping, pings(0, total), key=key_of)
    killed = kwtest.start("--concurrency", "64", KWTEST_DELAY_MS="20", KWTEST_KILL_AT="1500")
    assert killed.wait(120) == -signal.SIGKILL, kwtest.log()
    in_flight_at_kill = len(kwtest.handled())
    kwtest.start("--concurrency", "64", KWTEST_DELAY_MS="20")
    committed_all(kafka, kwtest, total)

    counts = collections.Counter(kwtest.handled())
    assert set(counts) == set(range(total)), "a message was lost"
    assert effects(kwtest) == total, "an idempotent effect happened twice or not at all"
    redone = sum(c - 1 for c in counts.values())
    print(f"SIGKILL at concurrency 64: {in_flight_at_kill} handled before the kill, {redone} handled again after it")


def test_a_revoke_with_messages_in_flight_never_has_two_members_handle_one_message(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    total = 4000
    kafka.create_topics(kwtest.ping, kwtest.pong)
    kafka.produce(kwtest.ping, pings(0, total), key=key_of)
    kwtest.start("--concurrency", "64", KWTEST_DELAY_MS="20")
    wait_for(lambda: len(kwtest.handled()) >= 500, 60, "the first member under way", 0.1)
    kwtest.start("--concurrency", "64", KWTEST_DELAY_MS="20")
    committed_all(kafka, kwtest, total)

    counts = collections.Counter(kwtest.handled())
    assert set(counts) == set(range(total)), "a message was lost"
    twice = [n for n, c in counts.items() if c > 1]
    assert twice == [], f"{len(twice)} message(s) handled by two members, e.g. {twice[:5]}"


def test_an_async_handler_and_a_sync_one_in_one_worker(kafka: KafkaHelper, kwtest: KwTest) -> None:
    aping = f"{kwtest.prefix}.aping"
    kafka.create_topics(kwtest.ping, aping, kwtest.pong)
    kafka.produce(kwtest.ping, pings(0, 500), key=key_of)
    kafka.produce(aping, pings(500, 1000), key=key_of)
    kwtest.start("--concurrency", "32", KWTEST_DELAY_MS="10", KWTEST_ASYNC="1")
    wait_for(lambda: len(kwtest.handled()) >= 1000, 60, "both topics handled", 0.1)
    committed_all(kafka, kwtest, 500)
    assert sorted(kwtest.handled()) == list(range(1000))
    assert sorted(json.loads(m.value())["n"] for m in kafka.read_all(kwtest.pong, 1000)) == list(range(1000))


def test_poison_at_concurrency_64_is_dead_lettered_once_each(kafka: KafkaHelper, kwtest: KwTest) -> None:
    total = 2000
    kafka.create_topics(kwtest.ping, kwtest.pong)
    kafka.produce(kwtest.ping, pings(0, total, fail="permanent", every=40), key=key_of)
    kwtest.start("--concurrency", "64", KWTEST_DELAY_MS="5")
    committed_all(kafka, kwtest, total)

    poisoned = set(range(0, total, 40))
    letters = [json.loads(m.value())["n"] for m in kafka.read_all(dlq_topic(kwtest.group), len(poisoned))]
    assert sorted(letters) == sorted(poisoned), "a poison message was not dead-lettered, or twice"
    assert sorted(kwtest.handled()) == sorted(set(range(total)) - poisoned)


def test_sigterm_with_slow_handlers_in_flight_exits_within_the_grace_and_loses_nothing(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    total = 400
    grace = 6.0
    kafka.create_topics(kwtest.ping, kwtest.pong)
    kafka.produce(kwtest.ping, pings(0, total, fail="slow:20", every=49), key=key_of)  # slow ones on distinct keys
    env = {"KAFKAWORKERS_SHUTDOWN_GRACE": str(grace)}
    worker = kwtest.start("--concurrency", "16", KWTEST_DELAY_MS="10", **env)
    wait_for(lambda: len(kwtest.handled()) >= 100, 60, "work under way", 0.1)
    worker.send_signal(signal.SIGTERM)
    stopping = time.monotonic()
    assert worker.wait(grace + 10) == 0, kwtest.log()
    print(f"SIGTERM with 20 s handlers in flight: exited in {time.monotonic() - stopping:.1f} s (grace {grace} s)")
    assert "stop requested" in kwtest.log()

    kwtest.start("--concurrency", "16", KWTEST_DELAY_MS="10", **env)
    committed_all(kafka, kwtest, total, timeout=180)
    assert set(kwtest.handled()) == set(range(total)), "a message was lost"
