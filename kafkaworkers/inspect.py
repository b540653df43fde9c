"""Live inspection of running plugins: ``kafkaworkers inspect workers | lag | retries``.

Everything here is read from the cluster, never from the workers' memory, so it works from
any host that reaches the broker:

- **workers**: every member of every plugin's consumer groups (its own group and the
  ``<group>-retry`` group that reads its retry topics), as the group coordinator describes
  them (the Admin API's ``DescribeGroups``). A kafkaworkers consumer's ``client.id`` is
  ``kafkaworkers/<host>/<pid>/<process index>`` (:func:`client_id`), so a member tells which
  host, process and ``--processes`` slot it is, whatever address the broker sees it from.
- **lag**: per group, topic and partition, the committed offset, the end (high watermark)
  and the difference.
- **retries**: per retry topic and partition, how many messages the retry group has not
  committed yet, and when the next and the last of them are due (their ``kw-due-at``
  header): the backlog is read, from the committed offset to the end, by a consumer that
  joins no group and commits nothing.

The functions return msgspec structs, so ``--format json`` is their JSON encoding and the
web console uses the same data.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import click
import msgspec
from confluent_kafka import TopicPartition

from kafkaworkers.api import Plugin
from kafkaworkers.clikit import OneLineErrors, load_cli_settings, plugin_host, settings_options
from kafkaworkers.config import Settings, admin_config
from kafkaworkers.consumer import consumer_config, watermarks
from kafkaworkers.errors import BrokerUnavailable, KafkaWorkersError
from kafkaworkers.headers import H_DUE, number, parse_headers
from kafkaworkers.retry import retry_topics
from kafkaworkers.supervisor import ENV_INDEX
from kafkaworkers.transports import Consumer, Transport, transport_for

__all__ = [
    "Identity",
    "Lag",
    "Member",
    "Partition",
    "Waiting",
    "client_id",
    "inspect",
    "lag",
    "parse_client_id",
    "plugin_groups",
    "retries",
    "this_process",
    "with_states",
    "workers",
]

#: The first part of every kafkaworkers consumer's ``client.id``.
CLIENT_PREFIX = "kafkaworkers"
#: Seconds a backlog read may go without receiving anything before the broker is declared unreachable.
READ_TIMEOUT = 30.0


class Partition(msgspec.Struct, frozen=True, order=True):
    """One topic partition."""

    topic: str
    partition: int


class Identity(msgspec.Struct, frozen=True):
    """Which worker process a client belongs to.

    :param process: the index of the process under ``run --processes`` (0 when run alone).
    """

    host: str
    pid: int
    process: int

    @property
    def worker(self) -> str:
        """The worker id ``control --worker`` takes: ``<host>/<pid>``."""
        return f"{self.host}/{self.pid}"


def this_process() -> Identity:
    """This process's identity: host name, pid and supervisor's process index."""
    return Identity(socket.gethostname(), os.getpid(), int(os.environ.get(ENV_INDEX) or 0))


def client_id(identity: Identity | None = None) -> str:
    """The ``client.id`` of a worker's consumers: ``kafkaworkers/<host>/<pid>/<process index>``."""
    who = identity or this_process()
    return f"{CLIENT_PREFIX}/{who.host}/{who.pid}/{who.process}"


def parse_client_id(text: str) -> Identity | None:
    """The identity a kafkaworkers ``client.id`` carries; None for any other client."""
    parts = text.split("/")
    if len(parts) != 4 or parts[0] != CLIENT_PREFIX or not parts[2].isdigit() or not parts[3].isdigit():
        return None
    return Identity(parts[1], int(parts[2]), int(parts[3]))


class Member(msgspec.Struct, kw_only=True):
    """One member of a plugin's consumer group.

    :param host: the host the member runs on, from its client id; for a client that is not
        a kafkaworkers worker, the address the broker sees.
    :param address: the address the broker sees the member connect from.
    :param worker: the worker id (``<host>/<pid>``) that ``control --worker`` takes.
    :param state: ``running`` or ``paused``, as the worker answered a ping; None when not asked.
    :param reason: why the worker is paused.
    """

    group: str
    plugin: str
    member_id: str
    client_id: str
    host: str
    address: str
    pid: int | None
    process: int | None
    worker: str | None
    partitions: list[Partition]
    state: str | None = None
    reason: str | None = None


