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
def exported(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    """A tracing observer whose spans end up, as they end, in an in-memory exporter (and no
    built-in one from the environment beside it)."""
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
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


# --- parentage at concurrency, in threads and async handlers --------------------------------


def traced_input(tracer: trace.Tracer, n: int) -> tuple[dict[str, bytes], int]:
    """The headers of an input message sent inside a span of its own, and that span's trace id."""
    carrier: dict[str, str] = {}
    with tracer.start_as_current_span(f"upstream {n}", kind=SpanKind.PRODUCER) as span:
        TraceContextTextMapPropagator().inject(carrier)
        return {k: v.encode() for k, v in carrier.items()}, span.get_span_context().trace_id


@pytest.mark.parametrize(("asynchronous", "concurrency"), [(False, 1), (False, 8), (True, 1), (True, 8)])
def test_the_span_follows_each_handler_onto_its_thread_or_task_and_into_what_it_produces(
    exported: tuple[Tracing, InMemorySpanExporter], kafkaworkers_harness: Any, asynchronous: bool, concurrency: int
) -> None:
    tracing, exporter = exported
    seed = random.randrange(1_000_000)
    print("seed", seed)
    rng = random.Random(seed)
    delays = {f"e{n}": rng.random() / 100 for n in range(40)}
    seen: dict[str, int] = {}  # event id -> the span id current inside its handler
    plugin: Plugin[None] = Plugin("eco", produces={"saida": Evento}, concurrency=concurrency, ordering="none")

    def produce(evento: Evento, ctx: Context[None]) -> None:
        seen[evento.id] = trace.get_current_span().get_span_context().span_id
        ctx.produce("saida", Evento(evento.id, 1))
        ctx.produce("saida", Evento(evento.id, 2))

    if asynchronous:

        @plugin.consumes("entrada")
        async def eco_async(evento: Evento, ctx: Context[None]) -> None:
            await asyncio.sleep(delays[evento.id])  # others run meanwhile on the same loop
            produce(evento, ctx)
    else:

        @plugin.consumes("entrada")
        def eco(evento: Evento, ctx: Context[None]) -> None:
            threading.Event().wait(delays[evento.id])
            produce(evento, ctx)

    harness = kafkaworkers_harness(plugin, tracing, partitions=4)
    upstream = TracerProvider().get_tracer("test")
    traces = {}
    for n in range(40):
        headers, traces[f"e{n}"] = traced_input(upstream, n)
        harness.produce("entrada", Evento(f"e{n}"), key=f"k{n}", headers=headers)
    harness.run_until_idle(timeout=30)

    spans = by_id(exporter.get_finished_spans())
    consumers = {s.attributes[KEY]: s for s in spans.values() if s.kind is SpanKind.CONSUMER}
    assert len(consumers) == 40
    for n in range(40):
        consumer = consumers[f"k{n}"]
        assert consumer.context.trace_id == traces[f"e{n}"]  # continues the input's trace
        assert seen[f"e{n}"] == consumer.context.span_id  # current inside the handler
    producers = [s for s in spans.values() if s.kind is SpanKind.PRODUCER]
    assert len(producers) == 80
    for span in producers:
        assert spans[span.parent.span_id] is consumers[span.attributes[KEY]]
    # What reaches the topic carries the producer span's context.
    for record in harness.records("saida"):
        parent = dict(record.headers())["traceparent"].decode().split("-")
        span = spans[int(parent[2], 16)]
        assert span.kind is SpanKind.PRODUCER and span.attributes[KEY] == record.key().decode()
        assert int(parent[1], 16) == traces[msgspec.json.decode(record.value(), type=Evento).id]


def test_consumer_spans_carry_the_messaging_attributes(
    exported: tuple[Tracing, InMemorySpanExporter], kafkaworkers_harness: Any
) -> None:
    tracing, exporter = exported
    plugin: Plugin[None] = Plugin("eco", produces={"saida": Evento})

    @plugin.consumes("entrada")
    def eco(evento: Evento, ctx: Context[None]) -> None:
        ctx.produce("saida", evento)

    harness = kafkaworkers_harness(plugin, tracing, partitions=1)
    harness.produce("entrada", Evento("a"), key="chave")
    harness.run_until_idle()
    consumer, producer = sorted(exporter.get_finished_spans(), key=lambda s: s.kind.value)[:2][::-1]
    assert (consumer.name, consumer.kind) == ("process entrada", SpanKind.CONSUMER)
    assert dict(consumer.attributes) == {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "entrada",
        "messaging.consumer.group.name": "eco",
        "messaging.destination.partition.id": "0",
        "messaging.kafka.destination.partition": 0,
        "messaging.kafka.offset": 0,
        "messaging.kafka.message.offset": 0,
        "messaging.kafka.message.key": "chave",
        "kafkaworkers.plugin": "eco",
    }
    assert consumer.status.status_code is StatusCode.UNSET
    assert (producer.name, producer.kind) == ("send saida", SpanKind.PRODUCER)
    assert dict(producer.attributes) == {
        "messaging.system": "kafka",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": "saida",
        "messaging.kafka.message.key": "chave",
        "kafkaworkers.plugin": "eco",
    }


# --- failures: retry topics and the dead-letter topic ------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_retried_message_stays_in_its_trace_and_each_failure_records_its_outcome(
    exported: tuple[Tracing, InMemorySpanExporter], kafkaworkers_harness: Any, concurrency: int
) -> None:
    tracing, exporter = exported
    plugin: Plugin[None] = Plugin(
        "falho", produces={"saida": Evento}, retry=RetryPolicy(delays=(0.0, 0.0), jitter=0.0), concurrency=concurrency
    )
    attempts: defaultdict[str, int] = defaultdict(int)

    @plugin.consumes("entrada")
    def falhar(evento: Evento, ctx: Context[None]) -> None:
        attempts[evento.id] += 1
        if evento.id == "veneno":
            raise PermanentError("never valid")
        if evento.id == "sempre" or attempts[evento.id] == 1:
            raise ConnectionError(f"down for {evento.id}")
        ctx.produce("saida", evento)

    harness = kafkaworkers_harness(plugin, tracing, partitions=1)
    upstream = TracerProvider().get_tracer("test")
    traces = {}
    for event in ("uma-vez", "sempre", "veneno"):
        headers, traces[event] = traced_input(upstream, 0)
        harness.produce("entrada", Evento(event), key=event, headers=headers)
    harness.produce("entrada", b"{not json", key="ilegivel")
    harness.run_until_idle(timeout=30, wait_for_retries=True)

    spans = exporter.get_finished_spans()
    consumers: defaultdict[str, list[ReadableSpan]] = defaultdict(list)
    for span in spans:
        if span.kind is SpanKind.CONSUMER:
            consumers[span.attributes[KEY]].append(span)
    outcomes = {k: [s.attributes.get(OUTCOME) for s in v] for k, v in consumers.items()}
    assert outcomes == {
        "uma-vez": ["retried", None],
        "sempre": ["retried", "retried", "dead_lettered"],
        "veneno": ["dead_lettered"],
        "ilegivel": ["dead_lettered"],
    }
    for event, attempts_spans in consumers.items():
        for number, span in enumerate(attempts_spans, start=1):
            if event in traces:  # every attempt continues the input's trace, as its child
                assert span.context.trace_id == traces[event]
                assert span.parent is not None and span.parent.trace_id == traces[event]
            if number > 1:
                assert span.attributes["kafkaworkers.attempt"] == number
                assert span.attributes["kafkaworkers.original_topic"] == "entrada"
                assert span.attributes["messaging.consumer.group.name"] == "falho-retry"
            if span.attributes.get(OUTCOME):
                assert span.status.status_code is StatusCode.ERROR
                assert [e.name for e in span.events] == ["exception"]
    assert consumers["sempre"][0].attributes["error.type"] == "ConnectionError"
    assert consumers["ilegivel"][0].attributes["error.type"] == "kafkaworkers.errors.DecodeError"
    # The handled retry's output is a child of its own attempt's span.
    (output,) = [s for s in spans if s.kind is SpanKind.PRODUCER]
    assert output.parent.span_id == consumers["uma-vez"][1].context.span_id
    # The dead letters keep the trace context of the message they copy.
    letters = {r.key().decode(): dict(r.headers()) for r in harness.records("falho-dlq")}
    for event in ("sempre", "veneno"):
        assert int(letters[event]["traceparent"].decode().split("-")[1], 16) == traces[event]


