"""Dead-letter tooling: ``kafkaworkers dlq list | show | replay``.

A plugin's dead letters sit in ``<group>-dlq`` (:func:`~kafkaworkers.retry.dlq_topic`),
each a copy of the failed message with ``kw-*`` headers naming where it came from and why
it failed (:func:`~kafkaworkers.retry.failure_headers`). These commands let an operator see
what died and, once the cause is fixed, send it back.

Reading
    A throwaway consumer is *assigned* every partition of the topic at its beginning and
    reads up to the high watermarks taken when it started, then stops: it never joins a
    group and never commits, so reading changes nothing and never competes with a worker.

Replaying
    A dead letter goes back to the group that failed it and to no other: it is re-published,
    with the same key and value, to the group's first retry topic (``<group>-retry-1``),
    which only that group's worker reads. It carries what the retry consumer needs to hand it
    to the handler of its original topic at once: the ``kw-original-*`` headers and a
    ``kw-due-at`` of now. It carries no ``kw-attempt``: a replay is a fresh start, so the
    handler sees ``ctx.attempt == 1`` and, should it fail again, the message goes through
    every retry of the plugin's policy before it is dead-lettered anew (with the same
    ``kw-original-*`` origin).

    A group without retry topics (a plugin whose ``RetryPolicy`` has no delays, or retries in
    place with ``mode="pause"``) has no topic of its own to replay into: replay says so and
    publishes nothing, rather than fall back to the shared topic behind the operator's back.
    ``--to original`` re-publishes on the topic the letter originally came from, on its
    original partition when that still exists, as a first attempt; that topic is shared, so
    every consumer group reading it (not only the plugin whose dead letter it was) handles
    the message again.

    Either way the message's own headers are kept (and ``kw-correlation-id``), every other
    ``kw-*`` failure header is dropped, and two audit headers are added: ``kw-replayed-from``
    (``<dlq topic>:<partition>:<offset>``) and ``kw-replayed-at`` (epoch milliseconds). A
    dead letter cut by the worker (``kw-value-truncated``) is never replayed, since its value
    is incomplete; the original is in the source topic at the offset its headers name.

The replay ledger: why a compacted topic
    Replaying twice must not deliver twice, so each replay is recorded in
    ``<group>-dlq-replayed``, a compacted topic keyed by ``<dlq topic>:<partition>:<offset>``
    whose value says when and where the letter went (JSON). It is read in full before
    replaying, created on first use, and written only after the replayed copies were
    acknowledged (idempotent producer, ``acks=all``, flush).

    It lives in Kafka because the dead letters do: every operator and host sees the same
    ledger, it is as durable and as access-controlled as the DLQ itself, and compaction keeps
    it at one record per replayed letter forever. A local file would be per machine; a
    consumer-group offset on the DLQ is a single position, which cannot record selective
    replays (``--filter-exception``, ``--since``) that leave holes behind. A Kafka
    transaction around the replays and the ledger would make replay exactly-once but would
    tie it to a transactional id and to ``read_committed`` consumers; the order used here is
    at-least-once instead: a crash after the replays were acknowledged and before the ledger
    was written replays those letters once more on the next run. A tombstone for a key in the
    ledger makes that letter eligible again.
"""

from __future__ import annotations

import heapq
import json
import time
import unicodedata
import uuid
from collections import Counter, defaultdict
from collections.abc import Collection, Generator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import click
from confluent_kafka import KafkaError, TopicPartition

from kafkaworkers.clikit import OneLineErrors, load_cli_settings, plugin_host, settings_options
from kafkaworkers.config import Settings, admin_config
from kafkaworkers.consumer import consumer_config, watermarks
from kafkaworkers.errors import BrokerUnavailable, KafkaWorkersError, PluginError
from kafkaworkers.headers import (
    H_CORRELATION_ID,
    H_DUE,
    H_EXCEPTION,
    H_ORIGINAL_OFFSET,
    H_ORIGINAL_PARTITION,
    H_ORIGINAL_TIMESTAMP,
    H_ORIGINAL_TOPIC,
    H_REPLAYED_AT,
    H_REPLAYED_FROM,
    H_TRUNCATED,
    PREFIX,
    number,
)
from kafkaworkers.plugins import PluginHost
from kafkaworkers.producer import create_producer, produce
from kafkaworkers.progress import progress
from kafkaworkers.retry import dlq_topic, retry_topic, retry_topics
from kafkaworkers.transports import Message, Transport, transport_for