class Lag(msgspec.Struct, kw_only=True):
    """How far a group is behind on one partition.

    :param committed: the group's committed offset; None when it has committed none (it
        starts from the beginning, so the lag counts from the first offset kept).
    :param end: the partition's end (high watermark): the offset the next message gets.
    """

    group: str
    plugin: str
    topic: str
    partition: int
    committed: int | None
    end: int
    lag: int


class Waiting(msgspec.Struct, kw_only=True):
    """What waits in one retry partition for the retry group.

    :param waiting: messages after the retry group's committed offset.
    :param next_due_ms: the earliest due time among them (epoch milliseconds); None when none waits.
    :param last_due_ms: the latest due time among them.
    """

    group: str
    plugin: str
    topic: str
    partition: int
    waiting: int
    next_due_ms: int | None
    last_due_ms: int | None


def retry_group(group: str) -> str:
    """The group a plugin's retry topics are read in (see :class:`kafkaworkers.worker.PluginRunner`)."""
    return f"{group}-retry"


def plugin_groups(settings: Settings, plugins: Iterable[Plugin[Any]]) -> list[tuple[str, str, list[str]]]:
    """(plugin, group, topics) of every group the plugins' workers consume in: each plugin's
    own group with its declared topics, and its retry group with its retry topics."""
    groups = []
    for plugin in plugins:
        group = settings.group_for(plugin.name)
        groups.append((plugin.name, group, sorted(plugin.subscriptions)))
        retries = retry_topics(group, plugin.retry)
        if retries:
            groups.append((plugin.name, retry_group(group), retries))
    return groups


def workers(settings: Settings, plugins: Iterable[Plugin[Any]], *, transport: Transport | None = None) -> list[Member]:
    """Every member of every plugin's groups, retry groups included, with what it is assigned."""
    transport = transport or transport_for(settings.bootstrap_servers)
    groups = plugin_groups(settings, plugins)
    described = transport.admin(admin_config(settings)).describe_groups([group for _, group, _ in groups])
    members = []
    for plugin, group, _ in groups:
        for member in described.get(group, []):
            who = parse_client_id(member.client_id)
            members.append(
                Member(
                    group=group,
                    plugin=plugin,
                    member_id=member.member_id,
                    client_id=member.client_id,
                    host=who.host if who else member.host.lstrip("/"),
                    address=member.host.lstrip("/"),
                    pid=who.pid if who else None,
                    process=who.process if who else None,
                    worker=who.worker if who else None,
                    partitions=[Partition(topic, partition) for topic, partition in member.partitions],
                )
            )
    return members


def with_states(
    settings: Settings, members: list[Member], timeout: float, *, transport: Transport | None = None
) -> list[Member]:
    """Fill in each member's state and reason from its worker's answer to a control-topic ping
    (:mod:`kafkaworkers.control`); a member whose worker did not answer keeps None."""
    from kafkaworkers.control import ping_all  # control builds on this module

    answers = ping_all(settings, sorted({m.plugin for m in members}), timeout, transport=transport)
    for member in members:
        reply = next((r for r in answers.get(member.plugin, []) if r.worker == member.worker), None)
        if reply is not None:
            member.state, member.reason = reply.state, reply.reason
    return members


def lag(settings: Settings, plugins: Iterable[Plugin[Any]], *, transport: Transport | None = None) -> list[Lag]:
    """Committed offset, end and lag of every partition every plugin's groups read."""
    transport = transport or transport_for(settings.bootstrap_servers)
    present = transport.admin(admin_config(settings)).list_topics()
    rows = []
    for plugin, group, topics in plugin_groups(settings, plugins):
        tps = [TopicPartition(t, p) for t in topics for p in range(present.get(t, 0))]
        if not tps:
            continue
        for tp, committed, low, high in _offsets(settings, transport, group, tps):
            start = committed if committed is not None else low
            rows.append(
                Lag(
                    group=group,
                    plugin=plugin,
                    topic=tp.topic,
                    partition=tp.partition,
                    committed=committed,
                    end=high,
                    lag=max(high - start, 0),
                )
            )
    return rows


