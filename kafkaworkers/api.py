"""The plugin API: how a plugin declares what it consumes and produces.

A plugin is a :class:`Plugin` object exposed through the ``kafkaworkers`` entry-point group::

    plugin = Plugin("fraude", produces={"fraude-verificado": FraudeVerificado})

    @plugin.consumes("pedido-novo", PedidoNovo)
    def analisar(pedido: PedidoNovo, ctx: Context) -> None:
        ctx.produce("fraude-verificado", FraudeVerificado(...))

The runtime decodes each message into the declared msgspec type before the handler sees it,
and stores the offset only after the handler returned and everything it produced was
acknowledged by the broker.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

from kafkaworkers.breaker import CircuitBreaker
from kafkaworkers.errors import PluginError
from kafkaworkers.hookspecs import hookimpl
from kafkaworkers.retry import RetryPolicy

__all__ = ["Context", "Plugin", "PluginEnv", "Subscription"]

T = TypeVar("T")
Handler = Callable[[Any, "Context"], None]

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")

#: Header carrying the id that ties every event of one business flow together.
CORRELATION_HEADER = "kw-correlation-id"


@dataclass(frozen=True, slots=True)
class Subscription(Generic[T]):
    """One consumed topic: its declared type and the handler that receives it."""

    topic: str
    type: type[T]
    handler: Handler
    decoder: msgspec.json.Decoder[T] = field(repr=False, compare=False)


@dataclass(slots=True)
class PluginEnv:
    """What a plugin's start-up callback gets: its own settings and its state directory.

    :param name: the plugin's name.
    :param config: the plugin's ``[plugins.<name>]`` settings.
    :param data_dir: a directory for the plugin's databases, created on start.
    """

    name: str
    config: Mapping[str, Any]
    data_dir: Path


class Context:
    """What a handler gets beside the decoded message: where it came from, and ``produce``.

    One is made per message, so it holds only references; headers are parsed on first use.
    """

    __slots__ = ("_headers", "_message", "_send", "plugin")

    def __init__(self, plugin: Plugin, message: Any, send: Callable[..., None]) -> None:
        self.plugin = plugin
        self._message = message
        self._send = send
        self._headers: dict[str, bytes] | None = None

    @property
    def topic(self) -> str:
        """The topic the message was published to (the original one for a retried message)."""
        topic = self._message.topic()
        if topic in self.plugin.subscriptions:
            return topic
        return self.headers.get("kw-original-topic", b"").decode("utf-8", "replace") or topic

    @property
    def partition(self) -> int:
        return self._message.partition()

    @property
    def offset(self) -> int:
        return self._message.offset()

    @property
    def key(self) -> bytes | None:
        return self._message.key()

    @property
    def timestamp_ms(self) -> int:
        """The broker or producer timestamp in milliseconds since the epoch."""
        return self._message.timestamp()[1]

    @property
    def headers(self) -> Mapping[str, bytes]:
        """The message headers; for a repeated name the last value wins."""
        if self._headers is None:
            self._headers = parse_headers(self._message.headers())
        return self._headers

    def _header(self, name: str) -> bytes | None:
        """One header's value (the last one), without building the whole dict on the hot path."""
        if self._headers is not None:
            return self._headers.get(name)
        found = None
        for key, value in self._message.headers() or ():
            if key == name:
                found = value if value is not None else b""
        return found

    @property
    def attempt(self) -> int:
        """1 on first delivery, 2 on the first retry, and so on."""
        raw = self.headers.get("kw-attempt")
        return int(raw) + 1 if raw and raw.isdigit() and len(raw) <= 18 else 1

    @property
    def correlation_id(self) -> str | None:
        raw = self.headers.get(CORRELATION_HEADER)
        return raw.decode("utf-8", "replace") if raw is not None else None

    def produce(
        self,
        topic: str,
        value: Any,
        *,
        key: bytes | str | None = None,
        headers: Mapping[str, bytes | str] | None = None,
    ) -> None:
        """Publish ``value`` to a topic this plugin declared it produces.

        The key defaults to the consumed message's key, so one entity's events stay on one
        partition; the correlation id travels along unless ``headers`` sets another.
        """
        if topic not in self.plugin.produced:
            raise PluginError(
                f"plugin {self.plugin.name!r} produced to {topic!r}, which it does not declare; add it to produces="
            )
        out: list[tuple[str, bytes]] = []
        correlation = self._header(CORRELATION_HEADER)
        if correlation is not None and not (headers and CORRELATION_HEADER in headers):
            out.append((CORRELATION_HEADER, correlation))
        if headers:
            out.extend((k, v.encode() if isinstance(v, str) else v) for k, v in headers.items())
        if key is None:
            key = self._message.key()
        self._send(topic, _encode(value), key.encode() if isinstance(key, str) else key, out)


_encoder = msgspec.json.Encoder()