__all__ = [
    "DeadLetter",
    "ReplayIncomplete",
    "ReplayReport",
    "ReplayTarget",
    "already_replayed",
    "dlq",
    "ledger_topic",
    "read_dead_letters",
    "read_ledger",
    "replay",
]

#: Where replayed letters go: the failing group's first retry topic, or the shared original topic.
ReplayTarget = Literal["group", "original"]
#: The headers that tell the retry consumer where a message came from, hence which handler runs it.
_ORIGIN = (H_ORIGINAL_TOPIC, H_ORIGINAL_PARTITION, H_ORIGINAL_OFFSET, H_ORIGINAL_TIMESTAMP)

#: Seconds a read may go without receiving anything before the broker is declared unreachable.
READ_TIMEOUT = 60.0
_METADATA_TIMEOUT = 10.0


def ledger_topic(group: str) -> str:
    """The compacted topic recording which of a group's dead letters were replayed."""
    return f"{group}-dlq-replayed"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record read from a dead-letter topic."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()

    @property
    def ref(self) -> str:
        """``<dlq topic>:<partition>:<offset>``: the letter's identity in the replay ledger."""
        return f"{self.topic}:{self.partition}:{self.offset}"

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name``; ``None`` when absent."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value if value is not None else b""
        return found

    @property
    def original_topic(self) -> str | None:
        """The topic the message was first consumed from, if the headers name a valid one."""
        raw = self.header(H_ORIGINAL_TOPIC)
        try:
            return raw.decode() if raw else None
        except UnicodeDecodeError:
            return None

    @property
    def original_partition(self) -> int | None:
        """The partition the message was first consumed from, if the headers name one."""
        raw = self.header(H_ORIGINAL_PARTITION)
        return number(raw) if raw else None

    @property
    def exception(self) -> str:
        """The failure's exception type as the worker recorded it (``?`` if it did not)."""
        raw = self.header(H_EXCEPTION)
        return raw.decode("utf-8", "backslashreplace") if raw else "?"

    @property
    def truncated(self) -> bool:
        """Whether the worker stored only the start of an oversized value."""
        return self.header(H_TRUNCATED) is not None

    def to_dict(self, max_value: int = 0) -> dict[str, Any]:
        """A JSON-ready view: bytes decoded as UTF-8, anything else backslash-escaped."""
        value = self.value
        cut = max_value > 0 and value is not None and len(value) > max_value
        return {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": _iso(self.timestamp_ms),
            "timestamp_ms": self.timestamp_ms,
            "key": _text(self.key),
            "headers": [[name, _text(v)] for name, v in self.headers],
            "value": _text(value[:max_value] if cut and value is not None else value),
            "value_bytes": None if value is None else len(value),
            "value_cut": cut,
        }


