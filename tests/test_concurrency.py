"""Concurrency inside one worker, on the in-memory broker: order per key, offsets of unfinished
work never stored, async handlers, back-pressure, failures, rewinds, revokes and shutdown."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from confluent_kafka import OFFSET_INVALID, TopicPartition

from kafkaworkers import Context, PermanentError, Plugin, RetryPolicy
from kafkaworkers.concurrency import BUFFER_FULL
from kafkaworkers.config import Settings
from kafkaworkers.errors import PluginError
from kafkaworkers.headers import H_ORIGINAL_OFFSET
from kafkaworkers.plugins import PluginHost
from kafkaworkers.testing import Harness
from kafkaworkers.transports.memory import MemoryBroker, MemoryTransport
from kafkaworkers.worker import Worker
from tests.conftest import SEED, wait_for

MakeHarness = Callable[..., Harness]


class Step(msgspec.Struct, frozen=True):
    key: str
    seq: int


def committed(harness: Harness, group: str, topic: str, partition: int = 0) -> int:
    reader = harness.transport.consumer({"group.id": group})
    return reader.committed([TopicPartition(topic, partition)])[0].offset


def drive(harness: Harness, condition: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    """Step the worker until ``condition`` holds: handlers run on other threads meanwhile."""

    def stepped() -> object:
        harness.worker.run_once(timeout=0.005)
        return condition()

    wait_for(stepped, timeout, what, interval=0)


def setup(
    transport: MemoryTransport, plugin: Plugin, tmp_path: Any, steps: list[Step], grace: float
) -> tuple[PluginHost, Settings]:
    """A host with ``plugin``, settings for workers of it, and ``steps`` waiting on "in", keyed by their key."""
    host = PluginHost()
    host.register(plugin, plugin.name)
    producer = transport.producer({})
    for step in steps:
        producer.produce("in", msgspec.json.encode(step), step.key.encode())
    producer.flush()
    settings = Settings(bootstrap_servers=f"memory://{plugin.name}", data_dir=str(tmp_path), shutdown_grace=grace)
    return host, settings


def test_messages_of_one_key_are_handled_in_offset_order_and_keys_run_in_parallel(
    kafkaworkers_harness: MakeHarness,
) -> None:
    rng = random.Random(SEED)
    print(f"seed {SEED}")
    plugin = Plugin("ordered", produces={"out": Step}, concurrency=8)
    lock = threading.Lock()
    running: set[str] = set()
    overlap: list[int] = []

    @plugin.consumes("in")
    def handle(step: Step, ctx: Context) -> None:
        with lock:
            assert step.key not in running, f"two messages of key {step.key} ran at once"
            running.add(step.key)
            overlap.append(len(running))
        time.sleep(rng.uniform(0, 0.004))
        with lock:
            running.discard(step.key)
        ctx.produce("out", step)

    harness = kafkaworkers_harness(plugin, partitions=2)
    keys = [f"k{i}" for i in range(10)]
    for seq in range(20):
        for key in keys:
            harness.produce("in", Step(key, seq), key=key)
    harness.run_until_idle(timeout=60)

    by_key: dict[str, list[int]] = defaultdict(list)
    for step in harness.values("out", Step):
        by_key[step.key].append(step.seq)
    assert by_key == {key: list(range(20)) for key in keys}, "a key's outputs are out of order, missing or doubled"
    assert max(overlap) > 1, "nothing ran in parallel: the test proves nothing"
    assert max(overlap) <= 8, "more handlers ran at once than the concurrency allows"
    assert committed(harness, "ordered", "in", 0) + committed(harness, "ordered", "in", 1) == 200


def test_an_offset_is_stored_only_up_to_the_first_unfinished_message(kafkaworkers_harness: MakeHarness) -> None:
    plugin = Plugin("gapped", produces={"out": Step}, concurrency=4)
    release = threading.Event()

    @plugin.consumes("in")
    def handle(step: Step, ctx: Context) -> None:
        if step.key == "slow":
            assert release.wait(20)
        ctx.produce("out", step)

    harness = kafkaworkers_harness(plugin, partitions=1)
    harness.produce("in", Step("slow", 0), key="slow")
    for seq in range(1, 6):
        harness.produce("in", Step("fast", seq), key="fast")
    drive(harness, lambda: len(harness.records("out")) == 5, "the five fast messages behind the slow one")
    harness.worker.run_once(timeout=0.005)
    assert committed(harness, "gapped", "in") == OFFSET_INVALID, "stored past a message still in flight"

    release.set()
    drive(harness, lambda: committed(harness, "gapped", "in") == 6, "the offset after the slow message finished")
    assert len(harness.records("out")) == 6


def test_async_handlers_run_concurrently_on_the_workers_event_loop_and_produce(
    kafkaworkers_harness: MakeHarness,
) -> None:
    plugin = Plugin("awaits", produces={"out": Step}, concurrency=4)
    started: list[int] = []
    loops: set[int] = set()
    gate: dict[str, asyncio.Event] = {}
    running: list[int] = [0]
    most: list[int] = [0]

    @plugin.consumes("in")
    async def handle(step: Step, ctx: Context) -> None:
        # All on the one event loop thread: no lock needed around the counts.
        loops.add(id(asyncio.get_running_loop()))
        running[0] += 1
        most[0] = max(most[0], running[0])
        event = gate.setdefault("open", asyncio.Event())
        started.append(step.seq)
        if len(started) == 4:
            event.set()
        await asyncio.wait_for(event.wait(), 20)
        await asyncio.sleep(0.002)
        running[0] -= 1
        ctx.produce("out", step)

    harness = kafkaworkers_harness(plugin, partitions=1)
    for seq in range(40):
        harness.produce("in", Step(f"k{seq}", seq), key=f"k{seq}")
    harness.run_until_idle(timeout=30)
    assert sorted(s.seq for s in harness.values("out", Step)) == list(range(40)), "four awaited at once"
    assert most[0] == 4, f"{most[0]} async handlers ran at once at concurrency 4"
    assert len(loops) == 1


def test_an_async_handler_works_at_concurrency_one(kafkaworkers_harness: MakeHarness) -> None:
    plugin = Plugin("awaits-one", produces={"out": Step})

    @plugin.consumes("in")
    async def handle(step: Step, ctx: Context) -> None:
        await asyncio.sleep(0)
        ctx.produce("out", step)

    harness = kafkaworkers_harness(plugin, partitions=1)
    harness.produce("in", Step("a", 1), key="a")
    harness.run_until_idle()
    assert harness.values("out", Step) == [Step("a", 1)]
    assert committed(harness, "awaits-one", "in") == 1


def test_a_sync_and_an_async_handler_in_one_worker(kafkaworkers_harness: MakeHarness) -> None:
    plugin = Plugin("mixed", produces={"out": Step}, concurrency=4)

    @plugin.consumes("sync-in")
    def handle_sync(step: Step, ctx: Context) -> None:
        ctx.produce("out", step)

    @plugin.consumes("async-in")
    async def handle_async(step: Step, ctx: Context) -> None:
        await asyncio.sleep(0)
        ctx.produce("out", step)

    harness = kafkaworkers_harness(plugin, partitions=1)
    harness.produce("sync-in", Step("s", 1), key="s")
    harness.produce("async-in", Step("a", 2), key="a")
    harness.run_until_idle()
    assert sorted(s.seq for s in harness.values("out", Step)) == [1, 2]


def test_failures_at_concurrency_are_dead_lettered_once_and_what_they_produced_is_never_sent(
    kafkaworkers_harness: MakeHarness,
) -> None:
    plugin = Plugin("poisoned", produces={"out": Step}, retry=RetryPolicy(delays=()), concurrency=8)

    @plugin.consumes("in")
    def handle(step: Step, ctx: Context) -> None:
        ctx.produce("out", step)
        if step.seq % 3 == 0:
            raise PermanentError(f"bad step {step.seq}")

    harness = kafkaworkers_harness(plugin, partitions=1)
    for seq in range(30):
        harness.produce("in", Step(f"k{seq % 5}", seq), key=f"k{seq % 5}")
    harness.produce("in", b"not json", key="k0")
    harness.run_until_idle(timeout=30)

    letters = sorted(int(dict(r.headers())[H_ORIGINAL_OFFSET]) for r in harness.records("poisoned-dlq"))
    assert letters == [*range(0, 30, 3), 30], "ten failed steps and one undecodable message, each dead-lettered once"
    assert sorted(s.seq for s in harness.values("out", Step)) == [s for s in range(30) if s % 3]
    assert committed(harness, "poisoned", "in") == 31


def test_a_partition_whose_buffer_is_full_is_paused_and_resumed_when_it_drains(
    kafkaworkers_harness: MakeHarness,
) -> None:
    plugin = Plugin("pressed", produces={"out": Step}, concurrency=2, ordering="partition")
    release = threading.Event()

    @plugin.consumes("in")
    def handle(step: Step, ctx: Context) -> None:
        assert release.wait(20)
        ctx.produce("out", step)

    harness = kafkaworkers_harness(plugin, partitions=1, batch_size=50)
    for seq in range(300):
        harness.produce("in", Step("k", seq), key="k")
    runner = harness.worker.runners[0]
    assert runner.dispatcher is not None
    drive(harness, lambda: runner.paused.get(("in", 0), (0, ""))[1] == BUFFER_FULL, "the full partition paused")
    assert runner.dispatcher.in_flight <= runner.dispatcher.buffer + 50, "memory is not bounded"

    release.set()
    harness.run_until_idle(timeout=60)
    assert [s.seq for s in harness.values("out", Step)] == list(range(300)), "lost or repeated across the pause"
    assert runner.paused == {}


def test_an_open_breaker_rewinds_the_partition_and_finished_messages_are_not_handled_twice(
    kafkaworkers_harness: MakeHarness,
) -> None:
    plugin = Plugin("guarded", produces={"out": Step}, concurrency=4)
    breaker = plugin.breaker("downstream", min_calls=1, window=1, failure_rate=1.0, wait=0.2, probes=1, timeout=None)
    calls: dict[int, int] = defaultdict(int)
    failing = {"on": True}

    @plugin.consumes("in")
    def handle(step: Step, ctx: Context) -> None:
        calls[step.seq] += 1

        def call() -> None:
            if step.seq == 5 and failing["on"]:
                failing["on"] = False
                raise ConnectionError("downstream refused")

        breaker.call(call)
        ctx.produce("out", step)

    harness = kafkaworkers_harness(plugin, partitions=1)
    for seq in range(10):
        harness.produce("in", Step(f"k{seq}", seq), key=f"k{seq}")
    harness.run_until_idle(timeout=30, wait_for_retries=True)

    outputs = sorted(s.seq for s in harness.values("out", Step))
    assert outputs == list(range(10)), "lost or produced twice"
    assert calls[5] >= 2, "the message that tripped the breaker was not handled again"
    assert committed(harness, "guarded", "in") == 10


def test_on_revoke_finished_work_is_stored_and_no_message_is_handled_by_two_members(tmp_path: Any) -> None:
    broker = MemoryBroker()
    broker.create_topic("in", 4)
    transport = MemoryTransport(broker)
    plugin = Plugin("shared", concurrency=8)
    ledger: list[tuple[str, int, int]] = []
    started: list[int] = []
    lock = threading.Lock()

    @plugin.consumes("in")
    def handle(step: Step, ctx: Context) -> None:
        started.append(step.seq)
        time.sleep(0.02)  # the handler's work: long enough that the rebalance finds messages in flight
        with lock:
            ledger.append((threading.current_thread().name.split("_")[0], ctx.partition, ctx.offset))

    host, settings = setup(transport, plugin, tmp_path, [Step(f"k{seq % 40}", seq) for seq in range(200)], 4.0)
    first = Worker([plugin], settings, host, transport=transport)
    second = Worker([plugin], settings, host, transport=transport)
    first.start(broker_wait=0)
    try:
        wait_for(lambda: first.run_once(timeout=0.005) >= 0 and len(started) >= 8, 10, "8 in flight", 0)
        second.start(broker_wait=0)

        def both() -> bool:
            first.run_once(timeout=0.005)
            second.run_once(timeout=0.005)
            reader = transport.consumer({"group.id": "shared"})
            offsets = reader.committed([TopicPartition("in", p) for p in range(4)])
            return sum(max(tp.offset, 0) for tp in offsets) == 200

        wait_for(both, 60, "all 200 committed by the two members", interval=0)
    finally:
        first.close()
        second.close()
    seen = [(partition, offset) for _, partition, offset in ledger]
    assert len(set(seen)) == 200, "a message was lost"
    assert len(seen) == 200, f"{len(seen) - 200} message(s) handled twice across the rebalance"


def test_shutdown_finishes_what_is_in_flight_within_the_grace_and_stores_it(tmp_path: Any) -> None:
    broker = MemoryBroker()
    broker.create_topic("in", 1)
    transport = MemoryTransport(broker)
    plugin = Plugin("stopping", concurrency=4)
    started: list[int] = []
    done: list[int] = []

    @plugin.consumes("in")
    def handle(step: Step, ctx: Context) -> None:
        started.append(step.seq)
        time.sleep(0.05)
        done.append(step.seq)

    host, settings = setup(transport, plugin, tmp_path, [Step(f"k{seq}", seq) for seq in range(4)], 10.0)
    worker = Worker([plugin], settings, host, transport=transport)
    worker.start(broker_wait=0)
    wait_for(lambda: worker.run_once(timeout=0.005) >= 0 and len(started) == 4, 10, "4 running")
    worker.stop()
    worker.close()
    assert sorted(done) == [0, 1, 2, 3]
    reader = transport.consumer({"group.id": "stopping"})
    assert reader.committed([TopicPartition("in", 0)])[0].offset == 4


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_message_waiting_for_a_slot_is_not_started_once_shutdown_began(tmp_path: Any, kind: str) -> None:
    broker = MemoryBroker()
    broker.create_topic("in", 1)
    transport = MemoryTransport(broker)
    plugin = Plugin("queued", concurrency=2)
    started: list[int] = []
    gate = threading.Event()

    if kind == "sync":

        @plugin.consumes("in")
        def handle(step: Step, ctx: Context) -> None:
            started.append(step.seq)
            assert gate.wait(30), "the test never opened the gate"

    else:

        @plugin.consumes("in")
        async def handle_async(step: Step, ctx: Context) -> None:
            started.append(step.seq)
            deadline = time.monotonic() + 30
            while not gate.is_set():
                assert time.monotonic() < deadline, "the test never opened the gate"
                await asyncio.sleep(0.005)

    host, settings = setup(transport, plugin, tmp_path, [Step(f"k{seq}", seq) for seq in range(6)], 20.0)
    worker = Worker([plugin], settings, host, transport=transport)
    worker.start(broker_wait=0)
    dispatcher = worker.runners[0].dispatcher
    assert dispatcher is not None
    # Two handlers hold both slots; two more messages wait for one.
    wait_for(lambda: worker.run_once(timeout=0.005) >= 0 and len(started) == 2 and dispatcher.gathering, 10,
             "two running and two queued")  # fmt: skip
    assert dispatcher.in_flight == 6
    worker.stop()
    closing = threading.Thread(target=worker.close)
    closing.start()
    wait_for(lambda: dispatcher.in_flight == 2, 10, "the queued messages given up")
    gate.set()
    closing.join(30)
    assert not closing.is_alive()
    assert sorted(started) == [0, 1], "a message waiting for a slot started after shutdown began"
    reader = transport.consumer({"group.id": "queued"})
    assert reader.committed([TopicPartition("in", 0)])[0].offset == 2

    again = Worker([plugin], settings, host, transport=transport)
    again.start(broker_wait=0)
    try:
        wait_for(lambda: again.run_once(timeout=0.005) >= 0 and len(started) == 6, 10, "the rest handled")
    finally:
        again.close()
    assert sorted(started) == list(range(6)), "lost or handled twice"


def test_concurrency_settings_pick_per_plugin_then_global_then_the_plugins_own() -> None:
    settings = Settings(concurrency=4, plugins={"a": {"concurrency": 16, "other": 1}})
    assert settings.concurrency_for("a", 2) == 16
    assert settings.concurrency_for("b", 2) == 4
    assert Settings().concurrency_for("b", 2) == 2
    assert settings.plugin_config("a") == {"other": 1}, "a plugin does not see the framework's settings"
    with pytest.raises(PluginError, match="ordering must be"):
        Plugin("bad", ordering="random")  # type: ignore[arg-type]
