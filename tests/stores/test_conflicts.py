"""A store conflict (a deadlock or a lost connection) makes the worker handle the message again, in place."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kafkaworkers import Context, Plugin, PluginEnv, RetryPolicy, Store, StoreConflict, open_store
from kafkaworkers.testing import Harness
from tests.pgserver import PgServer


class Ping(msgspec.Struct, frozen=True):
    n: int


def conflicted(conflicts: int) -> tuple[Plugin[Store], list[int]]:
    """A plugin that records each message in its store; message 2 loses a race ``conflicts`` times
    after writing."""
    plugin: Plugin[Store] = Plugin("conflicted", produces={"out": Ping}, retry=RetryPolicy(delays=(0.05,)))
    attempts: list[int] = []

    @plugin.on_start
    def start(env: PluginEnv) -> Store:
        return open_store(env, "conflicted", "CREATE TABLE IF NOT EXISTS visto (n BIGINT PRIMARY KEY);")

    @plugin.on_stop
    def stop(store: Store) -> None:
        store.close()

    @plugin.around_batch
    def batch(store: Store) -> AbstractContextManager[None]:
        return store.batch()

    @plugin.consumes("in", Ping)
    def handle(ping: Ping, ctx: Context[Store]) -> None:
        with ctx.state.transaction() as db:
            db.execute("INSERT INTO visto VALUES (?)", (ping.n,))
            attempts.append(ping.n)
            if ping.n == 2 and attempts.count(2) <= conflicts:
                raise StoreConflict("deadlock detected (simulated)", time.monotonic() + 0.05)
        ctx.produce("out", ping)

    return plugin, attempts


@pytest.mark.parametrize("concurrency", [1, 4])
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_message_that_lost_a_race_is_handled_again_never_retried_through_topics_or_dead_lettered(
    kafkaworkers_harness: Callable[..., Harness], request: pytest.FixtureRequest, backend: str, concurrency: int
) -> None:
    settings: dict[str, Any] = {"concurrency": concurrency}
    if backend == "postgresql":
        server: PgServer = request.getfixturevalue("pg_server")
        settings["database_url"] = server.create_database(f"t_{uuid.uuid4().hex[:12]}")
    plugin, attempts = conflicted(conflicts=5)
    harness = kafkaworkers_harness(plugin, partitions=1, **settings)
    for n in (1, 2, 3):
        harness.produce("in", Ping(n))

    harness.run_until_idle(wait_for_retries=True)

    assert attempts.count(2) == 6, "five conflicts, then it went through"
    assert sorted(p.n for p in harness.values("out", Ping)) == [1, 2, 3], "each produced once"
    assert harness.records("conflicted-retry-1") == [] and harness.records("conflicted-dlq") == []
    store: Store = harness.state("conflicted")
    assert [r[0] for r in store.db.execute("SELECT n FROM visto ORDER BY n").fetchall()] == [1, 2, 3]


def test_the_worker_hands_a_plugin_its_database_url(
    kafkaworkers_harness: Callable[..., Harness], tmp_path: Path
) -> None:
    seen: list[str | None] = []
    plugin: Plugin[None] = Plugin("urls")

    @plugin.on_start
    def start(env: PluginEnv) -> None:
        seen.append(env.database_url)
        assert "database_url" not in env.config, "a framework setting, not the plugin's own"

    @plugin.consumes("in", Ping)
    def handle(ping: Ping, ctx: Context[None]) -> None:
        """Nothing to do: the test looks at start-up only."""

    kafkaworkers_harness(
        plugin,
        database_url="postgresql://app@db-a/orders",
        plugins={"urls": {"database_url": "postgresql://app@db-b/orders"}},
    )
    assert seen == ["postgresql://app@db-b/orders"]
