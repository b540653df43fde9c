"""Fault injection on the real broker: killed workers, a stopped broker, failing and slow handlers.

Every scenario prints one line for the README::

    CHAOS scenario=<name> messages=<N> faults=<K> lost=<L> duplicated_effects=<D> recover_s=<X.X> redelivered=<R>

- ``lost``: pings with no effect row or no pong at the end (a dead-lettered ping counts,
  except for ``transient_k3``, whose pings must end there).
- ``duplicated_effects``: effects that happened more than once. Where the scenario promises
  at-least-once only (kills, broker outage, slow handler), that is the idempotent effect of
  the kwtest plugin (``effects``, ``INSERT OR IGNORE`` keyed by the ping): a re-delivery
  must not repeat it. Where the scenario promises no re-delivery at all (SIGTERM, transient
  failures, a dependency outage), it is every handling beyond one in the non-idempotent ledger.
- ``redelivered``: handlings beyond one per ping in the ledger (expected after a crash); for
  ``transient_k*``, the deliveries from the retry topics.
- ``recover_s``: from the end of the fault (the process restarted, the broker started, the
  dependency back, the slow handler returned) to the first new committed progress; for
  ``transient_k*``, from starting the worker to the last ping's outcome (pong or dead letter).

``pipeline_sigkill`` runs the six order plugins instead of kwtest: ``lost`` counts orders that
did not reach their expected end with their compensations, ``duplicated_effects`` a second
charge, refund, stock movement or customer notification, ``redelivered`` the events seen more
than once (the same event id re-published after a kill).

Every scenario but the pipeline runs twice: ``short`` at the default scale, in ``make test``,
and ``long`` (marked ``chaos``, for ``make chaos``) with its message counts multiplied by
``KAFKAWORKERS_CHAOS_SCALE`` (default 4); the fixed outage lengths are the same in both. The
pipeline runs once, in ``make test``, with 1,000 orders. Kill moments and the orders come
from the ``rng`` fixture: the run's seed is printed, and ``KAFKAWORKERS_TEST_SEED`` replays
it. The broker
outage and the pipeline run on a broker of their own (``scripts/kafka/broker.sh`` with its own
``KAFKA_HOME_DIR`` and ports): stopping the shared one would break other tests, and the
pipeline's topic names are fixed.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
import random
import re
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.conftest import FAST_GROUP, KW, ROOT, KafkaHelper, KwTest, free_port, http_get, stop_processes, wait_for

pytestmark = pytest.mark.kafka

LONG_SCALE = int(os.environ.get("KAFKAWORKERS_CHAOS_SCALE", "4"))
BROKER_SH = ROOT / "scripts" / "kafka" / "broker.sh"
CACHED_LIB = ROOT / ".cache" / "kafka" / "lib"
#: Where this module's own clients log: librdkafka's connection errors during a broker
#: outage are expected, and belong in pytest's captured log rather than on the terminal.
CLIENT_LOG = logging.getLogger("chaos.clients")


# --- helpers -----------------------------------------------------------------------


def pings(start: int, stop: int, fail: str = "") -> list[bytes]:
    return [msgspec.json.encode({"n": n, "fail": fail} if fail else {"n": n}) for n in range(start, stop)]


def query(path: Path, sql: str, *args: object) -> list[tuple]:
    """Rows of a worker's SQLite file; none while the worker has not created it."""
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
        try:
            return db.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # its tables are not created yet
            return []


def ledger(kw: KwTest, sql: str, *args: object) -> list[tuple]:
    return query(kw.ledger, sql, *args)


def handled_by(kw: KwTest, pid: int) -> int:
    rows = ledger(kw, "SELECT COUNT(*) FROM handled WHERE pid = ?", pid)
    return rows[0][0] if rows else 0


def effects(kw: KwTest) -> collections.Counter[int]:
    return collections.Counter(n for (n,) in ledger(kw, "SELECT n FROM effects"))


def read_topic(bootstrap: str, topic: str) -> list:
    """Every message of ``topic`` up to its current end (the work is finished when this is called)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}", "enable.auto.commit": False}
    )
    try:
        partitions = consumer.list_topics(topic, timeout=15).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1] for p in partitions}
        todo = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in todo])
        out: list = []
        deadline = time.monotonic() + 60
        while todo and time.monotonic() < deadline:
            out.extend(msg for msg in consumer.consume(1000, 0.5) if msg.error() is None)
            # The position, not the last message: a transaction's markers and aborted messages
            # take offsets that a read_committed reader never receives.
            for tp in consumer.position([TopicPartition(topic, p) for p in todo]):
                if tp.offset >= ends[tp.partition]:
                    todo.discard(tp.partition)
        assert not todo, f"could not read {topic} to its end"
        return out
    finally:
        consumer.close()


def numbers(messages: list) -> collections.Counter[int]:
    return collections.Counter(json.loads(m.value())["n"] for m in messages)


def wait_committed(kafka: KafkaHelper, kw: KwTest, total: int, timeout: float) -> None:
    wait_for(lambda: kafka.committed(kw.group, kw.ping) == total, timeout, f"{total} committed offsets", 0.5)


def committed_now(kafka: KafkaHelper, group: str, topic: str) -> int:
    """The group's committed offsets over ``topic`` once the coordinator answers (not while it loads)."""
    # A 1-tuple, so that an answer of 0 counts as an answer.
    [offsets] = wait_for(lambda: (c := kafka.committed(group, topic)) >= 0 and (c,), 60, f"{group}'s offsets", 0.2)
    return offsets


