"""The topics the installed plugins declare, and the ``kafkaworkers topics`` commands that manage them.

A topic's role comes from the declarations: a plugin's ``consumes`` (read) and ``produces``
(written), and the topics the runtime makes for each consumer group: ``<group>-retry-<n>``,
``<group>-dlq`` and the replay ledger ``<group>-dlq-replayed``. A group's topics on the broker
are recognised by name even when no installed plugin runs under that group (a one-off
``run --group-id`` leaves them behind; ``topics delete --group-id`` removes them). The
framework's own control topics (the ``control_topic`` and ``control_replies_topic`` settings,
:mod:`kafkaworkers.control`) are listed as its own, with the workers that read or answer them.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import click
import msgspec
from msgspec import inspect as mi

from kafkaworkers.clikit import OneLineErrors, load_cli_settings, plugin_host, settings_options
from kafkaworkers.config import DEFAULT_PARTITIONS, Settings, admin_config
from kafkaworkers.dlq import ledger_topic
from kafkaworkers.errors import KafkaWorkersError
from kafkaworkers.plugins import PluginHost, type_name
from kafkaworkers.retry import dlq_topic, retry_topics
from kafkaworkers.transports import Admin, transport_for

__all__ = [
    "KeyFieldError",
    "TopicRole",
    "check_key_field",
    "declared_topics",
    "group_topic",
    "message_key",
    "topic_type",
    "topics",
]

_GROUP_TOPIC = re.compile(r"^(?P<group>.+?)-(?:retry-(?P<level>[1-9][0-9]*)|dlq|dlq-replayed)$")


@dataclass
class TopicRole:
    """What the installed plugins (and the runtime for their groups) do with one topic.

    :param kind: ``declared`` (a plugin's own topic), ``retry``, ``dlq``, ``ledger`` (which
        dead letters were replayed), ``control`` (commands to the workers), ``replies`` (their
        answers) or ``undeclared``.
    :param group: the consumer group of a retry, dead-letter or ledger topic.
    :param type: the declared message type's name, for a declared topic.
    """

    kind: str
    group: str | None = None
    type: str | None = None
    readers: list[str] = field(default_factory=list)
    writers: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """The role in a few words, e.g. ``retry 2 of group fraude``."""
        if self.kind == "declared":
            return self.type or "declared"
        if self.kind == "undeclared":
            return "declared by no installed plugin"
        if self.kind in _FRAMEWORK:
            return _FRAMEWORK[self.kind]
        return {"retry": "retries", "dlq": "dead letters", "ledger": "replay ledger"}[self.kind] + (
            f" of group {self.group}"
        )


#: The framework's own topics' roles, as ``topics list`` describes them.
_FRAMEWORK = {"control": "kafkaworkers control commands", "replies": "kafkaworkers control replies"}
#: Who writes commands and reads the answers: the ``control`` command, and the console's pause and resume.
_CONTROLLERS = ["control", "ui"]


def topic_type(host: PluginHost, topic: str) -> type:
    """The message type an installed plugin declares for ``topic``, or a one-line error listing the declared ones."""
    for plugin in host.plugins.values():
        if topic in plugin.subscriptions:
            return plugin.subscriptions[topic].type
        if topic in plugin.produced:
            return plugin.produced[topic]
    known = sorted({t for p in host.plugins.values() for t in [*p.subscriptions, *p.produced]})
    raise KafkaWorkersError(f"no installed plugin declares topic {topic!r}; declared: {', '.join(known) or 'none'}")


class KeyFieldError(KafkaWorkersError):
    """A message's key field is missing or not a scalar a key can be made of."""


# Keys are bytes compared as such: only values with one obvious text form make one. A bool
# ("True"? "true"?) and a float ("1.0" or "1"?) would key equal values apart.
_KEY_TYPES = (mi.StrType, mi.IntType, mi.UUIDType)


def _keyable(t: mi.Type) -> bool:
    if isinstance(t, mi.UnionType):
        return all(_keyable(u) or isinstance(u, mi.NoneType) for u in t.types)
    if isinstance(t, mi.LiteralType | mi.EnumType):
        values = t.values if isinstance(t, mi.LiteralType) else [m.value for m in t.cls]
        return all(isinstance(v, str | int) and not isinstance(v, bool) for v in values)
    return isinstance(t, _KEY_TYPES)