def read_dead_letters(
    settings: Settings,
    topic: str,
    *,
    transport: Transport | None = None,
    partitions: int | None = None,
    timeout: float = READ_TIMEOUT,
    newest: int | None = None,
    start: Mapping[int, int] | None = None,
    unread: dict[int, int] | None = None,
) -> Generator[DeadLetter]:
    """Every record of ``topic`` from its beginning to the high watermarks seen at the start.

    :param partitions: the topic's partition count, if known; looked up otherwise, and a
        missing topic yields nothing.
    :param newest: read only the last this many offsets of each partition (a page that shows
        the latest letters need not read a topic that grew for months).
    :param start: read only these partitions, each from this offset on.
    :param unread: filled with, per partition, how many offsets before the first one read were
        left unread (offsets, so transaction markers count too: at most that many letters).
    :raises BrokerUnavailable: the broker cannot be reached, or sent nothing for ``timeout`` seconds.
    """
    transport = transport or transport_for(settings.bootstrap_servers)
    if partitions is None:
        partitions = _list_topics(settings, transport).get(topic, 0)
    if not partitions:
        return
    config = consumer_config(
        settings,
        f"kafkaworkers-dlq-reader-{uuid.uuid4().hex}",
        {"enable.auto.commit": False, "enable.partition.eof": True, "auto.offset.reset": "earliest"},
    )
    consumer = transport.consumer(config)
    try:
        ends: dict[int, int] = {}
        firsts: dict[int, int] = {}
        for p in range(partitions) if start is None else sorted(p for p in start if 0 <= p < partitions):
            low, high = watermarks(consumer, TopicPartition(topic, p), _METADATA_TIMEOUT)
            first = low if start is None else max(low, start[p])
            if newest is not None:
                first = max(first, high - newest)
            if unread is not None:
                unread[p] = first - low
            if high > first:
                ends[p], firsts[p] = high, first
        if not ends:
            return
        consumer.assign([TopicPartition(topic, p, firsts[p]) for p in sorted(ends)])
        deadline = time.monotonic() + timeout
        while ends:
            if time.monotonic() > deadline:
                raise BrokerUnavailable(
                    f"reading {topic} stalled: nothing received for {timeout:.0f} s;"
                    f" partitions {sorted(ends)} not read to their end"
                )
            batch = consumer.consume(500, 0.5)
            if batch:
                deadline = time.monotonic() + timeout
            for msg in batch:
                err = msg.error()
                partition = msg.partition()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF and partition is not None:
                        ends.pop(partition, None)
                    elif err.fatal():
                        raise BrokerUnavailable(f"cannot read {topic}: {err.str()}")
                    continue
                source, offset = msg.topic(), msg.offset()
                if source is None or partition is None or offset is None:  # a record has all three
                    continue
                end = ends.get(partition)
                if end is None:
                    continue
                if offset < end:
                    yield _letter(msg, source, partition, offset)
                if offset >= end - 1:
                    del ends[partition]
            if not batch and ends:
                # Compaction and control records leave gaps: no record may sit at high - 1.
                for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                    if tp.offset >= ends[tp.partition]:
                        del ends[tp.partition]
    finally:
        consumer.close()


def _letter(msg: Message, topic: str, partition: int, offset: int) -> DeadLetter:
    return DeadLetter(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp_ms=msg.timestamp()[1],
        key=msg.key(),
        value=msg.value(),
        headers=tuple(msg.headers() or ()),
    )


# --- the replay ledger ---------------------------------------------------------------


def read_ledger(
    settings: Settings, group: str, *, transport: Transport | None = None, partitions: int | None = None
) -> dict[str, dict[str, Any]]:
    """The group's replayed letters: ref -> what the ledger recorded (latest record wins)."""
    ledger: dict[str, dict[str, Any]] = {}
    for record in read_dead_letters(settings, ledger_topic(group), transport=transport, partitions=partitions):
        if record.key is None:
            continue
        ref = record.key.decode("utf-8", "replace")
        if record.value is None:
            ledger.pop(ref, None)  # a tombstone: the letter may be replayed again
            continue
        try:
            entry = json.loads(record.value)
        except ValueError:
            entry = {}
        ledger[ref] = entry if isinstance(entry, dict) else {}
    return ledger


def already_replayed(letter: DeadLetter, ledger: dict[str, dict[str, Any]]) -> bool:
    """Whether the ledger (:func:`read_ledger`) records this letter as replayed."""
    entry = ledger.get(letter.ref)
    if entry is None:
        return False
    # A DLQ deleted and created again reuses offsets: a ledger entry of the old topic has
    # another timestamp and must not hide a new letter.
    recorded = entry.get("dlq_timestamp_ms")
    return recorded is None or recorded == letter.timestamp_ms


def _ensure_ledger(settings: Settings, transport: Transport, topics: dict[str, int], name: str) -> None:
    if name not in topics:
        # -1: the broker's default replication factor, like the worker's own topics.
        transport.admin(admin_config(settings)).create_topics([(name, 1, -1)], config={"cleanup.policy": "compact"})


# --- replay --------------------------------------------------------------------------


@dataclass
class ReplayReport:
    """What a replay found and did."""

    dlq_topic: str
    group: str
    to: ReplayTarget = "group"
    matched: int = 0
    replayed: int = 0
    already_replayed: int = 0
    unroutable: int = 0
    truncated: int = 0
    over_limit: int = 0
    failed: int = 0
    unrecorded: int = 0
    dry_run: bool = False
    planned: list[tuple[DeadLetter, str]] = field(default_factory=list)

    def counts(self) -> dict[str, Any]:
        return {
            "dlq_topic": self.dlq_topic,
            "to": self.to,
            "dry_run": self.dry_run,
            "matched": self.matched,
            "replayed": self.replayed,
            "would_replay": len(self.planned) if self.dry_run else 0,
            "skipped_already_replayed": self.already_replayed,
            "skipped_unroutable": self.unroutable,
            "skipped_truncated": self.truncated,
            "skipped_over_limit": self.over_limit,
            "failed": self.failed,
            "unrecorded": self.unrecorded,
        }


