"""The ``kafkaworkers`` command line (also ``python -m kafkaworkers``).

Every expected failure (unknown plugin, unreachable broker, bad setting) prints one line
naming the problem and what to do, and exits non-zero without a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import uuid
from typing import Any

import click
import msgspec

from kafkaworkers import __version__
from kafkaworkers.clikit import EXIT_ERROR, OneLineErrors, load_cli_settings, plugin_host, settings_options
from kafkaworkers.config import DEFAULT_PARTITIONS, admin_config
from kafkaworkers.config_cli import config
from kafkaworkers.dlq import dlq
from kafkaworkers.errors import KafkaWorkersError
from kafkaworkers.headers import H_CORRELATION_ID
from kafkaworkers.plugins import PluginHost, type_name
from kafkaworkers.producer import create_producer
from kafkaworkers.producer import produce as send
from kafkaworkers.retry import dlq_topic, retry_topic
from kafkaworkers.transports import MEMORY_URL, transport_for


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kafkaworkers")
def cli() -> None:
    """Run Kafka worker plugins with at-least-once delivery, retries, dead letters and metrics."""


@cli.command()
@click.option("--plugin", "-p", "names", multiple=True, help="A plugin to run (repeatable).")
@click.option("--all", "run_all", is_flag=True, help="Run every installed plugin.")
@click.option("--group-id", help="Consumer group id (default: the plugin's name; one plugin only).")
@click.option("--metrics-host", help="Bind address of /metrics and the probes [default 127.0.0.1].")
@click.option("--metrics-port", type=int, help="Port of /metrics and the probes; 0 turns it off [default 9400].")
@click.option("--broker-wait", type=float, default=30.0, show_default=True, help="Seconds to wait for the broker.")
@settings_options
@click.pass_context
def run(
    ctx: click.Context,
    names: tuple[str, ...],
    run_all: bool,
    broker_wait: float,
    config_file: str | None,
    **overrides: Any,
) -> None:
    """Run plugins until SIGTERM or Ctrl-C (a second signal exits at once)."""
    from kafkaworkers.metrics import Metrics
    from kafkaworkers.probes import ProbeServer
    from kafkaworkers.worker import Worker

    host = plugin_host(ctx)
    if bool(names) == run_all:
        raise click.UsageError("name plugins with --plugin NAME, or pass --all")
    settings = load_cli_settings(config_file, **overrides)
    plugins = list(host.plugins.values()) if run_all else host.select(names)
    for broken in host.broken if run_all else []:
        click.echo(f"kafkaworkers: warning: not running a broken plugin: {broken.error}", err=True)
    if not plugins:
        raise KafkaWorkersError("no plugins are installed; pip install one (see `kafkaworkers plugins`)")
    # Port 0 turns the endpoint off, and with it the metrics' cost in the loop.
    metrics = Metrics() if settings.metrics_port else None
    worker = Worker(plugins, settings, host, metrics=metrics)
    server = None
    if metrics is not None:
        try:
            server = ProbeServer(
                settings.metrics_host,
                settings.metrics_port,
                metrics.registry,
                live=lambda: worker.alive(settings.liveness_timeout),
                ready=lambda: worker.ready,
            ).start()
        except OSError as exc:
            # A port in use or reserved is the port's fault; any other failure (not an address
            # of this machine, a name that does not resolve) is the host's.
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                hint = "pick another --metrics-port (0 turns it off)"
            else:
                hint = "pick a --metrics-host of this machine (127.0.0.1, or 0.0.0.0 for every interface)"
            where = f"{settings.metrics_host}:{settings.metrics_port}"
            raise KafkaWorkersError(f"cannot serve metrics on {where}: {exc.strerror or exc}; {hint}") from None
        click.echo(f"metrics and probes on http://{server.host}:{server.port}/metrics", err=True)
    signals = {"count": 0}

    def on_signal(signum: int, frame: Any) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            os._exit(128 + signum)
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        worker.run(broker_wait=broker_wait)
    finally:
        if server:
            server.close()


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.pass_context
def plugins(ctx: click.Context, fmt: str) -> None:
    """List installed plugins: where each came from, what it consumes and produces, or why it is broken."""
    host = plugin_host(ctx)
    rows: list[dict[str, Any]] = []
    for name, plugin in host.plugins.items():
        info = host.info(name)
        rows.append(
            {
                "name": name,
                "distribution": info.distribution,
                "version": info.version,
                "description": plugin.description,
                "consumes": {t: type_name(s.type) for t, s in sorted(plugin.subscriptions.items())},
                "produces": {t: type_name(typ) for t, typ in sorted(plugin.produced.items())},
                "error": None,
            }
        )
    for broken in host.broken:
        rows.append({"name": broken.name, "distribution": broken.distribution, "version": broken.version,
                     "error": broken.error})  # fmt: skip
    rows.sort(key=lambda row: (row["name"], row["distribution"]))
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no plugins installed")
    for row in rows:
        where = f"{row['name']}  ({row['distribution']} {row['version']})"
        if row["error"]:
            click.echo(f"{where}  BROKEN: {row['error']}")
            continue
        click.echo(f"{where}  {row['description']}".rstrip())
        for topic, typ in row["consumes"].items():
            click.echo(f"    consumes {topic}: {typ}")
        for topic, typ in row["produces"].items():
            click.echo(f"    produces {topic}: {typ}")


@cli.group()
def topics() -> None:
    """Manage the topics the installed plugins declare."""


@topics.command("create")
@click.option("--partitions", type=click.IntRange(1), default=DEFAULT_PARTITIONS, show_default=True)
@click.option("--replication-factor", type=click.IntRange(1), default=1, show_default=True)
@settings_options
@click.pass_context
def topics_create(
    ctx: click.Context, partitions: int, replication_factor: int, config_file: str | None, **overrides: Any
) -> None:
    """Create every declared topic plus each plugin's retry and dead-letter topics (idempotent).

    A topic that already exists is left as it is; one with another partition count than
    asked is flagged, since its keys would not spread (or, for a retry topic, not line up
    with its source) as the operator expects.
    """
    host = plugin_host(ctx)
    settings = load_cli_settings(config_file, **overrides)
    names: set[str] = set()
    for plugin in host.plugins.values():
        group = settings.group_for(plugin.name)
        names.update(plugin.subscriptions, plugin.produced, [dlq_topic(group)])
        if plugin.retry.mode == "topics":
            names.update(retry_topic(group, i + 1) for i in range(len(plugin.retry.delays)))
    admin = transport_for(settings.bootstrap_servers).admin(admin_config(settings))
    before = admin.list_topics()
    result = admin.create_topics([(n, partitions, replication_factor) for n in sorted(names)])
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


@cli.command()
@click.argument("topic")
@click.option("--file", "-f", "source", type=click.File("rb"), default="-", help="JSON lines; - for stdin.")
@click.option("--key", "key_field", help="Use this field of each message as its key.")
@settings_options
@click.pass_context
def produce(
    ctx: click.Context, topic: str, source: Any, key_field: str | None, config_file: str | None, **overrides: Any
) -> None:
    """Publish JSON lines to TOPIC, each validated against the topic's declared type."""
    host = plugin_host(ctx)
    settings = load_cli_settings(config_file, **overrides)
    typ = _topic_type(host, topic)
    decoder = msgspec.json.Decoder(typ)
    encoder = msgspec.json.Encoder()
    producer = create_producer(settings)
    failures: list[str] = []
    delivery_errors: list[str] = []
    sent = 0

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            delivery_errors.append(err.str())

    for number, line in enumerate(source, start=1):
        if not line.strip():
            continue
        try:
            value = decoder.decode(line)
        except msgspec.DecodeError as exc:
            failures.append(f"line {number}: {exc}")
            continue
        key = None
        if key_field:
            raw_key = msgspec.to_builtins(value).get(key_field) if hasattr(value, "__struct_fields__") else None
            key = str(raw_key).encode() if raw_key is not None else None
        headers = [(H_CORRELATION_ID, uuid.uuid4().hex.encode())]
        send(producer, topic, encoder.encode(value), key, headers, on_delivery)
        producer.poll(0)
        sent += 1
    remaining = producer.flush(30)
    for failure in failures:
        click.echo(f"kafkaworkers: rejected {failure}", err=True)
    for error in delivery_errors[:5]:
        click.echo(f"kafkaworkers: delivery failed: {error}", err=True)
    delivered = sent - len(delivery_errors) - remaining
    click.echo(f"{delivered} sent to {topic}, {len(failures)} rejected, {len(delivery_errors) + remaining} undelivered")
    if failures or delivery_errors or remaining:
        ctx.exit(EXIT_ERROR)


