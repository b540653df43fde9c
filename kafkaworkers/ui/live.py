"""The console's live view: lag and throughput per partition, breakers, retry backlogs, workers.

Lag, retry backlogs and group members come from the cluster (:mod:`kafkaworkers.inspect`).
Throughput per partition is the committed offset's progress between two looks at the page
(:class:`Rates`), so it needs nothing from the workers. Breaker states and the messages
each plugin consumed come from the workers' own ``/metrics``, found by a control-topic ping
(:mod:`kafkaworkers.control`): each answer names its worker's metrics URL.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kafkaworkers import control, inspect
from kafkaworkers.api import Plugin
from kafkaworkers.breaker import STATE_VALUES
from kafkaworkers.config import Settings
from kafkaworkers.plugins import PluginHost

__all__ = ["Breaker", "LagRow", "LiveView", "Rates", "TopicRate", "command", "members", "snapshot"]

log = logging.getLogger(__name__)

#: Seconds a ping waits for the workers' answers; the page waits this long at most for them.
PING_TIMEOUT = 2.0
#: Due times come from the first and last this many messages waiting in each retry partition:
#: a page load reads a bounded amount however long the backlog.
DUE_SAMPLE = 100
#: A rate is computed over at least this many seconds, so quick reloads do not make it noise.
MIN_SPAN = 1.0
_STATES = {value: name for name, value in STATE_VALUES.items()}


class Rates:
    """Per-second rates of counters (committed offsets, consumed totals) between two looks."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, ...], tuple[float, float, float | None]] = {}
        self._lock = threading.Lock()

    def rate(self, key: tuple[str, ...], value: float | None, now: float | None = None) -> float | None:
        """The counter's rate since the last look at least :data:`MIN_SPAN` ago; None on the first look."""
        if value is None:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            seen = self._seen.get(key)
            if seen is None:
                self._seen[key] = (now, value, None)
                return None
            then, before, last = seen
            if now - then < MIN_SPAN:
                return last
            # A counter that went back (a worker restarted, a group reset) starts a new span.
            rate = (value - before) / (now - then) if value >= before else None
            self._seen[key] = (now, value, rate)
            return rate


@dataclass(frozen=True)
class LagRow:
    """One partition a plugin's group reads: where it is, how far behind, how fast it moves."""

    lag: inspect.Lag
    per_second: float | None


@dataclass(frozen=True)
class TopicRate:
    """Messages a plugin consumed from a topic, over all the workers that answered."""

    plugin: str
    topic: str
    consumed: float
    per_second: float | None


@dataclass(frozen=True)
class Breaker:
    plugin: str
    name: str
    worker: str
    state: str


@dataclass
class LiveView:
    """Everything the live page shows, read at one moment."""

    lags: list[LagRow]
    waiting: list[inspect.Waiting]
    topics: list[TopicRate] = field(default_factory=list)
    breakers: list[Breaker] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def by_plugin(self) -> list[dict[str, Any]]:
        """One line per plugin: total lag, committed msgs/s, consumed msgs/s, retries waiting, breakers open."""
        names = sorted({r.lag.plugin for r in self.lags} | {t.plugin for t in self.topics})
        out = []
        for name in names:
            rates = [r.per_second for r in self.lags if r.lag.plugin == name and r.per_second is not None]
            consumed = [t.per_second for t in self.topics if t.plugin == name and t.per_second is not None]
            out.append(
                {
                    "plugin": name,
                    "lag": sum(r.lag.lag for r in self.lags if r.lag.plugin == name),
                    "committed_per_second": sum(rates) if rates else None,
                    "consumed_per_second": sum(consumed) if consumed else None,
                    "retrying": sum(w.waiting for w in self.waiting if w.plugin == name),
                    "open": sum(b.state != "closed" for b in self.breakers if b.plugin == name),
                }
            )
        return out


def snapshot(settings: Settings, host: PluginHost, rates: Rates) -> LiveView:
    """Read lag, backlogs and the workers' metrics now; rates against the previous snapshot."""
    plugins = list(host.plugins.values())
    now = time.monotonic()
    lags = [
        LagRow(row, rates.rate(("offset", row.group, row.topic, str(row.partition)), row.committed, now))
        for row in inspect.lag(settings, plugins)
    ]
    view = LiveView(lags=lags, waiting=inspect.retries(settings, plugins, sample=DUE_SAMPLE))
    consumed: dict[tuple[str, str], float] = {}
    for worker, url, families in _scrapes(settings, plugins, view.problems):
        view.answered.append(worker)
        for name, labels, value in families:
            if name == "kafkaworkers_messages_consumed_total":
                key = (labels.get("plugin", "?"), labels.get("topic", "?"))
                consumed[key] = consumed.get(key, 0.0) + value
            elif name == "kafkaworkers_circuit_breaker_state":
                state = _STATES.get(int(value), str(value))
                view.breakers.append(Breaker(labels.get("plugin", "?"), labels.get("breaker", "?"), worker, state))
        log.debug("scraped %s", url)
    view.topics = [
        TopicRate(plugin, topic, total, rates.rate(("consumed", plugin, topic), total, now))
        for (plugin, topic), total in sorted(consumed.items())
    ]
    view.breakers.sort(key=lambda b: (b.plugin, b.name, b.worker))
    return view


def members(settings: Settings, host: PluginHost) -> list[inspect.Member]:
    """Every member of the plugins' groups, with the state its worker answered to a ping."""
    found = inspect.with_states(settings, inspect.workers(settings, host.plugins.values()), PING_TIMEOUT)
    return sorted(found, key=lambda m: (m.plugin, m.group, m.host, m.pid or 0, m.member_id))


def command(settings: Settings, name: str, plugin: str, worker: str | None) -> list[control.Reply]:
    """Send ``pause`` or ``resume`` to a plugin's workers (or one of them); the answers that came."""
    return control.send(settings, name, plugin, worker=worker, timeout=PING_TIMEOUT)


def _scrapes(
    settings: Settings, plugins: Iterable[Plugin[Any]], problems: list[str]
) -> list[tuple[str, str, list[tuple[str, dict[str, str], float]]]]:
    """(worker, metrics URL, samples) of every worker that answered a ping with a metrics URL."""
    urls: dict[str, str] = {}
    for replies in control.ping_all(settings, [p.name for p in plugins], PING_TIMEOUT).values():
        for reply in replies:
            if reply.metrics_url:
                urls.setdefault(reply.metrics_url, reply.worker)
    out = []
    for url, worker in sorted(urls.items()):
        try:
            with urllib.request.urlopen(url, timeout=PING_TIMEOUT) as response:
                text = response.read().decode("utf-8", "replace")
        except OSError as exc:
            problems.append(f"{worker}: {url} did not answer ({exc})")
            continue
        samples = [
            (sample.name, dict(sample.labels), sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]
        out.append((worker, url, samples))
    return out
