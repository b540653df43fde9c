"""Remote control of running workers: ``kafkaworkers control ping | pause | resume | shutdown``.

Commands travel through Kafka, so an operator needs no shell on the workers' hosts, only
the right to write one topic (see the README for the broker ACLs that restrict it):

- ``send`` writes a :class:`Command` (JSON) to the control topic (``control_topic``,
  default ``kafkaworkers-control``), addressed to a plugin and optionally to one worker
  (``<host>/<pid>``, as ``inspect workers`` and ``ping`` show it), then reads the replies
  topic (``control_replies_topic``) for the answers to that command until its timeout.
- Every ``kafkaworkers run`` process reads the control topic with a consumer of its own
  (:class:`ControlChannel`): no group, every partition assigned at its end offset when the
  process starts, so a command sent before it started is never replayed to it. That
  consumer lives in a thread that only decodes and filters; the commands themselves are
  applied by the consumer loop, between two batches, through a queue it checks once per
  iteration: the loop's librdkafka consumers are never touched from two threads.

What the commands do to the worker's part for the addressed plugin:

- ``ping`` answers who the worker is (host, pid, process index, plugins), whether it is
  running or paused and why, what it is assigned and which of it is paused for what
  reason, and where it serves ``/metrics``.
- ``pause`` stops consuming every partition the plugin is assigned while keeping them
  assigned (no rebalance); partitions assigned later, after a rebalance, are paused as
  they arrive. ``/readyz`` then fails with ``paused by control``: the process is alive
  (``/livez`` passes, so nothing restarts it), but it is not doing its work, which a
  rollout or an alert should see.
- ``resume`` undoes only ``pause``: a partition paused by an open breaker, a retry not yet
  due or back-pressure stays paused until that reason ends.
- ``shutdown`` stops the process as SIGTERM does: what is in hand finishes, offsets are
  committed, the process exits 0 (under ``--processes`` the supervisor restarts it, as it
  restarts any process that exits).

A process that runs several plugins pauses and resumes only the addressed plugin's
partitions; ``shutdown`` stops the whole process.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import click
import msgspec
from confluent_kafka import TopicPartition

from kafkaworkers.clikit import OneLineErrors, load_cli_settings, plugin_host, settings_options
from kafkaworkers.config import Settings, admin_config
from kafkaworkers.consumer import consumer_config, watermarks
from kafkaworkers.errors import BrokerUnavailable, KafkaWorkersError
from kafkaworkers.inspect import Partition, echo_json, partitions_text, table, this_process
from kafkaworkers.producer import create_producer, produce, shared_producer
from kafkaworkers.transports import Admin, Consumer, Transport, transport_for

if TYPE_CHECKING:
    from kafkaworkers.worker import Worker

__all__ = [
    "COMMANDS",
    "CONTROL",
    "Command",
    "ControlChannel",
    "PausedPartition",
    "Reply",
    "control",
    "ensure_topics",
    "metrics_url",
    "ping_all",
    "send",
]

log = logging.getLogger(__name__)

CommandName = Literal["ping", "pause", "resume", "shutdown"]
COMMANDS: tuple[CommandName, ...] = ("ping", "pause", "resume", "shutdown")
#: Why partitions paused by ``control pause`` are paused (and why ``/readyz`` fails).
CONTROL = "paused by control"
#: Seconds ``send`` waits for answers by default.
DEFAULT_TIMEOUT = 3.0
#: Seconds between two looks at the control topic from the worker's loop.
_CHECK_EVERY = 0.2


class Command(msgspec.Struct, kw_only=True):
    """One command on the control topic.

    :param id: answers carry it, so a sender reads only the answers to its own command.
    :param worker: a worker id (``<host>/<pid>``): only that worker applies it; None: every
        worker of the plugin.
    """

    id: str
    command: CommandName
    plugin: str
    worker: str | None = None
    sent_ms: int = 0


class PausedPartition(msgspec.Struct, kw_only=True):
    """A partition a worker does not consume now, and why."""

    topic: str
    partition: int
    reason: str


class Reply(msgspec.Struct, kw_only=True):
    """A worker's answer to a command, on the replies topic.

    :param id: the command's id.
    :param worker: the worker id (``<host>/<pid>``) that ``--worker`` takes.
    :param plugins: every plugin the process runs.
    :param process: its index under ``run --processes`` (0 when run alone).
    :param state: ``running``, ``paused`` (by control) or ``stopping`` (after ``shutdown``),
        for the addressed plugin.
    :param reason: why it is paused.
    :param partitions: the addressed plugin's assigned partitions (retry topics included).
    :param paused: which of them are not consumed now, with the reason (control, an open
        breaker, a retry not yet due, back-pressure...).
    :param metrics_url: where the process serves ``/metrics``; None when metrics are off.
    """

    id: str
    command: CommandName
    plugin: str
    worker: str
    plugins: list[str]
    host: str
    pid: int
    process: int
    state: Literal["running", "paused", "stopping"]
    reason: str | None
    partitions: list[Partition]
    paused: list[PausedPartition]
    metrics_url: str | None


_command_decoder = msgspec.json.Decoder(Command)
_reply_decoder = msgspec.json.Decoder(Reply)
_encoder = msgspec.json.Encoder()


def metrics_url(host: str, port: int) -> str:
    """The URL of a ``/metrics`` served on ``host:port``, with this machine's name for a wildcard address."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"


