"""Watching and judging the order pipeline on a real broker: shared by the pipeline and cluster tests.

What a test needs to prove every order ended once: consumer groups started at the end of
the topics (:class:`Offsets`), a reader of this run's events (:class:`Watcher`), a wait until
nothing more can come (:func:`settle`), which partitions a worker holds by its log
(:func:`holdings`), and the counts of everything that must be zero (:mod:`tests.verdict`).
"""

from __future__ import annotations

import collections
import contextlib
import re
import sqlite3
import time
import uuid
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from kafkaworkers.producer import produce
from kafkaworkers_orders.contracts import PROCESSO_PAGAMENTO, RESERVA_ESTOQUE, TOPICS, Event, PedidoNovo
from kafkaworkers_orders.reserva.estoque import Produto
from kafkaworkers_orders.scenario import OrderScenario
from tests.conftest import wait_for

_DECODERS = {topic: msgspec.json.Decoder(typ) for topic, typ in TOPICS.items()}
_LOG_EVENT = re.compile(r" (\w+): (assigned|revoked|lost) (.+?)(?:; their uncommitted work will be redone)?$", re.M)
#: What a partition answers while its topic is being created.
_NOT_READY = {
    KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_PARTITION, KafkaError._TIMED_OUT,
}  # fmt: skip
_COORDINATOR_MOVING = {
    KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE,
}  # fmt: skip
_PARTITION = re.compile(r"([\w.-]+)\[(\d+)\]")


def holdings(log: str) -> set[tuple[str, int]]:
    """The partitions a worker holds now, according to its log's assigned/revoked/lost lines."""
    held: set[tuple[str, int]] = set()
    for _, action, partitions in _LOG_EVENT.findall(log):
        parts = {(t, int(p)) for t, p in _PARTITION.findall(partitions)}
        held = held | parts if action == "assigned" else held - parts
    return held


class Offsets:
    """High watermarks and consumer groups' committed offsets on the real broker."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        self._readers: dict[str, Any] = {}

    def _reader(self, group: str) -> Any:
        """A consumer in ``group`` that never subscribes: it reads and commits offsets, never joins."""
        if group not in self._readers:
            config = {"bootstrap.servers": self.bootstrap, "group.id": group, "enable.auto.commit": False}
            self._readers[group] = Consumer(config)
        return self._readers[group]

    def partitions(self, topics: list[str]) -> list[tuple[str, int]]:
        metadata = self.admin.list_topics(timeout=15).topics
        missing = [t for t in topics if t not in metadata]
        assert not missing, f"topics missing on the broker: {missing}"
        return [(t, p) for t in topics for p in sorted(metadata[t].partitions)]

    def ends(self, topics: list[str]) -> dict[tuple[str, int], int]:
        def high(topic: str, partition: int) -> int:
            # A topic created a moment ago may not have its leader yet: ask until it has.
            def answer() -> tuple[int] | None:
                try:
                    reader = self._reader("pipeline-test-watermarks")
                    return (reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=15)[1],)
                except KafkaException as exc:
                    if exc.args[0].code() not in _NOT_READY:
                        raise
                    # A leader moved (a broker restarted): the next reader starts from fresh metadata.
                    self._readers.pop("pipeline-test-watermarks").close()
                    return None

            return wait_for(answer, 30, f"the end of {topic}[{partition}]", interval=0.2)[0]

        return {(t, p): high(t, p) for t, p in self.partitions(topics)}

    def start_at_end(self, groups: dict[str, list[str]]) -> None:
        """Commit each (new) group's offsets at the current end of its topics, as the demo does."""
        for group, topics in groups.items():
            ends = [TopicPartition(t, p, high) for (t, p), high in self.ends(topics).items()]

            def committed(group: str = group, ends: list[TopicPartition] = ends) -> bool:
                try:
                    self._reader(group).commit(offsets=ends, asynchronous=False)
                except KafkaException as exc:
                    # A new cluster is still placing the offsets topic's coordinators: ask again.
                    if exc.args[0].code() not in _COORDINATOR_MOVING:
                        raise
                    return False
                return True

            wait_for(committed, 60, f"the group coordinator of {group}", interval=0.5)

    def caught_up(self, group: str, ends: dict[tuple[str, int], int]) -> bool:
        """Whether ``group`` committed every partition of ``ends`` at or beyond its offset there."""
        try:
            committed = self._reader(group).committed([TopicPartition(t, p) for t, p in ends], timeout=15)
        except KafkaException:
            return False  # the coordinator is busy; the caller asks again
        return all(max(tp.offset, 0) >= ends[(tp.topic, tp.partition)] for tp in committed)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        # An AdminClient has no close: dropped, it stops connecting (a failed test's traceback keeps us alive).
        del self.admin


