"""OpenTelemetry tracing: a consumer span per handled message, a producer span per produced one.

A built-in plugin, installed with ``pip install kafkaworkers[otel]`` and switched on by
``OTEL_TRACES_EXPORTER`` (:data:`kafkaworkers.plugins.BUILTINS`). It works only through hooks:

- ``kafkaworkers_message_scope``: a ``process <topic>`` span of kind CONSUMER around each
  handler, its parent read from the message's W3C ``traceparent``/``tracestate`` headers and
  current while the handler runs, on its pool thread or in its ``async`` task;
- ``kafkaworkers_message_producing``: a ``send <topic>`` span of kind PRODUCER for each
  ``ctx.produce`` (a child of the consumer span), its context written into the produced
  message's headers, so the next service's consumer span continues the same trace;
- ``kafkaworkers_message_failed``: a failed message's span records the exception and what
  the worker did with it (``kafkaworkers.outcome``: ``retried``, ``dead_lettered``,
  ``paused``) before it ends. Retry and dead-letter copies keep the message's headers, so a
  retried attempt is another child of the same producer span: one order, one trace.

Attributes follow OpenTelemetry's messaging semantic conventions. Spans go to the globally
configured tracer provider when there is one (``opentelemetry-instrument``), else to one
built from the standard ``OTEL_*`` variables, which the SDK and its exporters read themselves.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Iterable, Sequence
from contextvars import Token
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.semconv._incubating.attributes import messaging_attributes as messaging
from opentelemetry.semconv.attributes import error_attributes
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from kafkaworkers.api import Plugin
from kafkaworkers.errors import ConfigError
from kafkaworkers.headers import H_ATTEMPT, H_ORIGINAL_TOPIC, number, parse_headers
from kafkaworkers.hookspecs import hookimpl
from kafkaworkers.transports import Headers, Message

if TYPE_CHECKING:
    from kafkaworkers.worker import Worker

__all__ = ["OUTCOME", "Tracing", "plugin"]

log = logging.getLogger(__name__)

#: The span attribute saying what the worker did with a failed message.
OUTCOME = "kafkaworkers.outcome"
PLUGIN = "kafkaworkers.plugin"
ATTEMPT = "kafkaworkers.attempt"
ORIGINAL_TOPIC = "kafkaworkers.original_topic"
#: Failed messages' spans waiting for their outcome, at most this many: a message abandoned
#: by a rebalance never gets one, and its span is ended without it past this bound.
_MAX_WAITING = 10_000
_EXPORTER_GROUP = "opentelemetry_traces_exporter"


class _HeadersGetter(Getter[Headers]):
    """Reads propagation fields from Kafka headers (names are case-sensitive there)."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        found = [v.decode("utf-8", "replace") for k, v in carrier if k == key and v is not None]
        return found or None

    def keys(self, carrier: Headers) -> list[str]:
        return [k for k, _ in carrier]


class _HeadersSetter(Setter[Headers]):
    """Writes a propagation field into Kafka headers, replacing one of the same name."""

    def set(self, carrier: Headers, key: str, value: str) -> None:
        if any(k == key for k, _ in carrier):
            carrier[:] = [(k, v) for k, v in carrier if k != key]
        carrier.append((key, value.encode()))


_getter = _HeadersGetter()
_setter = _HeadersSetter()


