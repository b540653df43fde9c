"""The ``kafkaworkers`` command line (also ``python -m kafkaworkers``).

Every expected failure (unknown plugin, unreachable broker, bad setting) prints one line
naming the problem and what to do, and exits non-zero without a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

import click
import msgspec

from kafkaworkers import __version__
from kafkaworkers.clikit import EXIT_ERROR, OneLineErrors, load_cli_settings, plugin_host, settings_options
from kafkaworkers.config import Settings, admin_config
from kafkaworkers.config_cli import config
from kafkaworkers.control import control, metrics_url
from kafkaworkers.dlq import dlq
from kafkaworkers.errors import KafkaWorkersError
from kafkaworkers.headers import H_CORRELATION_ID
from kafkaworkers.inspect import inspect
from kafkaworkers.plugins import PluginHost, type_name
from kafkaworkers.producer import create_producer
from kafkaworkers.producer import produce as send
from kafkaworkers.progress import progress, rate
from kafkaworkers.samples import sample, schema
from kafkaworkers.topics import KeyFieldError, check_key_field, message_key, topic_type, topics
from kafkaworkers.transports import MEMORY_URL, Headers, transport_for
from kafkaworkers.ui.command import ui

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from kafkaworkers.probes import Check, ProbeServer


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
@click.option(
    "--processing-guarantee",
    type=click.Choice(["at_least_once", "exactly_once"], case_sensitive=False),
    help="exactly_once: outputs and consumed offsets commit in one Kafka transaction"
    " [env KAFKAWORKERS_PROCESSING_GUARANTEE; default at_least_once].",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 10_000),
    help="Messages of each plugin in flight at once, in order per key [env KAFKAWORKERS_CONCURRENCY;"
    " default: each plugin's own, most 1].",
)
@click.option(
    "--processes",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Worker processes on this host, under a supervisor that restarts them and serves one /metrics.",
)
@click.option(
    "--static-membership",
    is_flag=True,
    help="With --processes: a group.instance.id per process (plugins, host, index), so a restarted one"
    " does not rebalance its groups.",
)
@settings_options
@click.pass_context
def run(
    ctx: click.Context,
    /,
    names: tuple[str, ...],
    run_all: bool,
    broker_wait: float,
    processes: int,
    static_membership: bool,
    config_file: str | None,
    **overrides: Any,
) -> None:
    """Run plugins until SIGTERM or Ctrl-C (a second signal exits at once)."""
    from kafkaworkers.metrics import Metrics
    from kafkaworkers.supervisor import report_health, supervisor_fd
    from kafkaworkers.worker import Worker

    host = plugin_host(ctx)
    if names and run_all:
        raise click.UsageError("--all runs every installed plugin; it does not combine with --plugin")
    if not names and not run_all:
        raise click.UsageError("name plugins with --plugin NAME, or pass --all")
    if static_membership and processes == 1:
        raise click.UsageError(
            "--static-membership gives each of several --processes its own group.instance.id;"
            " one process sets [consumer] group.instance.id itself"
        )
    # Two members of one group in one process would only rebalance against each other.
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise click.UsageError(f"--plugin {', '.join(repeated)} given more than once; each plugin runs once a process")
    settings = load_cli_settings(config_file, **overrides)
    plugins = list(host.plugins.values()) if run_all else host.select(names)
    for broken in host.broken if run_all else []:
        click.echo(f"kafkaworkers: warning: not running a broken plugin: {broken.error}", err=True)
    if not plugins:
        raise KafkaWorkersError("no plugins are installed; pip install one (see `kafkaworkers plugins`)")
    if processes > 1:
        args = _child_args(names, run_all, broker_wait, config_file, overrides)
        ctx.exit(_supervise(settings, [p.name for p in plugins], processes, static_membership, args))
    # Port 0 turns the endpoint off, and with it the metrics' cost in the loop.
    metrics = Metrics() if settings.metrics_port else None
    worker = Worker(plugins, settings, host, metrics=metrics, control=True)

    def live() -> tuple[bool, str]:
        return worker.alive(settings.liveness_timeout)

    supervised = supervisor_fd()
    server = None
    if metrics is not None and supervised is not None:
        # A process of --processes serves its metrics to its supervisor only, on a port of its own.
        server = _serve("127.0.0.1", 0, metrics.registry, live, worker.readiness)
        worker.metrics_url = metrics_url(server.host, server.port)
    elif metrics is not None:
        server = _serve(settings.metrics_host, settings.metrics_port, metrics.registry, live, worker.readiness)
        worker.metrics_url = metrics_url(server.host, server.port)
        click.echo(f"metrics and probes on http://{server.host}:{server.port}/metrics", err=True)
    if supervised is not None:
        report_health(
            supervised,
            live,
            worker.readiness,
            server.port if server else None,
            on_orphan=worker.stop,
            interval=min(1.0, settings.liveness_timeout / 4),
            exit_after=settings.shutdown_grace + _STOP_MARGIN,
        )
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


#: Seconds a stopping worker process gets beyond its shutdown_grace before it is killed.
_STOP_MARGIN = 5.0


def _serve(host: str, port: int, registry: CollectorRegistry, live: Check, ready: Check) -> ProbeServer:
    """Start the metrics and probes endpoint, or say in one line why it cannot listen there."""
    from kafkaworkers.probes import ProbeServer

    try:
        return ProbeServer(host, port, registry, live=live, ready=ready).start()
    except OSError as exc:
        # A port in use or reserved is the port's fault; any other failure (not an address
        # of this machine, a name that does not resolve) is the host's.
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            hint = "pick another --metrics-port (0 turns it off)"
        else:
            hint = "pick a --metrics-host of this machine (127.0.0.1, or 0.0.0.0 for every interface)"
        raise KafkaWorkersError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; {hint}") from None


def _child_args(
    names: tuple[str, ...], run_all: bool, broker_wait: float, config_file: str | None, overrides: dict[str, Any]
) -> list[str]:
    """The ``run`` command line of a supervised process: this one's, without ``--processes``."""
    args = ["run", "--all"] if run_all else ["run", *(arg for name in names for arg in ("--plugin", name))]
    args += ["--broker-wait", repr(broker_wait)]
    if config_file:
        args += ["--config", config_file]
    for name, value in overrides.items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def _supervise(settings: Settings, plugins: list[str], processes: int, static: bool, args: list[str]) -> int:
    """Run ``processes`` worker processes under a supervisor until SIGTERM or Ctrl-C; its exit status."""
    from kafkaworkers.supervisor import Supervisor, instance_ids

    fixed = settings.consumer.get("group.instance.id", settings.kafka.get("group.instance.id"))
    if fixed and not static:
        raise KafkaWorkersError(
            f"group.instance.id={fixed!r} would be shared by all {processes} processes, each fencing the"
            " others out of the group; pass --static-membership to give each its own"
        )
    supervisor = Supervisor(
        [sys.executable, "-m", "kafkaworkers", *args],
        processes,
        liveness_timeout=settings.liveness_timeout,
        stop_timeout=settings.shutdown_grace + _STOP_MARGIN,
        instance_ids=instance_ids(plugins, socket.gethostname(), processes) if static else None,
    )
    server = None
    if settings.metrics_port:
        server = _serve(
            settings.metrics_host, settings.metrics_port, supervisor.registry, supervisor.live, supervisor.ready
        )
        where = f"http://{server.host}:{server.port}/metrics"
        click.echo(f"metrics and probes of the {processes} processes on {where}", err=True)
    signals = {"count": 0}

    def on_signal(signum: int, frame: Any) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            supervisor.kill()
            os._exit(128 + signum)
        supervisor.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return supervisor.run()
    finally:
        if server:
            server.close()


