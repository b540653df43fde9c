"""The dead-letter browser's data: each plugin's letters, filtered, with what was replayed.

Reading goes through :func:`kafkaworkers.dlq.read_dead_letters` and
:func:`kafkaworkers.dlq.read_ledger` (an assigned consumer that joins no group and commits
nothing), so browsing never disturbs a worker; replaying is :func:`kafkaworkers.dlq.replay`
narrowed to the letters the operator picked.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field

from kafkaworkers.config import Settings, admin_config
from kafkaworkers.dlq import (
    DeadLetter,
    ReplayReport,
    already_replayed,
    ledger_topic,
    read_dead_letters,
    read_ledger,
    replay,
)
from kafkaworkers.retry import dlq_topic
from kafkaworkers.transports import Transport, transport_for

__all__ = ["Filters", "Found", "PluginLetters", "browse", "find", "replay_selected"]


@dataclass(frozen=True)
class Filters:
    """What the operator narrowed the list to; ``None`` means any."""

    plugin: str | None = None
    exception: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None

    def match(self, letter: DeadLetter) -> bool:
        if self.exception and self.exception.lower() not in letter.exception.lower():
            return False
        if self.since_ms is not None and letter.timestamp_ms < self.since_ms:
            return False
        return self.until_ms is None or letter.timestamp_ms <= self.until_ms


@dataclass(frozen=True)
class Found:
    """One letter as the browser lists it."""

    plugin: str
    letter: DeadLetter
    replayed: bool


@dataclass
class PluginLetters:
    """One plugin's dead-letter topic: how many letters, how many not yet replayed, by exception."""

    plugin: str
    group: str
    topic: str
    total: int = 0
    waiting: int = 0
    exceptions: Counter[str] = field(default_factory=Counter)


def browse(
    settings: Settings, groups: dict[str, str], filters: Filters, limit: int = 200
) -> tuple[list[PluginLetters], list[Found]]:
    """Counts for every plugin of ``groups`` (plugin -> group), and the newest ``limit`` matching letters."""
    transport = transport_for(settings.bootstrap_servers)
    topics = _topics(settings, transport)
    summaries: list[PluginLetters] = []
    matching: list[Found] = []
    for plugin, group in sorted(groups.items()):
        source = dlq_topic(group)
        summary = PluginLetters(plugin, group, source)
        summaries.append(summary)
        ledger = read_ledger(settings, group, transport=transport, partitions=topics.get(ledger_topic(group), 0))
        for letter in read_dead_letters(settings, source, transport=transport, partitions=topics.get(source, 0)):
            replayed = already_replayed(letter, ledger)
            summary.total += 1
            summary.waiting += not replayed
            summary.exceptions[letter.exception] += 1
            if filters.plugin in (None, plugin) and filters.match(letter):
                matching.append(Found(plugin, letter, replayed))
    newest = heapq.nlargest(limit, matching, key=lambda f: (f.letter.timestamp_ms, f.letter.ref))
    return summaries, newest


def find(settings: Settings, group: str, partition: int, offset: int) -> Found | None:
    """The letter at ``partition``/``offset`` of the group's dead-letter topic, if there is one."""
    transport = transport_for(settings.bootstrap_servers)
    topics = _topics(settings, transport)
    source = dlq_topic(group)
    ledger = read_ledger(settings, group, transport=transport, partitions=topics.get(ledger_topic(group), 0))
    for letter in read_dead_letters(settings, source, transport=transport, partitions=topics.get(source, 0)):
        if letter.partition == partition and letter.offset == offset:
            return Found("", letter, already_replayed(letter, ledger))
    return None


def replay_selected(settings: Settings, group: str, refs: list[str]) -> ReplayReport:
    """Send the chosen letters back to their group's first retry topic, each at most once."""
    return replay(settings, group, refs=set(refs))


def _topics(settings: Settings, transport: Transport) -> dict[str, int]:
    return transport.admin(admin_config(settings)).list_topics(timeout=10.0)