def replay(
    settings: Settings,
    group: str,
    *,
    to: ReplayTarget = "group",
    exception: str | None = None,
    since_ms: int | None = None,
    limit: int | None = None,
    refs: Collection[str] | None = None,
    dry_run: bool = False,
    transport: Transport | None = None,
) -> ReplayReport:
    """Re-publish a group's dead letters, each at most once, for that group alone by default.

    :param to: ``"group"``: into the group's first retry topic, handled again by that group
        only, as a fresh start of its retries; ``"original"``: back on each letter's original
        topic, handled again by every group that reads it.
    :param exception: only letters whose ``kw-exception`` is this type (full or last dotted name).
    :param since_ms: only letters dead-lettered at or after this time (epoch milliseconds).
    :param limit: replay at most this many.
    :param refs: only these letters, by :attr:`DeadLetter.ref` (the console's selection).
    :param dry_run: find and count only; publish and record nothing.
    :raises KafkaWorkersError: the group's dead-letter topic, or (``to="group"``) its first
        retry topic, does not exist.
    """
    transport = transport or transport_for(settings.bootstrap_servers)
    topics = _list_topics(settings, transport)
    source = dlq_topic(group)
    if source not in topics:
        raise KafkaWorkersError(
            f"dead-letter topic {source} does not exist: group {group} has dead-lettered nothing"
            " (if the plugin runs under another group, pass its --group-id)"
        )
    retry = retry_topic(group, 1)
    if to == "group" and retry not in topics:
        raise KafkaWorkersError(
            f"group {group} has no retry topic {retry} to replay into (its plugin retries nothing, or its"
            " topics were never created); pass --to original to re-publish on the original topics,"
            " where every group reading them handles the letters again"
        )
    ledger_name = ledger_topic(group)
    report = ReplayReport(source, group, to, dry_run=dry_run)
    ledger = read_ledger(settings, group, transport=transport, partitions=topics.get(ledger_name, 0))
    for letter in read_dead_letters(settings, source, transport=transport, partitions=topics[source]):
        if exception is not None and not _exception_matches(letter.exception, exception):
            continue
        if since_ms is not None and letter.timestamp_ms < since_ms:
            continue
        if refs is not None and letter.ref not in refs:
            continue
        report.matched += 1
        origin = letter.original_topic
        if already_replayed(letter, ledger):
            report.already_replayed += 1
        elif origin is None or (to == "original" and origin not in topics):
            # Without a valid origin the retry consumer would find no handler either.
            report.unroutable += 1
        elif letter.truncated:
            report.truncated += 1
        elif limit is not None and len(report.planned) >= limit:
            report.over_limit += 1
        else:
            report.planned.append((letter, retry if to == "group" else origin))
    if dry_run or not report.planned:
        return report

    _ensure_ledger(settings, transport, topics, ledger_name)
    producer = create_producer(settings, transport=transport)
    acked: list[tuple[DeadLetter, str]] = []
    failed: list[str] = []
    now_ms = int(time.time() * 1000)
    with progress(report.planned, f"replaying {source}", length=len(report.planned)) as planned:
        for letter, target in planned:
            partition = -1  # into a retry topic by key, as the worker's own retries go
            if to == "original":
                partition = letter.original_partition if letter.original_partition is not None else -1
                if partition >= topics[target]:
                    partition = -1

            def delivered(err: Any, msg: Any, letter: DeadLetter = letter) -> None:
                if err is None:
                    acked.append((letter, f"{msg.topic()}:{msg.partition()}:{msg.offset()}"))
                else:
                    failed.append(err.str())

            headers = replay_headers(letter, now_ms, into_retry=to == "group")
            produce(producer, target, letter.value, letter.key, headers, delivered, partition)
    _flush(producer)
    report.replayed = len(acked)
    report.failed = len(report.planned) - len(acked)

    recorded: list[str] = []
    ledger_failed: list[str] = []

    def noted(err: Any, msg: Any) -> None:
        if err is None:
            recorded.append(msg.key())
        else:
            ledger_failed.append(err.str())

    for letter, where in acked:
        entry = {"replayed_at_ms": now_ms, "to": where, "dlq_timestamp_ms": letter.timestamp_ms,
                 "exception": letter.exception}  # fmt: skip
        produce(producer, ledger_name, json.dumps(entry).encode(), letter.ref.encode(), None, noted)
    _flush(producer)
    report.unrecorded = len(acked) - len(recorded)
    if report.failed or report.unrecorded:
        reasons = "; ".join(sorted(set(failed + ledger_failed))[:3]) or "not acknowledged in time"
        raise ReplayIncomplete(report, reasons)
    return report


