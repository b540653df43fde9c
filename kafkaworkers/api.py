"""The plugin API: how a plugin declares what it consumes and produces.

A plugin is a :class:`Plugin` object exposed through the ``kafkaworkers`` entry-point group::

    plugin: Plugin[Analises] = Plugin("fraude", produces={"fraude-verificado": FraudeVerificado})

    @plugin.on_start
    def start(env: PluginEnv) -> Analises:
        return Analises(env.data_dir / "fraude.db")

    @plugin.consumes("pedido-novo")
    def analisar(pedido: PedidoNovo, ctx: Context[Analises]) -> None:
        ctx.produce("fraude-verificado", ctx.state.verificar(pedido))

The runtime decodes each message into the type its handler's first parameter is annotated
with, and stores the offset only after the handler returned and everything it produced was
acknowledged by the broker. What ``on_start`` returns is the plugin's state: every handler
reaches it as ``ctx.state``, and ``on_stop`` and ``around_batch`` receive it, so nothing a
run needs lives in module globals.
"""

from __future__ import annotations

import builtins
import inspect
import re
import types
import typing
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import msgspec

from kafkaworkers.breaker import CircuitBreaker
from kafkaworkers.errors import PluginError
from kafkaworkers.headers import H_ATTEMPT, H_CORRELATION_ID, H_ORIGINAL_TOPIC, number, parse_headers
from kafkaworkers.hookspecs import hookimpl
from kafkaworkers.retry import RetryPolicy
from kafkaworkers.transports import Headers, Message

__all__ = ["MAX_CONCURRENCY", "Context", "Ordering", "Plugin", "PluginEnv", "Subscription"]

#: What is handled one after another at concurrency > 1 (see :class:`Plugin`).
Ordering = Literal["key", "partition", "none"]
#: The most messages of one plugin in flight in one process.
MAX_CONCURRENCY = 10_000

T = TypeVar("T")
#: A plugin's state: what its ``on_start`` returns.
S = TypeVar("S")
#: A handler: a function, or an ``async def``, of the decoded message and its context.
Handler = Callable[[Any, "Context[Any]"], "Awaitable[None] | None"]
H = TypeVar("H", bound=Handler)

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")

@dataclass(frozen=True, slots=True)
class Subscription(Generic[T]):
    """One consumed topic: its declared type and the handler that receives it.

    ``asynchronous``: the handler is an ``async def``, run on the worker's event loop.
    """

    topic: str
    type: type[T]
    handler: Handler
    decoder: msgspec.json.Decoder[T] = field(repr=False, compare=False)
    asynchronous: bool = False


@dataclass(slots=True)
class PluginEnv:
    """What a plugin's start-up callback gets: its own settings and its state directory.

    :param name: the plugin's name.
    :param config: the plugin's ``[plugins.<name>]`` settings.
    :param data_dir: a directory for the plugin's databases, created on start.
    :param database_url: the plugin's ``database_url`` setting: a PostgreSQL database its
        instances on every host share (see :func:`kafkaworkers.open_store`), or ``None``.
    """

    name: str
    config: Mapping[str, Any]
    data_dir: Path
    database_url: str | None = field(default=None, repr=False)