@cli.command()
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True, help="Output format."
)
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


@cli.command()
@click.argument("topic")
@click.option("--file", "-f", "source", type=click.File("rb"), default="-", help="JSON lines; - for stdin.")
@click.option("--key", "key_field", help="Use this field of each message as its key (a string or integer field).")
@click.option("--dry-run", is_flag=True, help="Validate every line against the topic's type; send nothing.")
@settings_options
@click.pass_context
def produce(
    ctx: click.Context,
    /,
    topic: str,
    source: Any,
    key_field: str | None,
    dry_run: bool,
    config_file: str | None,
    **overrides: Any,
) -> None:
    """Publish JSON lines to TOPIC, each validated against the topic's declared type."""
    host = plugin_host(ctx)
    settings = load_cli_settings(config_file, **overrides)
    typ = topic_type(host, topic)
    if key_field:
        check_key_field(typ, key_field)
    decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(typ)
    encoder = msgspec.json.Encoder()
    producer = None
    if not dry_run:
        # Fail in seconds with the reason, not after message.timeout.ms of retried connects.
        transport_for(settings.bootstrap_servers).admin(admin_config(settings)).list_topics(timeout=5.0)
        producer = create_producer(settings)
    failures: list[str] = []
    delivery_errors: list[str] = []
    sent = 0
    tracing = host.has_impl("kafkaworkers_message_producing")

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            delivery_errors.append(err.str())

    started = time.monotonic()
    with progress(source, f"{'checking' if dry_run else 'producing'} {topic}") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                value = decoder.decode(line)
                key = message_key(value, key_field) if key_field else None
            except (msgspec.DecodeError, KeyFieldError) as exc:
                failures.append(f"line {number}: {exc}")
                continue
            sent += 1
            if producer is None:
                continue
            headers: Headers = [(H_CORRELATION_ID, uuid.uuid4().hex.encode())]
            if tracing:
                host.message_producing(None, topic, key, headers)
            send(producer, topic, encoder.encode(value), key, headers, on_delivery)
            producer.poll(0)
    remaining = producer.flush(30) if producer is not None else 0
    for failure in failures:
        click.echo(f"kafkaworkers: error: rejected {failure}", err=True)
    for error in delivery_errors[:5]:
        click.echo(f"kafkaworkers: error: delivery failed: {error}", err=True)
    took = time.monotonic() - started
    if dry_run:
        click.echo(f"{sent} valid for {topic}, {len(failures)} rejected (dry run: nothing sent)")
    else:
        delivered = sent - len(delivery_errors) - remaining
        undelivered = len(delivery_errors) + remaining
        click.echo(
            f"{delivered} sent to {topic}, {len(failures)} rejected, {undelivered} undelivered"
            f" in {took:.1f} s ({rate(delivered, took)})"
        )
    if failures or delivery_errors or remaining:
        ctx.exit(EXIT_ERROR)