def committed_progress(kafka: KafkaHelper, kw: KwTest, since: int, start: float, timeout: float = 90) -> float:
    """Seconds from ``start`` until the group's committed offsets pass ``since``."""
    wait_for(lambda: kafka.committed(kw.group, kw.ping) > since, timeout, f"committed progress past {since}", 0.2)
    return time.monotonic() - start


def report(
    name: str, messages: int, faults: int, lost: int, duplicated: int, recover_s: float, redelivered: int
) -> None:
    print(
        f"\nCHAOS scenario={name} messages={messages} faults={faults} lost={lost} "
        f"duplicated_effects={duplicated} recover_s={recover_s:.1f} redelivered={redelivered}"
    )


def outcome(kw: KwTest, bootstrap: str, expected: set[int]) -> tuple[int, int, int]:
    """lost, duplicated idempotent effects, re-delivered handlings."""
    done = effects(kw)
    pongs = numbers(read_topic(bootstrap, kw.pong))
    lost = len(expected - (set(done) & set(pongs)))
    duplicated = sum(c - 1 for c in done.values())
    handled = collections.Counter(kw.handled())
    return lost, duplicated, sum(c - 1 for c in handled.values())


class PacedProducer(threading.Thread):
    """Produces pings at a steady rate until stopped or ``limit`` are sent, counting acknowledgements.

    Its librdkafka queue holds messages while the broker is away and delivers them after.
    """

    def __init__(self, bootstrap: str, topic: str, rate: float, limit: int | None = None) -> None:
        super().__init__(daemon=True)
        self.producer = Producer(
            {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5, "logger": CLIENT_LOG}
        )
        self.topic = topic
        self.rate = rate
        self.limit = limit
        self.sent = 0
        self.delivered: set[int] = set()
        self.failed: list[str] = []
        self._halt = threading.Event()
        self._rush = threading.Event()

    def _on_delivery(self, err: object, msg: object) -> None:
        if err is None:
            self.delivered.add(json.loads(msg.value())["n"])  # type: ignore[attr-defined]
        else:
            self.failed.append(str(err))

    def run(self) -> None:
        start = time.monotonic()
        while not self._halt.is_set():
            due = int((time.monotonic() - start) * self.rate)
            if self.limit is not None:
                due = self.limit if self._rush.is_set() else min(due, self.limit)
            while self.sent < due:
                self.producer.produce(self.topic, pings(self.sent, self.sent + 1)[0], str(self.sent).encode(),
                                      on_delivery=self._on_delivery)  # fmt: skip
                self.sent += 1
            if self.sent == self.limit:
                break
            self.producer.poll(0.02)

    def rush(self) -> None:
        """Send the rest of the ``limit`` now."""
        self._rush.set()

    def finish(self) -> int:
        """Stop (or, with a limit, wait until every message was sent) and wait for the acknowledgements."""
        if self.limit is None:
            self._halt.set()
        self.join(120)
        remaining = self.producer.flush(120)
        assert remaining == 0 and not self.failed, f"the test's producer failed: {self.failed[:3]}"
        assert self.delivered == set(range(self.sent))
        return self.sent


class QuietKafka(KafkaHelper):
    """The shared helper, with an admin client that logs through :data:`CLIENT_LOG`."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.admin = AdminClient({"bootstrap.servers": bootstrap, "logger": CLIENT_LOG})


class OwnBroker:
    """A second single-node broker for this module alone, driven by scripts/kafka/broker.sh."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.env = {
            **os.environ,
            "KAFKA_HOME_DIR": str(home),
            # The jars `make kafka-up` already fetched, instead of a second Maven download.
            "KAFKA_LIB_DIR": str(CACHED_LIB),
            "KAFKA_PORT": str(self.port),
            "KAFKA_CONTROLLER_PORT": str(free_port()),
            "KAFKA_HEAP_OPTS": "-Xmx384m",
        }
        self.bootstrap = f"127.0.0.1:{self.port}"

    def __call__(self, command: str) -> None:
        done = subprocess.run(["bash", str(BROKER_SH), command], env=self.env, capture_output=True, text=True,
                              timeout=180)  # fmt: skip
        assert done.returncode == 0, f"broker.sh {command} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnBroker]:
    """Our own broker, so that stopping it leaves the other tests' broker alone, and the order
    pipeline's fixed topic names meet no earlier run's orders."""
    broker = OwnBroker(tmp_path_factory.mktemp("broker"))
    broker("up")
    try:
        yield broker
    finally:
        broker("down")


