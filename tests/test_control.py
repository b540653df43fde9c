"""Remote control on the in-memory broker: what pause, resume, ping and shutdown do to a worker.

A worker with its control channel runs its real loop on the test's thread; ``send`` runs on
another, as an operator's command would, and waits for the answers the loop gives.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kafkaworkers import Context, Plugin, RetryPolicy
from kafkaworkers.batch import BREAKER_OPEN
from kafkaworkers.config import Settings
from kafkaworkers.control import CONTROL, Reply, send
from kafkaworkers.errors import BrokerUnavailable
from kafkaworkers.inspect import Partition
from kafkaworkers.plugins import PluginHost
from kafkaworkers.transports.memory import MemoryAdmin, MemoryBroker, MemoryTransport
from kafkaworkers.worker import Worker


class Ping(msgspec.Struct, frozen=True):
    n: int


class Setup:
    """Two plugins on one broker: ``probe`` in a worker that obeys control, ``bystander`` in another."""

    def __init__(self, tmp_path: Path, concurrency: int = 1) -> None:
        self.concurrency = concurrency
        self.broker = MemoryBroker()
        self.transport = MemoryTransport(self.broker)
        self.handled: list[int] = []
        self.producer = self.transport.producer({})
        self.workers = [self._worker("probe", tmp_path), self._worker("bystander", tmp_path)]
        self.settings = self.workers[0].settings

    def _worker(self, name: str, tmp_path: Path) -> Worker:
        plugin: Plugin[Any] = Plugin(name, retry=RetryPolicy(delays=(), jitter=0.0))

        @plugin.consumes(f"{name}-in", Ping)
        def handle(ping: Ping, ctx: Context[Any]) -> None:
            if name == "probe":
                self.handled.append(ping.n)

        self.broker.create_topic(f"{name}-in", 2)
        host = PluginHost()
        host.register(plugin, name)
        settings = Settings(
            bootstrap_servers="memory://control-test",
            data_dir=str(tmp_path),
            poll_timeout=0.01,
            concurrency=self.concurrency,
        )
        worker = Worker([plugin], settings, host, transport=self.transport, control=True)
        worker.start(broker_wait=0)
        return worker

    def step(self) -> None:
        for worker in self.workers:
            worker.run_once(timeout=0.001)

    def send(self, command: str, plugin: str = "probe", **options: Any) -> list[Reply]:
        """``send`` on another thread while the workers' loops run here, as in production."""
        result: list[list[Reply]] = []
        thread = threading.Thread(
            target=lambda: result.append(send(self.settings, command, plugin, transport=self.transport, **options))
        )
        thread.start()
        while thread.is_alive():
            self.step()
        thread.join()
        return result[0]

    def produce(self, *numbers: int) -> None:
        for n in numbers:
            self.producer.produce("probe-in", msgspec.json.encode(Ping(n)), str(n).encode())
        self.producer.flush()

    def run_until(self, condition: Callable[[], bool], steps: int = 2000) -> bool:
        for _ in range(steps):
            if condition():
                return True
            self.step()
        return condition()


@pytest.fixture(params=[1, 4], ids=["concurrency-1", "concurrency-4"])
def setup(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Setup]:
    made = Setup(tmp_path, request.param)
    assert made.run_until(lambda: all(w.ready for w in made.workers))
    yield made
    for worker in made.workers:
        worker.close()


def test_ping_is_answered_by_the_addressed_plugins_worker_only_with_who_it_is(setup: Setup) -> None:
    [reply] = setup.send("ping", timeout=0.3)
    assert (reply.plugin, reply.plugins, reply.state, reply.reason) == ("probe", ["probe"], "running", None)
    assert (reply.host, reply.pid, reply.process) == (socket.gethostname(), os.getpid(), 0)
    assert reply.worker == f"{socket.gethostname()}/{os.getpid()}"
    assert reply.partitions == [Partition("probe-in", 0), Partition("probe-in", 1)]
    assert reply.paused == [] and reply.metrics_url is None
    assert setup.send("ping", worker="elsewhere/1", timeout=0.3) == []


