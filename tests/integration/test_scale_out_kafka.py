"""Every order service as two instances "on two hosts", sharing one PostgreSQL, on the real broker.

Each instance has a data directory of its own (as on another machine) and the same
``KAFKAWORKERS_DATABASE_URL``: a fresh database on the test's PostgreSQL server. The main
test sends :data:`ORDERS` orders, SIGKILLs one instance each of reserva, pagamento and
picking a third of the way in and starts a replacement at once, and judges the run from the
topics and the database (:func:`tests.judging.judge`). It prints::

    SCALE orders=<N> <outcome>=<N>... elapsed_s=<X> stuck=0 wrong_outcome=0 double_charges=0 ...
"""

from __future__ import annotations

import collections
import json
import re
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition

from kafkaworkers.retry import dlq_topic
from kafkaworkers_orders.contracts import PEDIDO_NOVO, RESERVA_ESTOQUE, TOPICS
from kafkaworkers_orders.reserva import CATALOGUE
from kafkaworkers_orders.reserva.estoque import Produto, read_catalogue
from kafkaworkers_orders.scenario import OrderScenario
from tests.conftest import wait_for
from tests.integration.test_pipeline_kafka import Services, _single_item_order, race
from tests.judging import Offsets, Watcher, judge, publish, settle, write_catalogue
from tests.pgserver import PgServer, store_rows

pytestmark = pytest.mark.kafka

SERVICES = ("reserva", "fraude", "pagamento", "picking", "notificacao", "relatorios")
HOSTS = ("a", "b")
ORDERS = 300
SEED = 20261201
FINISH_TIMEOUT = 120.0
KILLED = ("reserva", "pagamento", "picking")


@pytest.fixture
def shared(bootstrap: str, tmp_path: Path, pg_server: PgServer) -> Iterator[Services]:
    """Service processes whose state is in one fresh PostgreSQL database; each host's data dir its own."""
    services = Services(bootstrap, tmp_path)
    services.env["KAFKAWORKERS_DATABASE_URL"] = pg_server.create_database(f"scale_{uuid.uuid4().hex[:8]}")
    try:
        yield services
    finally:
        services.stop_all()


class DeadLetters:
    """The dead-letter topics of the run's groups, read from where they ended before the run.

    The order topics are shared with other tests (poison included): only letters keyed by
    this run's orders count.
    """

    def __init__(self, offsets: Offsets, groups: list[str]) -> None:
        self.offsets = offsets
        self.topics = [dlq_topic(g) for g in groups]
        self.start = offsets.ends(self.topics)

    def of(self, orders: set[str]) -> dict[str, int]:
        """This run's dead letters per dead-letter topic."""
        ends = self.offsets.ends(self.topics)
        counts = dict.fromkeys(self.topics, 0)
        reader = Consumer({"bootstrap.servers": self.offsets.bootstrap, "group.id": f"dlq-{uuid.uuid4().hex}"})
        try:
            reader.assign([TopicPartition(t, p, o) for (t, p), o in self.start.items() if ends[(t, p)] > o])
            left = sum(ends[tp] - o for tp, o in self.start.items())
            deadline = time.monotonic() + 30
            while left > 0 and time.monotonic() < deadline:
                for msg in reader.consume(500, 0.5):
                    if msg.error() is None:
                        left -= 1
                        counts[msg.topic()] += (msg.key() or b"").decode(errors="replace") in orders
        finally:
            reader.close()
        assert left <= 0, f"{left} dead letters unread"
        return counts


def start_on(services: Services, plugin: str, host: str, label: str, **env: str) -> None:
    services.start(plugin, label, KAFKAWORKERS_DATA_DIR=str(services.data_dir / host), **env)


