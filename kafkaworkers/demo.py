"""``kafkaworkers demo``: run an installed scenario end to end and judge the result.

The framework knows nothing about what a scenario does. A distribution provides one through
the ``kafkaworkers_demo_scenario`` hook: which plugins to run and with which settings for the
size of the run, the input messages, which topics to watch, and how to judge what it saw.
The demo runs those plugins in a worker thread, publishes the input, feeds every watched
message to the scenario until it says it is finished (or the timeout passes), then prints
its report.
"""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec

from kafkaworkers.config import Settings, admin_config
from kafkaworkers.consumer import create_consumer, watermarks
from kafkaworkers.errors import KafkaWorkersError
from kafkaworkers.plugins import PluginHost
from kafkaworkers.producer import create_producer, produce
from kafkaworkers.progress import progress
from kafkaworkers.transports import Headers, Producer, TopicPartition, Transport, transport_for
from kafkaworkers.worker import Worker

__all__ = ["DemoReport", "DemoScenario", "run_demo"]


@dataclass
class DemoReport:
    """A scenario's verdict: ``ok`` decides the exit status; ``text`` and ``data`` are printed."""

    ok: bool
    text: str
    data: dict[str, Any] = field(default_factory=dict)


class DemoScenario(Protocol):
    """What a distribution provides for ``kafkaworkers demo``."""

    #: Plugins to run.
    plugins: list[str]
    #: Topics whose messages :meth:`observe` receives.
    watch: list[str]

    def prepare(self, count: int, data_dir: Path) -> dict[str, dict[str, Any]]:
        """Get ready for ``count`` units of work (files may go under ``data_dir``, which lives as
        long as the run); return the ``[plugins.NAME]`` settings the plugins need for them."""
        ...

    def generate(self, count: int, seed: int) -> Iterable[tuple[str, bytes | None, bytes, Headers]]:
        """The input: (topic, key, value, headers) for ``count`` units of work."""
        ...

    def observe(self, topic: str, key: bytes | None, value: bytes, timestamp_ms: int) -> None:
        """One message from a watched topic."""
        ...

    def finished(self) -> bool:
        """Whether every unit of work reached its end."""
        ...

    def report(self, elapsed: float, timed_out: bool) -> DemoReport:
        """The verdict, comparing what was observed with what was expected."""
        ...


def run_demo(
    host: PluginHost, settings: Settings, count: int, seed: int, timeout: float, partitions: int = 3
) -> DemoReport:
    """Run the installed scenario on the broker in ``settings`` and return its report."""
    scenario = host.demo_scenario()
    if scenario is None:
        raise KafkaWorkersError("no demo scenario is installed; install a distribution that provides one")
    plugins = host.select(scenario.plugins)
    transport = transport_for(settings.bootstrap_servers)
    admin = transport.admin(admin_config(settings))
    topics = sorted({t for p in plugins for t in [*p.subscriptions, *p.produced]})
    admin.create_topics([(t, partitions, 1) for t in topics])

    with tempfile.TemporaryDirectory(prefix="kafkaworkers-demo-") as data_dir:
        # The scenario's plugin settings win over the user's: it plans against them.
        plugin_settings = settings.plugins | {
            name: settings.plugin_config(name) | config
            for name, config in scenario.prepare(count, Path(data_dir)).items()
        }
        # Fresh groups that start at the end of every topic: on a shared broker the demo
        # neither replays old history nor takes work away from the real services' groups.
        settings = _replace(
            settings, data_dir=data_dir, group_prefix=f"demo-{uuid.uuid4().hex[:8]}-", plugins=plugin_settings
        )
        watch_group = settings.group_for("watcher")
        groups = {settings.group_for(p.name): list(p.subscriptions) for p in plugins}
        _start_at_end(settings, transport, {**groups, watch_group: scenario.watch}, admin.list_topics())
        worker = Worker(plugins, settings, host, transport=transport)
        thread = threading.Thread(target=worker.run, name="kafkaworkers-demo-worker", daemon=True)
        watcher = create_consumer(settings, watch_group, transport=transport)
        watcher.subscribe(scenario.watch)
        thread.start()
        timed_out = False
        try:
            # The clock starts once every group is joined: a real broker's join takes seconds
            # that are no part of the pipeline's throughput or latency.
            _wait_until(lambda: worker.ready or not thread.is_alive(), time.monotonic() + timeout)
            inputs = list(scenario.generate(count, seed))
            start = time.monotonic()
            _publish(create_producer(settings, transport=transport), inputs, host)
            deadline = start + timeout
            while not scenario.finished():
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                if not thread.is_alive():
                    raise KafkaWorkersError("the demo worker stopped unexpectedly; see the log above")
                for msg in watcher.consume(500, 0.2):
                    topic, value = msg.topic(), msg.value()
                    if msg.error() is None and topic is not None and value is not None:
                        scenario.observe(topic, msg.key(), value, msg.timestamp()[1])
            elapsed = time.monotonic() - start
        finally:
            watcher.close()
            worker.stop()
            thread.join(30)
        return scenario.report(elapsed, timed_out)


def _start_at_end(
    settings: Settings, transport: Transport, groups: dict[str, list[str]], partitions: dict[str, int]
) -> None:
    """Commit each group's offsets at the current end of its topics."""
    for group, topics in groups.items():
        consumer = create_consumer(settings, group, transport=transport)
        try:
            ends = []
            for topic in topics:
                for p in range(partitions.get(topic, 0)):
                    high = watermarks(consumer, TopicPartition(topic, p))[1]
                    ends.append(TopicPartition(topic, p, high))
            if ends:
                consumer.commit(offsets=ends, asynchronous=False)
        finally:
            consumer.close()


def _publish(producer: Producer, inputs: list[tuple[str, bytes | None, bytes, Headers]], host: PluginHost) -> None:
    producing = host.has_impl("kafkaworkers_message_producing")
    with progress(inputs, "publishing the demo's orders", length=len(inputs)) as shown:
        for topic, key, value, headers in shown:
            if producing:  # observers (tracing) may add headers to the input too
                host.message_producing(None, topic, key, headers)
            produce(producer, topic, value, key, headers)
    if producer.flush(30):
        raise KafkaWorkersError("the demo's orders could not be delivered to the broker within 30 s")


def _wait_until(condition: Callable[[], bool], deadline: float) -> None:
    while not condition():
        if time.monotonic() > deadline:
            raise KafkaWorkersError("the demo worker did not join its consumer groups in time")
        time.sleep(0.05)


def _replace(settings: Settings, **changes: Any) -> Settings:
    return msgspec.structs.replace(settings, **changes)
