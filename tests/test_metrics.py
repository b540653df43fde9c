"""Metric names, labels and values; consumer lag from librdkafka statistics; the dashboard and docs agree."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kafkaworkers import Context, PermanentError, Plugin, RetryPolicy, __version__
from kafkaworkers.config import Settings
from kafkaworkers.metrics import LAG_STATS_INTERVAL_MS, Metrics, consumer_lags
from kafkaworkers.plugins import PluginHost
from kafkaworkers.testing import Harness
from kafkaworkers.transports.memory import MemoryBroker, MemoryTransport
from kafkaworkers.worker import PluginRunner
from tests.conftest import ROOT

#: Every sample name /metrics serves, with its labels (histograms by their buckets).
EXPECTED = {
    "kafkaworkers_messages_consumed_total": {"plugin", "topic"},
    "kafkaworkers_messages_handled_total": {"plugin", "topic", "outcome"},
    "kafkaworkers_messages_produced_total": {"plugin", "topic"},
    "kafkaworkers_handler_duration_seconds_bucket": {"plugin", "topic", "le"},
    "kafkaworkers_batch_size_bucket": {"plugin", "le"},
    "kafkaworkers_consumer_lag": {"plugin", "topic", "partition"},
    "kafkaworkers_circuit_breaker_state": {"plugin", "breaker"},
    "kafkaworkers_partitions_assigned": {"plugin"},
    "kafkaworkers_partitions_paused": {"plugin"},
    "kafkaworkers_build_info": {"version"},
}
FAMILIES = {
    "kafkaworkers_messages_consumed": "counter",
    "kafkaworkers_messages_handled": "counter",
    "kafkaworkers_messages_produced": "counter",
    "kafkaworkers_handler_duration_seconds": "histogram",
    "kafkaworkers_batch_size": "histogram",
    "kafkaworkers_consumer_lag": "gauge",
    "kafkaworkers_circuit_breaker_state": "gauge",
    "kafkaworkers_partitions_assigned": "gauge",
    "kafkaworkers_partitions_paused": "gauge",
    "kafkaworkers_build": "info",
}


def require_tool(tool: str, package: str) -> str:
    """An outside tool's path; missing, it fails the test under CI=true, else skips it, saying how to install it."""
    path = shutil.which(tool)
    if path:
        return path
    hint = f"`{tool}` is not installed: `apt-get install {package}` (Debian package {package!r}; .ci/run installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(hint, pytrace=False)
    pytest.skip(hint)


def stats(partitions: Mapping[str, Mapping[str, Any]], topic: str = "pings") -> str:
    """A librdkafka statistics document, trimmed to what matters plus some noise."""
    return json.dumps(
        {
            "name": "rdkafka#consumer-1",
            "brokers": {"b1": {"rtt": {"avg": 100}}},
            "topics": {
                topic: {"topic": topic, "partitions": {k: {"hi_offset": 9, **v} for k, v in partitions.items()}}
            },
        }
    )


class Ping(msgspec.Struct):
    n: int
    fail: str = ""


def pinger() -> Plugin:
    plugin = Plugin("pinger", produces={"pongs": Ping}, retry=RetryPolicy(delays=(0.01,), jitter=0.0))
    plugin.breaker("db")
    attempts: dict[int, int] = {}

    @plugin.consumes("pings", Ping)
    def handle(ping: Ping, ctx: Context) -> None:
        attempts[ping.n] = attempts.get(ping.n, 0) + 1
        if ping.fail == "permanent":
            raise PermanentError("no")
        if ping.fail == "once" and attempts[ping.n] == 1:
            raise RuntimeError("flaky")
        ctx.produce("pongs", ping)

    return plugin


def samples(metrics: Metrics) -> list[Any]:
    text = generate_latest(metrics.registry).decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_every_metric_has_its_name_type_and_bounded_labels(tmp_path: Path) -> None:
    harness = Harness(pinger(), data_dir=tmp_path, partitions=2)
    try:
        harness.produce("pings", Ping(1))
        harness.run_until_idle()
        harness.worker.runners[0].metrics.update_lag(stats({"0": {"consumer_lag_stored": 3}}), {("pings", 0)})
        families = {f.name: f.type for f in harness.metrics.registry.collect()}
        labels = {s.name: set(s.labels) for s in samples(harness.metrics) if s.name in EXPECTED}
    finally:
        harness.close()
    assert {name: families.get(name) for name in FAMILIES} == FAMILIES
    assert not {n for n in families if not n.startswith("kafkaworkers_")}, "a metric without the prefix"
    assert labels == EXPECTED


def test_promtool_accepts_the_exposition(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "prometheus")
    harness = Harness(pinger(), data_dir=tmp_path, partitions=2)
    try:
        harness.produce("pings", Ping(1))
        harness.produce("pings", Ping(2, "permanent"))
        harness.run_until_idle()
        harness.worker.runners[0].metrics.update_lag(stats({"0": {"consumer_lag_stored": 3}}), {("pings", 0)})
        text = generate_latest(harness.metrics.registry).decode()
    finally:
        harness.close()
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert (check.stdout + check.stderr).strip() == "", "promtool has lint remarks"