class Watcher:
    """Reads topics from their end at creation (assigned, no group) and keeps this test's events."""

    def __init__(self, offsets: Offsets, topics: list[str]) -> None:
        self.topics = topics
        self.consumer = Consumer(
            {"bootstrap.servers": offsets.bootstrap, "group.id": f"pipeline-watch-{uuid.uuid4().hex}",
             "enable.auto.commit": False}
        )  # fmt: skip
        self.position = offsets.ends(topics)
        self.consumer.assign([TopicPartition(t, p, o) for (t, p), o in self.position.items()])
        self.orders: set[str] = set()
        #: Each of this test's events once, by event id; ``copies`` counts every delivery.
        self.events: dict[str, tuple[str, Event]] = {}
        self.copies: collections.Counter[str] = collections.Counter()
        self.foreign = 0

    def poll(self, timeout: float = 0.2) -> list[Any]:
        """Read what arrived; this test's messages, as they came."""
        ours = []
        for msg in self.consumer.consume(1000, timeout):
            if msg.error() is not None:
                continue
            self.position[(msg.topic(), msg.partition())] = msg.offset() + 1
            try:
                event = _DECODERS[msg.topic()].decode(msg.value() or b"")
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.foreign += 1  # another test's poison; never one of these orders
                continue
            if event.order_id not in self.orders:
                self.foreign += 1
                continue
            self.events.setdefault(event.event_id, (msg.topic(), event))
            self.copies[event.event_id] += 1
            ours.append(msg)
        return ours

    def read_to(self, ends: dict[tuple[str, int], int], timeout: float = 60.0) -> None:
        """Read until every watched partition is at or beyond ``ends``."""

        def there() -> bool:
            self.poll(0.1)
            return all(self.position[tp] >= ends[tp] for tp in self.position)

        wait_for(there, timeout, "the watcher to read up to the topics' end")

    def close(self) -> None:
        self.consumer.close()


def settle(offsets: Offsets, groups: dict[str, list[str]], watcher: Watcher, timeout: float = 120.0) -> int:
    """Wait until the pipeline is quiet for this test's orders; how many rounds that took.

    A round takes the end of every topic, waits until every group committed up to it (so all
    it held was handled and what that produced was acknowledged), then reads the watched
    topics to their new end. A round that saw none of this test's messages beyond the first
    end proves nothing more can come: everything they could cause is already on the topics.
    """
    every_topic = sorted({t for topics in groups.values() for t in topics} | set(watcher.topics))
    deadline = time.monotonic() + timeout
    for rounds in range(1, 100):
        ends = offsets.ends(every_topic)
        watcher.read_to({tp: ends[tp] for tp in watcher.position})
        seen = sum(watcher.copies.values())
        for group, topics in groups.items():
            # A plugin's retry topics are read by a group of their own, <group>-retry.
            retries = {t for t in topics if t.startswith(f"{group}-retry-")}
            for reader, read in ((group, set(topics) - retries), (f"{group}-retry", retries)):
                mine = {tp: o for tp, o in ends.items() if tp[0] in read}
                wait_for(
                    lambda g=reader, m=mine: offsets.caught_up(g, m), deadline - time.monotonic(),
                    f"{reader} to catch up",
                )  # fmt: skip
        watcher.read_to(offsets.ends(watcher.topics))
        if sum(watcher.copies.values()) == seen:
            return rounds
    pytest.fail("the pipeline never went quiet")