# --- zero cost when off, and how it is switched on ----------------------------------------------


def test_with_tracing_off_no_per_message_hook_is_implemented_or_called(
    kafkaworkers_harness: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    host = PluginHost()
    host.load_entry_points()
    assert host._pm.get_plugin("tracing") is None
    for hook in ("message_scope", "message_producing", "message_failed", "message_handled"):
        assert not host.has_impl(f"kafkaworkers_{hook}"), hook

    calls: defaultdict[str, int] = defaultdict(int)  # hook -> calls, of the per-message hooks
    observe, scope = PluginHost._observe, PluginHost.message_scope

    def counted_observe(self: PluginHost, hook: str, **kwargs: Any) -> None:
        calls[hook] += hook.startswith("kafkaworkers_message_")
        observe(self, hook, **kwargs)

    def counted_scope(self: PluginHost, plugin: Any, message: Any) -> Any:
        calls["kafkaworkers_message_scope"] += 1
        return scope(self, plugin, message)

    monkeypatch.setattr(PluginHost, "_observe", counted_observe)
    monkeypatch.setattr(PluginHost, "message_scope", counted_scope)

    def run(*observers: object) -> None:
        for concurrency in (1, 4):
            plugin: Plugin[None] = Plugin("eco", produces={"saida": Evento}, concurrency=concurrency)

            @plugin.consumes("entrada")
            def eco(evento: Evento, ctx: Context[None]) -> None:
                ctx.produce("saida", evento)

            harness = kafkaworkers_harness(plugin, *observers, partitions=2)
            for n in range(20):
                harness.produce("entrada", Evento(f"e{n}"), key=f"k{n}")
            harness.run_until_idle()
            assert len(harness.records("saida")) == 20
            harness.close()

    run()
    assert not any(calls.values()), dict(calls)
    provider = TracerProvider()
    run(Tracing(provider))  # the same run traced: the count sees the hooks when they exist
    assert calls["kafkaworkers_message_scope"] == calls["kafkaworkers_message_producing"] == 40
    provider.shutdown()


@pytest.mark.parametrize(
    ("environment", "loaded"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "console", "KAFKAWORKERS_DISABLE_PLUGINS": "tracing"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ],
)
def test_tracing_is_switched_on_by_OTEL_TRACES_EXPORTER(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], loaded: bool
) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED", "KAFKAWORKERS_DISABLE_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    host = PluginHost()
    host.load_entry_points()
    assert isinstance(host._pm.get_plugin("tracing"), Tracing) is loaded
    assert host.has_impl("kafkaworkers_message_scope") is loaded
    assert host.broken == [b for b in host.broken if b.name != "tracing"]
    if loaded:
        assert host.info("tracing").distribution == "kafkaworkers"


