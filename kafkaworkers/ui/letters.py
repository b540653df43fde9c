"""The dead-letter browser's data: each plugin's newest letters, filtered, with what was replayed.

A page reads only the newest :data:`DEPTH` offsets of each dead-letter partition (at most
:data:`MAX_DEPTH` when asked for more), whatever the topic holds: a load costs the same
after a month of failures as after one. Counts and filters are over what was read, and the
page says how many offsets before it were left unread.

Reading goes through :func:`kafkaworkers.dlq.read_dead_letters` and
:func:`kafkaworkers.dlq.read_ledger` (an assigned consumer that joins no group and commits
nothing), so browsing never disturbs a worker; replaying is :func:`kafkaworkers.dlq.replay`
narrowed to the letters the operator picked.
"""

from __future__ import annotations

import heapq
from collections import Counter
from contextlib import closing
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

__all__ = ["DEPTH", "MAX_DEPTH", "Filters", "Found", "PluginLetters", "browse", "find", "replay_selected"]

#: Offsets read back from the end of each dead-letter partition per page, unless asked otherwise.
DEPTH = 500
#: The most a page may be asked to read back per partition.
MAX_DEPTH = 10_000


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
    """One plugin's dead-letter topic as far back as it was read: how many letters, how many not
    yet replayed, by exception; how many offsets before them were not read, and the oldest time read."""

    plugin: str
    group: str
    topic: str
    total: int = 0
    waiting: int = 0
    exceptions: Counter[str] = field(default_factory=Counter)
    unread: int = 0
    oldest_ms: int | None = None


def browse(
    settings: Settings, groups: dict[str, str], filters: Filters, limit: int = 200, depth: int = DEPTH
) -> tuple[list[PluginLetters], list[Found]]:
    """Counts for every plugin of ``groups`` (plugin -> group) over the newest ``depth`` offsets of
    each dead-letter partition, and the newest ``limit`` matching letters among them."""
    transport = transport_for(settings.bootstrap_servers)
    topics = _topics(settings, transport)
    summaries: list[PluginLetters] = []
    matching: list[Found] = []
    depth = min(max(depth, 1), MAX_DEPTH)
    for plugin, group in sorted(groups.items()):
        source = dlq_topic(group)
        summary = PluginLetters(plugin, group, source)
        summaries.append(summary)
        ledger = read_ledger(settings, group, transport=transport, partitions=topics.get(ledger_topic(group), 0))
        unread: dict[int, int] = {}
        read = read_dead_letters(
            settings, source, transport=transport, partitions=topics.get(source, 0), newest=depth, unread=unread
        )
        for letter in read:
            replayed = already_replayed(letter, ledger)
            summary.total += 1
            summary.waiting += not replayed
            summary.exceptions[letter.exception] += 1
            if summary.oldest_ms is None or letter.timestamp_ms < summary.oldest_ms:
                summary.oldest_ms = letter.timestamp_ms
            if filters.plugin in (None, plugin) and filters.match(letter):
                matching.append(Found(plugin, letter, replayed))
        summary.unread = sum(unread.values())
    newest = heapq.nlargest(limit, matching, key=lambda f: (f.letter.timestamp_ms, f.letter.ref))
    return summaries, newest


def find(settings: Settings, group: str, partition: int, offset: int) -> Found | None:
    """The letter at ``partition``/``offset`` of the group's dead-letter topic, if there is one.

    Read from that offset on, stopping at the first record: a gap (a transaction marker, or
    compaction) there means no letter.
    """
    transport = transport_for(settings.bootstrap_servers)
    topics = _topics(settings, transport)
    source = dlq_topic(group)
    read = read_dead_letters(
        settings, source, transport=transport, partitions=topics.get(source, 0), start={partition: offset}
    )
    with closing(read):
        letter = next(read, None)
    if letter is None or letter.offset != offset:
        return None
    ledger = read_ledger(settings, group, transport=transport, partitions=topics.get(ledger_topic(group), 0))
    return Found("", letter, already_replayed(letter, ledger))


def replay_selected(settings: Settings, group: str, refs: list[str]) -> ReplayReport:
    """Send the chosen letters back to their group's first retry topic, each at most once."""
    return replay(settings, group, refs=set(refs))


def _topics(settings: Settings, transport: Transport) -> dict[str, int]:
    return transport.admin(admin_config(settings)).list_topics(timeout=10.0)
