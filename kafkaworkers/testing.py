"""Testing plugins without a broker: run them on the in-memory broker, step by step.

Published as a pytest plugin (``pytest11`` entry point), so a plugin's own test suite gets
the ``kafkaworkers_harness`` fixture with nothing to configure::

    def test_fraud_verdict(kafkaworkers_harness):
        harness = kafkaworkers_harness(fraude.plugin)
        harness.produce("pedido-novo", order, key=order.order_id)
        harness.run_until_idle()
        [verdict] = harness.values("fraude-verificado", FraudeVerificado)

The harness drives the real worker loop (decode, handle, produce, flush, store offsets,
retry and dead-letter topics) in the test's own thread; nothing is mocked.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from kafkaworkers.api import Plugin, encode
from kafkaworkers.clock import SYSTEM_CLOCK, Clock
from kafkaworkers.config import Settings
from kafkaworkers.metrics import Metrics
from kafkaworkers.plugins import PluginHost
from kafkaworkers.transports.memory import MemoryBroker, MemoryTransport
from kafkaworkers.worker import Worker

__all__ = ["Harness", "kafkaworkers_harness"]

T = TypeVar("T")
_names = itertools.count()


class Harness:
    """Plugins running on a private in-memory broker, advanced by the test.

    :param plugins: the plugins under test (observer objects may be passed too).
    :param data_dir: where the plugins keep their state.
    :param partitions: partitions of every declared topic.
    :param clock: the worker's clocks; a :class:`~kafkaworkers.clock.ManualClock` lets a test
        move retry delays and breaker waits forward instead of waiting for them.
    :param settings: further :class:`Settings` fields (``plugins={...}`` for plugin config).
    """

    def __init__(
        self, *plugins: object, data_dir: Path, partitions: int = 3, clock: Clock = SYSTEM_CLOCK, **settings: Any
    ) -> None:
        self.broker = MemoryBroker()
        self.transport = MemoryTransport(self.broker)
        self.host = PluginHost()
        # Modules and observers first: a module passed for its hooks may declare a plugin that is
        # passed too, and that plugin is then registered once, through its module.
        for obj in sorted(plugins, key=lambda obj: isinstance(obj, Plugin)):
            if isinstance(obj, Plugin) and self.host.plugins.get(obj.name) is obj:
                continue
            self.host.register(obj, getattr(obj, "name", None) or f"observer-{next(_names)}")
        self.host.check()
        workers = list(self.host.plugins.values())
        for plugin in workers:
            for topic in [*plugin.subscriptions, *plugin.produced]:
                if topic not in self.broker.list_topics():
                    self.broker.create_topic(topic, partitions)
        self.settings = Settings(
            bootstrap_servers=f"memory://harness-{next(_names)}", data_dir=str(data_dir), poll_timeout=0.0, **settings
        )
        self.metrics = Metrics()
        self.worker = Worker(
            workers, self.settings, self.host, transport=self.transport, metrics=self.metrics, clock=clock
        )
        self.worker.start(broker_wait=0)
        self._producer = self.transport.producer({})

    def produce(
        self, topic: str, value: Any, *, key: bytes | str | None = None, headers: dict[str, bytes] | None = None
    ) -> None:
        """Publish one message (a msgspec value, or raw bytes as they would arrive from Kafka)."""
        raw_key = key.encode() if isinstance(key, str) else key
        self._producer.produce(topic, encode(value), raw_key, headers=list((headers or {}).items()) or None)
        self._producer.flush()

    def run_until_idle(self, timeout: float = 10.0, wait_for_retries: bool = False) -> int:
        """Step the worker until no message is left or in flight (and, if asked, no retry is waiting)."""
        handled = 0
        idle = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = self.worker.run_once(timeout=0.01)
            handled += n
            waiting = wait_for_retries and any(r.paused for r in self.worker.runners)
            in_flight = any(r.dispatcher is not None and r.dispatcher.in_flight for r in self.worker.runners)
            # Twice idle: the step that stored the last offsets is followed by one that commits them.
            idle = idle + 1 if n == 0 and not waiting and not in_flight else 0
            if idle == 2:
                return handled
        raise TimeoutError(f"still busy after {timeout} s ({handled} handled)")

    def records(self, topic: str) -> list[Any]:
        """Every record on ``topic``, oldest first per partition."""
        return self.broker.records(topic)

    def values(self, topic: str, type: type[T]) -> list[T]:
        """Every message on ``topic`` decoded as ``type``."""
        decoder = msgspec.json.Decoder(type)
        return [decoder.decode(r.value()) for r in self.records(topic)]

    def state(self, name: str) -> Any:
        """The state the running plugin ``name`` got from its ``on_start`` (its ``ctx.state``)."""
        for runner in self.worker.runners:
            if runner.plugin.name == name:
                return runner.state
        running = ", ".join(r.plugin.name for r in self.worker.runners)
        raise KeyError(f"no plugin {name!r} runs in this harness (running: {running})")

    def close(self) -> None:
        self.worker.close()


@pytest.fixture
def kafkaworkers_harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    """A factory of :class:`Harness` objects, each closed after the test."""
    made: list[Harness] = []

    def make(*plugins: Plugin[Any] | object, **options: Any) -> Harness:
        options.setdefault("data_dir", tmp_path / f"data-{len(made)}")
        harness = Harness(*plugins, **options)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()