def retries(
    settings: Settings,
    plugins: Iterable[Plugin[Any]],
    *,
    transport: Transport | None = None,
    timeout: float = READ_TIMEOUT,
    sample: int | None = None,
) -> list[Waiting]:
    """Per retry partition of every plugin: how many messages wait for the retry group, and
    when the next and the last of them are due.

    :param sample: read only the first and the last this many waiting messages of each
        partition for the due times (what a page reloaded every few seconds can afford with a
        backlog of millions). A retry topic's messages are appended a fixed delay from their
        failure, so the due times grow along a partition but for the policy's jitter: the
        earliest is among the first, the latest among the last.
    """
    transport = transport or transport_for(settings.bootstrap_servers)
    present = transport.admin(admin_config(settings)).list_topics()
    rows = []
    for plugin in plugins:
        group = retry_group(settings.group_for(plugin.name))
        topics = retry_topics(settings.group_for(plugin.name), plugin.retry)
        tps = [TopicPartition(t, p) for t in topics for p in range(present.get(t, 0))]
        if not tps:
            continue
        ranges = {}
        for tp, committed, low, high in _offsets(settings, transport, group, tps):
            start = max(committed if committed is not None else low, low)
            ranges[(tp.topic, tp.partition)] = (start, high)
        dues = _sampled_due_times(settings, transport, {tp: r for tp, r in ranges.items() if r[1] > r[0]}, timeout,
                                  sample)  # fmt: skip
        for (topic, partition), (start, end) in ranges.items():
            due = dues.get((topic, partition))
            rows.append(
                Waiting(
                    group=group,
                    plugin=plugin.name,
                    topic=topic,
                    partition=partition,
                    waiting=end - start,
                    next_due_ms=due[0] if due else None,
                    last_due_ms=due[1] if due else None,
                )
            )
    return rows


def _offsets(
    settings: Settings, transport: Transport, group: str, tps: list[TopicPartition]
) -> Iterator[tuple[TopicPartition, int | None, int, int]]:
    """(partition, the group's committed offset or None, low, high) of each partition.

    The consumer carries the group's id only to ask for its committed offsets: it never
    subscribes, so it never joins the group nor commits."""
    consumer = transport.consumer(consumer_config(settings, group, {"enable.auto.commit": False}))
    try:
        committed = consumer.committed(tps, timeout=10.0)
        for tp in committed:
            low, high = watermarks(consumer, TopicPartition(tp.topic, tp.partition))
            yield tp, tp.offset if tp.offset >= 0 else None, low, high
    finally:
        consumer.close()


def _sampled_due_times(
    settings: Settings,
    transport: Transport,
    ranges: dict[tuple[str, int], tuple[int, int]],
    timeout: float,
    sample: int | None,
) -> dict[tuple[str, int], tuple[int, int]]:
    """:func:`_due_times` of each range, or of its first and last ``sample`` offsets only."""
    if sample is None:
        return _due_times(settings, transport, ranges, timeout)
    heads = {tp: (start, min(end, start + sample)) for tp, (start, end) in ranges.items()}
    tails = {tp: (max(start + sample, end - sample), end) for tp, (start, end) in ranges.items()
             if end - start > sample}  # fmt: skip
    dues = _due_times(settings, transport, heads, timeout)
    for tp, (first, last) in _due_times(settings, transport, tails, timeout).items():
        head = dues.get(tp)
        dues[tp] = (first, last) if head is None else (min(head[0], first), max(head[1], last))
    return dues