@cli.command()
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json", "mermaid", "dot"]), default="text", show_default=True
)
@click.pass_context
def topology(ctx: click.Context, fmt: str) -> None:
    """Draw the plugins and topics the installed plugins declare; report loose ends and readers whose types differ."""
    from kafkaworkers.topology import Topology

    graph = Topology.of(plugin_host(ctx).plugins.values())
    click.echo({"text": graph.text, "json": graph.json, "mermaid": graph.mermaid, "dot": graph.dot}[fmt]())


@cli.command()
@click.option("--orders", "count", type=click.IntRange(1), default=200, show_default=True, help="Units of work.")
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds before giving up.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--bootstrap-servers", "-b", help="A real broker; default: the embedded in-memory broker.")
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Least severe level logged [default WARNING].",
)
@click.pass_context
def demo(
    ctx: click.Context,
    count: int,
    seed: int,
    timeout: float,
    fmt: str,
    bootstrap_servers: str | None,
    log_level: str | None,
) -> None:
    """Run the installed demo scenario end to end; exit non-zero if any outcome differs from the expected one."""
    from kafkaworkers.demo import run_demo

    settings = load_cli_settings(
        None,
        bootstrap_servers=bootstrap_servers or f"{MEMORY_URL}demo",
        log_level=log_level or "WARNING",
        metrics_port=0,
    )
    report = run_demo(plugin_host(ctx), settings, count, seed, timeout)
    click.echo(json.dumps(report.data, indent=2, default=str) if fmt == "json" else report.text)
    if not report.ok:
        ctx.exit(EXIT_ERROR)


def _topic_type(host: PluginHost, topic: str) -> type:
    for plugin in host.plugins.values():
        if topic in plugin.subscriptions:
            return plugin.subscriptions[topic].type
        if topic in plugin.produced:
            return plugin.produced[topic]
    known = sorted({t for p in host.plugins.values() for t in [*p.subscriptions, *p.produced]})
    raise KafkaWorkersError(f"no installed plugin declares topic {topic!r}; declared: {', '.join(known) or 'none'}")


cli.add_command(dlq)
cli.add_command(config)


def main(argv: list[str] | None = None) -> None:
    """Load plugins (and the commands they add), then run the CLI.

    A broken plugin stops no command (``kafkaworkers plugins`` shows why it is broken), and
    ``--version`` loads no plugin at all.
    """
    args = sys.argv[1:] if argv is None else argv
    host = PluginHost()
    if args[:1] != ["--version"]:
        host.load_entry_points()
        host.register_commands(cli)
    cli.main(args=args, prog_name="kafkaworkers", obj=host)