def test_an_exporter_no_package_provides_leaves_tracing_out_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    host = PluginHost()
    host.load_entry_points()
    (broken,) = [b for b in host.broken if b.name == "tracing"]
    assert "span exporter 'zipkin'" in broken.error and "otlp_proto_http" in broken.error
    assert not host.has_impl("kafkaworkers_message_scope")


# --- export over OTLP, configured by the OTEL_* variables ----------------------------------------


class Collector(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP endpoint that keeps every span it receives."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.paths: list[str] = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
                    for scope in resource.scope_spans:
                        collector.spans += [(service, span) for span in scope.spans]
                collector.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)


def test_the_demo_exports_its_spans_over_otlp_where_the_OTEL_variables_say(tmp_path: Path) -> None:
    collector = Collector()
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    environment = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_address[1]}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    try:
        # From an empty directory, so no kafkaworkers.toml of the checkout changes the services' rules.
        done = subprocess.run(
            [KW, "demo", "--orders", "10", "--timeout", "60"], env=environment, cwd=tmp_path, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        # The SDK's batch processor exports what is left when the process exits.
        wait_for(lambda: collector.spans, 10, "spans at the collector")
    finally:
        collector.shutdown()
    assert set(collector.paths) == {"/v1/traces"}
    services = {service for service, _ in collector.spans}
    assert services == {"fraude,notificacao,pagamento,picking,relatorios,reserva"}, services
    roots = [span for _, span in collector.spans if not span.parent_span_id]
    assert len(roots) == 10 and {span.name for span in roots} == {"send pedido-novo"}
    assert len({span.trace_id for _, span in collector.spans}) == 10
