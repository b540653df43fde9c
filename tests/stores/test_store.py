"""The store contract, on SQLite and on a real PostgreSQL: the same plugin code and SQL on both."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from kafkaworkers import ConfigError, PluginEnv, Store, StoreConflict, open_store
from tests.pgserver import PgServer

SCHEMA = "CREATE TABLE IF NOT EXISTS feito (chave TEXT PRIMARY KEY, n BIGINT NOT NULL DEFAULT 0);"

Opener = Callable[[], Store]


@pytest.fixture
def env(tmp_path: Path, database_url: str | None) -> PluginEnv:
    """One plugin's environment: a data directory, or a fresh PostgreSQL database of its own."""
    return PluginEnv("servico", {}, tmp_path / "servico", database_url)


@pytest.fixture
def stores(env: PluginEnv) -> Iterator[Opener]:
    """Opens the plugin's store as one more instance would; closes them all after the test."""
    opened: list[Store] = []

    def open_one() -> Store:
        opened.append(open_store(env, "servico", SCHEMA))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


def rows(store: Store) -> list[str]:
    return [r[0] for r in store.db.execute("SELECT chave FROM feito ORDER BY chave").fetchall()]


def write(store: Store, chave: str, fail: bool = False) -> None:
    with store.transaction() as db:
        db.execute("INSERT INTO feito (chave) VALUES (?)", (chave,))
        if fail:
            raise ValueError("the handler failed after writing")


def test_the_backend_follows_the_database_url(env: PluginEnv, stores: Opener) -> None:
    store = stores()
    assert store.dialect == ("postgresql" if env.database_url else "sqlite")
    assert store.shared is bool(env.database_url)
    assert (env.data_dir / "servico.sqlite3").exists() is (env.database_url is None)


def test_a_batch_commits_its_messages_together_and_a_failed_message_leaves_nothing(stores: Opener) -> None:
    store, other = stores(), stores()
    with store.batch():
        write(store, "a")
        with pytest.raises(ValueError):
            write(store, "b", fail=True)
        write(store, "c")
        assert rows(other) == [], "nothing is visible to another instance before the batch commits"
    assert rows(other) == ["a", "c"]


def test_a_batch_that_fails_rolls_every_message_back_and_the_store_works_on(stores: Opener) -> None:
    store, other = stores(), stores()
    with pytest.raises(RuntimeError), store.batch():
        write(store, "a")
        raise RuntimeError("the commit would fail")
    assert rows(other) == []
    write(store, "a")
    assert rows(other) == ["a"], "outside a batch a transaction commits at once"


def test_the_same_sql_runs_on_both_backends(stores: Opener) -> None:
    store = stores()
    with store.transaction() as db:
        first = db.execute("INSERT INTO feito (chave) VALUES (?) ON CONFLICT DO NOTHING RETURNING chave", ("x",))
        assert first.fetchone() == ("x",)
        again = db.execute("INSERT INTO feito (chave) VALUES (?) ON CONFLICT DO NOTHING RETURNING chave", ("x",))
        assert again.fetchone() is None, "a key written once is not written again"
        db.executemany("INSERT INTO feito (chave, n) VALUES (?, ?)", [("100%", 1), ("y?", 2)])
        assert db.execute("UPDATE feito SET n = n + 1 WHERE n >= ?", (1,)).rowcount == 2
        liked = db.execute("SELECT chave FROM feito WHERE chave LIKE '%\\%' ESCAPE '\\' AND n = ?", (2,))
        assert liked.fetchall() == [("100%",)], "a literal % and a ? inside quotes are left alone"
    assert rows(store) == ["100%", "x", "y?"]


