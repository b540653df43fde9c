"""Tracing on the real broker: the W3C trace context travels in Kafka headers from the sales
system through fraude to picking, three processes each exporting its spans over OTLP, in
both processing guarantees; a dead letter replayed with ``kafkaworkers dlq replay`` is
handled again in its order's trace."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from kafkaworkers.retry import retry_topic, retry_topics
from kafkaworkers_orders import fraude, notificacao, picking
from kafkaworkers_orders.contracts import PEDIDO_NOVO
from tests.conftest import FAST_GROUP, wait_for
from tests.integration.test_ui_browser import Webhook
from tests.judging import Offsets, holdings
from tests.test_tracing import Collector

pytestmark = pytest.mark.kafka

KW = str(Path(sys.executable).with_name("kafkaworkers"))
ORDERS = 5


@pytest.fixture
def collector() -> Iterator[Collector]:
    running = Collector()
    threading.Thread(target=running.serve_forever, daemon=True).start()
    yield running
    running.shutdown()


def traced_env(bootstrap: str, collector: Collector, prefix: str, tmp_path: Path) -> dict[str, str]:
    """The services' environment: this test's groups, spans exported over OTLP to ``collector``."""
    return {
        **os.environ,
        **FAST_GROUP,
        "KAFKAWORKERS_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKAWORKERS_GROUP_PREFIX": prefix,
        "KAFKAWORKERS_DATA_DIR": str(tmp_path / "data"),
        "KAFKAWORKERS_METRICS_PORT": "0",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_address[1]}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


def sell(env: dict[str, str], orders: list[str], seed: int) -> None:
    """Publish one sample order per id on pedido-novo as the traced sales system (``vendas``)."""
    samples = subprocess.run(
        [KW, "sample", "pedido-novo", "-n", str(len(orders)), "--seed", str(seed)],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.splitlines()  # fmt: skip
    lines = [json.dumps({**json.loads(s), "order_id": order}) for s, order in zip(samples, orders, strict=True)]
    sent = subprocess.run(
        [KW, "produce", "pedido-novo", "--key", "order_id"], input="\n".join(lines), text=True,
        env={**env, "OTEL_SERVICE_NAME": "vendas"}, capture_output=True, timeout=120,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stdout + sent.stderr


# exactly_once: what a handler produces is held in a transaction until its batch commits, and
# only then can the next service read it; the context its producer span wrote must survive that.
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_traceparent_travels_through_kafka_from_the_sales_system_through_fraude_to_picking(
    bootstrap: str, collector: Collector, tmp_path: Path, guarantee: str
) -> None:
    seed = random.randrange(1_000_000)
    print("seed", seed)
    prefix = f"trace-{uuid.uuid4().hex[:8]}-"
    env = {**traced_env(bootstrap, collector, prefix, tmp_path), "KAFKAWORKERS_PROCESSING_GUARANTEE": guarantee}
    assert subprocess.run([KW, "topics", "create"], env=env, capture_output=True, timeout=120).returncode == 0
    declared = {"fraude": fraude.plugin, "picking": picking.plugin}
    consumed = {
        name: [*plugin.subscriptions, *(retry_topic(prefix + name, i + 1) for i in range(len(plugin.retry.delays)))]
        for name, plugin in declared.items()
    }
    offsets = Offsets(bootstrap)
    offsets.start_at_end({prefix + name: list(plugin.subscriptions) for name, plugin in declared.items()})
    verdicts_from = offsets.ends(["fraude-verificado"])
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: tmp_path / f"{name}.log" for name in consumed}
    try:
        for name in consumed:
            with logs[name].open("wb") as log:
                procs[name] = subprocess.Popen(
                    [KW, "run", "--plugin", name], env={**env, "OTEL_SERVICE_NAME": name}, stdout=log, stderr=log
                )

        def joined() -> bool:
            for name, proc in procs.items():
                assert proc.poll() is None, logs[name].read_text()
            return all({t for t, _ in holdings(logs[n].read_text())} >= set(consumed[n]) for n in consumed)

        wait_for(joined, 120, "fraude and picking to join their groups")
        if guarantee == "exactly_once":
            assert all(f"exactly-once for {name}" in logs[name].read_text() for name in consumed), "transactional"

        orders = [f"PED-{prefix}{n}" for n in range(ORDERS)]
        sell(env, orders, seed)

        def spans_of(service: str, name: str) -> dict[str, Any]:
            return {
                _key(span): span
                for s, span in list(collector.spans)
                if s == service and span.name == name and _key(span) in orders
            }

        wait_for(
            lambda: len(spans_of("picking", "process fraude-verificado")) == ORDERS, 120,
            "picking's spans of this run's verdicts",
        )  # fmt: skip
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(30)
        offsets.close()

    sales = spans_of("vendas", "send pedido-novo")
    checked = spans_of("fraude", "process pedido-novo")
    verdicts = spans_of("fraude", "send fraude-verificado")
    joined_in = spans_of("picking", "process fraude-verificado")
    for order in orders:
        root = sales[order]
        assert not root.parent_span_id
        # Each hop's parent is the span before it, across three processes and two topics.
        assert checked[order].parent_span_id == root.span_id
        assert verdicts[order].parent_span_id == checked[order].span_id
        assert joined_in[order].parent_span_id == verdicts[order].span_id
        assert {s.trace_id for s in (root, checked[order], verdicts[order], joined_in[order])} == {root.trace_id}

    # And on the broker: each verdict record carries the context of fraude's producer span.
    records = _read_from(bootstrap, verdicts_from, set(orders))
    for record in records.values():
        _, trace_id, span_id, _ = dict(record.headers())["traceparent"].decode().split("-")
        verdict = verdicts[record.key().decode()]
        assert (bytes.fromhex(trace_id), bytes.fromhex(span_id)) == (verdict.trace_id, verdict.span_id)


def _read_from(bootstrap: str, start: dict[tuple[str, int], int], keys: set[str]) -> dict[str, Any]:
    """The records with these keys, read from these offsets on."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}"})
    consumer.assign([TopicPartition(t, p, offset) for (t, p), offset in start.items()])
    found: dict[str, Any] = {}
    try:

        def all_found() -> bool:
            for msg in consumer.consume(500, 0.2):
                if msg.error() is None and msg.key() is not None and msg.key().decode() in keys:
                    found[msg.key().decode()] = msg
            return len(found) == len(keys)

        wait_for(all_found, 60, "this run's verdicts on fraude-verificado")
    finally:
        consumer.close()
    return found


