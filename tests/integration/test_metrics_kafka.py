"""Metrics on the real broker: a worker process under load, scraped over HTTP, by promtool and by Prometheus."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kafkaworkers import __version__
from tests.conftest import ROOT, KafkaHelper, KwTest, free_port, http_get, wait_for
from tests.test_metrics import require_tool

pytestmark = pytest.mark.kafka

DASHBOARD = ROOT / "dashboards" / "kafkaworkers.json"


def scrape(port: int) -> str | None:
    """The worker's /metrics text, or ``None`` while its HTTP server is not up yet."""
    try:
        status, _, body = http_get(f"http://127.0.0.1:{port}/metrics")
    except OSError:
        return None
    return body if status == 200 else None


class Scrape:
    """Parsed samples of one /metrics text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def values(self, name: str, **labels: str) -> list[float]:
        return [s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items()]

    def sum(self, name: str, **labels: str) -> float:
        return sum(self.values(name, **labels))

    def lag(self, topic: str) -> dict[str, float]:
        return {
            s.labels["partition"]: s.value
            for s in self.samples
            if s.name == "kafkaworkers_consumer_lag" and s.labels["topic"] == topic
        }


def pings(start: int, stop: int, fail: str = "") -> list[bytes]:
    return [msgspec.json.encode({"n": n, "fail": fail}) for n in range(start, stop)]


def test_counters_match_what_was_sent_lag_drains_to_zero_and_promtool_accepts_the_scrape(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    promtool = require_tool("promtool", "prometheus")
    sent = 3000
    kafka.create_topics(kwtest.ping, kwtest.pong)
    # The backlog is there before the worker starts, and each ping takes 2 ms (kwtest's "slow"),
    # so the drain outlasts the first librdkafka statistics and a lag above 0 can be seen.
    kafka.produce(kwtest.ping, pings(0, sent, fail="slow:0.002"))
    port = free_port()
    started = time.monotonic()
    kwtest.start("-b", kafka.bootstrap, "--metrics-port", str(port))

    seen = {"scrapes": 0, "max_lag": 0.0}

    def drained() -> Scrape | None:
        text = scrape(port)
        if text is None:
            return None
        metrics = Scrape(text)
        seen["scrapes"] += 1
        lag = metrics.lag(kwtest.ping)
        seen["max_lag"] = max([seen["max_lag"], *lag.values()])
        done = metrics.sum("kafkaworkers_messages_handled_total", outcome="ok") == sent
        return metrics if done and len(lag) == 3 and not any(lag.values()) else None

    metrics = wait_for(drained, 120, f"{sent} handled messages and a consumer lag of 0 on 3 partitions", 0.25)
    assert isinstance(metrics, Scrape)
    print(
        f"\n{sent} messages drained in {time.monotonic() - started:.1f} s; {seen['scrapes']} scrapes;"
        f" highest lag seen {seen['max_lag']:.0f}"
    )

    echo = {"plugin": "echo"}
    assert metrics.sum("kafkaworkers_messages_consumed_total", topic=kwtest.ping, **echo) == sent
    assert metrics.sum("kafkaworkers_messages_handled_total", topic=kwtest.ping, outcome="ok", **echo) == sent
    assert metrics.sum("kafkaworkers_messages_handled_total", outcome="retried") == 0
    assert metrics.sum("kafkaworkers_messages_handled_total", outcome="dead_lettered") == 0
    assert metrics.sum("kafkaworkers_messages_produced_total", topic=kwtest.pong, **echo) == sent
    assert metrics.sum("kafkaworkers_messages_produced_total") == sent
    assert metrics.sum("kafkaworkers_handler_duration_seconds_count", topic=kwtest.ping) == sent
    assert metrics.sum("kafkaworkers_batch_size_sum", **echo) == sent
    # The ping topic's 3 partitions plus 2 retry topics sized like it.
    assert metrics.values("kafkaworkers_partitions_assigned", **echo) == [9]
    assert metrics.values("kafkaworkers_partitions_paused", **echo) == [0]
    assert metrics.values("kafkaworkers_circuit_breaker_state", breaker="downstream", **echo) == [0]
    assert metrics.values("kafkaworkers_build_info", version=__version__) == [1]
    assert seen["max_lag"] > 0, "the lag was never seen above 0: the backlog drained before the first statistics"
    assert len(kafka.read_all(kwtest.pong, sent)) == sent

    check = subprocess.run([promtool, "check", "metrics"], input=metrics.text, capture_output=True, text=True)
    print(f"promtool check metrics: exit {check.returncode} {check.stdout.strip()} {check.stderr.strip()}".rstrip())
    assert check.returncode == 0, check.stdout + check.stderr
    assert not (check.stdout + check.stderr).strip(), "promtool has lint remarks"

    base = f"http://127.0.0.1:{port}"
    assert http_get(f"{base}/readyz")[::2] == (200, "ready\n")
    assert http_get(f"{base}/livez")[::2] == (200, "alive\n")
    assert http_get(f"{base}/nope")[0] == 404


def test_a_breaker_forced_open_reads_2_and_pauses_partitions_while_nothing_is_handled(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    kafka.create_topics(kwtest.ping, kwtest.pong)
    kafka.produce(kwtest.ping, pings(0, 30))
    port = free_port()
    kwtest.start(
        "-b", kafka.bootstrap, "--metrics-port", str(port), KWTEST_BREAKER_OPEN="1", KWTEST_BREAKER_WAIT="3600"
    )

    def paused() -> Scrape | None:
        text = scrape(port)
        if text is None:
            return None
        metrics = Scrape(text)
        breaker = metrics.values("kafkaworkers_circuit_breaker_state", plugin="echo", breaker="downstream")
        return metrics if breaker == [2] and metrics.sum("kafkaworkers_partitions_paused", plugin="echo") > 0 else None

    metrics = wait_for(paused, 60, "breaker state 2 and paused partitions", 0.25)
    assert isinstance(metrics, Scrape)
    paused_partitions = metrics.sum("kafkaworkers_partitions_paused", plugin="echo")
    print(f"\nbreaker 'downstream' state 2, {paused_partitions:.0f} partition(s) paused")
    assert paused_partitions <= 3
    assert metrics.sum("kafkaworkers_messages_handled_total") == 0
    assert metrics.sum("kafkaworkers_messages_produced_total") == 0
    assert kwtest.handled() == []
    # Paused on an open breaker is healthy, not stuck.
    assert http_get(f"http://127.0.0.1:{port}/livez")[0] == 200


def test_a_prometheus_server_scrapes_the_worker_and_the_dashboard_queries_run(
    kafka: KafkaHelper, kwtest: KwTest, tmp_path: Path
) -> None:
    prometheus = require_tool("prometheus", "prometheus")
    sent = 500
    kafka.create_topics(kwtest.ping, kwtest.pong)
    kafka.produce(kwtest.ping, pings(0, sent))
    worker_port, prom_port = free_port(), free_port()
    kwtest.start("-b", kafka.bootstrap, "--metrics-port", str(worker_port))
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: kafkaworkers\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{worker_port}']\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process
    server = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=log, stderr=log,
    )  # fmt: skip
    api = f"http://127.0.0.1:{prom_port}/api/v1/query?query="

    def query(expr: str) -> dict:
        try:
            return json.loads(http_get(api + urllib.parse.quote(expr))[2])
        except (OSError, ValueError):
            return {}

    def consumed() -> float | None:
        result = query(f'sum(kafkaworkers_messages_consumed_total{{plugin="echo",topic="{kwtest.ping}"}})')
        values = [float(r["value"][1]) for r in result.get("data", {}).get("result", [])]
        return values[0] if values == [sent] else None

    try:
        started = time.monotonic()
        wait_for(consumed, 90, f"Prometheus to report {sent} consumed messages", 0.5)
        print(f"\nPrometheus reported {sent} consumed after {time.monotonic() - started:.1f} s")

        # Every query of the dashboard is valid PromQL and finds series of this worker.
        exprs = [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel.get("targets", [])]
        for expr in exprs:
            concrete = expr.replace("$__rate_interval", "1m").replace("$plugin", ".*")
            answer = query(concrete)
            assert answer.get("status") == "success", f"{expr}: {answer}"
            wait_for(lambda q=concrete: query(q).get("data", {}).get("result"), 30, f"a series for {expr}", 0.5)
        print(f"{len(exprs)} dashboard queries evaluated, each with data")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