class ReplayIncomplete(BrokerUnavailable):
    """Some replayed copies, or their ledger records, were not acknowledged."""

    def __init__(self, report: ReplayReport, reasons: str) -> None:
        super().__init__(
            f"replay of {report.dlq_topic} incomplete: {report.replayed} replayed, {report.failed} not delivered,"
            f" {report.unrecorded} replayed but not recorded in {ledger_topic(report.group)} ({reasons});"
            " run the replay again once the broker is healthy (unrecorded letters will be replayed again)"
        )
        self.report = report


def replay_headers(letter: DeadLetter, now_ms: int, *, into_retry: bool) -> list[tuple[str, bytes | None]]:
    """The replayed copy's headers: the message's own, its correlation id, and the audit pair.

    Into a retry topic also its origin and a due time of now, so that the retry consumer
    hands it at once to the handler of its original topic; no attempt count, so that it
    starts its retries afresh.
    """
    kept = [(k, v) for k, v in letter.headers if not k.startswith(PREFIX) or k == H_CORRELATION_ID]
    if into_retry:
        kept += [(name, value) for name in _ORIGIN if (value := letter.header(name)) is not None]
        kept.append((H_DUE, str(now_ms).encode()))
    return [*kept, (H_REPLAYED_FROM, letter.ref.encode()), (H_REPLAYED_AT, str(now_ms).encode())]


def _exception_matches(recorded: str, wanted: str) -> bool:
    return recorded == wanted or recorded.rsplit(".", 1)[-1] == wanted


def _flush(producer: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while producer.flush(1.0) > 0 and time.monotonic() < deadline:
        pass


# --- helpers -------------------------------------------------------------------------


def _list_topics(settings: Settings, transport: Transport) -> dict[str, int]:
    return transport.admin(admin_config(settings)).list_topics(timeout=_METADATA_TIMEOUT)


def _text(raw: bytes | None) -> str | None:
    """Bytes as text: UTF-8 where valid, ``\\xNN`` escapes where not."""
    return None if raw is None else raw.decode("utf-8", "backslashreplace")


def _printable(raw: bytes | None, limit: int = 0) -> str:
    """Bytes safe to print on a terminal: also control and format characters escaped."""
    if raw is None:
        return "(null)"
    text = (raw[:limit] if limit > 0 else raw).decode("utf-8", "backslashreplace")
    out = "".join(
        ch if ch == " " or unicodedata.category(ch)[0] not in "CZ" else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )
    if limit > 0 and len(raw) > limit:
        out += f"… ({len(raw)} bytes, first {limit} shown)"
    return out


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# click 8.5 made ParamType generic; subscribing it would break the click 8.1-8.4 that
# pyproject allows, so the converted type is left to convert()'s annotation.
class _Time(click.ParamType):  # type: ignore[type-arg]
    """ISO-8601 (naive means UTC) or epoch milliseconds."""

    name = "TIME"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        if text.isdigit():
            return int(text)
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            self.fail(f"{text!r} is neither ISO-8601 (2024-05-01T12:00:00Z) nor epoch milliseconds", param, ctx)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return int(moment.timestamp() * 1000)


def _groups(host: PluginHost, settings: Settings, name: str | None) -> list[tuple[str, str]]:
    """(plugin, consumer group) pairs the command is about: the named plugin, or all of them."""
    plugins = [p.name for p in host.select([name])] if name is not None else sorted(host.plugins)
    if not plugins:
        raise KafkaWorkersError("no plugins are installed; pip install one (see `kafkaworkers plugins`)")
    if settings.group_id and len(plugins) > 1:
        raise PluginError("--group-id names one group; pass --plugin NAME as well")
    return [(plugin, settings.group_for(plugin)) for plugin in plugins]


_plugin_option = click.option("--plugin", "-p", "plugin", help="Only this plugin's dead letters.")
_plugin_required = click.option("--plugin", "-p", "plugin", required=True, help="The plugin whose dead letters to use.")
_group_option = click.option("--group-id", help="The plugin's consumer group, if it runs with --group-id.")
_format_option = click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="text for people, json for scripts.",
)