@cli.command()
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "mermaid", "dot"]),
    default="text",
    show_default=True,
    help="text or json, or a mermaid or Graphviz dot graph.",
)
@click.pass_context
def topology(ctx: click.Context, fmt: str) -> None:
    """Draw the plugins and topics the installed plugins declare; report loose ends and readers whose types differ."""
    from kafkaworkers.topology import Topology

    graph = Topology.of(plugin_host(ctx).plugins.values())
    click.echo({"text": graph.text, "json": graph.json, "mermaid": graph.mermaid, "dot": graph.dot}[fmt]())


@cli.command()
@click.option("--orders", "count", type=click.IntRange(1), default=200, show_default=True, help="Units of work.")
@click.option("--seed", type=int, default=7, show_default=True, help="The same seed gives the same orders.")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds before giving up.")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True, help="Output format."
)
@click.option("--bootstrap-servers", "-b", help="A real broker; default: the embedded in-memory broker.")
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Least severe level logged [default WARNING].",
)
@click.option(
    "--processing-guarantee",
    type=click.Choice(["at_least_once", "exactly_once"], case_sensitive=False),
    help="exactly_once needs a real broker (-b): every service commits in Kafka transactions.",
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
    processing_guarantee: str | None,
) -> None:
    """Run the installed demo scenario end to end; exit non-zero if any outcome differs from the expected one."""
    from kafkaworkers.demo import run_demo

    settings = load_cli_settings(
        None,
        bootstrap_servers=bootstrap_servers or f"{MEMORY_URL}demo",
        log_level=log_level or "WARNING",
        metrics_port=0,
        processing_guarantee=processing_guarantee,
    )
    report = run_demo(plugin_host(ctx), settings, count, seed, timeout)
    click.echo(json.dumps(report.data, indent=2, default=str) if fmt == "json" else report.text)
    if not report.ok:
        ctx.exit(EXIT_ERROR)


cli.add_command(dlq)
cli.add_command(config)
cli.add_command(schema)
cli.add_command(sample)
cli.add_command(topics)
cli.add_command(inspect)
cli.add_command(control)
cli.add_command(ui)


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
