"""``kafkaworkers inspect workers | lag | retries`` against workers running on the real broker."""

from __future__ import annotations

import json
import socket
import time

import msgspec
import pytest

from tests.conftest import KafkaHelper, KwTest, wait_for

pytestmark = pytest.mark.kafka


def inspect(kwtest: KwTest, what: str, *args: str) -> list[dict]:
    """``inspect <what> --format json`` for the test plugin's group, parsed."""
    done = kwtest.cli("inspect", what, "--plugin", "echo", "--group-id", kwtest.group, "--format", "json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def pings(*numbers: int, fail: str = "") -> list[bytes]:
    return [msgspec.json.encode({"n": n, "fail": fail}) for n in numbers]


def test_inspect_workers_lists_two_running_workers_with_their_partitions_hosts_and_processes(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    kafka.create_topics(kwtest.ping, kwtest.pong, partitions=4)
    procs = [kwtest.start(), kwtest.start()]
    pids = {proc.pid for proc in procs}

    def two_members_own_every_partition() -> list[dict] | None:
        rows = [m for m in inspect(kwtest, "workers") if m["group"] == kwtest.group]
        owned = sorted((p["topic"], p["partition"]) for m in rows for p in m["partitions"])
        if len(rows) == 2 and owned == [(kwtest.ping, p) for p in range(4)] and all(m["partitions"] for m in rows):
            return rows
        return None

    rows = wait_for(two_members_own_every_partition, 60, "two workers sharing the 4 ping partitions")
    assert {m["pid"] for m in rows} == pids
    assert {m["host"] for m in rows} == {socket.gethostname()}
    assert {m["process"] for m in rows} == {0}
    assert {m["worker"] for m in rows} == {f"{socket.gethostname()}/{pid}" for pid in pids}
    assert all(m["plugin"] == "echo" and m["client_id"].startswith("kafkaworkers/") for m in rows)
    # The retry group has the same two members.
    retry = wait_for(
        lambda: len([m for m in inspect(kwtest, "workers") if m["group"] == f"{kwtest.group}-retry"]) == 2,
        30,
        "both workers in the retry group",
    )
    assert retry
    table = kwtest.cli("inspect", "workers", "--plugin", "echo", "--group-id", kwtest.group)
    assert table.returncode == 0, table.stderr
    lines = [line for line in table.stdout.splitlines() if line.startswith(kwtest.group + " ")]
    assert len(lines) == 2
    assert all(socket.gethostname() in line and kwtest.ping in line for line in lines)


def test_inspect_lag_is_what_was_produced_minus_what_was_handled(kafka: KafkaHelper, kwtest: KwTest) -> None:
    kafka.create_topics(kwtest.ping, kwtest.pong, partitions=3)
    kafka.produce(kwtest.ping, pings(*range(30)))
    worker = kwtest.start()
    wait_for(lambda: len(kwtest.handled()) >= 30, 60, "the first 30 pings handled")
    wait_for(lambda: kafka.committed(kwtest.group, kwtest.ping) == 30, 30, "30 offsets committed")
    worker.terminate()
    assert worker.wait(30) == 0
    kafka.produce(kwtest.ping, pings(*range(30, 42)))

    rows = inspect(kwtest, "lag")
    main = [r for r in rows if r["group"] == kwtest.group]
    assert sorted(r["partition"] for r in main) == [0, 1, 2]
    assert all(r["topic"] == kwtest.ping for r in main)
    produced, handled = 42, len(kwtest.handled())
    assert sum(r["lag"] for r in main) == produced - handled == 12
    assert sum(r["end"] for r in main) == produced
    assert sum(r["committed"] or 0 for r in main) == handled
    assert all(r["lag"] == r["end"] - (r["committed"] or 0) for r in main)
    # The retry topics exist (the worker made them) and nothing ever waited there.
    assert {r["topic"] for r in rows if r["group"] == f"{kwtest.group}-retry"} == {
        f"{kwtest.group}-retry-1",
        f"{kwtest.group}-retry-2",
    }
    assert sum(r["lag"] for r in rows if r["group"] != kwtest.group) == 0
    table = kwtest.cli("inspect", "lag", "--plugin", "echo", "--group-id", kwtest.group)
    assert table.returncode == 0 and "total lag 12" in table.stdout, table.stdout + table.stderr


def test_inspect_retries_counts_what_a_failing_handler_left_in_retry_1_and_when_it_is_due(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    kafka.create_topics(kwtest.ping, kwtest.pong, partitions=3)
    # A first retry a minute away: the failed pings wait in retry-1 for the whole test.
    kwtest.start(KWTEST_RETRY_DELAYS="60,120")
    before = time.time()
    kafka.produce(kwtest.ping, pings(*range(5), fail="retry"))
    retry_1 = f"{kwtest.group}-retry-1"
    wait_for(lambda: len(kafka.read_all(retry_1, 5, timeout=2)) >= 5, 60, "5 failed pings in retry-1")
    after = time.time()

    rows = [r for r in inspect(kwtest, "retries") if r["topic"] == retry_1]
    assert sum(r["waiting"] for r in rows) == 5
    waiting = [r for r in rows if r["waiting"]]
    for row in waiting:
        assert row["group"] == f"{kwtest.group}-retry" and row["plugin"] == "echo"
        assert (before + 60) * 1000 <= row["next_due_ms"] <= row["last_due_ms"] <= (after + 60) * 1000
    assert all(r["next_due_ms"] is None for r in rows if not r["waiting"])
    assert kwtest.handled() == []
    table = kwtest.cli("inspect", "retries", "--plugin", "echo", "--group-id", kwtest.group)
    assert table.returncode == 0, table.stderr
    assert "5 message(s) waiting" in table.stdout and "(in " in table.stdout


def test_inspect_workers_tells_the_processes_of_one_supervisor_apart_by_index(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    kafka.create_topics(kwtest.ping, kwtest.pong, partitions=2)
    supervisor = kwtest.start("--processes", "2")

    def two_processes() -> list[dict] | None:
        rows = [m for m in inspect(kwtest, "workers", "--ping-timeout", "0") if m["group"] == kwtest.group]
        return rows if sorted(m["process"] for m in rows) == [0, 1] else None

    rows = wait_for(two_processes, 60, "both processes of the supervisor in the group")
    assert len({m["pid"] for m in rows}) == 2 and supervisor.pid not in {m["pid"] for m in rows}
    assert {m["host"] for m in rows} == {socket.gethostname()}
