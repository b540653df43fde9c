"""``kafkaworkers run --processes N`` on the real broker: a supervisor and its worker processes
in one group, with faults injected into a child and into the supervisor itself."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import KafkaHelper, KwTest, free_port, http_get, wait_for
from tests.integration.test_chaos_kafka import read_topic

pytestmark = pytest.mark.kafka

STARTED = re.compile(r"process (\d+) started \(pid (\d+)\)")


def pings(start: int, stop: int) -> list[bytes]:
    return [msgspec.json.encode({"n": n}) for n in range(start, stop)]


def pongs(kafka: KafkaHelper, kw: KwTest) -> set[int]:
    return {msgspec.json.decode(m.value())["n"] for m in read_topic(kafka.bootstrap, kw.pong)}


def children(kw: KwTest) -> dict[int, list[int]]:
    """Every pid each process index had, in order, from the supervisor's log."""
    out: dict[int, list[int]] = {}
    for index, pid in STARTED.findall(kw.log()):
        out.setdefault(int(index), []).append(int(pid))
    return out


def handled(kw: KwTest) -> Counter[int]:
    try:
        return Counter(kw.handled())
    except sqlite3.OperationalError:  # the first child is creating the ledger's tables
        return Counter()


def status(port: int, path: str) -> int:
    try:
        return http_get(f"http://127.0.0.1:{port}{path}")[0]
    except OSError:
        return 0


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def start(kafka: KafkaHelper, kw: KwTest, processes: int, *args: str, **env: str) -> int:
    """Create the topics, start the supervisor, wait until every process joined; its metrics port."""
    kafka.create_topics(kw.ping, kw.pong)
    port = free_port()
    kw.start("--processes", str(processes), "--metrics-port", str(port), *args, **env)
    wait_for(lambda: status(port, "/readyz") == 200, 90, f"/readyz of {processes} processes")
    assert len(children(kw)) == processes
    return port


def test_sigkill_one_of_three_processes_under_load_restarts_it_and_loses_nothing(
    kafka: KafkaHelper, kwtest: KwTest, rng
) -> None:
    port = start(kafka, kwtest, 3)
    total, chunk = 3000, 100

    def load() -> None:
        for first in range(0, total, chunk):
            kafka.produce(kwtest.ping, pings(first, first + chunk))

    producer = threading.Thread(target=load)
    producer.start()
    wait_for(lambda: len(handled(kwtest)) >= 300, 60, "300 pings handled")
    victim = rng.randrange(3)
    pid = children(kwtest)[victim][0]
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: len(children(kwtest)[victim]) == 2, 30, f"process {victim} restarted")
    restarted = time.monotonic() - killed
    producer.join(120)
    wait_for(lambda: set(handled(kwtest)) >= set(range(total)), 120, f"all {total} pings handled")
    # The last batch's pongs may still be on their way when its pings are in the ledger.
    wait_for(lambda: pongs(kafka, kwtest) >= set(range(total)), 60, f"a pong for each of the {total} pings")
    wait_for(lambda: status(port, "/readyz") == 200, 60, "/readyz with the restarted process")
    counts = handled(kwtest)
    print(
        f"SUPERVISOR sigkill: messages={total} restarted_s={restarted:.1f} lost=0"
        f" redelivered={sum(counts.values()) - len(counts)}"
    )
    assert f"process {victim} (pid {pid}) was killed by SIGKILL" in kwtest.log()