# --- commands ------------------------------------------------------------------------


@click.group("dlq", cls=OneLineErrors)
def dlq() -> None:
    """Inspect and replay the plugins' dead-letter topics."""


@dlq.command("list")
@_plugin_option
@_group_option
@_format_option
@settings_options
@click.pass_context
def dlq_list(
    ctx: click.Context, /, plugin: str | None, group_id: str | None, fmt: str, config_file: str | None, **overrides: Any
) -> None:
    """Count dead letters per plugin and original topic: oldest, newest, and by exception type."""
    settings = load_cli_settings(config_file, group_id=group_id, **overrides)
    transport = transport_for(settings.bootstrap_servers)
    topics = _list_topics(settings, transport)
    rows: list[dict[str, Any]] = []
    for name, group in _groups(plugin_host(ctx), settings, plugin):
        source = dlq_topic(group)
        ledger = read_ledger(settings, group, transport=transport, partitions=topics.get(ledger_topic(group), 0))
        per_topic: dict[str, dict[str, Any]] = defaultdict(
            lambda: {"count": 0, "oldest_ms": None, "newest_ms": None, "exceptions": Counter()}
        )
        total = replayed = 0
        for letter in read_dead_letters(settings, source, transport=transport, partitions=topics.get(source, 0)):
            total += 1
            replayed += already_replayed(letter, ledger)
            row = per_topic[letter.original_topic or _text(letter.header(H_ORIGINAL_TOPIC)) or "?"]
            row["count"] += 1
            row["exceptions"][letter.exception] += 1
            ts = letter.timestamp_ms
            row["oldest_ms"] = ts if row["oldest_ms"] is None else min(row["oldest_ms"], ts)
            row["newest_ms"] = ts if row["newest_ms"] is None else max(row["newest_ms"], ts)
        rows.append(
            {
                "plugin": name,
                "group": group,
                "dlq_topic": source,
                "exists": source in topics,
                "dead": total,
                "replayed": replayed,
                "topics": [
                    {
                        "topic": topic,
                        "dead": row["count"],
                        "oldest": _iso(row["oldest_ms"]),
                        "newest": _iso(row["newest_ms"]),
                        "exceptions": dict(row["exceptions"].most_common()),
                    }
                    for topic, row in sorted(per_topic.items())
                ],
            }
        )
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        if not row["dead"]:
            missing = "" if row["exists"] else " (the topic does not exist yet)"
            click.echo(f"{row['plugin']}: no dead letters in {row['dlq_topic']}{missing}")
            continue
        click.echo(f"{row['plugin']}: {row['dead']} dead letter(s) in {row['dlq_topic']}, {row['replayed']} replayed")
        for t in row["topics"]:
            click.echo(f"  {_printable(t['topic'].encode())}: {t['dead']}, oldest {t['oldest']}, newest {t['newest']}")
            for exc, count in t["exceptions"].items():
                click.echo(f"    {count:>8}  {_printable(exc.encode())}")


@dlq.command("show")
@_plugin_required
@_group_option
@click.option("--limit", "-n", type=click.IntRange(1), default=20, show_default=True, help="How many, oldest first.")
@click.option("--max-bytes", type=click.IntRange(0), default=4096, show_default=True,
              help="Cut each value after this many bytes; 0 shows it whole.")  # fmt: skip