class Tracing:
    """The tracing observer (see the module docstring).

    :param provider: where spans go. By default the global tracer provider if one was set,
        else one made from the ``OTEL_*`` variables at first use (named after the plugins the
        worker runs unless ``OTEL_SERVICE_NAME`` names it) and set as the global one, so
        spans a handler starts itself are children of its message's span.
    """

    def __init__(self, provider: trace.TracerProvider | None = None) -> None:
        self._provider = provider
        self._tracer: trace.Tracer | None = None if provider is None else _tracer(provider)
        # plugin name -> consumer group; topic -> consumer attributes fixed per plugin and topic
        self._groups: dict[str, str] = {}
        self._fixed: dict[tuple[str, str], dict[str, AttributeValue]] = {}
        # (plugin, topic, partition, offset) -> the span of a failed handler, ended by its outcome.
        # Scopes exit on handler threads, outcomes arrive on the loop's: dict operations are atomic.
        self._waiting: dict[tuple[str, str, int, int], Span] = {}

    # --- set-up ------------------------------------------------------------------------

    def tracer(self, service: str = "kafkaworkers") -> trace.Tracer:
        """The tracer spans are made with, set up on first use."""
        if self._tracer is None:
            current = trace.get_tracer_provider()
            if isinstance(current, trace.ProxyTracerProvider):
                current = _provider_from_environment(service)
                trace.set_tracer_provider(current)
            self._provider = current
            self._tracer = _tracer(current)
        return self._tracer

    @hookimpl
    def kafkaworkers_worker_started(self, worker: Worker) -> None:
        for runner in worker.runners:
            self._groups[runner.plugin.name] = runner.group
        self.tracer(",".join(sorted(p.name for p in worker.plugins)) or "kafkaworkers")

    @hookimpl
    def kafkaworkers_worker_stopping(self, worker: Worker) -> None:
        """Spans still waiting for an outcome end now, and what is queued is exported within part of
        the grace; the SDK exports the spans of what is still in flight when the process exits."""
        for span in self._waiting.values():
            span.end()
        self._waiting.clear()
        if isinstance(self._provider, TracerProvider):
            self._provider.force_flush(int(worker.settings.shutdown_grace * 1000 / 4))

    # --- consuming ---------------------------------------------------------------------

    @hookimpl
    def kafkaworkers_message_scope(self, plugin: Plugin[Any], message: Message) -> _ConsumerScope:
        return _ConsumerScope(self, plugin.name, message, self._consumer_span(plugin, message))

    @hookimpl
    def kafkaworkers_message_failed(
        self, plugin: Plugin[Any], message: Message, error: BaseException, outcome: str
    ) -> None:
        span = self._waiting.pop(_spot(plugin.name, message), None)
        if span is None:
            # Failed before a handler ran (undecodable, or a retry this plugin no longer handles).
            span = self._consumer_span(plugin, message)
            _record(span, error)
        span.set_attribute(OUTCOME, outcome)
        span.end()

    def _consumer_span(self, plugin: Plugin[Any], message: Message) -> Span:
        topic = message.topic() or ""
        fixed = self._fixed.get((plugin.name, topic))
        if fixed is None:
            fixed = self._fixed[(plugin.name, topic)] = self._consumer_attributes(plugin, topic)
        partition, offset, key = message.partition(), message.offset(), message.key()
        attributes = dict(fixed)
        if partition is not None:
            attributes[messaging.MESSAGING_DESTINATION_PARTITION_ID] = str(partition)
            attributes[messaging.MESSAGING_KAFKA_DESTINATION_PARTITION] = partition
        if offset is not None:
            attributes[messaging.MESSAGING_KAFKA_OFFSET] = offset
            attributes[messaging.MESSAGING_KAFKA_MESSAGE_OFFSET] = offset
        if key is not None:
            attributes[messaging.MESSAGING_KAFKA_MESSAGE_KEY] = key.decode("utf-8", "replace")
        carrier = message.headers() or []
        if topic not in plugin.subscriptions:  # a retry topic: which attempt, of what
            headers = parse_headers(carrier)
            attributes[ATTEMPT] = number(headers.get(H_ATTEMPT)) + 1
            attributes[ORIGINAL_TOPIC] = headers.get(H_ORIGINAL_TOPIC, b"").decode("utf-8", "replace")
        parent = propagate.extract(carrier, getter=_getter)
        return self.tracer().start_span(f"process {topic}", parent, SpanKind.CONSUMER, attributes)

    def _consumer_attributes(self, plugin: Plugin[Any], topic: str) -> dict[str, AttributeValue]:
        group = self._groups.get(plugin.name, plugin.name)
        return {
            messaging.MESSAGING_SYSTEM: messaging.MessagingSystemValues.KAFKA.value,
            messaging.MESSAGING_OPERATION_TYPE: "process",
            messaging.MESSAGING_OPERATION_NAME: "process",
            messaging.MESSAGING_DESTINATION_NAME: topic,
            messaging.MESSAGING_CONSUMER_GROUP_NAME: group if topic in plugin.subscriptions else f"{group}-retry",
            PLUGIN: plugin.name,
        }

    def _failed(self, plugin: str, message: Message, span: Span, error: BaseException) -> None:
        """A handler raised: its span waits for the worker's decision (``kafkaworkers_message_failed``)."""
        _record(span, error)
        spot = _spot(plugin, message)
        earlier = self._waiting.pop(spot, None)
        if earlier is not None:  # the same message handled again after its first run was abandoned
            earlier.end()
        if len(self._waiting) >= _MAX_WAITING:
            self._waiting.pop(next(iter(self._waiting))).end()
        self._waiting[spot] = span

    # --- producing ---------------------------------------------------------------------

    @hookimpl
    def kafkaworkers_message_producing(
        self, plugin: Plugin[Any] | None, topic: str, key: bytes | None, headers: Headers
    ) -> None:
        attributes: dict[str, AttributeValue] = {
            messaging.MESSAGING_SYSTEM: messaging.MessagingSystemValues.KAFKA.value,
            messaging.MESSAGING_OPERATION_TYPE: "send",
            messaging.MESSAGING_OPERATION_NAME: "send",
            messaging.MESSAGING_DESTINATION_NAME: topic,
        }
        if key is not None:
            attributes[messaging.MESSAGING_KAFKA_MESSAGE_KEY] = key.decode("utf-8", "replace")
        if plugin is not None:
            attributes[PLUGIN] = plugin.name
        # A child of the current span: the handler's consumer span, or a span of the caller's.
        span = self.tracer().start_span(f"send {topic}", kind=SpanKind.PRODUCER, attributes=attributes)
        propagate.inject(headers, trace.set_span_in_context(span), setter=_setter)
        span.end()


