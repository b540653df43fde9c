"""Tracing: one connected trace per order through the six services, parentage kept at any
concurrency and in async handlers, retries and dead letters in the same trace, nothing called
when tracing is off, and spans exported over OTLP as the ``OTEL_*`` variables say."""

from __future__ import annotations

import asyncio
import http.server
import os
import random
import subprocess
import sys
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from kafkaworkers import Context, PermanentError, Plugin, RetryPolicy
from kafkaworkers.config import Settings
from kafkaworkers.demo import run_demo
from kafkaworkers.plugins import PluginHost
from kafkaworkers.tracing import OUTCOME, Tracing
from tests.conftest import free_port, wait_for

KW = str(Path(sys.executable).with_name("kafkaworkers"))
KEY = "messaging.kafka.message.key"
DEST = "messaging.destination.name"
PLUGIN = "kafkaworkers.plugin"


class Evento(msgspec.Struct):
    id: str
    n: int = 0


@pytest.fixture
def exported() -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    """A tracing observer whose spans end up, as they end, in an in-memory exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Tracing(provider), exporter
    provider.shutdown()


def by_id(spans: tuple[ReadableSpan, ...]) -> dict[int, ReadableSpan]:
    return {span.context.span_id: span for span in spans}


def chain(span: ReadableSpan, spans: dict[int, ReadableSpan]) -> list[ReadableSpan]:
    """``span`` and its ancestors up to the root; fails on a parent that was never exported."""
    path = [span]
    while path[-1].parent is not None:
        parent = spans.get(path[-1].parent.span_id)
        assert parent is not None, f"{path[-1].name} has a parent span that was never exported"
        path.append(parent)
    return path


# --- the six services -----------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 4])
def test_each_order_is_one_connected_trace_through_the_six_services_with_its_compensations(
    exported: tuple[Tracing, InMemorySpanExporter], tmp_path: Path, concurrency: int
) -> None:
    tracing, exporter = exported
    seed = random.randrange(1_000_000)
    print("seed", seed)
    host = PluginHost()
    host.load_entry_points()
    host.register(tracing, "tracing")
    settings = Settings(
        bootstrap_servers=f"memory://tracing-{uuid.uuid4().hex[:8]}", data_dir=str(tmp_path), concurrency=concurrency
    )
    report = run_demo(host, settings, count=40, seed=seed, timeout=60)
    assert report.ok, report.text
    spans = by_id(exporter.get_finished_spans())

    roots = {s.attributes[KEY]: s for s in spans.values() if s.parent is None}
    assert len(roots) == 40
    assert all(r.kind is SpanKind.PRODUCER and r.attributes[DEST] == "pedido-novo" for r in roots.values())
    trace_of = {order: root.context.trace_id for order, root in roots.items()}
    assert len(set(trace_of.values())) == 40  # one trace per order

    per_order: defaultdict[str, list[ReadableSpan]] = defaultdict(list)
    for span in spans.values():
        order = span.attributes[KEY]
        per_order[order].append(span)
        # Every span of an order is in the order's trace, and its parents lead to the order's root.
        assert span.context.trace_id == trace_of[order], span.name
        assert chain(span, spans)[-1] is roots[order]
        parent = spans.get(span.parent.span_id) if span.parent else None
        if span.kind is SpanKind.CONSUMER:  # a consumer continues the producer of its message
            assert parent is not None and parent.kind is SpanKind.PRODUCER
            assert parent.attributes[DEST] == span.attributes[DEST]
        elif parent is not None:  # a handler's output is a child of the handler's message
            assert parent.kind is SpanKind.CONSUMER and parent.attributes[PLUGIN] == span.attributes[PLUGIN]

    compensations = {"refund": 0, "release": 0}
    for order, order_spans in per_order.items():
        handled = {(s.attributes[PLUGIN], s.attributes[DEST]) for s in order_spans if s.kind is SpanKind.CONSUMER}
        for service in ("reserva", "fraude", "pagamento", "notificacao", "relatorios"):
            assert (service, "pedido-novo") in handled, (order, service)
        joined = {("picking", t) for t in ("reserva-estoque", "fraude-verificado", "processo-pagamento")}
        picked = any(s.kind is SpanKind.PRODUCER and s.attributes[DEST] == "processo-picking" for s in order_spans)
        # picking joins all three outcomes of a picked order; the first negative cancels one.
        assert joined <= handled if picked else joined & handled, (order, handled)
        for span in order_spans:
            if span.kind is SpanKind.PRODUCER and span.parent is not None:
                parent = spans[span.parent.span_id]
                if parent.attributes[DEST] == "pedido-cancelado":
                    # The compensation's path: cancelled by picking, reacting to a service's outcome.
                    path = [(s.attributes.get(PLUGIN), s.kind, s.attributes[DEST]) for s in chain(span, spans)]
                    assert path[2] == ("picking", SpanKind.PRODUCER, "pedido-cancelado"), path
                    if span.attributes[DEST] == "reserva-estoque":
                        compensations["release"] += 1
                    if span.attributes[DEST] == "processo-pagamento":
                        compensations["refund"] += 1
    done = report.data["compensations"]
    assert compensations["release"] == done["releases_done"] > 0
    assert compensations["refund"] == done["refunds_done"]