def _due_times(
    settings: Settings, transport: Transport, ranges: dict[tuple[str, int], tuple[int, int]], timeout: float
) -> dict[tuple[str, int], tuple[int, int]]:
    """The earliest and latest ``kw-due-at`` of the messages in each [start, end) range."""
    if not ranges:
        return {}
    config = consumer_config(settings, f"kafkaworkers-inspect-{uuid.uuid4().hex}", {"enable.auto.commit": False})
    consumer: Consumer = transport.consumer(config)
    dues: dict[tuple[str, int], tuple[int, int]] = {}
    left = {tp: end for tp, (_, end) in ranges.items()}
    try:
        consumer.assign([TopicPartition(t, p, start) for (t, p), (start, _) in ranges.items()])
        deadline = time.monotonic() + timeout
        while left:
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"reading the retry backlog stalled: {sorted(left)} not read to their end")
            batch = consumer.consume(500, 0.5)
            if batch:
                deadline = time.monotonic() + timeout
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.fatal():
                        raise BrokerUnavailable(f"cannot read the retry topics: {err.str()}")
                    continue
                topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                assert topic is not None and partition is not None and offset is not None
                key = (topic, partition)
                end = left.get(key)
                if end is None:
                    continue
                due = number(parse_headers(msg.headers()).get(H_DUE))
                if offset < end and due:
                    first, last = dues.get(key, (due, due))
                    dues[key] = (min(first, due), max(last, due))
                if offset >= end - 1:
                    del left[key]
            if not batch and left:
                # Transaction markers take offsets no record is at: the position says a partition is done.
                for tp in consumer.position([TopicPartition(t, p) for t, p in left]):
                    if tp.offset >= left[(tp.topic, tp.partition)]:
                        del left[(tp.topic, tp.partition)]
    finally:
        consumer.close()
    return dues


# --- presentation ----------------------------------------------------------------------


def partitions_text(partitions: Sequence[Partition]) -> str:
    """Partitions grouped by topic: ``orders[0,2] orders-retry-1[1]``."""
    by_topic: dict[str, list[int]] = defaultdict(list)
    for p in sorted(partitions):
        by_topic[p.topic].append(p.partition)
    return " ".join(f"{topic}[{','.join(map(str, numbers))}]" for topic, numbers in by_topic.items()) or "-"


def table(rows: list[list[str]], numeric: Iterable[int] = ()) -> str:
    """Rows as columns two spaces apart; the ``numeric`` columns right-aligned."""
    right = set(numeric)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _due_text(ms: int | None, now: float) -> str:
    if ms is None:
        return "-"
    moment = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    wait = ms / 1000 - now
    return f"{moment} ({'in ' + _span(wait) if wait > 0 else 'due'})"


def _span(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def echo_json(rows: Any) -> None:
    """Rows of structs as indented JSON on stdout."""
    click.echo(msgspec.json.format(msgspec.json.encode(rows), indent=2).decode())


# --- commands ----------------------------------------------------------------------------


_plugins_option = click.option(
    "--plugin", "-p", "names", multiple=True, help="Only this plugin (repeatable) [default: every installed plugin]."
)
_group_option = click.option("--group-id", help="The plugin's consumer group, if it runs with --group-id.")
_format_option = click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
    help="table for people, json for scripts.",
)  # fmt: skip


def _selected(ctx: click.Context, names: tuple[str, ...]) -> list[Plugin[Any]]:
    host = plugin_host(ctx)
    plugins = host.select(names) if names else list(host.plugins.values())
    if not plugins:
        raise KafkaWorkersError("no plugins are installed; pip install one (see `kafkaworkers plugins`)")
    return plugins


def _report(
    ctx: click.Context,
    names: tuple[str, ...],
    settings: Settings,
    fmt: str,
    read: Callable[[Settings, list[Plugin[Any]]], Sequence[Any]],
    none: str,
) -> Sequence[Any]:
    """Read the rows for the selected plugins; print them as JSON, or say there are none, and
    return what is left for the table (nothing when printed already)."""
    rows = read(settings, _selected(ctx, names))
    if fmt == "json":
        echo_json(rows)
        return []
    if not rows:
        click.echo(none)
    return rows


@click.group("inspect", cls=OneLineErrors)
def inspect() -> None:
    """See what runs: the workers in each plugin's groups, their lag, what waits in the retry topics.

    \b
    Examples:
      kafkaworkers inspect workers                   # every member of every installed plugin's groups
      kafkaworkers inspect lag --plugin fraude       # committed, end and lag per partition
      kafkaworkers inspect retries --format json     # retry backlogs and when they are due
    """