# How a declared field type reads in the terms of the JSON a user writes.
_JSON_KINDS = {
    "Struct": "an object",
    "Dict": "an object",
    "TypedDict": "an object",
    "Dataclass": "an object",
    "List": "an array",
    "Set": "an array",
    "FrozenSet": "an array",
    "VarTuple": "an array",
    "Tuple": "an array",
    "Bool": "a boolean",
    "Float": "a number with a fraction",
    "Union": "a choice of types",
}


def check_key_field(typ: Any, field: str) -> None:
    """Refuse, before anything is read, a key field the type lacks or declares as other than a string or integer."""
    info = mi.type_info(typ)
    if not isinstance(info, mi.StructType | mi.DataclassType | mi.TypedDictType):
        return
    fields = {f.encode_name: f for f in info.fields}
    name = getattr(typ, "__name__", str(typ))
    if field not in fields:
        raise KeyFieldError(f"--key {field}: {name} has no field {field!r}; its fields: {', '.join(fields)}")
    declared = fields[field].type
    if not _keyable(declared):
        kind = type(declared).__name__.removesuffix("Type")
        what = _JSON_KINDS.get(kind, f"a {kind.lower()}")
        raise KeyFieldError(f"--key {field}: {name}.{field} is {what}; a key must be a string or integer field")


def message_key(value: Any, field: str) -> bytes:
    """The key of one message: its ``field`` as text, or :class:`KeyFieldError` saying what the field holds instead."""
    fields = msgspec.to_builtins(value)
    if not isinstance(fields, dict) or field not in fields:
        raise KeyFieldError(f"no field {field!r} for the key")
    raw = fields[field]
    if isinstance(raw, str) or (isinstance(raw, int) and not isinstance(raw, bool)):
        return str(raw).encode()
    what = {dict: "an object", list: "an array", bool: "a boolean", float: "a fraction"}.get(type(raw), "null")
    raise KeyFieldError(f"key field {field!r} is {what}; a key must be a string or integer")


def declared_topics(host: PluginHost, settings: Settings) -> dict[str, TopicRole]:
    """Every topic the installed plugins use under these settings, with who reads and writes it.

    A plugin reads and writes its own retry topics (in the ``topics`` retry mode), writes its
    dead-letter topic; ``kafkaworkers dlq replay`` reads that and writes the ledger.
    """
    roles: dict[str, TopicRole] = {}

    def role(name: str, kind: str, group: str | None = None) -> TopicRole:
        return roles.setdefault(name, TopicRole(kind, group))

    for name, plugin in sorted(host.plugins.items()):
        for topic, subscription in plugin.subscriptions.items():
            declared = role(topic, "declared")
            declared.type = declared.type or type_name(subscription.type)
            declared.readers.append(name)
        for topic, typ in plugin.produced.items():
            declared = role(topic, "declared")
            declared.type = declared.type or type_name(typ)
            declared.writers.append(name)
        group = settings.group_for(name)
        for topic in retry_topics(group, plugin.retry):
            retry = role(topic, "retry", group)
            retry.readers.append(name)
            retry.writers.append(name)
        role(dlq_topic(group), "dlq", group).writers.append(name)
        if "dlq replay" not in roles[dlq_topic(group)].readers:
            roles[dlq_topic(group)].readers.append("dlq replay")
        ledger = role(ledger_topic(group), "ledger", group)
        ledger.readers[:] = ledger.writers[:] = ["dlq replay"]
    # Every worker (``kafkaworkers run``) reads the commands and answers them, whatever it runs.
    workers = sorted(host.plugins)
    commands = role(settings.control_topic, "control")
    commands.readers[:], commands.writers[:] = workers, _CONTROLLERS
    replies = role(settings.control_replies_topic, "replies")
    replies.readers[:], replies.writers[:] = _CONTROLLERS, workers
    return roles


def group_topic(name: str) -> TopicRole | None:
    """The role of a retry, dead-letter or ledger topic told by its name alone; None for any other."""
    match = _GROUP_TOPIC.match(name)
    if match is None:
        return None
    if match["level"]:
        return TopicRole("retry", match["group"])
    return TopicRole("ledger" if name.endswith("-dlq-replayed") else "dlq", match["group"])


def _role(name: str, roles: dict[str, TopicRole]) -> TopicRole:
    return roles.get(name) or group_topic(name) or TopicRole("undeclared")


def _admin(settings: Settings) -> Admin:
    return transport_for(settings.bootstrap_servers).admin(admin_config(settings))


def _names(values: Iterable[str]) -> str:
    return ", ".join(values) or "-"


