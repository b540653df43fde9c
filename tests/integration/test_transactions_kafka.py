"""Exactly-once's commit timing on the real broker, with a worker in this process stepped by the test.

A transaction gathers batches for up to ``transaction_interval_ms`` only while they come back
full; once the consumer has caught up it commits at once, so the interval costs latency only
under a load that keeps the batches full.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kafkaworkers import Context, Plugin
from tests.conftest import KafkaHelper, wait_for
from tests.integration.conftest import Loop, Ping

pytestmark = pytest.mark.kafka


def echo(name: str) -> tuple[Plugin[Any], str, str, list[int]]:
    source, out = f"{name}.in", f"{name}.out"
    plugin = Plugin(name, produces={out: Ping})
    handled: list[int] = []

    @plugin.consumes(source)
    def handle(ping: Ping, ctx: Context) -> None:
        handled.append(ping.n)
        ctx.produce(out, ping)

    return plugin, source, out, handled


def test_a_caught_up_consumer_commits_its_transaction_at_once_not_after_the_interval(
    kafka: KafkaHelper, bootstrap: str, tmp_path: Path, loops: list[Loop]
) -> None:
    name = f"eos-{uuid.uuid4().hex[:8]}"
    plugin, source, out, handled = echo(name)
    kafka.create_topics(source, out, partitions=1)
    loop = Loop(
        bootstrap, tmp_path, plugin, group_id=name, batch_size=50,
        processing_guarantee="exactly_once", transaction_interval_ms=60_000,
    )  # fmt: skip
    loops.append(loop)
    loop.add()
    kafka.produce(source, [msgspec.json.encode(Ping(n)) for n in range(3)])
    # Far inside the 60 s interval: only the caught-up commit makes these visible this soon.
    loop.until(lambda: kafka.committed(name, source, partitions=1) == 3, 20, "the 3 offsets committed")
    assert sorted(handled) == [0, 1, 2]
    assert sorted(msgspec.json.decode(m.value(), type=Ping).n for m in kafka.read_all(out, 3)) == [0, 1, 2]


def test_full_batches_gather_into_fewer_transactions_than_batches(
    kafka: KafkaHelper, bootstrap: str, tmp_path: Path, loops: list[Loop]
) -> None:
    name = f"eos-{uuid.uuid4().hex[:8]}"
    plugin, source, out, handled = echo(name)
    kafka.create_topics(source, out, partitions=1)
    total, batch = 400, 10
    kafka.produce(source, [msgspec.json.encode(Ping(n)) for n in range(total)])
    loop = Loop(
        bootstrap, tmp_path, plugin, group_id=name, batch_size=batch,
        processing_guarantee="exactly_once", transaction_interval_ms=60_000,
    )  # fmt: skip
    loops.append(loop)
    worker = loop.add()
    txn = worker.txn
    assert txn is not None
    commits: list[int] = []
    commit = txn.commit

    def counted() -> bool:  # observes the real commit, which still runs
        commits.append(len(handled))
        return commit()

    txn.commit = counted  # type: ignore[method-assign]
    steps = [0]

    def stepped() -> bool:
        before = len(handled)
        loop.step()
        steps[0] += len(handled) > before
        return kafka.committed(name, source, partitions=1) == total

    wait_for(stepped, 60, f"all {total} offsets committed", interval=0)
    print(f"{steps[0]} steps handled messages, {len(commits)} transactions committed")
    assert sorted(handled) == list(range(total))
    assert len(commits) < steps[0], "every batch committed its own transaction although the batches were full"
    assert len(kafka.read_all(out, total)) == total