@inspect.command("workers")
@_plugins_option
@_group_option
@click.option(
    "--ping-timeout",
    type=click.FloatRange(0),
    default=1.0,
    show_default=True,
    help="Seconds to wait for the workers' answers to a ping (their state, and why paused); 0 asks nothing.",
)
@_format_option
@settings_options
@click.pass_context
def inspect_workers(
    ctx: click.Context,
    /,
    names: tuple[str, ...],
    group_id: str | None,
    ping_timeout: float,
    fmt: str,
    config_file: str | None,
    **overrides: Any,
) -> None:
    """List every member of the plugins' groups (retry groups too): host, process, state, partitions.

    The state (running, or paused and why) is what each worker answers to a ping through the
    control topic; a member whose worker does not answer shows `-`.

    \b
    Examples:
      kafkaworkers inspect workers
      kafkaworkers inspect workers -p fraude -p reserva --format json
    """
    settings = load_cli_settings(config_file, group_id=group_id, **overrides)

    def read(settings: Settings, plugins: list[Plugin[Any]]) -> list[Member]:
        members = workers(settings, plugins)
        return with_states(settings, members, ping_timeout) if members and ping_timeout else members

    rows: Sequence[Member] = _report(ctx, names, settings, fmt, read, "no worker is in any of the plugins' groups")
    if not rows:
        return
    lines = [["GROUP", "PLUGIN", "HOST", "PID", "PROCESS", "STATE", "PARTITIONS", "CLIENT ID"]]
    for m in rows:
        state = (m.reason if m.state == "paused" else m.state) or "-"
        pid = "-" if m.pid is None else str(m.pid)
        process = "-" if m.process is None else str(m.process)
        lines.append([m.group, m.plugin, m.host, pid, process, state, partitions_text(m.partitions), m.client_id])
    click.echo(table(lines))


@inspect.command("lag")
@_plugins_option
@_group_option
@_format_option
@settings_options
@click.pass_context
def inspect_lag(
    ctx: click.Context,
    /,
    names: tuple[str, ...],
    group_id: str | None,
    fmt: str,
    config_file: str | None,
    **overrides: Any,
) -> None:
    """Show per group, topic and partition the committed offset, the end offset and the lag.

    A group that has committed nothing on a partition shows `-` and a lag from the
    partition's first offset (it starts from the beginning).

    \b
    Examples:
      kafkaworkers inspect lag
      kafkaworkers inspect lag --plugin pagamento --format json
    """
    settings = load_cli_settings(config_file, group_id=group_id, **overrides)
    rows: Sequence[Lag] = _report(ctx, names, settings, fmt, lag, "none of the plugins' topics exists yet")
    if not rows:
        return
    lines = [["GROUP", "TOPIC", "PARTITION", "COMMITTED", "END", "LAG"]]
    for r in rows:
        committed = "-" if r.committed is None else str(r.committed)
        lines.append([r.group, r.topic, str(r.partition), committed, str(r.end), str(r.lag)])
    total = sum(r.lag for r in rows)
    click.echo(table(lines, numeric=(2, 3, 4, 5)))
    click.echo(f"total lag {total}")


@inspect.command("retries")
@_plugins_option
@_group_option
@_format_option
@settings_options
@click.pass_context
def inspect_retries(
    ctx: click.Context,
    /,
    names: tuple[str, ...],
    group_id: str | None,
    fmt: str,
    config_file: str | None,
    **overrides: Any,
) -> None:
    """Show per retry topic and partition how many messages wait and when the next and last are due.

    A message waits until its plugin's retry group commits past it; its due time is its
    kw-due-at header.

    \b
    Examples:
      kafkaworkers inspect retries
      kafkaworkers inspect retries --plugin notificacao --format json
    """
    settings = load_cli_settings(config_file, group_id=group_id, **overrides)
    rows: Sequence[Waiting] = _report(ctx, names, settings, fmt, retries, "no retry topic of the plugins exists yet")
    if not rows:
        return
    now = time.time()
    lines = [["GROUP", "TOPIC", "PARTITION", "WAITING", "NEXT DUE", "LAST DUE"]]
    for w in rows:
        lines.append(
            [
                w.group,
                w.topic,
                str(w.partition),
                str(w.waiting),
                _due_text(w.next_due_ms, now),
                _due_text(w.last_due_ms, now),
            ]
        )
    click.echo(table(lines, numeric=(2, 3)))
    click.echo(f"{sum(w.waiting for w in rows)} message(s) waiting")