def _table(rows: list[list[str]]) -> str:
    """Rows as left-aligned columns two spaces apart (the second column right-aligned: counts)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(widths[i]) if i == 1 else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


#: Copies of each partition in a cluster large enough; two of them must hold a write.
MAX_REPLICAS = 3
REPLICATED_MIN_INSYNC = 2


def _replication(admin: Admin, replicas: int | None, min_insync: int | None) -> tuple[int, dict[str, str]]:
    """The replication factor and topic config to create topics with: the flags, or what the cluster allows."""
    if replicas is None:
        replicas = min(MAX_REPLICAS, admin.broker_count())
    if min_insync is None and replicas >= MAX_REPLICAS:
        min_insync = REPLICATED_MIN_INSYNC
    if min_insync is not None and min_insync > replicas:
        raise click.BadParameter(
            f"{min_insync} is more than the {replicas} cop{'ies' if replicas > 1 else 'y'} of each partition:"
            " no write could be acknowledged",
            param_hint="--min-insync-replicas",
        )
    return replicas, {} if min_insync is None else {"min.insync.replicas": str(min_insync)}


_format_option = click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True, help="Output format."
)


@click.group(cls=OneLineErrors)
def topics() -> None:
    """Create, list, describe and delete the topics the installed plugins declare."""


@topics.command("create")
@click.option(
    "--partitions",
    type=click.IntRange(1),
    default=DEFAULT_PARTITIONS,
    show_default=True,
    help="Partitions of each topic created (existing ones are never resized).",
)
@click.option(
    "--replication-factor",
    type=click.IntRange(1),
    default=None,
    help=f"Copies of each partition (at most the number of brokers)  [default: {MAX_REPLICAS}, or one per broker"
    " in a smaller cluster]",
)
@click.option(
    "--min-insync-replicas",
    type=click.IntRange(1),
    default=None,
    help="Copies that must hold a write before it is acknowledged (at most the replication factor)  [default: 2"
    " with 3 or more copies, else the broker's]",
)
@settings_options
@click.pass_context
def topics_create(
    ctx: click.Context,
    /,
    partitions: int,
    replication_factor: int | None,
    min_insync_replicas: int | None,
    config_file: str | None,
    **overrides: Any,
) -> None:
    """Create every declared topic plus each plugin's retry and dead-letter topics (idempotent).

    A topic that already exists is left as it is; one with another partition count than
    asked is flagged, since its keys would not spread (or, for a retry topic, not line up
    with its source) as the operator expects. In a cluster of three or more brokers a topic
    gets three copies, two of which must hold a write before the producer (``acks=all``) is
    told it is stored: a broker may then die without losing an acknowledged message.
    """
    host = plugin_host(ctx)
    settings = load_cli_settings(config_file, **overrides)
    names: set[str] = set()
    for plugin in host.plugins.values():
        group = settings.group_for(plugin.name)
        names.update(plugin.subscriptions, plugin.produced, [dlq_topic(group)], retry_topics(group, plugin.retry))
    admin = _admin(settings)
    replicas, config = _replication(admin, replication_factor, min_insync_replicas)
    before = admin.list_topics()
    result = admin.create_topics([(n, partitions, replicas) for n in sorted(names)], config)
    mismatched = 0
    for name, status in sorted(result.items()):
        count = before.get(name, partitions)
        if status == "exists" and count != partitions:
            mismatched += 1
            click.echo(f"{status:8} {name}  with {count} partition{'s' * (count != 1)}, asked {partitions}")
        else:
            click.echo(f"{status:8} {name}")
    created = sum(s == "created" for s in result.values())
    click.echo(f"{created} created, {len(result) - created} existed")
    if mismatched:
        click.echo(
            f"{mismatched} existing topic(s) have another partition count than asked; kafkaworkers never resizes"
            f" a topic. To grow one: kafka-topics.sh --bootstrap-server {settings.bootstrap_servers} --alter"
            f" --topic NAME --partitions {partitions} (keys written from then on may land on other partitions);"
            " Kafka cannot shrink one: delete it and run this command again, once it is drained.",
            err=True,
        )


@topics.command("list")
@click.option("--declared", is_flag=True, help="Only the topics the installed plugins use (with the missing ones).")
@_format_option
@settings_options
@click.pass_context
def topics_list(ctx: click.Context, /, declared: bool, fmt: str, config_file: str | None, **overrides: Any) -> None:
    """List every topic on the broker with its partitions, its role and the plugins that read and write it.

    Topics the installed plugins declare but the broker lacks are listed as missing.
    """
    settings = load_cli_settings(config_file, **overrides)
    roles = declared_topics(plugin_host(ctx), settings)
    present = _admin(settings).list_topics()
    names = sorted(set(roles) | (set() if declared else set(present)))
    # A ledger exists only once something was replayed, the control topics once a worker or
    # ``control`` made them: not missing when absent.
    names = [n for n in names if n in present or roles[n].kind not in ("ledger", "control", "replies")]
    rows = [{"topic": n, "partitions": present.get(n), **asdict(_role(n, roles))} for n in names]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no topics")
        return
    table = [["TOPIC", "PARTITIONS", "ROLE", "READ BY", "WRITTEN BY"]]
    for row in rows:
        role = _role(row["topic"], roles)
        count = "missing" if row["partitions"] is None else str(row["partitions"])
        table.append([row["topic"], count, role.describe(), _names(role.readers), _names(role.writers)])
    click.echo(_table(table))


@topics.command("describe")
@click.argument("topic")
@_format_option
@settings_options
@click.pass_context
def topics_describe(ctx: click.Context, /, topic: str, fmt: str, config_file: str | None, **overrides: Any) -> None:
    """Show TOPIC's partitions, replication factor and own config, and who reads and writes it."""
    settings = load_cli_settings(config_file, **overrides)
    role = _role(topic, declared_topics(plugin_host(ctx), settings))
    description = _admin(settings).describe_topic(topic)
    if description is None:
        creatable = role.kind in ("declared", "retry", "dlq")
        hint = "; `kafkaworkers topics create` creates it" if creatable else ""
        raise KafkaWorkersError(f"no topic {topic!r} on {settings.bootstrap_servers}{hint}")
    data = {"topic": topic, **asdict(description), **asdict(role)}
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
        return
    rows = [
        ("Topic", topic),
        ("Role", role.describe()),
        ("Partitions", str(description.partitions)),
        ("Replication", str(description.replication)),
        ("Read by", _names(role.readers)),
        ("Written by", _names(role.writers)),
    ]
    rows += [(f"  {key}", value) for key, value in description.config.items()]
    # A config key may be longer than the labels: its value still stands apart.
    width = max(14, *(len(label) + 1 for label, _ in rows))
    lines = (f"{label + ':' if not label.startswith(' ') else label:<{width}}{value}" for label, value in rows)
    click.echo("\n".join(lines))
    if not description.config:
        click.echo(f"{'Config:':<14}broker defaults")


