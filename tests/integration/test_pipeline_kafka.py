"""The order pipeline on the real broker, deployed as in production: one process per service.

Every test runs its services under a group prefix of its own (``KAFKAWORKERS_GROUP_PREFIX``),
so its consumer groups, retry and dead-letter topics are its own; the order topics are shared
with other tests and the demo. Before a service starts, its fresh group is committed at the
current end of every topic it consumes, so old messages are never replayed. Another run's
orders may still arrive while a test runs: the pipeline test's catalogue uses SKUs of its
own, so such orders ask for SKUs this reserva does not know and cannot take its stock, and
every check looks at this test's orders only.

``test_pipeline_as_deployed_six_processes`` prints::

    PIPELINE orders=1000 terminal=<N> as_expected=<N> elapsed_s=<X> orders_per_s=<X>
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import msgspec
import pytest

from kafkaworkers.headers import H_CORRELATION_ID
from kafkaworkers.retry import dlq_topic, retry_topic
from kafkaworkers_orders.contracts import (
    PEDIDO_CANCELADO,
    PEDIDO_NOVO,
    PROCESSO_PAGAMENTO,
    PROCESSO_PICKING,
    RESERVA_ESTOQUE,
    TOPICS,
    Cartao,
    Cliente,
    Item,
    PedidoNovo,
    event_id_for,
)
from kafkaworkers_orders.notificacao import PAYMENT_KINDS, PICKING_KINDS
from kafkaworkers_orders.reserva import CATALOGUE
from kafkaworkers_orders.reserva.estoque import Produto, read_catalogue
from kafkaworkers_orders.scenario import OrderScenario
from tests.conftest import FAST_GROUP, KW, stop_processes, wait_for
from tests.judging import Offsets, Watcher, holdings, publish, query, settle, write_catalogue

pytestmark = pytest.mark.kafka

SERVICES = ("reserva", "fraude", "pagamento", "picking", "notificacao", "relatorios")
ORDERS = 1000
SEED = 20240611
PIPELINE_TIMEOUT = 180.0
#: notificacao's default channels: one delivery per (order, kind) on each.
CHANNELS = ("log",)


# --- the services as processes ---------------------------------------------------------


class Services:
    """This test's service processes: one group prefix, one data dir, a log file per process."""

    def __init__(self, bootstrap: str, tmp_path: Path) -> None:
        self.bootstrap = bootstrap
        self.prefix = f"pipe-{uuid.uuid4().hex[:8]}-"
        self.data_dir = tmp_path / "data"
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {
            **os.environ,
            **FAST_GROUP,
            "KAFKAWORKERS_BOOTSTRAP_SERVERS": bootstrap,
            "KAFKAWORKERS_DATA_DIR": str(self.data_dir),
            "KAFKAWORKERS_GROUP_PREFIX": self.prefix,
            "KAFKAWORKERS_METRICS_PORT": "0",
            "KAFKAWORKERS_LOG_LEVEL": "INFO",
            # The services that wait on the network run 8 messages at once (their defaults, said
            # here so the test covers it whatever the defaults become): every order must still
            # end once, every charge and notification happen once.
            "KAFKAWORKERS_PLUGINS__NOTIFICACAO__CONCURRENCY": "8",
            "KAFKAWORKERS_PLUGINS__PAGAMENTO__CONCURRENCY": "8",
        }

    def group(self, plugin: str) -> str:
        return self.prefix + plugin

    def consumed(self, plugin: str) -> list[str]:
        """Every topic the plugin's group consumes: its subscriptions and its retry topics."""
        declared = importlib.import_module(f"kafkaworkers_orders.{plugin}").plugin
        retries = [retry_topic(self.group(plugin), i + 1) for i in range(len(declared.retry.delays))]
        return [*declared.subscriptions, *retries]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([KW, *args], env=self.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"kafkaworkers {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
        return done

    def start(self, plugin: str, label: str | None = None, **env: str) -> subprocess.Popen[bytes]:
        label = label or plugin
        log = open(self.logs / f"{label}.log", "wb")  # noqa: SIM115 - the process holds it until it exits
        command = [KW, "run", "--plugin", plugin]
        self.procs[label] = subprocess.Popen(command, env={**self.env, **env}, stdout=log, stderr=log)
        log.close()
        return self.procs[label]

    def log(self, label: str) -> str:
        path = self.logs / f"{label}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def holdings(self, label: str) -> set[tuple[str, int]]:
        """The partitions the process holds now, according to its log's assigned/revoked/lost lines."""
        return holdings(self.log(label))

    def check_running(self) -> None:
        for label, proc in self.procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{label} exited with {proc.returncode}:\n{self.log(label)[-4000:]}")

    def stop(self, label: str) -> int:
        proc = self.procs[label]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(30)

    def stop_all(self) -> None:
        stop_processes(self.procs.values())


@pytest.fixture
def services(bootstrap: str, tmp_path: Path) -> Iterator[Services]:
    running = Services(bootstrap, tmp_path)
    try:
        yield running
    finally:
        running.stop_all()


# --- the tests -------------------------------------------------------------------------


def test_pipeline_as_deployed_six_processes(services: Services, tmp_path: Path) -> None:
    run_id = uuid.uuid4().hex[:8]
    # The seed catalogue under SKUs of this run: another run's orders cannot take its stock;
    # reserva holds what the scenario plans the run's orders against.
    seed = [msgspec.structs.replace(p, sku=f"{p.sku}-{run_id[:6].upper()}") for p in read_catalogue(CATALOGUE)]
    scenario = OrderScenario(run_id=run_id, catalogue=seed)
    catalogue = scenario.stock(ORDERS)
    initial = {p.sku: p.estoque for p in catalogue}
    services.cli(
        "stock", "load", "--file", str(write_catalogue(tmp_path / "catalogo.json", catalogue)),
        "--data-dir", str(services.data_dir / "reserva"),
    )  # fmt: skip
    services.cli("topics", "create")
    groups = {services.group(name): services.consumed(name) for name in SERVICES}
    offsets = Offsets(services.bootstrap)
    offsets.start_at_end(groups)
    watcher = Watcher(offsets, list(TOPICS))
    try:
        for name in SERVICES:
            services.start(name)

        def joined() -> bool:
            services.check_running()
            return all({t for t, _ in services.holdings(n)} >= set(services.consumed(n)) for n in SERVICES)

        wait_for(joined, 120, "every service to join its group and hold all its partitions")

        inputs = list(scenario.generate(ORDERS, SEED))
        watcher.orders = set(scenario.tracks)
        start = time.monotonic()
        publish(services.bootstrap, inputs)
        while not scenario.finished():
            if time.monotonic() - start > PIPELINE_TIMEOUT:
                pytest.fail(scenario.report(time.monotonic() - start, True).text + _tails(services), pytrace=False)
            services.check_running()
            for msg in watcher.poll():
                if msg.topic() in scenario.watch:
                    scenario.observe(msg.topic(), msg.key(), msg.value(), msg.timestamp()[1])
        elapsed = time.monotonic() - start
        rounds = settle(offsets, groups, watcher)
        services.check_running()
        dead = {g: sum(offsets.ends([dlq_topic(g)]).values()) for g in groups}
        relatorios_exit = services.stop("relatorios")  # DuckDB: one process at a time
    finally:
        watcher.close()
        offsets.close()

    report = scenario.report(elapsed, False)
    tracks = scenario.tracks
    terminal = sum(t.terminal is not None for t in tracks.values())
    as_expected = sum(t.terminal == t.expected for t in tracks.values())
    print(
        f"\nPIPELINE orders={ORDERS} terminal={terminal} as_expected={as_expected}"
        f" elapsed_s={elapsed:.1f} orders_per_s={ORDERS / elapsed:.1f}"
    )
    print(report.text)
    assert report.ok, report.text
    assert dead == dict.fromkeys(groups, 0), f"dead letters per group: {dead}"

    events = watcher.events
    cancelled = {o for o, t in tracks.items() if t.terminal != "separado"}

    # Stock: never negative, and each SKU's loss is exactly what the reserved orders hold.
    estoque = services.data_dir / "reserva" / "estoque.sqlite3"
    left = dict(query(estoque, "SELECT sku, estoque FROM produto"))
    held: collections.Counter[str] = collections.Counter()
    for (itens,) in query(estoque, "SELECT itens FROM reserva WHERE status = 'reservado'"):
        held.update(json.loads(itens))
    assert min(left.values()) >= 0, f"negative stock: {left}"
    wrong_stock = {s: (n, held[s], left.get(s)) for s, n in initial.items() if n - held[s] != left.get(s)}
    assert not wrong_stock, f"sku: (initial, held by reserved orders, left): {wrong_stock}"
    reservas = dict(query(estoque, "SELECT order_id, status FROM reserva WHERE order_id LIKE ?", f"PED-{run_id}-%"))
    reserved_events = {e.order_id for t, e in events.values() if t == RESERVA_ESTOQUE and e.status == "reservado"}
    released_events = {e.order_id for t, e in events.values() if t == RESERVA_ESTOQUE and e.status == "liberado"}
    assert {o for o, s in reservas.items() if s in ("reservado", "liberado")} == reserved_events
    assert {o for o, s in reservas.items() if s == "liberado"} == released_events == reserved_events & cancelled

    # Money: one charge per order at most, refunds only of charged cancelled orders, each once.
    gateway = services.data_dir / "pagamento" / "gateway.sqlite3"
    ours = f"PED-{run_id}-%"
    charges = query(gateway, "SELECT chave, status, transacao_id, valor FROM cobranca WHERE chave LIKE ?", ours)
    per_order = collections.Counter(chave.split(":")[0] for chave, *_ in charges)
    assert max(per_order.values()) <= 1, [o for o, n in per_order.items() if n > 1]
    charged = {chave: (tx, valor) for chave, status, tx, valor in charges if status == "aprovado"}
    refunds = query(gateway, "SELECT chave, transacao_id, valor FROM estorno WHERE chave LIKE ?", f"PED-{run_id}-%")
    refunds_per_order = collections.Counter(chave.removesuffix(":estorno") for chave, _, _ in refunds)
    assert max(refunds_per_order.values(), default=0) <= 1, [o for o, n in refunds_per_order.items() if n > 1]
    assert set(refunds_per_order) == set(charged) & cancelled, "a refund of an order not charged and cancelled"
    assert all(charged[c.removesuffix(":estorno")] == (tx, v) for c, tx, v in refunds), "a refund of another charge"
    transactions: dict[str, set[str]] = collections.defaultdict(set)
    for topic, e in events.values():
        if topic == PROCESSO_PAGAMENTO and e.status == "aprovado":
            transactions[e.order_id].add(e.transacao_id)
    assert {o: {tx} for o, (tx, _) in charged.items()} == transactions, "approved events disagree with the gateway"

    # Notifications: one per (order, kind, channel) that the events call for, each sent once.
    kinds = {PEDIDO_NOVO: lambda e: "pedido_recebido", PEDIDO_CANCELADO: lambda e: "pedido_cancelado",
             PROCESSO_PAGAMENTO: lambda e: PAYMENT_KINDS[e.status],
             PROCESSO_PICKING: lambda e: PICKING_KINDS[e.status]}  # fmt: skip
    expected_notes = {(e.order_id, kinds[t](e), c) for t, e in events.values() if t in kinds for c in CHANNELS}
    notificacao = services.data_dir / "notificacao" / "notificacao.sqlite3"
    envios = query(
        notificacao, "SELECT order_id, kind, channel, status, attempts FROM envios WHERE order_id LIKE ?",
        f"PED-{run_id}-%",
    )  # fmt: skip
    rows = collections.Counter((o, k, c) for o, k, c, _, _ in envios)
    assert max(rows.values()) == 1
    assert set(rows) == expected_notes, (
        f"missing {sorted(expected_notes - set(rows))[:10]}, unexpected {sorted(set(rows) - expected_notes)[:10]}"
    )
    assert [r for r in envios if r[3] != "sent" or r[4] != 1] == [], "a notification not sent, or sent again"
    logged = collections.Counter(
        re.findall(rf"notificacao (PED-{run_id}-\d+)\.(\w+) para", services.log("notificacao"))
    )
    assert set(logged) == {(o, k) for o, k, _ in expected_notes} and max(logged.values()) == 1, (
        f"log-channel sends seen more than once: {[k for k, n in logged.items() if n > 1][:10]}"
    )

    # The warehouse: every order once, in the state the topics gave it, every event once.
    assert relatorios_exit == 0, services.log("relatorios")[-4000:]
    warehouse = duckdb.connect(str(services.data_dir / "relatorios" / "warehouse.duckdb"), read_only=True)
    try:
        pedidos = warehouse.execute(
            "SELECT order_id, estado, cancelado_motivo FROM pedidos WHERE order_id LIKE ?", [f"PED-{run_id}-%"]
        ).fetchall()
        fact_ids = [i for (i,) in warehouse.execute("SELECT event_id FROM eventos WHERE order_id LIKE ?",
                                                     [f"PED-{run_id}-%"]).fetchall()]  # fmt: skip
    finally:
        warehouse.close()
    states = {
        o: ("separado", None) if t.terminal == "separado" else ("cancelado", t.terminal) for o, t in tracks.items()
    }
    assert len({o for o, _, _ in pedidos}) == ORDERS
    wrong_state = {o: (e, m, states.get(o)) for o, e, m in pedidos if (e, m) != states.get(o)}
    assert not wrong_state, f"warehouse state vs topics: {dict(list(wrong_state.items())[:10])}"
    assert len(fact_ids) == len(set(fact_ids)) == len(events), (
        f"facts {len(fact_ids)} (distinct {len(set(fact_ids))}) vs distinct events on the topics {len(events)}"
    )
    assert set(fact_ids) == set(events)

    republished = sum(n - 1 for n in watcher.copies.values())
    print(
        f"PIPELINE_DETAIL events={len(events)} republished_copies={republished} foreign_messages={watcher.foreign}"
        f" settle_rounds={rounds} charges={len(charged)} refunds={len(refunds)}"
        f" reservations={len(reserved_events)} releases={len(released_events)}"
        f" notifications={len(envios)} warehouse_orders={len(pedidos)} facts={len(fact_ids)}"
        f" dead_letters={sum(dead.values())} stock_left={sum(left[s] for s in initial)}/{sum(initial.values())}"
    )


RACE_STOCK = 25
RACE_ORDERS = 120


def test_two_reserva_processes_never_oversell(services: Services, tmp_path: Path) -> None:
    run_id = uuid.uuid4().hex[:8]
    sku = f"RACE-{run_id.upper()}"
    lote = Produto(sku=sku, nome="Último lote", estoque=RACE_STOCK, preco_centavos=1990)
    services.cli(
        "stock", "load", "--file", str(write_catalogue(tmp_path / "catalogo.json", [lote])),
        "--data-dir", str(services.data_dir / "reserva"),
    )  # fmt: skip
    services.cli("topics", "create")
    group = services.group("reserva")
    offsets = Offsets(services.bootstrap)
    novo = offsets.partitions([PEDIDO_NOVO])
    assert len(novo) >= 2, f"{PEDIDO_NOVO} has {len(novo)} partition(s): two processes cannot share it"
    offsets.start_at_end({group: services.consumed("reserva")})
    watcher = Watcher(offsets, [RESERVA_ESTOQUE])
    orders = [_single_item_order(f"RACE-{run_id}-{n:04d}", sku) for n in range(RACE_ORDERS)]
    watcher.orders = {o.order_id for o in orders}
    try:
        # The deployed default, cooperative-sticky, balances the count of partitions over all
        # the group's topics, retry topics included: on this broker it gave both partitions of
        # pedido-novo to one process and only retry partitions to the other, so nothing raced.
        # range splits every topic's partitions between the members, pedido-novo's too.
        for label in ("reserva-a", "reserva-b"):
            services.start("reserva", label, KAFKAWORKERS_CONSUMER_PARTITION_ASSIGNMENT_STRATEGY="range")

        def split() -> dict[str, set[tuple[str, int]]] | None:
            services.check_running()
            held = {label: {tp for tp in services.holdings(label) if tp[0] == PEDIDO_NOVO} for label in services.procs}
            every = set().union(*held.values())
            disjoint = sum(map(len, held.values())) == len(novo)
            return held if all(held.values()) and every == set(novo) and disjoint else None

        before = wait_for(split, 90, f"both reserva processes to hold partitions of {PEDIDO_NOVO}")
        per_partition = race(services, watcher, orders)
        settle(offsets, {group: services.consumed("reserva")}, watcher)
        after = split()
    finally:
        watcher.close()
        offsets.close()

    statuses: dict[str, set[str]] = collections.defaultdict(set)
    for _, e in watcher.events.values():
        statuses[e.order_id].add(e.status)
    outcome = collections.Counter(s for ss in statuses.values() for s in ss)
    estoque = services.data_dir / "reserva" / "estoque.sqlite3"
    [(left,)] = query(estoque, "SELECT estoque FROM produto WHERE sku = ?", sku)
    rows = query(estoque, "SELECT status FROM reserva WHERE order_id LIKE ?", f"RACE-{run_id}-%")
    recorded = collections.Counter(s for (s,) in rows)
    handled_by = {label: sum(per_partition[p] for _, p in tps) for label, tps in before.items()}
    print(
        f"\nRACE stock={RACE_STOCK} orders={RACE_ORDERS} reservado={outcome['reservado']}"
        f" sem_estoque={outcome['sem_estoque']} stock_left={left}"
        f" republished_copies={sum(n - 1 for n in watcher.copies.values())}"
        f" partitions={ {label: sorted(p for _, p in tps) for label, tps in before.items()} }"
        f" orders_per_process={handled_by}"
    )
    assert [o for o, ss in statuses.items() if len(ss) != 1] == [], "an order got two different outcomes"
    assert len(statuses) == RACE_ORDERS
    assert outcome == {"reservado": RACE_STOCK, "sem_estoque": RACE_ORDERS - RACE_STOCK}, outcome
    assert left == 0
    assert recorded == {"reservado": RACE_STOCK, "sem_estoque": RACE_ORDERS - RACE_STOCK}, recorded
    # The race was real: each process held a partition of pedido-novo from before the first order
    # until every outcome was out, and each of those partitions carried some of the orders.
    assert after == before, f"the partitions moved during the race: {before} -> {after}"
    assert all(n > 0 for n in handled_by.values()), f"one process received no orders: {handled_by}"


def race(services: Services, watcher: Watcher, orders: list[PedidoNovo]) -> collections.Counter[int]:
    """Send the orders to reserva and wait for each one's outcome; how many went to each partition."""
    encoder = msgspec.json.Encoder()
    per_partition = publish(
        services.bootstrap,
        [(PEDIDO_NOVO, o.order_id.encode(), encoder.encode(o), [(H_CORRELATION_ID, o.order_id.encode())])
         for o in orders],
    )  # fmt: skip

    def outcomes() -> bool:
        services.check_running()
        watcher.poll()
        return len({e.order_id for _, e in watcher.events.values()}) >= len(orders)

    wait_for(outcomes, 120, f"one {RESERVA_ESTOQUE} outcome for each of the {len(orders)} orders")
    return per_partition


def _single_item_order(order_id: str, sku: str) -> PedidoNovo:
    now = datetime.now(UTC)
    return PedidoNovo(
        order_id=order_id,
        event_id=event_id_for(order_id, PEDIDO_NOVO),
        occurred_at=now,
        criado_em=now,
        cliente=Cliente(id=f"CLI-{order_id}", nome="Ana Souza", email=f"ana.souza.{order_id.lower()}@gmail.com"),
        itens=[Item(sku=sku, quantidade=1, preco_unitario_centavos=1990)],
        cartao=Cartao(token="tok_aprovado", final="4242", pais_emissor="BR"),
        pais_entrega="BR",
    )


def _tails(services: Services) -> str:
    return "".join(f"\n--- {label} (last lines) ---\n{services.log(label)[-1500:]}" for label in services.procs)