def publish(
    bootstrap: str, messages: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]]
) -> collections.Counter[int]:
    """Produce (topic, key, value, headers) and wait for every acknowledgement; messages per partition."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    partitions: collections.Counter[int] = collections.Counter()
    errors: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(err.str())
        else:
            partitions[msg.partition()] += 1

    for topic, key, value, headers in messages:
        produce(producer, topic, value, key, headers, delivered)
        producer.poll(0)
    assert producer.flush(30) == 0, "orders still undelivered after 30 s"
    assert not errors, f"{len(errors)} orders not delivered: {errors[:3]}"
    return partitions


def query(path: Path, sql: str, *params: object) -> list[tuple]:
    assert path.exists(), f"{path} does not exist"
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
        return db.execute(sql, params).fetchall()


def write_catalogue(path: Path, produtos: list[Produto]) -> Path:
    path.write_bytes(msgspec.json.encode(produtos))
    return path


# --- the verdict -----------------------------------------------------------------------

#: Rows of one plugin's table over every database the run used: (plugin, database file, SQL)
#: to rows. One host's SQLite files, every host's, or the shared PostgreSQL database.
Rows = Callable[[str, str, str], list[tuple]]


@dataclass
class Verdict:
    """Everything that must be zero after a run, counted from the topics and the databases.

    :param figures: each count by name; ``ok`` when all are zero.
    :param detail: a few examples of each non-zero count, for the failure message.
    """

    orders: int
    figures: dict[str, int]
    detail: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every count zero but ``resent_after_loss``, which the caller bounds by the kills."""
        return not any(n for name, n in self.figures.items() if name != "resent_after_loss")

    def line(self) -> str:
        return " ".join(f"{name}={n}" for name, n in self.figures.items())

    def explain(self) -> str:
        return "\n".join(f"{name}: {self.detail.get(name, [])[:5]}" for name, n in self.figures.items() if n)