def ensure_topics(admin: Admin, settings: Settings) -> dict[str, int]:
    """Create the control and replies topics when missing (one partition each: commands are
    few and every worker reads every partition anyway); the broker's topics, with them."""
    topics = admin.list_topics()
    wanted = [name for name in (settings.control_topic, settings.control_replies_topic) if name not in topics]
    if wanted:
        admin.create_topics([(name, 1, -1) for name in wanted])
        topics = admin.list_topics()
    return topics


def _assign_at_end(consumer: Consumer, topic: str, partitions: int) -> None:
    """Read ``topic`` from now on: every partition from its current end offset."""
    ends = [TopicPartition(topic, p, watermarks(consumer, TopicPartition(topic, p))[1]) for p in range(partitions)]
    consumer.assign(ends)


def _reader(settings: Settings, transport: Transport) -> Consumer:
    """A consumer that joins no group and commits nothing (its group id is never used)."""
    extra = {"enable.auto.commit": False, "enable.partition.eof": False}
    return transport.consumer(consumer_config(settings, f"kafkaworkers-control-{uuid.uuid4().hex}", extra))


# --- the worker's side -------------------------------------------------------------------


class ControlChannel:
    """A worker's end of the control topic, read and acted on by the worker's loop.

    Created by :meth:`kafkaworkers.worker.Worker.start` once the plugins' consumers exist. The
    loop calls :meth:`check` between batches: a command is applied where the consumers live,
    and no thread waits on the topic (one blocked in ``consume`` cost W3-small a fifth of its
    throughput).
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.settings = settings = worker.settings
        self.identity = this_process()
        self.plugins = {runner.plugin.name for runner in worker.runners}
        #: when the loop looks at the topic next (monotonic seconds)
        self.due = 0.0
        self._reported: set[int] = set()
        transport = worker.transport
        topics = ensure_topics(transport.admin(admin_config(settings)), settings)
        self._producer = shared_producer(settings, transport)
        self._consumer = _reader(settings, transport)
        _assign_at_end(self._consumer, settings.control_topic, topics.get(settings.control_topic, 1))
        log.info("listening for commands on %s as worker %s", settings.control_topic, self.identity.worker)

    @classmethod
    def open(cls, worker: Worker) -> ControlChannel | None:
        """The worker's channel, or None (logged) when the control topic cannot be created or
        read: a worker without control still does its work."""
        try:
            return cls(worker)
        except BrokerUnavailable as exc:
            log.warning("not listening for control commands on %s: %s", worker.settings.control_topic, exc)
            return None

    def check(self, now: float) -> None:
        """Apply, in the order they came, the commands for this worker that came since the last look."""
        self.due = now + _CHECK_EVERY
        try:
            messages = self._consumer.consume(100, 0)
        except Exception:  # the worker must outlive any one bad read
            log.exception("reading the control topic failed")
            return
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() not in self._reported:  # e.g. not authorized: once, not every look
                    self._reported.add(err.code())
                    log.warning("reading %s: %s", self.settings.control_topic, err.str())
                continue
            try:
                command = _command_decoder.decode(msg.value() or b"")
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("ignoring a message on %s that is no command: %s", self.settings.control_topic, exc)
                continue
            if command.plugin in self.plugins and command.worker in (None, self.identity.worker):
                self.apply(command)

    def apply(self, command: Command) -> None:
        """Carry out one command and answer it."""
        runners = [r for r in self.worker.runners if r.plugin.name == command.plugin]
        if command.command == "pause":
            for runner in runners:
                runner.partitions.hold(CONTROL)
        elif command.command == "resume":
            for runner in runners:
                runner.partitions.release()
        elif command.command == "shutdown":
            log.warning("shutdown asked through %s", self.settings.control_topic)
            self.worker.stop()
        if command.command != "ping":
            log.info("%s %s through %s", command.command, command.plugin, self.settings.control_topic)
        self._answer(command, runners)

    def _answer(self, command: Command, runners: Sequence[Any]) -> None:
        held = next((r.partitions.hold_reason for r in runners if r.partitions.hold_reason), None)
        assigned = sorted(Partition(t, p) for r in runners for t, p in r.partitions.assigned)
        paused = []
        for runner in runners:
            for topic, partition in sorted(runner.partitions.assigned):
                reason = runner.partitions.paused.get((topic, partition), (0.0, runner.partitions.hold_reason))[1]
                if reason:
                    paused.append(PausedPartition(topic=topic, partition=partition, reason=reason))
        who = self.identity
        reply = Reply(
            id=command.id,
            command=command.command,
            plugin=command.plugin,
            worker=who.worker,
            plugins=sorted(self.plugins),
            host=who.host,
            pid=who.pid,
            process=who.process,
            state="stopping" if command.command == "shutdown" else "paused" if held else "running",
            reason=held,
            partitions=assigned,
            paused=paused,
            metrics_url=self.worker.metrics_url,
        )
        try:
            produce(self._producer, self.settings.control_replies_topic, _encoder.encode(reply), who.worker.encode())
            self._producer.poll(0)
        except Exception:  # an answer that cannot be sent must not stop the loop
            log.exception("cannot answer %s on %s", command.command, self.settings.control_replies_topic)

    def close(self) -> None:
        """Stop reading the control topic."""
        self._consumer.close()


# --- the sender's side -------------------------------------------------------------------


def send(
    settings: Settings,
    command: str,
    plugin: str,
    worker: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    transport: Transport | None = None,
) -> list[Reply]:
    """Send ``command`` to the workers of ``plugin`` (or to ``worker`` alone) and return the
    answers that came within ``timeout`` seconds, one per worker, sorted by worker id.

    Every worker that runs the plugin answers, so without ``worker`` it waits the whole
    timeout; with ``worker`` it returns as soon as that worker answered.

    :raises KafkaWorkersError: an unknown command; :class:`BrokerUnavailable` when the
        command could not be written.
    """
    if command not in COMMANDS:
        raise KafkaWorkersError(f"no control command {command!r}; commands: {', '.join(COMMANDS)}")
    sent = Command(id=uuid.uuid4().hex, command=command, plugin=plugin, worker=worker, sent_ms=int(time.time() * 1000))
    return _exchange(settings, [sent], timeout, transport)[sent.id]


def ping_all(
    settings: Settings, plugins: Iterable[str], timeout: float = DEFAULT_TIMEOUT, *, transport: Transport | None = None
) -> dict[str, list[Reply]]:
    """Ping the workers of every plugin at once: plugin -> the answers within ``timeout`` seconds."""
    now = int(time.time() * 1000)
    sent = {name: Command(id=uuid.uuid4().hex, command="ping", plugin=name, sent_ms=now) for name in plugins}
    answers = _exchange(settings, list(sent.values()), timeout, transport)
    return {name: answers[command.id] for name, command in sent.items()}


def _exchange(
    settings: Settings, commands: list[Command], timeout: float, transport: Transport | None
) -> dict[str, list[Reply]]:
    """Write ``commands``, then gather the answers to each (by command id) for ``timeout`` seconds."""
    transport = transport or transport_for(settings.bootstrap_servers)
    topics = ensure_topics(transport.admin(admin_config(settings)), settings)
    replies_topic = settings.control_replies_topic
    consumer = _reader(settings, transport)
    try:
        # Listen before sending: an answer can come before the send returns.
        _assign_at_end(consumer, replies_topic, topics.get(replies_topic, 1))
        failed: list[str] = []
        producer = create_producer(settings, transport=transport)
        for command in commands:
            produce(
                producer,
                settings.control_topic,
                _encoder.encode(command),
                command.plugin.encode(),
                on_delivery=lambda err, msg: failed.append(err.str()) if err is not None else None,
            )
        if producer.flush(min(max(timeout, 1.0), 30.0)) or failed:
            reason = failed[0] if failed else "not acknowledged in time"
            raise BrokerUnavailable(f"cannot write to {settings.control_topic}: {reason}")
        return _collect(consumer, commands, timeout)
    finally:
        consumer.close()


def _collect(consumer: Consumer, commands: list[Command], timeout: float) -> dict[str, list[Reply]]:
    """The answers to each command that arrive within ``timeout`` seconds, the last per worker;
    a command addressed to one worker stops the wait once that worker answered."""
    answers: dict[str, dict[str, Reply]] = {command.id: {} for command in commands}
    single = {command.id: command.worker for command in commands if command.worker is not None}
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        for msg in consumer.consume(100, min(left, 0.2)):
            if msg.error() is not None:
                continue
            try:
                reply = _reply_decoder.decode(msg.value() or b"")
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if reply.id in answers:
                answers[reply.id][reply.worker] = reply
        if len(single) == len(commands) and all(w in answers[i] for i, w in single.items()):
            break
    return {i: [got[w] for w in sorted(got)] for i, got in answers.items()}


# --- commands ----------------------------------------------------------------------------


def _print(replies: Iterable[Reply]) -> None:
    lines = [["WORKER", "PID", "PROCESS", "STATE", "PARTITIONS", "METRICS"]]
    for r in replies:
        state = r.reason if r.state == "paused" and r.reason else r.state
        others = [p for p in r.paused if p.reason != CONTROL]
        if others:
            state += "; " + ", ".join(f"{p.topic}[{p.partition}] {p.reason}" for p in others)
        lines.append([r.worker, str(r.pid), str(r.process), state, partitions_text(r.partitions), r.metrics_url or "-"])
    click.echo(table(lines, numeric=(1, 2)))


@click.group("control", cls=OneLineErrors)
def control() -> None:
    """Ping, pause, resume or stop running workers through the control topic.

    Every worker of the plugin answers on the replies topic; the command prints who answered
    within --timeout, and fails when nobody did.

    \b
    Examples:
      kafkaworkers control ping --plugin fraude
      kafkaworkers control pause --plugin fraude                     # every worker of fraude
      kafkaworkers control resume --plugin fraude --worker web-1/4242
      kafkaworkers control shutdown --plugin fraude --worker web-1/4242
    """


_HELP = {
    "ping": "List the plugin's workers that answer: host, process, state and why, partitions, metrics URL.",
    "pause": "Stop consuming, keeping the partitions assigned (readiness then fails with the reason).",
    "resume": "Consume again what `pause` stopped (partitions paused for other reasons stay paused).",
    "shutdown": "Stop the workers gracefully, as SIGTERM does: finish, commit, exit 0.",
}


def _register(name: CommandName) -> None:
    @control.command(name, help=f"{_HELP[name]}\n\n\b\nExample:\n  kafkaworkers control {name} --plugin fraude")
    @click.option("--plugin", "-p", "plugin", required=True, help="The plugin whose workers are addressed.")
    @click.option("--worker", "-w", help="Only this worker (<host>/<pid>, as `control ping` shows it).")
    @click.option(
        "--timeout", type=click.FloatRange(0.1, 300), default=DEFAULT_TIMEOUT, show_default=True,
        help="Seconds to wait for answers.",
    )  # fmt: skip
    @click.option(
        "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
        help="table for people, json for scripts.",
    )  # fmt: skip
    @settings_options
    @click.pass_context
    def command(
        ctx: click.Context,
        /,
        plugin: str,
        worker: str | None,
        timeout: float,
        fmt: str,
        config_file: str | None,
        **overrides: Any,
    ) -> None:
        settings = load_cli_settings(config_file, **overrides)
        replies = send(settings, name, plugin, worker=worker, timeout=timeout)
        if fmt == "json":
            echo_json(replies)
        elif replies:
            _print(replies)
        if not replies:
            said = f"no answer from worker {worker} of plugin {plugin}" if worker else f"no worker of {plugin} answered"
            hint = (
                ""
                if plugin in plugin_host(ctx).plugins
                else f" (no plugin {plugin!r} is installed here: check the name)"
            )
            raise KafkaWorkersError(f"{said} within {timeout:g} s{hint}")
        if fmt == "table":
            click.echo(f"{len(replies)} worker(s) of {plugin} answered {name}")


for _name in COMMANDS:
    _register(_name)