def test_build_info_names_the_version() -> None:
    metrics = Metrics()
    assert value(metrics, "kafkaworkers_build_info", version=__version__) == 1


def test_counters_count_every_message_once_by_outcome(tmp_path: Path) -> None:
    harness = Harness(pinger(), data_dir=tmp_path, partitions=2)
    m = harness.metrics
    try:
        # Before any message, every outcome of a consumed topic is a series at 0.
        for outcome in ("ok", "retried", "dead_lettered"):
            assert value(m, "kafkaworkers_messages_handled_total", plugin="pinger", topic="pings", outcome=outcome) == 0
        for n in range(5):
            harness.produce("pings", Ping(n), key=str(n))
        harness.produce("pings", Ping(5, "permanent"))
        harness.produce("pings", Ping(6, "once"))
        harness.run_until_idle(wait_for_retries=True)
        assert value(m, "kafkaworkers_partitions_assigned", plugin="pinger") == 4  # pings and pinger-retry-1
        assert value(m, "kafkaworkers_partitions_paused", plugin="pinger") == 0
    finally:
        harness.close()
    assert value(m, "kafkaworkers_partitions_assigned", plugin="pinger") == 0, "closing gave the partitions back"

    def handled(outcome: str) -> float | None:
        return value(m, "kafkaworkers_messages_handled_total", plugin="pinger", topic="pings", outcome=outcome)

    # Ping 6 is consumed twice: once from "pings", once from the retry topic (counted under its original topic).
    assert value(m, "kafkaworkers_messages_consumed_total", plugin="pinger", topic="pings") == 8
    assert (handled("ok"), handled("retried"), handled("dead_lettered")) == (6, 1, 1)
    assert value(m, "kafkaworkers_messages_produced_total", plugin="pinger", topic="pongs") == 6
    assert value(m, "kafkaworkers_messages_produced_total", plugin="pinger", topic="pinger-retry-1") == 1
    assert value(m, "kafkaworkers_messages_produced_total", plugin="pinger", topic="pinger-dlq") == 1
    assert value(m, "kafkaworkers_handler_duration_seconds_count", plugin="pinger", topic="pings") == 6
    # A retry fetched before it is due is put back and fetched again: batches may hold it twice.
    assert value(m, "kafkaworkers_batch_size_sum", plugin="pinger") in (8, 9)
    assert value(m, "kafkaworkers_circuit_breaker_state", plugin="pinger", breaker="db") == 0


def test_consumer_lags_reads_the_stored_lag_else_the_committed_one_and_skips_unknowns() -> None:
    doc = stats(
        {
            "0": {"consumer_lag_stored": 5, "consumer_lag": 7},
            "1": {"consumer_lag_stored": -1, "consumer_lag": 4},
            "2": {"consumer_lag_stored": -1, "consumer_lag": -1},
            "3": {"consumer_lag_stored": 0, "consumer_lag": 12},
            "-1": {"consumer_lag_stored": 0, "consumer_lag": 0},
        }
    )
    assert consumer_lags(doc) == [("pings", 0, 5), ("pings", 1, 4), ("pings", 3, 0)]
    assert consumer_lags(doc.encode()) == consumer_lags(doc)
    assert consumer_lags('{"name": "rdkafka#producer-1", "topics": {}}') == []
    assert consumer_lags("{}") == []


def test_update_lag_sets_only_assigned_partitions_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    plugin = metrics.for_plugin("p")
    doc = stats({"0": {"consumer_lag_stored": 5}, "1": {"consumer_lag_stored": 6}})
    plugin.update_lag(doc, {("pings", 0)})
    assert value(metrics, "kafkaworkers_consumer_lag", plugin="p", topic="pings", partition="0") == 5
    assert value(metrics, "kafkaworkers_consumer_lag", plugin="p", topic="pings", partition="1") is None

    plugin.update_lag(stats({"0": {"consumer_lag_stored": 0}}), {("pings", 0)})
    assert value(metrics, "kafkaworkers_consumer_lag", plugin="p", topic="pings", partition="0") == 0

    with caplog.at_level(logging.WARNING, "kafkaworkers.metrics"):
        plugin.update_lag("not json", {("pings", 0)})
        plugin.update_lag('{"topics": {"pings": {"partitions": {"x": {}}}}}', {("pings", 0)})
    assert len(caplog.records) == 1, "a broken statistics document is reported once, not every interval"
    assert "cannot read consumer lag" in caplog.records[0].getMessage()

    plugin.forget_lag("pings", 0)
    plugin.forget_lag("pings", 0)
    assert value(metrics, "kafkaworkers_consumer_lag", plugin="p", topic="pings", partition="0") is None


class RecordingTransport(MemoryTransport):
    """The in-memory broker, remembering the configuration each consumer was made with."""

    def __init__(self) -> None:
        super().__init__(MemoryBroker())
        self.configs: list[dict[str, Any]] = []

    def consumer(self, config: Mapping[str, Any]) -> Any:
        self.configs.append(dict(config))
        return super().consumer(config)