@_format_option
@settings_options
@click.pass_context
def dlq_show(
    ctx: click.Context,
    /,
    plugin: str | None,
    group_id: str | None,
    limit: int,
    max_bytes: int,
    fmt: str,
    config_file: str | None,
    **overrides: Any,
) -> None:
    """Print dead letters with their headers and values (non-UTF-8 bytes escaped)."""
    settings = load_cli_settings(config_file, group_id=group_id, **overrides)
    [(_, group)] = _groups(plugin_host(ctx), settings, plugin)
    transport = transport_for(settings.bootstrap_servers)
    topics = _list_topics(settings, transport)
    source = dlq_topic(group)
    ledger = read_ledger(settings, group, transport=transport, partitions=topics.get(ledger_topic(group), 0))
    letters = heapq.nsmallest(
        limit,
        read_dead_letters(settings, source, transport=transport, partitions=topics.get(source, 0)),
        key=lambda d: (d.timestamp_ms, d.partition, d.offset),
    )
    if fmt == "json":
        click.echo(
            json.dumps([{**d.to_dict(max_bytes), "replayed": already_replayed(d, ledger)} for d in letters], indent=2)
        )
        return
    if not letters:
        click.echo(f"no dead letters in {source}")
    for d in letters:
        mark = "  (replayed)" if already_replayed(d, ledger) else ""
        click.echo(f"{d.ref}  {_iso(d.timestamp_ms)}  key={_printable(d.key, 256)}{mark}")
        for name, value in d.headers:
            click.echo(f"  {_printable(name.encode())}: {_printable(value, 1024)}")
        size = "null" if d.value is None else f"{len(d.value)} bytes"
        click.echo(f"  value ({size}): {_printable(d.value, max_bytes)}")


@dlq.command("replay")
@_plugin_required
@_group_option
@click.option("--to", "to", type=click.Choice(["group", "original"]), default="group", show_default=True,
              help="group: into the plugin's first retry topic, handled again by its group alone;"
                   " original: back on the original topic, handled again by every group reading it.")  # fmt: skip
@click.option("--filter-exception", "exception", metavar="TYPE",
              help="Only letters that failed with this exception type (full or last dotted name).")  # fmt: skip
@click.option(
    "--since", "since_ms", type=_Time(), help="Only letters dead-lettered at or after TIME (ISO-8601 or epoch ms)."
)
@click.option("--limit", "-n", type=click.IntRange(1), help="Replay at most this many.")
@click.option("--dry-run", is_flag=True, help="Show what would be replayed; publish nothing.")
@_format_option
@settings_options
@click.pass_context
def dlq_replay(
    ctx: click.Context,
    /,
    plugin: str | None,
    group_id: str | None,
    to: ReplayTarget,
    exception: str | None,
    since_ms: int | None,
    limit: int | None,
    dry_run: bool,
    fmt: str,
    config_file: str | None,
    **overrides: Any,
) -> None:
    """Re-publish dead letters for the plugin to handle again as first attempts, each at most once."""
    settings = load_cli_settings(config_file, group_id=group_id, **overrides)
    host = plugin_host(ctx)
    [(name, group)] = _groups(host, settings, plugin)
    policy = host.plugins[name].retry
    if to == "group" and not retry_topics(group, policy):
        raise KafkaWorkersError(
            f"plugin {name} has no retry topics (its RetryPolicy retries nothing, or in place: mode='pause'),"
            f" so group {group} has none to replay into; pass --to original to re-publish on the original"
            " topics, where every group reading them handles the letters again"
        )
    try:
        report = replay(settings, group, to=to, exception=exception, since_ms=since_ms, limit=limit, dry_run=dry_run)
    except ReplayIncomplete as exc:
        _print_report(exc.report, fmt)
        raise
    _print_report(report, fmt)


def _print_report(report: ReplayReport, fmt: str) -> None:
    counts = report.counts()
    if fmt == "json":
        if report.dry_run:
            counts["planned"] = [
                {"from": d.ref, "to": target, "exception": d.exception} for d, target in report.planned
            ]
        click.echo(json.dumps(counts, indent=2))
        return
    if report.dry_run:
        for letter, target in report.planned:
            click.echo(f"would replay {letter.ref} -> {_printable(target.encode())}  ({letter.exception})")
    done = f"{len(report.planned)} would be replayed" if report.dry_run else f"{report.replayed} replayed"
    click.echo(
        f"{report.dlq_topic}: {report.matched} matched, {done}, {report.already_replayed} skipped as already replayed,"
        f" {report.unroutable} unroutable, {report.truncated} truncated, {report.over_limit} over --limit"
        + (f", {report.failed} failed" if report.failed else "")
    )