def _encode(value: Any) -> bytes:
    return value if isinstance(value, bytes) else _encoder.encode(value)


def encode(value: Any) -> bytes:
    """The wire form of a message: msgspec JSON (bytes pass through untouched)."""
    return _encode(value)


def parse_headers(raw: list[tuple[str, bytes | None]] | None) -> dict[str, bytes]:
    """Kafka headers as a dict; a null header value becomes ``b""``, names are kept as given."""
    if not raw:
        return {}
    return {k: v if v is not None else b"" for k, v in raw}


class Plugin:
    """A worker plugin: a name (and consumer group), handlers per topic, produced topics.

    :param name: lower-case, ``[a-z0-9_-]``; also the default consumer group id.
    :param produces: topic -> msgspec type of every topic the handlers publish to.
    :param retry: the retry and dead-letter policy; the default retries any exception
        three times (1 s, 10 s, 60 s, with jitter) and dead-letters after that.
    :param description: one line for ``kafkaworkers plugins``.
    """

    def __init__(
        self,
        name: str,
        *,
        produces: Mapping[str, type] | None = None,
        retry: RetryPolicy | None = None,
        description: str = "",
    ) -> None:
        if not _NAME.match(name):
            raise PluginError(f"plugin name {name!r} must match {_NAME.pattern}")
        self.name = name
        self.description = description
        self.retry = retry or RetryPolicy()
        self.subscriptions: dict[str, Subscription[Any]] = {}
        self.produced: dict[str, type] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        self._on_start: list[Callable[[PluginEnv], None]] = []
        self._on_stop: list[Callable[[], None]] = []
        self._around_batch: Callable[[], AbstractContextManager[object]] | None = None
        for topic, typ in (produces or {}).items():
            self.produces(topic, typ)

    def __repr__(self) -> str:
        return f"<Plugin {self.name} consumes={sorted(self.subscriptions)} produces={sorted(self.produced)}>"

    def consumes(self, topic: str, type: type[T]) -> Callable[[Handler], Handler]:
        """Decorator: ``handler(message: type, ctx: Context)`` receives every message of ``topic``."""
        _check_topic(topic)

        def register(handler: Handler) -> Handler:
            if topic in self.subscriptions:
                raise PluginError(f"plugin {self.name!r} has two handlers for topic {topic!r}")
            self.subscriptions[topic] = Subscription(topic, type, handler, msgspec.json.Decoder(type))
            return handler

        return register

    def produces(self, topic: str, type: type) -> None:
        """Declare that handlers publish ``type`` messages to ``topic``."""
        _check_topic(topic)
        self.produced[topic] = type

    def breaker(self, name: str, **options: Any) -> CircuitBreaker:
        """Declare a circuit breaker guarding a dependency of this plugin (see :class:`CircuitBreaker`)."""
        if name in self.breakers:
            raise PluginError(f"plugin {self.name!r} declares breaker {name!r} twice")
        self.breakers[name] = CircuitBreaker(name, **options)
        return self.breakers[name]

    def on_start(self, fn: Callable[[PluginEnv], None]) -> Callable[[PluginEnv], None]:
        """Decorator: run ``fn(env)`` once before the first message (open databases here)."""
        self._on_start.append(fn)
        return fn

    def on_stop(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Decorator: run ``fn()`` once after the last message was committed."""
        self._on_stop.append(fn)
        return fn

    def around_batch(
        self, fn: Callable[[], AbstractContextManager[object]]
    ) -> Callable[[], AbstractContextManager[object]]:
        """Decorator: ``fn()`` gives a context manager that wraps the handling of each batch.

        The worker enters it before the batch's first handler and exits it after the last,
        before the produced messages are flushed and the offsets stored; if entering or
        exiting raises, nothing of the batch is stored and the batch is handled again. Use
        it to commit a database once per batch instead of once per message (each handler
        still needs its own savepoint, so a failed message leaves nothing behind).
        """
        if self._around_batch is not None:
            raise PluginError(f"plugin {self.name!r} declares around_batch twice")
        self._around_batch = fn
        return fn

    def batch_scope(self) -> AbstractContextManager[object] | None:
        """The context manager wrapping one batch (see :meth:`around_batch`), or ``None``."""
        return self._around_batch() if self._around_batch is not None else None

    def start(self, env: PluginEnv) -> None:
        """Run the start-up callbacks (the worker calls this)."""
        env.data_dir.mkdir(parents=True, exist_ok=True)
        for fn in self._on_start:
            fn(env)

    def stop(self) -> None:
        """Run the shutdown callbacks in reverse order (the worker calls this)."""
        for fn in reversed(self._on_stop):
            fn()

    @hookimpl
    def kafkaworkers_declare(self) -> Plugin:
        return self


def _check_topic(topic: str) -> None:
    if not _TOPIC.match(topic) or topic in (".", ".."):
        raise PluginError(f"{topic!r} is not a valid Kafka topic name")