@pytest.fixture(params=[pytest.param(1, id="short"), pytest.param(LONG_SCALE, id="long", marks=pytest.mark.chaos)])
def scale(request: pytest.FixtureRequest) -> int:
    """The multiplier of a scenario's message counts: 1 in ``make test``, the long run's in ``make chaos``."""
    return int(request.param)


# --- scenarios ---------------------------------------------------------------------


def test_chaos_sigkill_x3_loses_nothing_and_the_idempotent_effect_happens_once(
    kafka: KafkaHelper, kwtest: KwTest, rng: random.Random, scale: int
) -> None:
    total = 5000 * scale
    kafka.create_topics(kwtest.ping, kwtest.pong)
    # Live traffic, so that the kills land in a running stream with commits between them; the
    # pace leaves messages unsent for the last kill even on a slow machine, the rest goes after it.
    producer = PacedProducer(kafka.bootstrap, kwtest.ping, rate=total / 40, limit=total)
    producer.start()
    worker = kwtest.start()
    recoveries = []
    for _ in range(3):
        pid = worker.pid
        wait_for(lambda pid=pid: handled_by(kwtest, pid) > 0, 60, f"worker {pid} handling")
        # The kill moment is the scenario: a random instant of the run, anywhere in a batch.
        time.sleep(rng.uniform(0.3, 2.0))
        assert worker.poll() is None, kwtest.log()
        worker.kill()
        assert worker.wait(30) == -signal.SIGKILL
        assert len(set(kwtest.handled())) < total, "the run finished before the kill: the test proved nothing"
        before = committed_now(kafka, kwtest.group, kwtest.ping)
        restarted = time.monotonic()
        worker = kwtest.start()
        recoveries.append(committed_progress(kafka, kwtest, before, restarted))
    producer.rush()
    assert producer.finish() == total
    wait_committed(kafka, kwtest, total, 180)

    lost, duplicated, redelivered = outcome(kwtest, kafka.bootstrap, set(range(total)))
    report("sigkill_x3", total, 3, lost, duplicated, max(recoveries), redelivered)
    assert lost == 0, "a message was lost"
    assert duplicated == 0, "a re-delivered message repeated its idempotent effect"
    assert set(kwtest.handled()) == set(range(total))