def test_a_stopped_process_is_killed_and_restarted_within_the_liveness_timeout_and_livez_fails_meanwhile(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    liveness = 3.0
    port = start(kafka, kwtest, 2, KAFKAWORKERS_LIVENESS_TIMEOUT=str(liveness))
    assert status(port, "/livez") == 200
    pid = children(kwtest)[1][0]
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    wait_for(lambda: status(port, "/livez") == 503, liveness + 5, "/livez to fail")
    wait_for(lambda: len(children(kwtest)[1]) == 2, liveness + 10, "process 1 restarted")
    assert time.monotonic() - stopped < liveness + 10
    assert re.search(rf"process 1 \(pid {pid}\) is wedged \(no health report for 3\.\d s\): killing it", kwtest.log())
    wait_for(lambda: gone(pid), 10, "the stopped process killed")
    wait_for(lambda: status(port, "/livez") == 200, 30, "/livez to pass again")
    kafka.produce(kwtest.ping, pings(0, 300))
    wait_for(lambda: set(handled(kwtest)) >= set(range(300)), 60, "300 pings handled after the restart")


def test_sigterm_to_the_supervisor_stops_every_process_exits_0_and_leaves_nothing_uncommitted(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    start(kafka, kwtest, 3)
    total = 3000
    kafka.produce(kwtest.ping, pings(0, total))
    wait_for(lambda: len(handled(kwtest)) >= 500, 60, "500 pings handled")
    supervisor = kwtest.procs[0]
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(60) == 0, kwtest.log()
    assert all(gone(pid) for pids in children(kwtest).values() for pid in pids)
    counts = handled(kwtest)
    assert max(counts.values()) == 1, "a graceful stop handles nothing twice"
    # Every handled ping's offset is committed: the group's committed offsets add up to them.
    committed = wait_for(lambda: max(kafka.committed(kwtest.group, kwtest.ping), 0), 30, "committed offsets")
    assert committed == len(counts)
    # Nothing lost: the rest is handled by the next run, and nothing again.
    kwtest.start()
    wait_for(lambda: len(handled(kwtest)) == total, 90, f"all {total} pings handled")
    assert max(handled(kwtest).values()) == 1


def test_a_plugin_that_cannot_start_makes_the_supervisor_exit_non_zero_saying_why_once(
    kafka: KafkaHelper, kwtest: KwTest, tmp_path: Path
) -> None:
    kafka.create_topics(kwtest.ping, kwtest.pong)
    result = kwtest.cli(
        "run", "--plugin", "echo", "--group-id", kwtest.group, "--processes", "3",
        KWTEST_LEDGER=str(tmp_path / "no-such-dir" / "ledger.sqlite3"),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    assert re.fullmatch(
        r"kafkaworkers: error: process \d failed at start 3 times in a row; the last: plugin 'echo' failed to start:"
        r" OperationalError: unable to open database file",
        errors[0],
    ), errors


def test_metrics_of_three_processes_merge_with_a_process_label_and_sum_to_the_messages_handled(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    port = start(kafka, kwtest, 3)
    total = 900
    kafka.produce(kwtest.ping, pings(0, total))
    wait_for(lambda: set(handled(kwtest)) >= set(range(total)), 60, f"all {total} pings handled")

    def ok_by_process() -> dict[str, float]:
        text = http_get(f"http://127.0.0.1:{port}/metrics")[2]
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "kafkaworkers_messages_handled_total" and sample.labels["outcome"] == "ok":
                    out[sample.labels["process"]] = out.get(sample.labels["process"], 0) + sample.value
        return out

    # Counters are published once per batch: poll until the last batch's are in.
    by_process = wait_for(
        lambda: (lambda m: m if sum(m.values()) == len(kwtest.handled()) else None)(ok_by_process()),
        30,
        "the handled counters to add up to the ledger",
    )
    assert set(by_process) == {"0", "1", "2"}
    text = http_get(f"http://127.0.0.1:{port}/metrics")[2]
    assert 'kafkaworkers_process_up{process="2"} 1.0' in text


def test_static_membership_brings_a_killed_process_back_into_its_place_before_its_session_expires(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    # Without static membership the replacement would wait for the killed member's 30 s session
    # to expire before the group gave it (or anyone) the killed member's partitions.
    session = 30.0
    start(kafka, kwtest, 2, "--static-membership", KAFKAWORKERS_CONSUMER_SESSION_TIMEOUT_MS=str(int(session * 1000)))
    members = kafka.admin.describe_consumer_groups([kwtest.group])[kwtest.group].result(15).members
    ids = sorted(m.group_instance_id for m in members)
    assert len(ids) == 2 and ids[0].startswith("echo-") and ids[0].endswith("-0") and ids[1].endswith("-1")
    pid = children(kwtest)[0][0]
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: len(children(kwtest)[0]) == 2, 30, "process 0 restarted")
    kafka.produce(kwtest.ping, pings(0, 300))
    wait_for(lambda: set(handled(kwtest)) >= set(range(300)), session - 10, "300 pings handled, on every partition")
    assert time.monotonic() - killed < session
