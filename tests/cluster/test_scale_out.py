"""The six order services on two hosts against three brokers, through a host's and a broker's faults.

Each scenario runs every service on hosts ``a`` and ``b`` (network namespaces, each with its
own data dir) under one group prefix, sends :data:`ORDERS` orders at a steady pace onto
6-partition topics with three copies, injects its fault a third of the way in, waits until
every order ended and nothing more can come, and judges the run from the topics and the
databases (:func:`tests.judging.judge`). Each prints::

    CLUSTER scenario=<name> orders=<N> <outcome>=<N>... fault_s=<X> elapsed_s=<X> stuck=0 wrong_outcome=0 ...

- ``kill_host``: SIGKILL every service on host b, restart them 3 s later.
- ``cut_host``: host b's network down for :data:`CUT_S` (beyond the 6 s session timeout): host
  a takes all its partitions; when it is back, host b's same processes rejoin.
- ``kill_leader``: SIGKILL the broker leading the most order-topic partitions, start it 10 s later.
- ``rolling_restart``: stop and start each broker in turn, each once every partition is back in sync.
"""

from __future__ import annotations

import collections
import importlib
import json
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import psycopg
import pytest
from confluent_kafka import Producer

from kafkaworkers.producer import produce
from kafkaworkers.retry import retry_topic
from kafkaworkers_orders.contracts import TOPICS
from kafkaworkers_orders.notificacao import plugin as notificacao
from kafkaworkers_orders.reserva import CATALOGUE
from kafkaworkers_orders.reserva.estoque import read_catalogue
from kafkaworkers_orders.scenario import OrderScenario
from tests.cluster.conftest import Hosts, wait_joined
from tests.conftest import wait_for
from tests.judging import Offsets, Verdict, Watcher, judge, settle, write_catalogue

pytestmark = pytest.mark.cluster

SERVICES = ("reserva", "fraude", "pagamento", "picking", "notificacao", "relatorios")
ORDERS = 2000
PARTITIONS = 6
#: Orders per second: the run lasts ~40 s, so every fault lands in a running pipeline.
RATE = 50.0
CUT_S = 15.0
FINISH_TIMEOUT = 180.0
ORDER_TOPICS = sorted(TOPICS)


def consumed(hosts: Hosts, plugin: str) -> list[str]:
    """Every topic the plugin's group reads: its subscriptions and its retry topics."""
    declared = importlib.import_module(f"kafkaworkers_orders.{plugin}").plugin
    retries = [retry_topic(hosts.group(plugin), i + 1) for i in range(len(declared.retry.delays))]
    return [*declared.subscriptions, *retries]


class Feed(threading.Thread):
    """Sends the orders at :data:`RATE` with ``acks=all``, counting what the brokers acknowledged."""

    def __init__(self, bootstrap: str, orders: Iterator[tuple[str, bytes | None, bytes, list]], count: int) -> None:
        super().__init__(daemon=True)
        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
        self.orders, self.count = orders, count
        self.stopping = threading.Event()
        self.sent = 0
        self.acked: set[bytes] = set()
        self.errors: list[str] = []

    def run(self) -> None:
        def delivered(err: object, msg: object) -> None:
            if err is not None:
                self.errors.append(str(err))
            else:
                self.acked.add(msg.key())  # type: ignore[attr-defined]

        began = time.monotonic()
        for topic, key, value, headers in self.orders:
            while (time.monotonic() - began) * RATE < self.sent:
                self.producer.poll(0.005)
            if self.stopping.is_set():
                return
            produce(self.producer, topic, value, key, headers, delivered)
            self.sent += 1
            self.producer.poll(0)
        self.producer.flush(120)

    def close(self) -> None:
        """Stop sending and drop the producer, so nothing outlives the test's network."""
        self.stopping.set()
        self.join(130)
        self.producer.flush(5)
        del self.producer