def runner(transport: RecordingTransport, metrics: Metrics | None, **settings: Any) -> PluginRunner:
    plugin = pinger()
    transport.broker.create_topic("pings", 2)
    host = PluginHost()
    host.register(plugin, plugin.name)
    return PluginRunner(
        plugin,
        Settings(bootstrap_servers="memory://lag", **settings),
        host,
        transport.producer({}),
        transport,
        metrics.for_plugin(plugin.name) if metrics else None,
    )


def test_with_metrics_on_each_consumer_reports_statistics_to_the_lag_gauges() -> None:
    transport, metrics = RecordingTransport(), Metrics()
    run = runner(transport, metrics)
    config, retry_config = transport.configs  # the plugin's consumer and its retry topics' consumer
    for each in (config, retry_config):
        assert each["statistics.interval.ms"] == LAG_STATS_INTERVAL_MS <= 5000
        assert each["stats_cb"] == run._on_stats

    run.subscribe()
    run.step(0.05, lambda: None)  # the assignment arrives inside consume()
    # librdkafka would call this inside consume(); the in-memory broker never does.
    config["stats_cb"](stats({"0": {"consumer_lag_stored": 2}, "1": {"consumer_lag": 1}}))
    assert value(metrics, "kafkaworkers_consumer_lag", plugin="pinger", topic="pings", partition="0") == 2
    assert value(metrics, "kafkaworkers_consumer_lag", plugin="pinger", topic="pings", partition="1") == 1
    run._on_revoke(run.consumer, list(run.consumer.assignment()))
    assert value(metrics, "kafkaworkers_consumer_lag", plugin="pinger", topic="pings", partition="0") is None


def test_statistics_are_off_without_metrics_and_a_configured_interval_wins() -> None:
    transport = RecordingTransport()
    runner(transport, None)
    assert not {"statistics.interval.ms", "stats_cb"} & transport.configs[0].keys()

    transport = RecordingTransport()
    runner(transport, Metrics(), consumer={"statistics.interval.ms": 500})
    assert transport.configs[0]["statistics.interval.ms"] == 500
    assert "stats_cb" in transport.configs[0]


def test_the_dashboard_queries_only_metrics_that_exist_and_covers_the_essentials() -> None:
    dashboard = json.loads((ROOT / "dashboards" / "kafkaworkers.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    served = set(EXPECTED) | {
        "kafkaworkers_handler_duration_seconds_sum",
        "kafkaworkers_handler_duration_seconds_count",
        "kafkaworkers_batch_size_sum",
        "kafkaworkers_batch_size_count",
    }
    used = {name for expr in exprs for name in re.findall(r"kafkaworkers_[a-z_]+", expr)}
    assert used <= served, used - served
    stem = re.compile(r"_(bucket|sum|count)$")
    assert {stem.sub("", n) for n in EXPECTED} <= {stem.sub("", n) for n in used}, "a metric no panel shows"
    joined = "\n".join(exprs)
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, " in joined
    assert 'outcome="retried"' in joined and 'outcome="dead_lettered"' in joined
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(p["description"] for p in panels)


def test_the_docs_describe_every_metric_and_every_dashboard_panel() -> None:
    docs = (ROOT / "docs" / "observability.md").read_text()
    for name in [*FAMILIES, "kafkaworkers_build_info"]:
        if name != "kafkaworkers_build":
            assert f"`{name}" in docs, name
    dashboard = json.loads((ROOT / "dashboards" / "kafkaworkers.json").read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["title"] in docs, panel["title"]


@pytest.mark.parametrize("way", ["observe", "record-then-settle"])
def test_handler_durations_count_each_observation_in_its_le_bucket_and_serve_them_cumulatively(way: str) -> None:
    metrics = Metrics()
    durations = metrics.for_plugin("timer").duration("jobs")
    observed = (0.003, 0.0001, 42.0, 0.00011, 0.003)  # a bound itself belongs to its bucket ("le")
    for seconds in observed:
        if way == "observe":
            durations.observe(seconds)
        else:
            durations.record(seconds)
    if way == "record-then-settle":
        assert value(metrics, "kafkaworkers_handler_duration_seconds_count", plugin="timer", topic="jobs") == 0
        durations.settle()
        durations.settle()  # nothing recorded since: counts nothing twice

    def bucket(le: str) -> float | None:
        return value(metrics, "kafkaworkers_handler_duration_seconds_bucket", plugin="timer", topic="jobs", le=le)

    assert (bucket("0.0001"), bucket("0.00025"), bucket("0.0025"), bucket("0.005"), bucket("10.0")) == (1, 2, 2, 4, 4)
    assert bucket("+Inf") == value(metrics, "kafkaworkers_handler_duration_seconds_count", plugin="timer", topic="jobs")
    assert bucket("+Inf") == 5
    total = value(metrics, "kafkaworkers_handler_duration_seconds_sum", plugin="timer", topic="jobs")
    assert total == pytest.approx(sum(observed))