def _stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


@topics.command("delete")
@click.argument("names", metavar="[TOPIC]...", nargs=-1)
@click.option(
    "--group-id",
    "group",
    help="Also every retry, dead-letter and ledger topic of this consumer group (e.g. a one-off --group-id run's).",
)
@click.option("--yes", "-y", is_flag=True, help="Delete without asking (required when stdin is not a terminal).")
@settings_options
@click.pass_context
def topics_delete(
    ctx: click.Context,
    /,
    names: tuple[str, ...],
    group: str | None,
    yes: bool,
    config_file: str | None,
    **overrides: Any,
) -> None:
    """Delete the named topics, and with --group-id a group's retry and dead-letter topics, after asking.

    Deleting a topic deletes its messages; Kafka cannot undo it.
    """
    if not names and not group:
        raise click.UsageError("name topics to delete, or pass --group-id GROUP")
    settings = load_cli_settings(config_file, **overrides)
    roles = declared_topics(plugin_host(ctx), settings)
    admin = _admin(settings)
    present = admin.list_topics()
    unknown = [n for n in names if n not in present]
    if unknown:
        raise KafkaWorkersError(f"no topic {', '.join(map(repr, unknown))} on {settings.bootstrap_servers}")
    doomed = list(dict.fromkeys(names))
    if group:
        ours = sorted(n for n in present if (r := group_topic(n)) is not None and r.group == group)
        if not ours and not names:
            click.echo(f"group {group} has no retry or dead-letter topics on {settings.bootstrap_servers}")
            return
        doomed += [n for n in ours if n not in doomed]
    for name in doomed:
        role = _role(name, roles)
        used = f"; read by {_names(role.readers)}" if role.readers else ""
        click.echo(f"  {name}  ({present[name]} partitions; {role.describe()}{used})")
    if not yes:
        if not _stdin_is_terminal():
            raise KafkaWorkersError(f"not deleting {len(doomed)} topic(s) without --yes: stdin is not a terminal")
        click.confirm(f"Delete these {len(doomed)} topic(s) and every message in them?", abort=True)
    result = admin.delete_topics(doomed)
    for name, status in result.items():
        click.echo(f"{status:8} {name}")
    click.echo(f"{sum(s == 'deleted' for s in result.values())} deleted")