class Context(Generic[S]):
    """What a handler gets beside the decoded message: the plugin's state, where the message
    came from, and ``produce``.

    One is made per message, so it holds only references; headers are parsed on first use.

    :param plugin: the plugin whose handler runs.
    :param message: the consumed record (a message without an error, so it has a topic,
        partition and offset).
    :param send: ``send(topic, value, key, headers)``, where produced messages go.
    :param state: what the plugin's ``on_start`` returned, as ``ctx.state``.
    """

    __slots__ = ("_attempt", "_headers", "_message", "_send", "plugin", "state")

    def __init__(
        self, plugin: Plugin[S], message: Message, send: Callable[..., None], state: S, attempt: int = 0
    ) -> None:
        self.plugin = plugin
        self._attempt = attempt
        self.state = state
        self._message = message
        self._send = send
        self._headers: dict[str, bytes] | None = None

    @property
    def topic(self) -> str:
        """The topic the message was published to (the original one for a retried message)."""
        topic = self._message.topic()
        assert topic is not None  # handlers get records, never consumer errors
        if topic in self.plugin.subscriptions:
            return topic
        return self.headers.get(H_ORIGINAL_TOPIC, b"").decode("utf-8", "replace") or topic

    @property
    def partition(self) -> int:
        partition = self._message.partition()
        assert partition is not None  # handlers get records, never consumer errors
        return partition

    @property
    def offset(self) -> int:
        offset = self._message.offset()
        assert offset is not None  # handlers get records, never consumer errors
        return offset

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

    @property
    def attempt(self) -> int:
        """1 on first delivery, 2 on the first retry, and so on."""
        if self._attempt:  # retry mode "pause": the loop counts deliveries of the message it waits on
            return self._attempt
        return number(self.headers.get(H_ATTEMPT)) + 1

    @property
    def correlation_id(self) -> str | None:
        raw = self.headers.get(H_CORRELATION_ID)
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

        ``value`` must be an instance of the type declared for the topic (or ``bytes``, sent
        as already encoded), so a wrongly typed value fails here, in the handler, instead of
        dead-lettering downstream as a decode error. The key defaults to the consumed
        message's key, so one entity's events stay on one partition; the correlation id
        travels along unless ``headers`` sets another.
        """
        accepted = self.plugin._accepts.get(topic)
        if accepted is None:
            raise PluginError(
                f"plugin {self.plugin.name!r} produced to {topic!r}, which it does not declare; add it to produces="
            )
        if not isinstance(value, accepted):
            raise PluginError(
                f"plugin {self.plugin.name!r} produced a {type(value).__qualname__} to {topic!r}, "
                f"which is declared to carry {_type_name(self.plugin.produced[topic])}"
            )
        # Once per produced message: _header and _encode written out here save two calls.
        out: Headers = []
        if not (headers and H_CORRELATION_ID in headers):
            if self._headers is not None:
                correlation = self._headers.get(H_CORRELATION_ID)
            else:
                correlation = None
                for name, raw in self._message.headers() or ():
                    if name == H_CORRELATION_ID:
                        correlation = raw if raw is not None else b""
            if correlation is not None:
                out.append((H_CORRELATION_ID, correlation))
        if headers:
            out.extend((k, v.encode() if isinstance(v, str) else v) for k, v in headers.items())
        if key is None:
            key = self._message.key()
        elif isinstance(key, str):
            key = key.encode()
        self._send(topic, value if isinstance(value, bytes) else _encode_struct(value), key, out)


_encoder = msgspec.json.Encoder()
_encode_struct = _encoder.encode


def _encode(value: Any) -> bytes:
    return value if isinstance(value, bytes) else _encoder.encode(value)


def encode(value: Any) -> bytes:
    """The wire form of a message: msgspec JSON (bytes pass through untouched)."""
    return _encode(value)


class Plugin(Generic[S]):
    """A worker plugin: a name (and consumer group), handlers per topic, produced topics.

    ``S`` is the type of the plugin's state, what its ``on_start`` callback returns; annotate
    the plugin with it (``plugin: Plugin[Analises] = Plugin(...)``) so handlers, ``on_stop``
    and ``around_batch`` are checked against it.

    :param name: lower-case, ``[a-z0-9_-]``; also the default consumer group id.
    :param produces: topic -> msgspec type of every topic the handlers publish to.
    :param retry: the retry and dead-letter policy; the default retries any exception
        three times (1 s, 10 s, 60 s, with jitter) and dead-letters after that.
    :param description: one line for ``kafkaworkers plugins``.
    :param concurrency: how many messages of this plugin may be in flight at once unless the
        settings say otherwise (``--concurrency``, ``[plugins.<name>] concurrency``).
    :param ordering: at concurrency > 1, what is handled one after another in offset order:
        ``key`` (messages with one key on one partition; the default), ``partition`` (all
        of a partition) or ``none``.
    """

    def __init__(
        self,
        name: str,
        *,
        produces: Mapping[str, type] | None = None,
        retry: RetryPolicy | None = None,
        description: str = "",
        concurrency: int = 1,
        ordering: Ordering = "key",
    ) -> None:
        if not _NAME.match(name):
            raise PluginError(f"plugin name {name!r} must match {_NAME.pattern}")
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or not 1 <= concurrency <= MAX_CONCURRENCY:
            raise PluginError(f"plugin {name!r}: concurrency must be a whole number from 1 to {MAX_CONCURRENCY}")
        if ordering not in ("key", "partition", "none"):
            raise PluginError(f"plugin {name!r}: ordering must be 'key', 'partition' or 'none', not {ordering!r}")
        self.name = name
        self.description = description
        self.retry = retry or RetryPolicy()
        self.concurrency = concurrency
        self.ordering: Ordering = ordering
        self.subscriptions: dict[str, Subscription[Any]] = {}
        self.produced: dict[str, type] = {}
        # topic -> what ``ctx.produce`` lets through: one isinstance per produced message.
        self._accepts: dict[str, tuple[type, ...]] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        self._on_start: Callable[[PluginEnv], S] | None = None
        # Called with ``S | None``: ``None`` when the plugin has no on_start (then S is None too).
        self._on_stop: Callable[[Any], None] | None = None
        self._around_batch: Callable[[Any], AbstractContextManager[object]] | None = None
        for topic, typ in (produces or {}).items():
            self.produces(topic, typ)

    def __repr__(self) -> str:
        return f"<Plugin {self.name} consumes={sorted(self.subscriptions)} produces={sorted(self.produced)}>"

    def consumes(self, topic: str, type: Any = None) -> Callable[[H], H]:
        """Decorator: ``handler(message, ctx)`` receives every message of ``topic``.

        The message type is the annotation of the handler's first parameter
        (``def check(order: Order, ctx: Context[S]) -> None``). ``type`` may name it
        explicitly instead; with an annotation too, it must be that type or one the
        annotation accepts (a subclass, a member of a union), as when one handler annotated
        with a base class consumes several topics, each decoded as its own subclass.
        """
        _check_topic(topic)

        def register(handler: H) -> H:
            if topic in self.subscriptions:
                raise PluginError(f"plugin {self.name!r} has two handlers for topic {topic!r}")
            typ = self._message_type(topic, handler, type)
            asynchronous = inspect.iscoroutinefunction(handler)
            self.subscriptions[topic] = Subscription(topic, typ, handler, msgspec.json.Decoder(typ), asynchronous)
            return handler

        return register

    def _message_type(self, topic: str, handler: Handler, explicit: Any) -> Any:
        """The type ``handler`` receives from ``topic``: its first parameter's annotation, or ``explicit``."""
        where = f"plugin {self.name!r}, topic {topic!r}"
        annotated, problem = _first_parameter_type(handler)
        if annotated is None:
            if explicit is not None:
                return explicit
            raise PluginError(
                f"{where}: {problem}; annotate the handler's first parameter with the message type "
                f"(def handler(message: Order, ctx: Context) -> None) or pass it: consumes({topic!r}, Order)"
            )
        if explicit is not None and not _accepts(annotated, explicit):
            raise PluginError(
                f"{where}: consumes() names {_type_name(explicit)} but the handler's first parameter "
                f"is annotated {_type_name(annotated)}; make them agree, or drop the type from consumes()"
            )
        return explicit if explicit is not None else annotated

    def produces(self, topic: str, type: type) -> None:
        """Declare that handlers publish ``type`` messages to ``topic``."""
        _check_topic(topic)
        self.produced[topic] = type
        # bytes are values encoded already; a type isinstance cannot test (a union, an alias) is not checked.
        checkable = isinstance(type, builtins.type) and not isinstance(type, types.GenericAlias)
        self._accepts[topic] = (type, bytes) if checkable else (object,)

    def breaker(self, name: str, **options: Any) -> CircuitBreaker:
        """Declare a circuit breaker guarding a dependency of this plugin (see :class:`CircuitBreaker`)."""
        if name in self.breakers:
            raise PluginError(f"plugin {self.name!r} declares breaker {name!r} twice")
        self.breakers[name] = CircuitBreaker(name, **options)
        return self.breakers[name]

    def on_start(self, fn: Callable[[PluginEnv], S]) -> Callable[[PluginEnv], S]:
        """Decorator: ``fn(env)`` runs once before the first message; what it returns (open
        databases, clients) is the plugin's state, ``ctx.state`` in every handler."""
        if self._on_start is not None:
            raise PluginError(f"plugin {self.name!r} declares on_start twice")
        self._on_start = fn
        return fn

    def on_stop(self, fn: Callable[[S], None]) -> Callable[[S], None]:
        """Decorator: ``fn(state)`` runs once after the last message was committed."""
        if self._on_stop is not None:
            raise PluginError(f"plugin {self.name!r} declares on_stop twice")
        self._on_stop = fn
        return fn

    def around_batch(
        self, fn: Callable[[S], AbstractContextManager[object]]
    ) -> Callable[[S], AbstractContextManager[object]]:
        """Decorator: ``fn(state)`` gives a context manager that wraps the handling of each batch.

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

    def batch_scope(self, state: S | None) -> AbstractContextManager[object] | None:
        """The context manager wrapping one batch (see :meth:`around_batch`), or ``None``."""
        return self._around_batch(state) if self._around_batch is not None else None

    def start(self, env: PluginEnv) -> S | None:
        """Close the breakers, run ``on_start`` and return the state it made (the worker calls this).

        Breakers are declared once per plugin object but a plugin may be started again (a
        second harness, a restarted worker): each start begins with every breaker closed.
        """
        env.data_dir.mkdir(parents=True, exist_ok=True)
        for breaker in self.breakers.values():
            breaker.reset()
        return self._on_start(env) if self._on_start is not None else None

    def stop(self, state: S | None) -> None:
        """Run ``on_stop`` with the state ``start`` returned (the worker calls this)."""
        if self._on_stop is not None:
            self._on_stop(state)

    @hookimpl
    def kafkaworkers_declare(self) -> Plugin[S]:
        return self


def _first_parameter_type(handler: Callable[..., Any]) -> tuple[Any, str]:
    """The resolved annotation of ``handler``'s first parameter, or ``None`` and why there is none.

    Only that one annotation is evaluated, so the others (the ``Context[S]`` of a state class
    defined further down the module) need not resolve when the decorator runs.
    """
    try:
        first = next(iter(inspect.signature(handler).parameters.values()), None)
    except (TypeError, ValueError):
        return None, "the handler's signature cannot be read"
    if first is None:
        return None, "the handler takes no parameters"
    if first.annotation is inspect.Parameter.empty:
        return None, f"the handler's parameter {first.name!r} has no annotation"
    holder = types.SimpleNamespace(__annotations__={first.name: first.annotation})
    target = inspect.unwrap(handler)
    try:
        hints = typing.get_type_hints(holder, globalns=getattr(target, "__globals__", {}))
    except (NameError, AttributeError, SyntaxError, TypeError) as exc:  # evaluating it may fail any of these ways
        return None, f"the annotation of the handler's parameter {first.name!r} does not resolve ({exc})"
    return hints[first.name], ""


def _accepts(annotated: Any, explicit: Any) -> bool:
    """Whether a handler annotated ``annotated`` can take every value decoded as ``explicit``."""
    if explicit == annotated or annotated is Any:
        return True
    if typing.get_origin(annotated) in (typing.Union, types.UnionType):
        return any(_accepts(member, explicit) for member in typing.get_args(annotated))
    plain = isinstance(annotated, type) and isinstance(explicit, type)
    return plain and not isinstance(explicit, types.GenericAlias) and issubclass(explicit, annotated)


def _type_name(typ: Any) -> str:
    return typ.__qualname__ if isinstance(typ, type) and not isinstance(typ, types.GenericAlias) else repr(typ)


def _check_topic(topic: str) -> None:
    if not _TOPIC.match(topic) or topic in (".", ".."):
        raise PluginError(f"{topic!r} is not a valid Kafka topic name")