class _ConsumerScope:
    """Makes a message's consumer span current while its handler runs; ends it, or on failure
    leaves it to wait for the worker's decision."""

    __slots__ = ("_message", "_plugin", "_span", "_token", "_tracing")

    def __init__(self, tracing: Tracing, plugin: str, message: Message, span: Span) -> None:
        self._tracing = tracing
        self._plugin = plugin
        self._message = message
        self._span = span
        self._token: Token[otel_context.Context] | None = None

    def __enter__(self) -> Span:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._token is not None:
            otel_context.detach(self._token)
        if exc is None:
            self._span.end()
        else:
            self._tracing._failed(self._plugin, self._message, self._span, exc)


def plugin() -> Tracing:
    """The built-in plugin's object (:data:`kafkaworkers.plugins.BUILTINS` registers it).

    Refuses an exporter name no installed package provides now, at start-up, rather than
    dropping every span.
    """
    for name in _exporter_names():
        _exporter_entry_point(name)
    return Tracing()


def _record(span: Span, error: BaseException) -> None:
    span.record_exception(error)
    kind = type(error)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    span.set_attribute(error_attributes.ERROR_TYPE, name)
    span.set_status(Status(StatusCode.ERROR, f"{kind.__name__}: {error}"[:256]))


def _spot(plugin: str, message: Message) -> tuple[str, str, int, int]:
    return plugin, message.topic() or "", message.partition() or 0, message.offset() or 0


def _tracer(provider: trace.TracerProvider) -> trace.Tracer:
    return provider.get_tracer("kafkaworkers", importlib.metadata.version("kafkaworkers"))


def _provider_from_environment(service: str) -> TracerProvider:
    """A tracer provider as the ``OTEL_*`` variables describe it.

    The SDK reads the resource (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``), the
    sampler (``OTEL_TRACES_SAMPLER``), the batch processor's limits (``OTEL_BSP_*``) and each
    exporter its own endpoint, headers, timeout and compression
    (``OTEL_EXPORTER_OTLP_[TRACES_]*``). Only ``OTEL_TRACES_EXPORTER`` is read here: the SDK
    resolves it in its private auto-configuration module only.
    """
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = TracerProvider(resource=resource)
    for name in _exporter_names():
        exporter: SpanExporter = _exporter_entry_point(name).load()()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    service_name = resource.attributes.get(SERVICE_NAME)
    log.info("tracing: exporting the spans of %s with %s", service_name, ", ".join(_exporter_names()))
    return provider


def _exporter_names() -> list[str]:
    """The exporters ``OTEL_TRACES_EXPORTER`` names, ``otlp`` resolved by its protocol.

    ``otlp`` is OTLP over HTTP (what the ``otel`` extra installs, and the protocol the
    specification makes the default) unless ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` is
    ``grpc``, which needs ``opentelemetry-exporter-otlp-proto-grpc``.
    """
    names = []
    for raw in os.environ.get("OTEL_TRACES_EXPORTER", "").split(","):
        name = raw.strip().lower()
        if name in ("", "none"):
            continue
        if name == "otlp":
            protocol = (
                os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf"
            )  # fmt: skip
            name = "otlp_proto_grpc" if protocol.strip().lower() == "grpc" else "otlp_proto_http"
        names.append(name)
    return names


def _exporter_entry_point(name: str) -> importlib.metadata.EntryPoint:
    found: Iterable[importlib.metadata.EntryPoint] = importlib.metadata.entry_points(group=_EXPORTER_GROUP, name=name)
    for entry_point in found:
        return entry_point
    known: Sequence[str] = sorted(e.name for e in importlib.metadata.entry_points(group=_EXPORTER_GROUP))
    raise ConfigError(
        f"bad setting OTEL_TRACES_EXPORTER: no installed package provides the span exporter {name!r}"
        f" (installed: {', '.join(known) or 'none'}, or none)"
    )