class Run:
    """One scenario's run: the orders, the watcher and the time it is at."""

    def __init__(self, hosts: Hosts, tmp_path: Path, seed: int) -> None:
        self.hosts = hosts
        self.run_id = uuid.uuid4().hex[:8]
        # SKUs of this run: another scenario's orders cannot take its stock.
        seed_catalogue = [
            msgspec.structs.replace(p, sku=f"{p.sku}-{self.run_id[:6].upper()}") for p in read_catalogue(CATALOGUE)
        ]
        self.scenario = OrderScenario(run_id=self.run_id, catalogue=seed_catalogue)
        catalogue = self.scenario.stock(ORDERS)
        self.initial = {p.sku: p.estoque for p in catalogue}
        # One stock for every host: it lives in the shared database.
        hosts.each["a"].cli("stock", "load", "--file", str(write_catalogue(tmp_path / "catalogo.json", catalogue)))
        hosts.each["a"].cli("topics", "create", "--partitions", str(PARTITIONS))
        self.groups = {plugin: consumed(hosts, plugin) for plugin in SERVICES}
        self.offsets = Offsets(hosts.cluster.bootstrap)
        every = sorted({t for ts in self.groups.values() for t in ts})
        self.partitions = collections.Counter(t for t, _ in self.offsets.partitions(every))
        self.offsets.start_at_end({hosts.group(p): ts for p, ts in self.groups.items()})
        self.watcher = Watcher(self.offsets, ORDER_TOPICS)
        self.seed = seed
        self.began = 0.0

    def start(self) -> Feed:
        for host in self.hosts.each.values():
            for plugin in SERVICES:
                host.start(plugin)
        wait_joined(self.hosts, self.groups, self.partitions)
        feed = self.scenario.generate(ORDERS, self.seed)
        self.watcher.orders = set(self.scenario.tracks)
        self.began = time.monotonic()
        sender = Feed(self.hosts.cluster.bootstrap, feed, ORDERS)
        sender.start()
        return sender

    def pump(self, seconds: float) -> None:
        """Read and observe this run's events for ``seconds``."""
        end = time.monotonic() + seconds
        while True:
            for msg in self.watcher.poll(0.1):
                if msg.topic() in self.scenario.watch:
                    self.scenario.observe(msg.topic(), msg.key(), msg.value(), msg.timestamp()[1])
            if time.monotonic() >= end:
                return

    def pump_until(self, condition: Callable[[], object], timeout: float, what: str) -> None:
        wait_for(lambda: self.pump(0.2) or condition(), timeout, what, interval=0)

    def close(self) -> None:
        self.watcher.close()
        self.offsets.close()


def rows_of(url: str) -> Callable[[str, str, str], list[tuple]]:
    """Rows of a plugin's table in the shared database: the store ``<name>.sqlite3`` of one host
    is the schema ``<plugin>`` (``<plugin>_<name>`` when the names differ) there."""

    def rows(plugin: str, file: str, sql: str) -> list[tuple]:
        name = file.removesuffix(".sqlite3")
        schema = plugin if name == plugin else f"{plugin}_{name}"
        with psycopg.connect(url, autocommit=True, options=f"-c search_path={schema}") as db:
            return db.execute(sql).fetchall()

    return rows


Fault = Callable[[Run], None]


def kill_host(run: Run) -> None:
    b = run.hosts.each["b"]
    for plugin in SERVICES:
        b.kill(plugin)
    run.pump(3.0)
    for plugin in SERVICES:
        b.start(plugin)


def cut_host(run: Run) -> None:
    hosts, b = run.hosts, run.hosts.each["b"]
    a = hosts.each["a"]
    hosts.network.cut("b")
    cut_at = time.monotonic()

    def a_holds_all() -> bool:
        return all(
            {tp for tp in a.holdings(p) if tp[0] in ts} >= {(t, i) for t in ts for i in range(run.partitions[t])}
            for p, ts in run.groups.items()
        )

    run.pump_until(a_holds_all, CUT_S + 30, "host a to take every partition of the cut host b")
    taken_s = time.monotonic() - cut_at
    run.pump(max(0.0, CUT_S - taken_s))
    hosts.network.restore("b")
    print(f"CUT host=b cut_s={time.monotonic() - cut_at:.1f} partitions_moved_after_s={taken_s:.1f}")

    def b_rejoined() -> bool:
        hosts.check_running()
        return all(any(tp[0] in run.groups[p] for tp in b.holdings(p)) for p in SERVICES)

    run.pump_until(b_rejoined, 90, "the same processes on host b to hold partitions again")
    lost = [p for p in SERVICES if re.search(r": lost ", b.current_log(p))]
    print(f"CUT rejoined_after_s={time.monotonic() - cut_at:.1f} reported_lost={lost}")