def test_two_instances_of_every_service_share_postgresql_through_sigkills(shared: Services, tmp_path: Path) -> None:
    services = shared
    run_id = uuid.uuid4().hex[:8]
    seed = [msgspec.structs.replace(p, sku=f"{p.sku}-{run_id[:6].upper()}") for p in read_catalogue(CATALOGUE)]
    scenario = OrderScenario(run_id=run_id, catalogue=seed)
    catalogue = scenario.stock(ORDERS)
    initial = {p.sku: p.estoque for p in catalogue}
    # One stock for both hosts: loaded once into the shared database.
    services.cli("stock", "load", "--file", str(write_catalogue(tmp_path / "catalogo.json", catalogue)))
    services.cli("topics", "create")
    groups = {services.group(name): services.consumed(name) for name in SERVICES}
    offsets = Offsets(services.bootstrap)
    offsets.start_at_end(groups)
    watcher = Watcher(offsets, list(TOPICS))
    letters = DeadLetters(offsets, list(groups))
    labels = {name: [f"{name}-{host}" for host in HOSTS] for name in SERVICES}
    try:
        for name in SERVICES:
            for host in HOSTS:
                start_on(services, name, host, f"{name}-{host}")
        every = {name: set(offsets.partitions(services.consumed(name))) for name in SERVICES}

        def joined() -> bool:
            services.check_running()
            held = {n: [services.holdings(lb) & every[n] for lb in labels[n]] for n in SERVICES}
            # The assignment settles in rounds (cooperative-sticky): until the last, one
            # instance may still hold every partition.
            return all(all(h) and set().union(*h) == every[n] for n, h in held.items())

        wait_for(joined, 120, "both instances of every service to hold some of its partitions, all between them")
        held_at_start = {lb: len(services.holdings(lb)) for ls in labels.values() for lb in ls}

        inputs = list(scenario.generate(ORDERS, SEED))
        watcher.orders = set(scenario.tracks)
        start = time.monotonic()

        def pump() -> int:
            services.check_running()
            for msg in watcher.poll(0.1):
                if msg.topic() in scenario.watch:
                    scenario.observe(msg.topic(), msg.key(), msg.value(), msg.timestamp()[1])
            return sum(t.terminal is not None for t in scenario.tracks.values())

        third = ORDERS // 3
        publish(services.bootstrap, inputs[:third])
        wait_for(lambda: pump() >= third // 2, 60, "the first orders to end", interval=0)
        # SIGKILL host b's reserva, pagamento and picking mid-run; their replacements start at
        # once, and the dead members' partitions move when their sessions time out.
        for name in KILLED:
            killed = services.procs.pop(f"{name}-b")
            killed.send_signal(signal.SIGKILL)
            killed.wait(10)
        killed_at = time.monotonic() - start
        for name in KILLED:
            start_on(services, name, "b", f"{name}-b2")
        publish(services.bootstrap, inputs[third:])
        while not scenario.finished():
            if time.monotonic() - start > FINISH_TIMEOUT:
                break
            pump()
        elapsed = time.monotonic() - start
        if scenario.finished():
            settle(offsets, groups, watcher)
        services.check_running()
        dead = letters.of(watcher.orders)
    finally:
        watcher.close()
        offsets.close()

    logged = collections.Counter(
        (o, k)
        for label in services.procs
        if label.startswith("notificacao")
        for o, k in re.findall(rf"notificacao (PED-{run_id}-\d+)\.(\w+) para", services.log(label))
    )
    url = services.env["KAFKAWORKERS_DATABASE_URL"]
    # The topics are shared with other runs, whose events relatorios recorded too: the report
    # is judged on this run's orders, so the others' facts leave this test's database first.
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("DELETE FROM relatorios_fatos.fatos WHERE valor NOT LIKE %s", (f'%"order_id":"PED-{run_id}-%',))
    report = json.loads(services.cli("report", "--format", "json").stdout)
    orders = {p.pedido.order_id: p.pedido for p in scenario.plan(ORDERS, SEED)}
    verdict = judge(scenario, orders, initial, watcher.events, store_rows(url), logged, report["by_state"])
    outcomes = collections.Counter(t.terminal or "unfinished" for t in scenario.tracks.values())
    print(
        f"\nSCALE orders={ORDERS} "
        + " ".join(f"{k}={n}" for k, n in sorted(outcomes.items()))
        + f" killed_at_s={killed_at:.1f} elapsed_s={elapsed:.1f} dead_letters={sum(dead.values())}"
        + f" {verdict.line()}\nSCALE partitions_held_at_start={held_at_start}"
    )
    assert scenario.finished(), scenario.report(elapsed, True).text
    assert verdict.ok, verdict.explain()
    assert not any(dead.values()), f"this run's dead letters: {dead}"
    assert all(held_at_start.values()), f"an instance held no partition, so it shared nothing: {held_at_start}"


RACE_STOCK = 30
RACE_ORDERS = 60


def test_sixty_orders_race_for_thirty_units_across_two_hosts(shared: Services, tmp_path: Path) -> None:
    services = shared
    run_id = uuid.uuid4().hex[:8]
    sku = f"RACE-{run_id.upper()}"
    lote = Produto(sku=sku, nome="Último lote", estoque=RACE_STOCK, preco_centavos=1990)
    services.cli("stock", "load", "--file", str(write_catalogue(tmp_path / "catalogo.json", [lote])))
    services.cli("topics", "create")
    group = services.group("reserva")
    offsets = Offsets(services.bootstrap)
    novo = offsets.partitions([PEDIDO_NOVO])
    offsets.start_at_end({group: services.consumed("reserva")})
    watcher = Watcher(offsets, [RESERVA_ESTOQUE])
    orders = [_single_item_order(f"RACE-{run_id}-{n:04d}", sku) for n in range(RACE_ORDERS)]
    watcher.orders = {o.order_id for o in orders}
    try:
        # range gives each member partitions of every topic, so both hosts take from the one stock.
        for host in HOSTS:
            start_on(
                services,
                "reserva",
                host,
                f"reserva-{host}",
                KAFKAWORKERS_CONSUMER_PARTITION_ASSIGNMENT_STRATEGY="range",
            )

        def split() -> dict[str, set[tuple[str, int]]] | None:
            services.check_running()
            held = {label: {tp for tp in services.holdings(label) if tp[0] == PEDIDO_NOVO} for label in services.procs}
            return held if all(held.values()) and set().union(*held.values()) == set(novo) else None

        before = wait_for(split, 90, f"both reserva hosts to hold partitions of {PEDIDO_NOVO}")
        per_partition = race(services, watcher, orders)
        settle(offsets, {group: services.consumed("reserva")}, watcher)
    finally:
        watcher.close()
        offsets.close()

    statuses = collections.Counter(e.status for _, e in watcher.events.values())
    rows = store_rows(services.env["KAFKAWORKERS_DATABASE_URL"])
    [(left,)] = [(n,) for s, n in rows("reserva", "estoque.sqlite3", "SELECT sku, estoque FROM produto") if s == sku]
    recorded = collections.Counter(s for (s,) in rows("reserva", "estoque.sqlite3", "SELECT status FROM reserva"))
    handled_by = {label: sum(per_partition[p] for _, p in tps) for label, tps in before.items()}  # type: ignore[union-attr]
    print(
        f"\nRACE hosts=2 stock={RACE_STOCK} orders={RACE_ORDERS} reservado={statuses['reservado']}"
        f" sem_estoque={statuses['sem_estoque']} stock_left={left} orders_per_host={handled_by}"
    )
    assert statuses == {"reservado": RACE_STOCK, "sem_estoque": RACE_ORDERS - RACE_STOCK}, statuses
    assert recorded == {"reservado": RACE_STOCK, "sem_estoque": RACE_ORDERS - RACE_STOCK}, recorded
    assert left == 0
    assert all(n > 0 for n in handled_by.values()), f"one host received no orders: {handled_by}"
