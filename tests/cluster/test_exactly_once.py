"""Exactly-once on the three-broker cluster: the transaction coordinator's broker dies mid-run.

A Kafka-to-Kafka plugin (kwtest's echo) in ``exactly_once`` handles :data:`TOTAL` pings on
topics with three copies while it is SIGKILLed twice and the broker coordinating its
transactions is SIGKILLed and started again: a ``read_committed`` reader sees every output
exactly once. Prints::

    EXACTLY_ONCE_CLUSTER messages=<N> sigkills=2 coordinator=<broker> duplicates=0 missing=0
        handled_again=<N> stopped_itself=<0|1>

The worker stops itself (and is started again) when librdkafka blocks in a transactional call
past its timeout, which it can while the group's coordinator is down.
"""

from __future__ import annotations

import collections
import random
import signal
import time

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from kafkaworkers.transactions import transactional_id
from tests.cluster.conftest import Cluster
from tests.conftest import KafkaHelper, KwTest, wait_for
from tests.integration.test_chaos_kafka import PacedProducer, handled_by, read_committed, wait_committed

pytestmark = pytest.mark.cluster

TOTAL = 10_000
#: Partitions of the ping and pong topics: the helpers that sum committed offsets read three.
PARTITIONS = 3
#: The topics holding transactions' and groups' state.
INTERNAL = ["__transaction_state", "__consumer_offsets"]
#: transaction.state.log.num.partitions in scripts/kafka/broker.sh.
TRANSACTION_STATE_PARTITIONS = 4


def java_hash(text: str) -> int:
    """Java's ``String.hashCode``, by which Kafka places a transactional id."""
    h = 0
    for unit in text.encode("utf-16-be").hex(" ", 2).split():
        h = (31 * h + int(unit, 16)) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def coordinator(cluster: Cluster, tid: str) -> int:
    """The broker coordinating ``tid``'s transactions: the leader of its ``__transaction_state`` partition."""
    partition = (java_hash(tid) & 0x7FFFFFFF) % TRANSACTION_STATE_PARTITIONS
    return cluster.leaders(["__transaction_state"])[("__transaction_state", partition)]


def test_cluster_exactly_once_through_sigkills_and_the_coordinators_broker_killed_every_output_once(
    cluster: Cluster, kwtest: KwTest, rng: random.Random
) -> None:
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
    topics = [NewTopic(t, PARTITIONS, 3, config={"min.insync.replicas": "2"}) for t in (kwtest.ping, kwtest.pong)]
    for future in admin.create_topics(topics).values():
        future.result(30)
    del admin
    kafka = KafkaHelper(cluster.bootstrap)
    producer = PacedProducer(cluster.bootstrap, kwtest.ping, rate=TOTAL / 80, limit=TOTAL)
    producer.start()
    args = ("--processing-guarantee", "exactly_once")
    env = {"KAFKAWORKERS_BOOTSTRAP_SERVERS": cluster.bootstrap}
    worker = kwtest.start(*args, **env)
    killed_broker = None
    stopped_itself = 0
    try:
        for kill in range(3):
            pid = worker.pid
            wait_for(lambda pid=pid: handled_by(kwtest, pid) > 0, 90, f"worker {pid} handling")
            # The kill moment is the scenario: a random instant of the run, anywhere in a transaction.
            time.sleep(rng.uniform(0.3, 2.0))
            assert worker.poll() is None, kwtest.log()
            assert len(set(kwtest.handled())) < TOTAL, "the run finished before this fault: the test proves nothing"
            if kill == 1:
                # A new cluster makes its transaction log on first use: a leader killed before its
                # followers caught up would leave no copy in sync to take over.
                wait_for(lambda: cluster.fully_replicated(INTERNAL), 60, "the internal topics' copies in sync")
                # The worker's transactional id is the kwtest group's on this host, process 0.
                killed_broker = coordinator(cluster, transactional_id([kwtest.group], 0))
                cluster("kill", str(killed_broker))
                before = len(kwtest.handled())
                carried_on = lambda b=before: len(kwtest.handled()) > b + 200  # noqa: E731
                wait_for(lambda w=worker, c=carried_on: c() or w.poll() is not None, 90,
                         "the worker carrying on without it, or stopping itself")  # fmt: skip
                if not carried_on():
                    # librdkafka can block in send_offsets_to_transaction while the group's
                    # coordinator is down (confluentinc/librdkafka#5511): the worker then stops
                    # itself as a fenced producer does, and is started again, as its supervisor would.
                    assert worker.wait(30) != 0
                    assert "did not return within" in kwtest.log(), kwtest.log()
                    stopped_itself += 1
                    worker = kwtest.start(*args, **env)
                    wait_for(carried_on, 90, "the restarted worker carrying on without it")
                cluster("start", str(killed_broker))
                continue
            worker.kill()
            assert worker.wait(30) == -signal.SIGKILL
            worker = kwtest.start(*args, **env)
        producer.rush()
        assert producer.finish() == TOTAL
        wait_committed(kafka, kwtest, TOTAL, 240)
    finally:
        producer.producer.flush(5)
        del producer.producer
        kwtest.stop_all()

    outputs = read_committed(cluster.bootstrap, kwtest.pong)
    duplicates = sum(c - 1 for c in outputs.values())
    missing = TOTAL - len(set(outputs) & set(range(TOTAL)))
    handled_again = sum(c - 1 for c in collections.Counter(kwtest.handled()).values())
    print(
        f"\nEXACTLY_ONCE_CLUSTER messages={TOTAL} sigkills=2 coordinator={killed_broker} duplicates={duplicates}"
        f" missing={missing} handled_again={handled_again} stopped_itself={stopped_itself}"
    )
    assert duplicates == 0, "a read_committed reader saw an output twice"
    assert missing == 0, "an output is missing"
    assert handled_again > 0, "no message was handled twice: the kills landed nowhere, the test proved nothing"