def judge(
    scenario: OrderScenario,
    orders: dict[str, PedidoNovo],
    initial: dict[str, int],
    events: dict[str, tuple[str, Event]],
    rows: Rows,
    notifications_logged: collections.Counter[tuple[str, str]],
    report: dict[str, int],
    sent_by_killed: AbstractSet[tuple[str, str]] = frozenset(),
) -> Verdict:
    """Count what went wrong with this run's ``orders``: stuck or wrong outcomes, charges, refunds,
    releases, stock, notifications and the report.

    :param initial: the stock loaded before the run, by SKU.
    :param events: this run's events by id (:attr:`Watcher.events`).
    :param notifications_logged: every log-channel send, by (order, kind), over every notificacao.
    :param sent_by_killed: the sends logged by a notificacao later SIGKILLed. A kill between a
        send and its record is the one window where a channel with no idempotency key (a log
        line, an e-mail) sends again: counted apart, as ``resent_after_loss``.
    :param report: the report's orders by state (``kafkaworkers report``'s ``by_state``), from
        a database holding this run's orders only.
    """
    mine = set(orders)
    tracks = scenario.tracks
    detail: dict[str, list[Any]] = collections.defaultdict(list)
    cancelled = {o for o, t in tracks.items() if t.terminal not in (None, "separado")}
    by_status: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    transactions: dict[str, set[str]] = collections.defaultdict(set)
    for topic, e in events.values():
        status = getattr(e, "status", None) or getattr(e, "motivo", "")
        by_status[(topic, status)].add(e.order_id)
        if topic == PROCESSO_PAGAMENTO and e.status == "aprovado":
            transactions[e.order_id].add(e.transacao_id)

    for order, t in tracks.items():
        if t.terminal is None:
            detail["stuck"].append(order)
        elif t.terminal != t.expected:
            detail["wrong_outcome"].append((order, t.expected, t.terminal))

    # Money: the gateway's ledger on every database; one charge per order, one refund per charged cancelled one.
    charges = collections.Counter(
        c.split(":")[0] for (c,) in rows("pagamento", "gateway.sqlite3", "SELECT chave FROM cobranca")
    )
    approved = {
        c.split(":")[0]
        for c, s in rows("pagamento", "gateway.sqlite3", "SELECT chave, status FROM cobranca")
        if s == "aprovado"
    }
    refunds = collections.Counter(
        c.removesuffix(":estorno") for (c,) in rows("pagamento", "gateway.sqlite3", "SELECT chave FROM estorno")
    )
    detail["double_charges"] = sorted(
        {o for o in mine if charges[o] > 1} | {o for o, tx in transactions.items() if len(tx) > 1}
    )
    detail["missing_refunds"] = sorted(o for o in (approved & cancelled & mine) if not refunds[o])
    detail["double_refunds"] = sorted(o for o in mine if refunds[o] > 1)
    detail["refunds_not_owed"] = sorted(o for o in mine if refunds[o] and o not in approved & cancelled)

    # Stock: released once per reserved cancelled order; what every database lost is what the
    # orders still holding a reservation took, and no SKU holds more than it had.
    reserved = by_status[(RESERVA_ESTOQUE, "reservado")] & mine
    released = by_status[(RESERVA_ESTOQUE, "liberado")] & mine
    detail["missing_releases"] = sorted(reserved & cancelled - released)
    detail["releases_not_owed"] = sorted(released - (reserved & cancelled))
    held: collections.Counter[str] = collections.Counter()
    for order in reserved - released:
        held.update({i.sku: i.quantidade for i in orders[order].itens})
    taken: collections.Counter[str] = collections.Counter()
    for sku, left in rows("reserva", "estoque.sqlite3", "SELECT sku, estoque FROM produto"):
        if sku in initial:
            taken[sku] += initial[sku] - left
    detail["units_oversold"] = [(s, held[s], n) for s, n in initial.items() if held[s] > n]
    detail["stock_mismatch_units"] = [(s, held[s], taken[s]) for s in initial if held[s] != taken[s]]

    # Notifications: each (order, kind, channel) recorded once, each log-channel send once.
    envios = collections.Counter(
        (o, k, c)
        for o, k, c in rows("notificacao", "notificacao.sqlite3", "SELECT order_id, kind, channel FROM envios")
        if o in mine
    )
    twice = {k for k, n in notifications_logged.items() if n > 1 and k[0] in mine}
    detail["duplicate_notifications"] = sorted({k for k, n in envios.items() if n > 1} | (twice - sent_by_killed))
    detail["resent_after_loss"] = sorted(twice & sent_by_killed)

    # The report: every order once, in the state the topics gave it.
    states: collections.Counter[str] = collections.Counter(
        "unfinished" if t.terminal is None else t.terminal if t.terminal == "separado" else f"cancelado: {t.terminal}"
        for t in tracks.values()
    )
    detail["report_wrong"] = [
        (state, states[state], report.get(state, 0))
        for state in sorted(set(report) | set(states))
        if states[state] != report.get(state, 0)
    ]

    figures = {
        name: len(detail[name])
        for name in (
            "stuck", "wrong_outcome", "double_charges", "missing_refunds", "double_refunds", "refunds_not_owed",
            "missing_releases", "releases_not_owed", "units_oversold", "stock_mismatch_units",
            "duplicate_notifications", "report_wrong", "resent_after_loss",
        )
    }  # fmt: skip
    figures["units_oversold"] = sum(h - n for _, h, n in detail["units_oversold"])
    figures["stock_mismatch_units"] = sum(abs(h - t) for _, h, t in detail["stock_mismatch_units"])
    figures["report_wrong"] = sum(abs(want - got) for _, want, got in detail["report_wrong"])
    return Verdict(len(orders), figures, dict(detail))