def test_chaos_sigterm_under_load_loses_nothing_and_handles_nothing_twice(
    kafka: KafkaHelper, kwtest: KwTest, scale: int
) -> None:
    total = 5000 * scale
    kafka.create_topics(kwtest.ping, kwtest.pong)
    kafka.produce(kwtest.ping, pings(0, total))
    worker = kwtest.start()
    wait_for(lambda: len(kwtest.handled()) >= total // 5, 60, f"{total // 5} handled messages")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, kwtest.log()
    assert len(kwtest.handled()) < total, "the worker finished before the signal: the test proved nothing"
    before = committed_now(kafka, kwtest.group, kwtest.ping)
    restarted = time.monotonic()
    kwtest.start()
    recover_s = committed_progress(kafka, kwtest, before, restarted)
    wait_committed(kafka, kwtest, total, 120)

    lost, _, redelivered = outcome(kwtest, kafka.bootstrap, set(range(total)))
    report("sigterm_under_load", total, 1, lost, redelivered, recover_s, redelivered)
    assert lost == 0, "a message was lost"
    assert redelivered == 0, "SIGTERM left handled work uncommitted"


def test_chaos_broker_outage_20s_workers_recover_without_restart_and_lose_nothing(
    own_broker: OwnBroker, kwtest: KwTest, scale: int
) -> None:
    kafka = QuietKafka(own_broker.bootstrap)
    kafka.create_topics(kwtest.ping, kwtest.pong)
    producer = PacedProducer(own_broker.bootstrap, kwtest.ping, rate=100 * scale)
    producer.start()
    port = free_port()
    worker = kwtest.start(KAFKAWORKERS_BOOTSTRAP_SERVERS=own_broker.bootstrap, KAFKAWORKERS_METRICS_PORT=str(port))
    wait_for(lambda: kafka.committed(kwtest.group, kwtest.ping) >= 200 * scale, 60, "committed progress", 0.2)
    wait_for(lambda: readyz(port)[0] == 200, 30, "/readyz ready before the outage", 0.2)

    own_broker("stop")
    try:
        outage = time.monotonic()
        _, body = wait_for(lambda: (r := readyz(port))[0] == 503 and r, 15, "/readyz failing in the outage", 0.2)
        assert "unreachable" in body, body
        # The outage's length is the scenario: 20 s without a broker, whatever the worker does.
        time.sleep(max(0.0, 20 - (time.monotonic() - outage)))
        assert worker.poll() is None, f"the worker exited during the outage:\n{kwtest.log()}"
        librdkafka_errors = kwtest.log().count("ERROR   kafkaworkers.librdkafka")
        assert librdkafka_errors <= 30, f"{librdkafka_errors} librdkafka error lines in a 20 s outage: not summarised"
    finally:
        own_broker("start")  # the module's other scenarios share this broker
    wait_for(lambda: readyz(port)[0] == 200, 60, "/readyz ready again after the outage", 0.2)
    started = time.monotonic()
    before = committed_now(kafka, kwtest.group, kwtest.ping)
    recover_s = committed_progress(kafka, kwtest, before, started, timeout=120)
    total = producer.finish()
    wait_committed(kafka, kwtest, total, 120)
    assert worker.poll() is None, f"the worker exited:\n{kwtest.log()}"

    lost, duplicated, redelivered = outcome(kwtest, kafka.bootstrap, set(range(total)))
    report("broker_outage_20s", total, 1, lost, duplicated, recover_s, redelivered)
    assert lost == 0, "a message was lost"
    assert duplicated == 0, "a re-delivered message repeated its idempotent effect"
    assert {pid for (pid,) in ledger(kwtest, "SELECT DISTINCT pid FROM handled")} == {worker.pid}


def test_chaos_sigterm_with_the_broker_down_exits_within_the_grace_and_loses_nothing(
    own_broker: OwnBroker, kwtest: KwTest, scale: int
) -> None:
    grace = 6.0
    kafka = QuietKafka(own_broker.bootstrap)
    kafka.create_topics(kwtest.ping, kwtest.pong)
    producer = PacedProducer(own_broker.bootstrap, kwtest.ping, rate=100 * scale)
    producer.start()
    env = {"KAFKAWORKERS_BOOTSTRAP_SERVERS": own_broker.bootstrap, "KAFKAWORKERS_SHUTDOWN_GRACE": str(grace)}
    worker = kwtest.start(**env)
    wait_for(lambda: kafka.committed(kwtest.group, kwtest.ping) >= 200 * scale, 60, "committed progress", 0.2)

    own_broker("stop")
    try:
        worker.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        # The grace bounds the shutdown; the rest is the process's own start and exit.
        exit_code = worker.wait(grace + 10)
        stopped_s = time.monotonic() - stopping
        assert exit_code == 0, kwtest.log()
        assert "stop requested" in kwtest.log()
    finally:
        own_broker("start")  # the module's other scenarios share this broker
    total = producer.finish()
    kwtest.start(**env)
    wait_committed(kafka, kwtest, total, 120)

    lost, duplicated, redelivered = outcome(kwtest, kafka.bootstrap, set(range(total)))
    report("sigterm_broker_down", total, 1, lost, duplicated, stopped_s, redelivered)
    assert lost == 0, "a message was lost"
    assert duplicated == 0, "a re-delivered message repeated its idempotent effect"


def read_committed(bootstrap: str, topic: str) -> collections.Counter[int]:
    """How often each ping number appears on ``topic`` to a read_committed reader."""
    return numbers(read_topic(bootstrap, topic))


def test_chaos_exactly_once_20000_messages_5_sigkills_and_a_broker_restart_every_output_once(
    own_broker: OwnBroker, kwtest: KwTest, rng: random.Random
) -> None:
    total = 20_000
    kafka = QuietKafka(own_broker.bootstrap)
    kafka.create_topics(kwtest.ping, kwtest.pong)
    producer = PacedProducer(own_broker.bootstrap, kwtest.ping, rate=total / 40, limit=total)
    producer.start()
    args = ("--processing-guarantee", "exactly_once")
    env = {"KAFKAWORKERS_BOOTSTRAP_SERVERS": own_broker.bootstrap}
    worker = kwtest.start(*args, **env)
    for kill in range(5):
        pid = worker.pid
        wait_for(lambda pid=pid: handled_by(kwtest, pid) > 0, 90, f"worker {pid} handling")
        # The kill moment is the scenario: a random instant of the run, anywhere in a transaction.
        time.sleep(rng.uniform(0.3, 2.0))
        assert worker.poll() is None, kwtest.log()
        worker.kill()
        assert worker.wait(30) == -signal.SIGKILL
        if kill == 2:
            own_broker("stop")
            own_broker("start")
        worker = kwtest.start(*args, **env)
    assert len(set(kwtest.handled())) < total, "the run finished before the kills: the test proved nothing"
    producer.rush()
    assert producer.finish() == total
    wait_committed(kafka, kwtest, total, 240)

    outputs = read_committed(own_broker.bootstrap, kwtest.pong)
    duplicates = sum(c - 1 for c in outputs.values())
    missing = total - len(set(outputs) & set(range(total)))
    handled_again = sum(c - 1 for c in collections.Counter(kwtest.handled()).values())
    print(f"\nEXACTLY_ONCE messages={total} sigkills=5 broker_restarts=1 duplicates={duplicates} missing={missing}"
          f" (handled again after a kill, outputs aborted: {handled_again})")  # fmt: skip
    assert duplicates == 0, "a read_committed reader saw an output twice"
    assert missing == 0, "an output is missing"
    assert handled_again > 0, "no message was handled twice: the kills landed nowhere, the test proved nothing"


def test_chaos_exactly_once_at_concurrency_16_a_sigkill_mid_flight_leaves_every_output_once(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    """A transaction covers each partition's run of finished messages, never one in flight."""
    total = 3000
    kafka.create_topics(kwtest.ping, kwtest.pong)
    kafka.produce(kwtest.ping, pings(0, total), key=lambda n: f"key-{n % 40}".encode())
    args = ("--processing-guarantee", "exactly_once", "--concurrency", "16")
    killed = kwtest.start(*args, KWTEST_DELAY_MS="10", KWTEST_KILL_AT="1500")
    assert killed.wait(120) == -signal.SIGKILL, kwtest.log()
    kwtest.start(*args, KWTEST_DELAY_MS="10")
    wait_committed(kafka, kwtest, total, 180)

    outputs = read_committed(kafka.bootstrap, kwtest.pong)
    handled_again = sum(c - 1 for c in collections.Counter(kwtest.handled()).values())
    print(f"\nEXACTLY_ONCE concurrency=16 messages={total} duplicates={sum(c - 1 for c in outputs.values())}"
          f" missing={total - len(outputs)} handled_again={handled_again}")  # fmt: skip
    assert sorted(outputs) == list(range(total)), "an output is missing"
    assert [n for n, c in outputs.items() if c > 1] == [], "a read_committed reader saw an output twice"
    assert handled_again > 0, "nothing was in flight at the kill: the test proved nothing"


def test_chaos_exactly_once_a_zombie_resumed_after_its_replacement_took_over_is_fenced(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    total = 300
    kafka.create_topics(kwtest.ping, kwtest.pong, partitions=1)
    slow = 100  # the zombie is stopped while it handles this one, its transaction open
    kafka.produce(kwtest.ping, [msgspec.json.encode({"n": n, "fail": "slow:6" if n == slow else ""})
                                for n in range(total)])  # fmt: skip
    args = ("--processing-guarantee", "exactly_once")
    zombie = kwtest.start(*args)
    wait_for(lambda: len(kwtest.handled()) >= slow, 60, "the zombie inside its slow message")
    os.kill(zombie.pid, signal.SIGSTOP)
    try:
        replacement = kwtest.start(*args)  # the same plugin, host and index: the same transactional id
        wait_committed(kafka, kwtest, total, 120)
    finally:
        os.kill(zombie.pid, signal.SIGCONT)
    assert zombie.wait(60) != 0, "the zombie went on as if it owned the partitions"
    log = kwtest.log(0)
    assert "fenced" in log and "Traceback" not in log, log
    assert replacement.poll() is None, kwtest.log(1)

    outputs = read_committed(kafka.bootstrap, kwtest.pong)
    assert sorted(outputs) == list(range(total)), "an output is missing"
    assert [n for n, c in outputs.items() if c > 1] == [], "the zombie's outputs became visible"


def readyz(port: int) -> tuple[int, str]:
    """The worker's readiness answer; (0, reason) while its endpoint does not answer."""
    try:
        status, _, body = http_get(f"http://127.0.0.1:{port}/readyz")
    except OSError as exc:
        return 0, str(exc)
    return status, body


def test_chaos_transient_k_failures_retry_k_times_then_succeed_or_dead_letter_after_two(
    kafka: KafkaHelper, kwtest: KwTest, scale: int
) -> None:
    """Pings failing k = 1, 2, 3 times under the policy (0.2 s, 0.4 s): k retries and success, or
    two retries and the dead-letter topic for k = 3. One worker, one range of pings per k."""
    count = 5 * scale
    ranges = {k: range((k - 1) * count, k * count) for k in (1, 2, 3)}
    kafka.create_topics(kwtest.ping, kwtest.pong)
    kafka.produce(kwtest.ping, [p for k, r in ranges.items() for p in pings(r.start, r.stop, fail=f"retry:{k}")])
    started = time.monotonic()
    kwtest.start()
    retry_1, retry_2, dlq = (f"{kwtest.group}-retry-1", f"{kwtest.group}-retry-2", f"{kwtest.group}-dlq")
    outcome_s = {}
    for k in (1, 2):
        wait_for(lambda k=k: set(ranges[k]) <= set(kwtest.handled()), 60, f"the pings failing {k} time(s) handled")
        outcome_s[k] = time.monotonic() - started
    wait_for(lambda: len(kafka.read_all(dlq, count, timeout=1)) >= count, 60, f"{count} dead letters")
    outcome_s[3] = time.monotonic() - started
    wait_committed(kafka, kwtest, 3 * count, 60)

    retried_1, retried_2, dead = (numbers(read_topic(kafka.bootstrap, t)) for t in (retry_1, retry_2, dlq))
    handled = collections.Counter(kwtest.handled())
    pongs = numbers(read_topic(kafka.bootstrap, kwtest.pong))
    # Per k and place (retry-1, retry-2, the ledger, the DLQ, pong): how many pings were seen how often.
    seen = {
        k: [collections.Counter(c[n] for n in r) for c in (retried_1, retried_2, handled, dead, pongs)]
        for k, r in ranges.items()
    }
    for k, r in ranges.items():
        lost = sum(1 for n in r if not handled[n] and not dead[n])
        twice = sum(handled[n] - 1 for n in r if handled[n] > 1)
        retries = sum(retried_1[n] + retried_2[n] for n in r)
        report(f"transient_k{k}", count, k * count, lost, twice, outcome_s[k], retries)
    once, never = collections.Counter({1: count}), collections.Counter({0: count})
    assert seen[1] == [once, never, once, never, once], "k=1: one retry, then success"
    assert seen[2] == [once, once, once, never, once], "k=2: two retries, then success"
    assert seen[3] == [once, once, never, once, never], "k=3: two retries, then the dead-letter topic"


def test_chaos_dependency_down_30s_opens_the_breaker_pauses_and_dead_letters_nothing(
    kafka: KafkaHelper, kwtest: KwTest, tmp_path: Path, scale: int
) -> None:
    before_outage, during_outage = 100 * scale, 300 * scale
    total = before_outage + during_outage
    outage = tmp_path / "downstream-down"
    kafka.create_topics(kwtest.ping, kwtest.pong)
    kafka.produce(kwtest.ping, pings(0, before_outage))
    # A breaker that probes every 2 s, so the outage outlasts every message's retry budget.
    worker = kwtest.start(KWTEST_OUTAGE_FILE=str(outage), KWTEST_BREAKER_WAIT="2")
    wait_committed(kafka, kwtest, before_outage, 60)

    outage.touch()
    kafka.produce(kwtest.ping, pings(before_outage, total))
    wait_for(lambda: "breaker open: 'downstream'" in kwtest.log(), 30, "the breaker to open and pause")
    # The outage's length is the scenario: the dependency stays down for 30 s.
    time.sleep(30)
    assert len(set(kwtest.handled())) < total, "pings were handled while the dependency was down"
    before = committed_now(kafka, kwtest.group, kwtest.ping)
    outage.unlink()
    ended = time.monotonic()
    recover_s = committed_progress(kafka, kwtest, before, ended, timeout=60)
    wait_committed(kafka, kwtest, total, 120)
    # The pings that failed before the breaker opened went through the retry topic: the main
    # topic's committed offsets do not wait for them, so wait for their effects too.
    wait_for(lambda: not set(range(total)) - set(effects(kwtest)), 60, "every ping's effect, retried ones included")
    assert worker.poll() is None, kwtest.log()

    dead = sorted(numbers(read_topic(kafka.bootstrap, f"{kwtest.group}-dlq")))
    lost, _, redelivered = outcome(kwtest, kafka.bootstrap, set(range(total)))
    report("gateway_down_30s", total, 1, lost, redelivered, recover_s, redelivered)
    assert dead == [], f"pings {dead} were dead-lettered because a dependency was down"
    assert lost == 0
    assert redelivered == 0, "a ping was handled twice"


def test_chaos_slow_handler_beyond_max_poll_interval_rejoins_by_itself_and_loses_nothing(
    kafka: KafkaHelper, kwtest: KwTest, scale: int
) -> None:
    total, slow = 60 * scale, 7
    kafka.create_topics(kwtest.ping, kwtest.pong)
    kafka.produce(kwtest.ping, [*pings(0, slow), *pings(slow, slow + 1, fail="slow:8"), *pings(slow + 1, total)])
    worker = kwtest.start(KAFKAWORKERS_CONSUMER_MAX_POLL_INTERVAL_MS="6000")
    wait_for(lambda: slow in effects(kwtest), 60, "the slow handler to return")
    returned = time.monotonic()
    before = committed_now(kafka, kwtest.group, kwtest.ping)
    recover_s = committed_progress(kafka, kwtest, before, returned, timeout=60)
    wait_committed(kafka, kwtest, total, 90)
    log = kwtest.log()
    assert worker.poll() is None, f"the worker exited:\n{log}"

    lost, duplicated, redelivered = outcome(kwtest, kafka.bootstrap, set(range(total)))
    report("slow_handler", total, 1, lost, duplicated, recover_s, redelivered)
    assert "maximum poll interval (6000ms) exceeded" in log, "the worker did not notice it left the group"
    assert "; their uncommitted work will be redone" in log, "the partitions were not reported lost"
    assert lost == 0, "a message was lost"
    assert duplicated == 0, "a re-delivered message repeated its idempotent effect"
    assert {pid for (pid,) in ledger(kwtest, "SELECT DISTINCT pid FROM handled")} == {worker.pid}


PIPELINE = ["reserva", "notificacao", "fraude", "relatorios", "picking", "pagamento"]


class Pipeline:
    """The six order plugins, each a ``kafkaworkers run`` process of its own on ``bootstrap``."""

    def __init__(self, bootstrap: str, tmp_path: Path, guarantee: str = "at_least_once") -> None:
        self.bootstrap = bootstrap
        self.data = tmp_path / "data"
        self.logs = tmp_path
        self.env = {
            **os.environ,
            **FAST_GROUP,
            "KAFKAWORKERS_BOOTSTRAP_SERVERS": bootstrap,
            "KAFKAWORKERS_DATA_DIR": str(self.data),
            "KAFKAWORKERS_METRICS_PORT": "0",
            "KAFKAWORKERS_PROCESSING_GUARANTEE": guarantee,
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started: collections.Counter[str] = collections.Counter()

    def start(self, name: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}-{self.started[name]}.log", "wb")  # noqa: SIM115 - closed with the process
        self.started[name] += 1
        self.procs[name] = subprocess.Popen([KW, "run", "--plugin", name], env=self.env, stdout=log, stderr=log)
        return self.procs[name]

    def log(self, name: str) -> str:
        return "".join((self.logs / f"{name}-{i}.log").read_text(errors="replace") for i in range(self.started[name]))

    def db(self, plugin: str, file: str, sql: str) -> list[tuple]:
        return query(self.data / plugin / file, sql)

    def stop_all(self) -> None:
        stop_processes(self.procs.values())


#: What notificacao's log channel writes for each notification: the order id and its kind.
NOTIFIED = r"notificacao (PED-[\w-]+\.\w+) para"


def notified_orders(log: str) -> set[str]:
    """The orders whose customer notificacao's log says it notified at least once."""
    return {key.split(".")[0] for key in re.findall(NOTIFIED, log)}


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_chaos_pipeline_sigkill_of_pagamento_and_reserva_ends_every_order_once(
    own_broker: OwnBroker, tmp_path: Path, rng: random.Random, guarantee: str
) -> None:
    """Both guarantees end every order once; in exactly_once, a read_committed reader also
    sees no event twice on any topic, however the kills fell."""
    from kafkaworkers_orders.scenario import OrderScenario

    orders = 1000 if guarantee == "at_least_once" else 2000
    kafka = QuietKafka(own_broker.bootstrap)
    pipeline = Pipeline(own_broker.bootstrap, tmp_path, guarantee)
    created = subprocess.run([KW, "topics", "create"], env=pipeline.env, capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stderr
    scenario = OrderScenario()
    # reserva holds the stock the scenario plans these orders against.
    stock = scenario.stock(orders)
    (tmp_path / "catalogue.json").write_bytes(msgspec.json.encode(stock))
    loaded = subprocess.run(
        [KW, "stock", "load", "--file", str(tmp_path / "catalogue.json"), "--data-dir", str(pipeline.data / "reserva")],
        env=pipeline.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr
    watcher = Consumer(
        {"bootstrap.servers": own_broker.bootstrap, "group.id": f"watch-{uuid.uuid4().hex}",
         "auto.offset.reset": "earliest", "enable.auto.commit": False, "logger": CLIENT_LOG}
    )  # fmt: skip
    watcher.subscribe(scenario.watch)
    try:
        for name in PIPELINE:
            pipeline.start(name)
        # Live orders for ~30 s, so that the kills land in a running pipeline.
        producer = Producer({"bootstrap.servers": own_broker.bootstrap, "enable.idempotence": True,
                             "linger.ms": 5, "logger": CLIENT_LOG})  # fmt: skip
        feed = scenario.generate(orders, seed=rng.randrange(2**32))
        events: list[tuple[str, dict]] = []
        began, sent = time.monotonic(), 0

        def pump(seconds: float) -> None:
            """Feed orders at the pace, and watch the pipeline's events, for ``seconds``."""
            nonlocal sent
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                due = min(orders, int((time.monotonic() - began) * orders / 30))
                for _, key, value, headers in itertools.islice(feed, due - sent):
                    producer.produce("pedido-novo", value, key, headers=headers)
                sent = max(sent, due)
                producer.poll(0)
                for msg in watcher.consume(500, 0.1):
                    if msg.error() is None and msg.value() is not None:
                        scenario.observe(msg.topic(), msg.key(), msg.value(), msg.timestamp()[1])
                        event = json.loads(msg.value())
                        # Only this run's orders: the broker keeps an earlier test's events on these topics.
                        if event.get("order_id") in scenario.tracks:
                            events.append((msg.topic(), event))

        recoveries = []
        store = {"reserva": ("estoque.sqlite3", "reserva"), "pagamento": ("pagamento.sqlite3", "cobranca")}
        for name in ["reserva", "pagamento"]:
            file, table = store[name]
            while not pipeline.db(name, file, f"SELECT 1 FROM {table} LIMIT 1"):
                pump(0.2)
            # The kill moment is the scenario: a random instant while orders flow.
            pump(rng.uniform(0.5, 3.0))
            victim = pipeline.procs[name]
            assert victim.poll() is None, pipeline.log(name)
            assert sent < orders, "every order was sent before the kill: the test proved nothing"
            victim.kill()
            assert victim.wait(30) == -signal.SIGKILL
            before = committed_now(kafka, name, "pedido-novo")
            restarted = time.monotonic()
            pipeline.start(name)
            while kafka.committed(name, "pedido-novo") <= before:
                assert time.monotonic() - restarted < 90, f"{name} made no progress after its restart"
                pump(0.3)
            recoveries.append(time.monotonic() - restarted)
        for _, key, value, headers in feed:
            producer.produce("pedido-novo", value, key, headers=headers)
            producer.poll(0)
        assert producer.flush(60) == 0
        deadline = time.monotonic() + 180
        while not scenario.finished() and time.monotonic() < deadline:
            pump(0.5)
        # notificacao reads every topic and is on no order's path to its end: it may still be
        # working through the last orders' events when the scenario has seen them all end.
        ended = time.monotonic()
        while len(notified_orders(pipeline.log("notificacao"))) < orders and time.monotonic() < deadline:
            pump(0.5)
        print(f"notificacao had notified every order {time.monotonic() - ended:.1f} s after the last one ended")
        verdict = scenario.report(0.0, not scenario.finished()).data
        assert all(p.poll() is None for p in pipeline.procs.values()), "a pipeline process exited"
    finally:
        watcher.close()
        pipeline.stop_all()

    # Charges: one gateway charge per charged order, one refund per refunded charge.
    gateway = "gateway.sqlite3"
    charges = collections.Counter(k for (k,) in pipeline.db("pagamento", gateway, "SELECT chave FROM cobranca"))
    refunds = collections.Counter(t for (t,) in pipeline.db("pagamento", gateway, "SELECT transacao_id FROM estorno"))
    transactions: dict[str, set[str]] = collections.defaultdict(set)
    for topic, event in events:
        if topic == "processo-pagamento" and event["status"] == "aprovado":
            transactions[event["order_id"]].add(event["transacao_id"])
    # Reservations: every unit taken once, and given back once per released order.
    taken: collections.Counter[str] = collections.Counter()
    for (itens,) in pipeline.db("reserva", "estoque.sqlite3", "SELECT itens FROM reserva WHERE status = 'reservado'"):
        taken.update(json.loads(itens))
    left = dict(pipeline.db("reserva", "estoque.sqlite3", "SELECT sku, estoque FROM produto"))
    stock_errors = {p.sku: (p.estoque, taken[p.sku], left.get(p.sku)) for p in stock
                    if p.estoque - taken[p.sku] != left.get(p.sku)}  # fmt: skip
    # Notifications: notificacao (never killed) logs each one; a repeat would log it again.
    notified = collections.Counter(re.findall(NOTIFIED, pipeline.log("notificacao")))
    unsent = pipeline.db("notificacao", "notificacao.sqlite3", "SELECT * FROM envios WHERE status != 'sent'")

    duplicated = (
        sum(c - 1 for c in charges.values())
        + sum(c - 1 for c in refunds.values())
        + sum(len(t) - 1 for t in transactions.values())
        + sum(c - 1 for c in notified.values())
        + len(stock_errors)
    )
    event_ids = collections.Counter((t, e["event_id"]) for t, e in events)
    repeated_events = sum(c - 1 for c in event_ids.values())
    report(f"pipeline_sigkill_{guarantee}", orders, 2, len(verdict["mismatches"]), duplicated, max(recoveries),
           repeated_events)  # fmt: skip
    if guarantee == "exactly_once":
        twice = collections.Counter(topic for (topic, _), c in event_ids.items() if c > 1)
        print(f"EXACTLY_ONCE pipeline: {len(events)} events read_committed, {repeated_events} seen twice {dict(twice)}")
        assert repeated_events == 0, "an event appeared twice on a topic in exactly_once"
    assert verdict["mismatches"] == [], f"{len(verdict['mismatches'])} orders: {verdict['mismatches'][:5]}"
    assert [k for k, c in charges.items() if c > 1] == []
    assert [t for t, c in refunds.items() if c > 1] == []
    assert {o: t for o, t in transactions.items() if len(t) > 1} == {}, "an order was charged twice"
    assert stock_errors == {}, "stock moved twice for an order (sku: initial, taken, left)"
    assert {k: c for k, c in notified.items() if c > 1} == {}, "a customer was notified twice"
    assert unsent == []
    assert len(notified_orders(pipeline.log("notificacao"))) == orders, "an order's customer was never notified"