def test_pause_holds_every_partition_and_readiness_says_why_until_resume(setup: Setup) -> None:
    probe, bystander = setup.workers
    [paused] = setup.send("pause", timeout=0.3)
    assert (paused.state, paused.reason) == ("paused", CONTROL)
    assert {(p.topic, p.partition, p.reason) for p in paused.paused} == {
        ("probe-in", 0, CONTROL),
        ("probe-in", 1, CONTROL),
    }
    assert probe.readiness() == (False, f"{CONTROL} (probe)")
    assert bystander.readiness() == (True, "ready"), "a command for another plugin is ignored"
    setup.produce(*range(6))
    setup.run_until(lambda: False, steps=200)
    assert setup.handled == []

    [resumed] = setup.send("resume", timeout=0.3)
    assert (resumed.state, resumed.paused) == ("running", [])
    assert setup.run_until(lambda: sorted(setup.handled) == list(range(6)))
    assert probe.readiness() == (True, "ready")


def test_the_operations_guide_gives_the_readiness_reason_a_pause_shows(setup: Setup) -> None:
    probe, _ = setup.workers
    setup.send("pause", timeout=0.3)
    reason = probe.readiness()[1]
    guide = (Path(__file__).parents[1] / "docs" / "observability.md").read_text()
    assert reason.replace("probe", "fraude") in guide and reason.replace("probe", "<plugin>") in guide


def test_resume_leaves_partitions_paused_for_their_own_reason_paused(setup: Setup) -> None:
    runner = setup.workers[0].runners[0]
    runner.partitions.pause(("probe-in", 0), 0, float("inf"), f"{BREAKER_OPEN}: 'db'")
    setup.send("pause", timeout=0.3)
    [resumed] = setup.send("resume", timeout=0.3)
    assert [(p.topic, p.partition, p.reason) for p in resumed.paused] == [("probe-in", 0, f"{BREAKER_OPEN}: 'db'")]
    setup.produce(*range(20))
    on_1 = {msgspec.json.decode(r.value(), type=Ping).n for r in setup.broker.records("probe-in") if r.partition() == 1}
    assert 0 < len(on_1) < 20, "the keys spread over both partitions"
    assert setup.run_until(lambda: set(setup.handled) == on_1)
    setup.run_until(lambda: False, steps=100)
    assert set(setup.handled) == on_1, "the breaker's partition was resumed"


def test_partitions_assigned_while_paused_arrive_paused(setup: Setup) -> None:
    setup.send("pause", timeout=0.3)
    # A second member takes a partition, then leaves: it comes back to the paused worker.
    other = setup.transport.consumer({"group.id": "probe", "partition.assignment.strategy": "cooperative-sticky"})
    other.subscribe(["probe-in"])
    assert setup.run_until(lambda: (other.consume(1, 0), len(setup.workers[0].runners[0].assignment) == 1)[1])
    other.close()
    runner = setup.workers[0].runners[0]
    assert setup.run_until(lambda: runner.assignment == {("probe-in", 0), ("probe-in", 1)})
    setup.produce(*range(6))
    setup.run_until(lambda: False, steps=200)
    assert setup.handled == []
    setup.send("resume", timeout=0.3)
    assert setup.run_until(lambda: sorted(setup.handled) == list(range(6)))


def test_shutdown_stops_the_loop_and_says_so(setup: Setup) -> None:
    [reply] = setup.send("shutdown", timeout=0.3)
    assert reply.state == "stopping"
    assert not setup.workers[0]._running and setup.workers[1]._running


class NoControlTopics(MemoryAdmin):
    """A cluster where this principal may not create the control topics."""

    def create_topics(self, topics: Any, config: Any = None) -> dict[str, str]:
        if any(name.startswith("kafkaworkers-control") for name, _, _ in topics):
            raise BrokerUnavailable("cannot create topic 'kafkaworkers-control': Topic authorization failed")
        return super().create_topics(topics, config)


def test_a_worker_whose_control_topic_cannot_be_made_runs_without_control(tmp_path: Path) -> None:
    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    transport.admin = lambda config: NoControlTopics(broker)  # type: ignore[method-assign]
    plugin: Plugin[Any] = Plugin("probe")
    handled: list[int] = []

    @plugin.consumes("probe-in", Ping)
    def handle(ping: Ping, ctx: Context[Any]) -> None:
        handled.append(ping.n)

    broker.create_topic("probe-in", 1)
    host = PluginHost()
    host.register(plugin, "probe")
    settings = Settings(bootstrap_servers="memory://no-control", data_dir=str(tmp_path), poll_timeout=0.01)
    worker = Worker([plugin], settings, host, transport=transport, control=True)
    worker.start(broker_wait=0)
    try:
        producer = transport.producer({})
        producer.produce("probe-in", msgspec.json.encode(Ping(1)))
        producer.flush()
        for _ in range(200):
            if handled:
                break
            worker.run_once(timeout=0.001)
        assert handled == [1]
    finally:
        worker.close()