def kill_leader(run: Run) -> None:
    # The busiest partitions: those that took the most messages so far, summed per leader.
    ends = run.offsets.ends(ORDER_TOPICS)
    carried: collections.Counter[int] = collections.Counter()
    for tp, leader in run.hosts.cluster.leaders(ORDER_TOPICS).items():
        carried[leader] += ends[tp]
    node, messages = carried.most_common(1)[0]
    run.hosts.cluster("kill", str(node))
    print(f"KILLED broker={node} leading partitions that carried {messages} of {sum(carried.values())} messages")
    run.pump(10.0)
    run.hosts.cluster("start", str(node))
    run.pump_until(lambda: run.hosts.cluster.fully_replicated(ORDER_TOPICS), 120, "every replica back in sync")


def rolling_restart(run: Run) -> None:
    for node in ("1", "2", "3"):
        run.hosts.cluster("stop", node)
        run.hosts.cluster("start", node)
        run.pump_until(lambda: run.hosts.cluster.fully_replicated(ORDER_TOPICS), 120, f"replicas in sync after {node}")


@pytest.mark.parametrize(
    "fault", [kill_host, cut_host, kill_leader, rolling_restart], ids=lambda f: f.__name__
)  # fmt: skip
def test_cluster_two_hosts_every_order_ends_once_through(
    fault: Fault, hosts: Hosts, tmp_path: Path, rng: random.Random
) -> None:
    run = Run(hosts, tmp_path, rng.randrange(2**32))
    feed: Feed | None = None
    try:
        feed = run.start()
        run.pump_until(lambda: feed.sent >= ORDERS // 3, 60, "a third of the orders sent")
        fault_began = time.monotonic()
        fault(run)
        fault_s = time.monotonic() - fault_began
        deadline = time.monotonic() + FINISH_TIMEOUT
        while not (feed.sent == ORDERS and not feed.is_alive() and run.scenario.finished()):
            if time.monotonic() > deadline:
                break
            hosts.check_running()
            run.pump(0.5)
        elapsed = time.monotonic() - run.began
        finished = run.scenario.finished()
        if finished:
            settle(run.offsets, {hosts.group(p): ts for p, ts in run.groups.items()}, run.watcher)
        hosts.check_running()
    finally:
        if feed is not None:
            feed.close()
        run.close()
        hosts.stop_all()

    sends = re.compile(rf"notificacao (PED-{run.run_id}-\d+)\.(\w+) para")
    logged = collections.Counter(k for host in hosts.each.values() for k in sends.findall(host.log("notificacao")))
    by_killed = {k for host in hosts.each.values() for k in sends.findall(host.killed_log("notificacao"))}
    kills = sum(p == "notificacao" for host in hosts.each.values() for p, _ in host.killed)
    orders = {p.pedido.order_id: p.pedido for p in run.scenario.plan(ORDERS, run.seed)}
    report = json.loads(hosts.each["a"].cli("report", "--format", "json"))
    verdict: Verdict = judge(
        run.scenario,
        orders,
        run.initial,
        run.watcher.events,
        rows_of(hosts.database_url),
        logged,
        report["by_state"],
        by_killed,
    )
    outcomes = collections.Counter(t.terminal or "unfinished" for t in run.scenario.tracks.values())
    print(
        f"\nCLUSTER scenario={fault.__name__} orders={ORDERS} "
        + " ".join(f"{k}={n}" for k, n in sorted(outcomes.items()))
        + f" acknowledged={len(feed.acked)} fault_s={fault_s:.1f} elapsed_s={elapsed:.1f} {verdict.line()}"
    )
    assert not feed.errors, f"orders not acknowledged: {feed.errors[:3]}"
    assert len(feed.acked) == ORDERS
    assert verdict.ok, verdict.explain()
    # A kill catches at most the sends in flight unrecorded: one per message notificacao runs at once.
    assert verdict.figures["resent_after_loss"] <= kills * notificacao.concurrency, verdict.explain()
    assert finished, run.scenario.report(elapsed, True).text


def test_cluster_topics_create_gives_three_copies_two_in_sync(hosts: Hosts) -> None:
    hosts.each["a"].cli("topics", "create", "--partitions", str(PARTITIONS))
    # Metadata lists only the brokers that are up: an earlier test may have just restarted one.
    wait_for(lambda: hosts.cluster.fully_replicated(["pedido-novo"]), 60, "every broker up")
    described = hosts.each["a"].cli("topics", "describe", "pedido-novo", "--format", "json")
    data = msgspec.json.decode(described)
    assert (data["partitions"], data["replication"]) == (PARTITIONS, 3)
    assert data["config"]["min.insync.replicas"] == "2"
