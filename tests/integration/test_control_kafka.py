"""``kafkaworkers control ping | pause | resume | shutdown`` against worker processes on the real broker.

Each test has control topics of its own (``KAFKAWORKERS_CONTROL_TOPIC``), so workers of
other tests running at the same time never see its commands.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable

import msgspec
import pytest

from tests.conftest import KW, KafkaHelper, KwTest, free_port, http_get, wait_for

pytestmark = pytest.mark.kafka


def topics(kwtest: KwTest) -> dict[str, str]:
    """This test's control topics, as environment variables for its workers and commands."""
    return {
        "KAFKAWORKERS_CONTROL_TOPIC": f"{kwtest.prefix}-control",
        "KAFKAWORKERS_CONTROL_REPLIES_TOPIC": f"{kwtest.prefix}-control-replies",
    }


def control(kwtest: KwTest, command: str, *args: str, timeout: float = 2.0) -> list[dict]:
    """``control <command> --plugin echo`` answered in JSON (an empty list when nobody answered)."""
    done = kwtest.cli(
        "control", command, "--plugin", "echo", "--timeout", str(timeout), "--format", "json", *args, **topics(kwtest)
    )
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout) if done.returncode == 0 else []


def worker_id(pid: int) -> str:
    return f"{socket.gethostname()}/{pid}"


def pings(numbers: range) -> list[bytes]:
    return [msgspec.json.encode({"n": n}) for n in numbers]


def stays(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Fail if ``condition`` stops holding at any check within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), what
        time.sleep(0.1)


def test_ping_is_answered_by_exactly_the_workers_of_the_addressed_plugin(kafka: KafkaHelper, kwtest: KwTest) -> None:
    kafka.create_topics(kwtest.ping, kwtest.pong, partitions=2)
    echoes = [kwtest.start(**topics(kwtest)), kwtest.start(**topics(kwtest))]
    # The same test plugin under another name, reading the same control topic.
    other = subprocess.Popen(
        [KW, "run", "--plugin", "other", "--group-id", f"{kwtest.group}-other"],
        env=kwtest.env(KWTEST_PLUGIN_NAME="other", **topics(kwtest)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kwtest.procs.append(other)
    expected = {worker_id(p.pid) for p in echoes}

    replies = wait_for(
        lambda: (r := control(kwtest, "ping")) and {x["worker"] for x in r} == expected and r,
        60,
        "both echo workers answering a ping",
    )
    for reply in replies:
        assert reply["plugins"] == ["echo"] and reply["plugin"] == "echo"
        assert reply["host"] == socket.gethostname() and reply["process"] == 0
        assert reply["state"] == "running" and reply["reason"] is None
    # The other plugin's worker answers its own pings, never echo's.
    [theirs] = wait_for(lambda: control(kwtest, "ping", "--plugin", "other"), 30, "the other plugin's worker")
    assert theirs["worker"] == worker_id(other.pid) and theirs["plugins"] == ["other"]
    assert {x["worker"] for x in control(kwtest, "ping")} == expected
    # Addressed to one worker: only that one answers.
    one = worker_id(echoes[0].pid)
    assert [x["worker"] for x in control(kwtest, "ping", "--worker", one)] == [one]
    table = kwtest.cli("control", "ping", "--plugin", "echo", "--timeout", "2", **topics(kwtest))
    assert table.returncode == 0 and "2 worker(s) of echo answered ping" in table.stdout, table.stdout + table.stderr
    nobody = kwtest.cli("control", "ping", "--plugin", "nobody", "--timeout", "1", **topics(kwtest))
    assert nobody.returncode == 1 and "no worker of nobody answered within 1 s" in nobody.stderr


def test_pause_stops_handling_and_keeps_partitions_it_gains_in_a_rebalance_paused_until_resume(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    kafka.create_topics(kwtest.ping, kwtest.pong, partitions=3)
    port = free_port()
    worker = kwtest.start(KAFKAWORKERS_METRICS_PORT=str(port), **topics(kwtest))
    second = kwtest.start(**topics(kwtest))
    me = worker_id(worker.pid)

    def owned(reply: dict) -> set[tuple[str, int]]:
        return {(p["topic"], p["partition"]) for p in reply["partitions"] if p["topic"] == kwtest.ping}

    wait_for(lambda: len([r for r in control(kwtest, "ping") if owned(r)]) == 2, 60, "both workers owning pings")
    kafka.produce(kwtest.ping, pings(range(5)))
    wait_for(lambda: len(kwtest.handled()) == 5, 60, "the first 5 pings handled")

    [paused] = control(kwtest, "pause", "--worker", me)
    assert paused["worker"] == me and paused["state"] == "paused" and paused["reason"] == "paused by control"
    assert {(p["topic"], p["partition"]) for p in paused["paused"]} >= owned(paused)
    status, _, body = http_get(f"http://127.0.0.1:{port}/readyz")
    assert status == 503 and "paused by control (echo)" in body
    assert http_get(f"http://127.0.0.1:{port}/livez")[0] == 200
    listed = kwtest.cli("inspect", "workers", "--plugin", "echo", "--group-id", kwtest.group, "--format", "json",
                        **topics(kwtest))  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    states = {(m["worker"], m["group"]): (m["state"], m["reason"]) for m in json.loads(listed.stdout)}
    assert states[(me, kwtest.group)] == ("paused", "paused by control")
    assert states[(worker_id(second.pid), kwtest.group)] == ("running", None)

    # The other worker leaves: the paused one gains partitions it never held paused, and
    # they stay paused too.
    second.terminate()
    assert second.wait(30) == 0

    def all_mine() -> dict | None:
        mine = [r for r in control(kwtest, "ping") if r["worker"] == me]
        return mine[0] if mine and owned(mine[0]) == {(kwtest.ping, p) for p in range(3)} else None

    back = wait_for(all_mine, 60, "the 3 ping partitions with the paused worker")
    assert back["state"] == "paused"
    assert {(p["topic"], p["partition"]) for p in back["paused"]} >= owned(back)
    assert http_get(f"http://127.0.0.1:{port}/readyz")[0] == 503
    kafka.produce(kwtest.ping, pings(range(5, 15)))
    stays(lambda: len(kwtest.handled()) == 5, 3, "a paused worker handled a ping")

    [resumed] = control(kwtest, "resume", "--worker", me)
    assert resumed["state"] == "running" and resumed["paused"] == []
    wait_for(lambda: set(kwtest.handled()) == set(range(15)), 60, "every ping handled after resume")
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 10, "ready again")


def test_shutdown_stops_the_worker_gracefully_with_its_offsets_committed(kafka: KafkaHelper, kwtest: KwTest) -> None:
    kafka.create_topics(kwtest.ping, kwtest.pong, partitions=3)
    worker = kwtest.start(**topics(kwtest))
    wait_for(lambda: control(kwtest, "ping"), 60, "the worker answering")
    kafka.produce(kwtest.ping, pings(range(20)))
    [reply] = control(kwtest, "shutdown", "--worker", worker_id(worker.pid), timeout=10)
    assert reply["state"] == "stopping"
    assert worker.wait(60) == 0
    handled = kwtest.handled()
    assert kafka.committed(kwtest.group, kwtest.ping) == len(handled)
    assert "shutdown asked through" in kwtest.log()