def _key(span: Any) -> str:
    return _attribute(span, "messaging.kafka.message.key")


def test_a_dead_letter_replayed_with_dlq_replay_is_handled_again_in_its_orders_trace(
    bootstrap: str, collector: Collector, tmp_path: Path
) -> None:
    seed = random.randrange(1_000_000)
    print("seed", seed)
    prefix = f"trace-{uuid.uuid4().hex[:8]}-"
    group = prefix + "notificacao"
    webhook = Webhook()  # answers 400 first: a refusal is permanent, so each order dead-letters at once
    env = {
        **traced_env(bootstrap, collector, prefix, tmp_path),
        "KAFKAWORKERS_PLUGINS__NOTIFICACAO__CHANNELS": '["webhook"]',
        "KAFKAWORKERS_PLUGINS__NOTIFICACAO__WEBHOOK_URL": webhook.url,
        "KAFKAWORKERS_PLUGINS__NOTIFICACAO__TIMEOUT": "5",
    }
    assert subprocess.run([KW, "topics", "create"], env=env, capture_output=True, timeout=120).returncode == 0
    consumed = [*notificacao.plugin.subscriptions]
    retries = retry_topics(group, notificacao.plugin.retry)
    offsets = Offsets(bootstrap)
    offsets.start_at_end({group: consumed, f"{group}-retry": retries})
    offsets.close()
    orders = [f"PED-{prefix}{n}" for n in range(ORDERS)]
    log_path = tmp_path / "notificacao.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [KW, "run", "--plugin", "notificacao"], env={**env, "OTEL_SERVICE_NAME": "notificacao"},
            stdout=log, stderr=log,
        )  # fmt: skip
    try:

        def joined() -> bool:
            assert proc.poll() is None, log_path.read_text()
            return {t for t, _ in holdings(log_path.read_text())} >= {*consumed, *retries}

        wait_for(joined, 120, "notificacao to join its groups")
        sell(env, orders, seed)

        def spans(service: str, name: str) -> dict[str, Any]:
            return {
                _key(span): span
                for s, span in list(collector.spans)
                if s == service and span.name == name and _key(span) in orders
            }

        first = f"process {PEDIDO_NOVO}"
        wait_for(lambda: len(spans("notificacao", first)) == ORDERS, 120, "notificacao to dead-letter every order")
        webhook.status = 200
        replayed = subprocess.run(
            [KW, "dlq", "replay", "--plugin", "notificacao", "--format", "json"], env=env, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        again = f"process {retries[0]}"
        wait_for(lambda: len(spans("notificacao", again)) == ORDERS, 120, "the replayed letters handled again")
        wait_for(lambda: set(orders) <= set(webhook.accepted), 60, "the replayed notifications sent")
    finally:
        proc.terminate()
        proc.wait(30)
        webhook.close()

    sales = spans("vendas", f"send {PEDIDO_NOVO}")
    failed, handled = spans("notificacao", first), spans("notificacao", again)
    for order in orders:
        root = sales[order]
        assert _attribute(failed[order], "kafkaworkers.outcome") == "dead_lettered"
        # The replayed copy carries the letter's context: both attempts are children of the sale.
        assert failed[order].parent_span_id == handled[order].parent_span_id == root.span_id
        assert failed[order].trace_id == handled[order].trace_id == root.trace_id
        assert handled[order].status.code != 2, "the replayed attempt succeeded"  # STATUS_CODE_ERROR


def _attribute(span: Any, name: str) -> str:
    return next((a.value.string_value for a in span.attributes if a.key == name), "")