def test_a_conditional_update_never_takes_more_than_there_is_across_instances(stores: Opener) -> None:
    """60 takes of one unit each, from three instances on four threads each, of 30 units: exactly 30."""
    instances = [stores() for _ in range(3)]
    with instances[0].transaction() as db:
        db.execute("INSERT INTO feito (chave, n) VALUES ('sku', 30)")
    taken: list[int] = []
    lock = threading.Lock()

    def take(store: Store) -> None:
        for _ in range(5):
            with store.transaction() as db:
                got = db.execute("UPDATE feito SET n = n - 1 WHERE chave = 'sku' AND n >= ?", (1,)).rowcount
            with lock:
                taken.append(got)

    threads = [threading.Thread(target=take, args=(s,)) for s in instances for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(taken) == 60
    assert sum(taken) == 30
    assert instances[1].db.execute("SELECT n FROM feito WHERE chave = 'sku'").fetchone() == (0,)


def test_each_thread_has_its_own_transaction(stores: Opener) -> None:
    store = stores()
    inside = threading.Event()
    seen: list[list[str]] = []
    with store.batch():
        write(store, "a")

        def look() -> None:
            seen.append(rows(store))
            inside.set()

        threading.Thread(target=look).start()
        assert inside.wait(10)
    assert seen == [[]], "another thread does not see the batch's uncommitted writes"
    assert rows(store) == ["a"]


def test_a_second_store_of_a_plugin_has_its_own_tables(env: PluginEnv) -> None:
    one = open_store(env, "servico", SCHEMA)
    two = open_store(env, "ledger", SCHEMA)
    try:
        write(one, "a")
        assert rows(two) == []
    finally:
        one.close()
        two.close()


def test_a_deadlock_between_instances_is_a_store_conflict_and_rolls_back(pg_server: PgServer, tmp_path: Path) -> None:
    env = PluginEnv("servico", {}, tmp_path, pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}"))
    one, two = open_store(env, "servico", SCHEMA), open_store(env, "servico", SCHEMA)
    try:
        with one.transaction() as db:
            db.executemany("INSERT INTO feito (chave) VALUES (?)", [("a",), ("b",)])
        first_locked, errors = threading.Barrier(2), []

        def cross(store: Store, first: str, second: str) -> None:
            try:
                with store.transaction() as db:
                    db.execute("UPDATE feito SET n = n + 1 WHERE chave = ?", (first,))
                    first_locked.wait(10)
                    db.execute("UPDATE feito SET n = n + 1 WHERE chave = ?", (second,))
            except StoreConflict as exc:
                errors.append(exc)

        threads = [threading.Thread(target=cross, args=a) for a in ((one, "a", "b"), (two, "b", "a"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(errors) == 1, "PostgreSQL breaks the deadlock by failing exactly one of the two"
        assert "40P01" in str(errors[0])
        counts = dict(one.db.execute("SELECT chave, n FROM feito").fetchall())
        assert counts == {"a": 1, "b": 1}, "the loser's writes were rolled back, the winner's committed"
        write(one, "c")
        write(two, "d")
        assert rows(two) == ["a", "b", "c", "d"], "both stores work on after the conflict"
    finally:
        one.close()
        two.close()


def test_the_server_drops_a_session_whose_host_vanished_within_seconds(pg_server: PgServer, tmp_path: Path) -> None:
    """Each session asks the server to give up on a silent peer in seconds, not TCP's minutes:
    a host cut off mid-batch would otherwise hold its row locks against the instances that took
    its partitions (the cluster's cut-host scenario shows it end to end)."""
    env = PluginEnv("servico", {}, tmp_path, pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}"))
    store = open_store(env, "servico", SCHEMA)
    try:
        shown = {
            name: store.db.execute(f"SHOW {name}").fetchone()[0]
            for name in ("tcp_user_timeout", "tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")
        }
    finally:
        store.close()
    assert shown == {
        "tcp_user_timeout": "10000", "tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2",
        "tcp_keepalives_count": "3",
    }  # fmt: skip


def test_instances_starting_at_once_create_the_schema_once(pg_server: PgServer, tmp_path: Path) -> None:
    """Eight processes open the same new store at the same moment: every one starts."""
    url = pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")
    schema = "".join(f"CREATE TABLE IF NOT EXISTS t{i} (k TEXT PRIMARY KEY, v BIGINT);" for i in range(20))
    start = tmp_path / "go"
    script = (
        "import sys, time, pathlib\n"
        "from kafkaworkers import PluginEnv, open_store\n"
        "go = pathlib.Path(sys.argv[1])\n"
        "while not go.exists(): time.sleep(0.001)\n"
        "env = PluginEnv('servico', {}, pathlib.Path(sys.argv[2]), sys.argv[3])\n"
        f"store = open_store(env, 'servico', {schema!r})\n"
        "store.db.execute('INSERT INTO t19 VALUES (?, ?)', (sys.argv[4], 1))\n"
        "store.close()\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(start), str(tmp_path), url, str(i)], stderr=subprocess.PIPE)
        for i in range(8)
    ]
    start.touch()
    failures = [p.stderr.read().decode() if p.wait(60) and p.stderr else "" for p in procs]
    assert [f for f in failures if f] == []
    store = open_store(PluginEnv("servico", {}, tmp_path, url), "servico", schema)
    try:
        assert store.db.execute("SELECT count(*) FROM t19").fetchone() == (8,)
    finally:
        store.close()


def test_the_password_of_the_url_never_shows(pg_server: PgServer, tmp_path: Path) -> None:
    url = pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")
    with_password = url.replace(f"{pg_server.user}@", f"{pg_server.user}:hunter2@")
    store = open_store(PluginEnv("servico", {}, tmp_path, with_password), "servico", SCHEMA)
    try:
        assert "hunter2" not in repr(store)
        assert "***" in repr(store)
    finally:
        store.close()
    unreachable = with_password.replace(f":{pg_server.port}/", f":{pg_server.port + 1}/")
    from kafkaworkers.stores.postgres import PostgresStore

    with pytest.raises(StoreConflict) as failed:
        PostgresStore(unreachable, "servico", [SCHEMA], connect_timeout=1.0)
    assert "hunter2" not in str(failed.value)


def test_a_lost_connection_is_a_store_conflict_and_the_next_transaction_reconnects(
    pg_server: PgServer, tmp_path: Path
) -> None:
    url = pg_server.create_database(f"t_{uuid.uuid4().hex[:12]}")
    store = open_store(PluginEnv("servico", {}, tmp_path, url), "servico", SCHEMA)
    try:
        write(store, "a")
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        with pytest.raises(StoreConflict), store.batch():
            write(store, "b")
        write(store, "c")
        assert rows(store) == ["a", "c"], "what the lost transaction wrote is gone; the store works on"
    finally:
        store.close()


def test_a_database_url_without_psycopg_installed_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "kafkaworkers.stores.postgres", None)  # as if psycopg were missing
    env = PluginEnv("servico", {}, tmp_path, "postgresql://app:hunter2@db/orders")
    with pytest.raises(ConfigError, match=r"pip install 'kafkaworkers\[postgres\]'") as refused:
        open_store(env, "servico", SCHEMA)
    assert "hunter2" not in str(refused.value)
