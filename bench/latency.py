"""W5: end-to-end latency at a fixed load, from an order's ``criado_em`` to its
``processo-picking`` iniciado message (that message's broker timestamp).

Two shapes:

* ``pipeline``: the six order services, each a ``kafkaworkers run --plugin X`` process with
  its own bench consumer group, on the real ``pedido-novo`` ... ``processo-picking`` topics;
* ``passthrough``: one ``kafkaworkers run`` process whose bench plugin turns each order into
  a ``ProcessoPicking`` iniciado at once (used while the pipeline is not installed), on the
  run's own topics, the output one with ``message.timestamp.type=LogAppendTime``.

The load comes from its own process (``bench.contenders.rate_producer``). Nothing is read
while the load runs: both topics are read afterwards and joined on the order id. The one
exception is a ``live`` run (W8): there a ``read_committed`` reader in this process also notes
when each output became visible, since a transactional output's broker timestamp is when it
was appended, not when its transaction committed.

The same function measures the pipeline's capacity: under a load it cannot carry, ``out_rate``
is the pace at which orders reach a terminal state (picked; cancelled ones are counted too).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
from confluent_kafka import Consumer, Producer, TopicPartition

from bench import runner
from bench.broker import Broker
from bench.common import PRODUCER, listening_pid, percentile, process_cpu
from bench.orders import CORRELATION_HEADER, make_order
from bench.runner import KW, Contender, Workspace
from kafkaworkers.consumer import watermarks

PIPELINE = ("reserva", "notificacao", "fraude", "relatorios", "picking", "pagamento")
CATALOGUE = runner.ROOT / "plugins" / "reserva" / "catalogo.json"
#: Stock enough for any load: the bench measures latency, not running out of stock.
BENCH_STOCK = 10**9
IN_TOPIC, OUT_TOPIC = "pedido-novo", "processo-picking"
#: What reserva, pagamento and fraude answer each order with; picking joins the three.
FIRST_HOP = ("reserva-estoque", "processo-pagamento", "fraude-verificado")
CANCELLED_TOPIC = "pedido-cancelado"
READY_TIMEOUT = 90.0
DRAIN_TIMEOUT = 60.0

PASSTHROUGH = Contender("w5-kw", "W5", "kafkaworkers pass-through", kind="kw-cli", options={"mode": "passthrough"})
LOAD = Contender("w5-load", "W5", "rate producer", module="bench.contenders.rate_producer")


class _Created(msgspec.Struct):
    order_id: str
    criado_em: datetime


class _Picking(msgspec.Struct):
    order_id: str
    status: str = ""


class _OrderId(msgspec.Struct):
    order_id: str


@dataclass
class LatencyResult:
    mode: str
    #: Percent of the W2 rate; 0 for a load given in orders/s (``--w5-pipeline-rates``).
    load_pct: int
    rep: int
    target_rate: float
    ok: bool = False
    error: str = ""
    sent: int = 0
    matched: int = 0
    achieved_rate: float = 0.0
    #: Outputs per second between the first and the last output: the pipeline's pace.
    out_rate: float = 0.0
    p50: float = float("nan")
    p99: float = float("nan")
    p999: float = float("nan")
    max: float = float("nan")
    timestamp_type: str = ""
    workers_cpu_s: float = 0.0
    workers_peak_rss_kb: list[int] = field(default_factory=list)
    #: What the run varied (W8: the processing guarantee; capacity: the services' settings).
    variant: str = ""
    #: Pipeline: this load's orders cancelled (their other terminal state).
    cancelled: int = 0
    #: ``live`` runs: when the output reached a read_committed reader, minus ``criado_em``.
    visible_p50: float = float("nan")
    visible_p99: float = float("nan")
    visible_p999: float = float("nan")
    #: Pipeline: the slowest of the three answers to each order, minus ``criado_em`` (ms) ...
    first_p50: float = float("nan")
    first_p99: float = float("nan")
    #: ... and picking's output minus that slowest answer (ms).
    join_p50: float = float("nan")
    join_p99: float = float("nan")
    #: Pipeline: cores each service (and the local broker, when found) used while the load ran.
    load_cores: dict[str, float] = field(default_factory=dict)

    @property
    def load(self) -> str:
        return f"{self.load_pct}% of W2" if self.load_pct else f"{self.target_rate:,.0f} orders/s"


def _installed_plugins() -> list[dict[str, Any]]:
    """``kafkaworkers plugins --format json`` as the pipeline's processes will see it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KAFKAWORKERS_DISABLE_PLUGINS")}
    proc = subprocess.run([str(KW), "plugins", "--format", "json"], capture_output=True, text=True, env=env, cwd="/")
    if proc.returncode != 0:
        raise RuntimeError(f"`kafkaworkers plugins` failed: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout or "[]")


def pipeline_status() -> tuple[bool, str]:
    """Whether the six-service order pipeline is installed, and what was found."""
    try:
        rows = _installed_plugins()
    except RuntimeError as exc:
        return False, str(exc)
    names = sorted(r["name"] for r in rows)
    missing = [p for p in PIPELINE if p not in names]
    if missing or not any(OUT_TOPIC in r["produces"] for r in rows):
        return False, f"order pipeline not complete: installed plugins {names}, missing {missing}"
    return True, f"order pipeline installed: {names}"


def run(
    ws: Workspace, broker: Broker, mode: str, load_pct: int, rate: float, seconds: float, rep: int,
    variant: str = "", options: dict[str, Any] | None = None, live: bool = False,
    service_args: dict[str, list[str]] | None = None,
) -> LatencyResult:  # fmt: skip
    """One load at ``rate`` for ``seconds`` through ``mode``.

    :param variant: a label for what the run varies, also part of its topic and group names.
    :param options: the pass-through contender's spec options (W8: ``guarantee``, ``settings``).
    :param live: also time each output's arrival at a read_committed reader during the load.
    :param service_args: pipeline: extra ``kafkaworkers run`` arguments per service.
    """
    result = LatencyResult(mode, load_pct, rep, rate, variant=variant)
    key = (str(load_pct) if load_pct else f"{rate:.0f}ps") + (f"-{variant}" if variant else "")
    tag = f"w5-{key}-r{rep}"
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    if mode == "passthrough":
        in_topic, out_topic = f"{ws.prefix}-{tag}-orders", f"{ws.prefix}-{tag}-picking"
        broker.create(in_topic)
        broker.create(out_topic, config={"message.timestamp.type": "LogAppendTime"})
    else:
        in_topic, out_topic = IN_TOPIC, OUT_TOPIC
        _create_pipeline_topics(broker)
    skus = _catalogue_skus() if mode == "pipeline" else None
    start_in, start_out = _ends(broker, in_topic), _ends(broker, out_topic)
    start_cancelled = _ends(broker, CANCELLED_TOPIC) if mode == "pipeline" else {}
    start_first = {t: _ends(broker, t) for t in FIRST_HOP} if mode == "pipeline" else {}
    reader: _LiveReader | None = None
    try:
        if mode == "passthrough":
            spec = runner.make_spec(PASSTHROUGH, ws, in_topic, out_topic, 0, tag)
            spec.options.update(options or {})
            procs.append(("kafkaworkers", runner.start(PASSTHROUGH, spec, ws)[0]))
        else:
            procs += _start_pipeline(ws, tag, service_args or {})
        probe_prefix = f"probe{uuid.uuid4().hex[:6]}"
        if not _wait_ready(broker, in_topic, out_topic, start_out, probe_prefix, procs, skus):
            result.error = f"no {out_topic} output within {READY_TIMEOUT:.0f} s of start"
            return result
        load_spec = runner.make_spec(LOAD, ws, in_topic, out_topic, 0, tag)
        load_spec.options.update(rate=rate, seconds=seconds, id_prefix=f"{ws.prefix[-6:]}{key}r{rep}", skus=skus)
        if live:
            reader = _LiveReader(broker, out_topic, start_out, load_spec.options["id_prefix"])
            reader.start()
        cpu = _CpuWindow(procs, broker) if mode == "pipeline" else None
        load = runner.run_contender(LOAD, load_spec, ws, rep, timeout=seconds * 3 + 60)
        if cpu is not None:
            result.load_cores = cpu.cores()
        if not load.ok:
            result.error = f"load producer failed: {load.error}"
            return result
        result.sent = load.messages
        result.achieved_rate = load.extra.get("achieved_rate", 0.0)
        if reader is not None:
            reader.wait(result.sent, DRAIN_TIMEOUT)
        else:
            _drain(broker, out_topic, start_out, load_spec.options["id_prefix"], result.sent)
    finally:
        if reader is not None:
            reader.stop()
        for _, proc in procs:
            _, usage, peak = runner.stop(proc)
            if usage:
                result.workers_cpu_s += usage.ru_utime + usage.ru_stime
            result.workers_peak_rss_kb.append(peak)
    created = {
        m.order_id: m.criado_em.timestamp() * 1000
        for _, m in _read(broker, in_topic, start_in, _Created)
        if m.order_id.startswith(load_spec.options["id_prefix"])
    }
    latencies: dict[str, float] = {}
    ts_types = set()
    out_times = []
    for (ts_type, ts), m in _read(broker, out_topic, start_out, _Picking):
        if m.order_id in created and m.order_id not in latencies and m.status in ("", "iniciado"):
            latencies[m.order_id] = ts - created[m.order_id]
            out_times.append(ts)
            ts_types.add({1: "CreateTime", 2: "LogAppendTime"}.get(ts_type, str(ts_type)))
    values = list(latencies.values())
    result.matched = len(values)
    if len(out_times) > 1 and max(out_times) > min(out_times):
        result.out_rate = (len(out_times) - 1) / ((max(out_times) - min(out_times)) / 1000)
    result.timestamp_type = ",".join(sorted(ts_types))
    if mode == "pipeline":
        prefix = load_spec.options["id_prefix"]
        cancelled = {m.order_id for _, m in _read(broker, CANCELLED_TOPIC, start_cancelled, _OrderId)}
        result.cancelled = sum(1 for order_id in cancelled if order_id.startswith(prefix))
        _hops(result, broker, start_first, created, prefix, {m: created[m] + v for m, v in latencies.items()})
    if reader is not None:
        visible = [t - created[o] for o, t in reader.seen.items() if o in created]
        result.visible_p50, result.visible_p99, result.visible_p999 = (percentile(visible, q) for q in (50, 99, 99.9))
    if values:
        result.ok = True
        result.p50, result.p99, result.p999 = (percentile(values, q) for q in (50, 99, 99.9))
        result.max = max(values)
    else:
        result.error = "no order came out"
    return result


class _CpuWindow:
    """CPU each pipeline process and the local broker use from now until :meth:`cores`."""

    def __init__(self, procs: list[tuple[str, subprocess.Popen[bytes]]], broker: Broker) -> None:
        port = int(broker.bootstrap.split(",")[0].rsplit(":", 1)[1])
        broker_pid = listening_pid(port)
        self.pids = {name: proc.pid for name, proc in procs}
        if broker_pid is not None:
            self.pids["broker"] = broker_pid
        self.start = time.monotonic()
        self.used = {name: process_cpu(pid) for name, pid in self.pids.items()}

    def cores(self) -> dict[str, float]:
        span = time.monotonic() - self.start
        return {name: (process_cpu(pid) - self.used[name]) / span for name, pid in self.pids.items()}


def _hops(result: LatencyResult, broker: Broker, start: dict[str, dict[int, int]], created: dict[str, float],
          prefix: str, picked: dict[str, float]) -> None:  # fmt: skip
    """Split each picked order's latency at its slowest first answer: the three services that
    answer ``pedido-novo``, then picking's join."""
    answered: dict[str, dict[str, float]] = {}
    for topic in FIRST_HOP:
        for (_, ts), m in _read(broker, topic, start[topic], _OrderId):
            if m.order_id.startswith(prefix):
                answered.setdefault(m.order_id, {}).setdefault(topic, ts)
    slowest = {o: max(t.values()) for o, t in answered.items() if len(t) == len(FIRST_HOP) and o in picked}
    first = [slowest[o] - created[o] for o in slowest]
    join = [picked[o] - slowest[o] for o in slowest]
    if first:
        result.first_p50, result.first_p99 = percentile(first, 50), percentile(first, 99)
        result.join_p50, result.join_p99 = percentile(join, 50), percentile(join, 99)


def _start_pipeline(
    ws: Workspace, tag: str, service_args: dict[str, list[str]]
) -> list[tuple[str, subprocess.Popen[bytes]]]:
    """One ``kafkaworkers run --plugin X`` per service (plus its ``service_args``), each in a
    bench-owned consumer group."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KAFKAWORKERS_DISABLE_PLUGINS")}
    catalogue = ws.path / "catalogo-bench.json"
    items = json.loads(CATALOGUE.read_text())
    catalogue.write_text(json.dumps([{**item, "estoque": BENCH_STOCK} for item in items]))
    spec = runner.make_spec(PASSTHROUGH, ws, IN_TOPIC, OUT_TOPIC, 0, f"{tag}-pipeline")
    # The topics are shared and hold earlier orders: new bench groups start at their end.
    spec.consumer["auto.offset.reset"] = "latest"
    config = ws.kw_config(spec, plugins={"reserva": {"catalogue": str(catalogue)}})
    procs = []
    for name in PIPELINE:
        group = f"{ws.prefix}-{tag}-{name}"
        argv = [str(KW), "run", "--plugin", name, "--group-id", group, "--config", str(config), "-b", ws.bootstrap,
                "--metrics-port", str(runner.free_port()), "--log-level", "WARNING",
                *service_args.get(name, [])]  # fmt: skip
        log = open(ws.path / f"{group}.log", "wb")  # noqa: SIM115 - handed to the child
        env_one = {**env, "KAFKAWORKERS_DATA_DIR": str(ws.path / "data" / group)}
        procs.append((name, subprocess.Popen(argv, env=env_one, cwd=ws.path, stdout=log, stderr=subprocess.STDOUT)))
        log.close()
    return procs


def _create_pipeline_topics(broker: Broker) -> None:
    """Create the pipeline's topics a fresh broker lacks, with the orders topic's 6 partitions."""
    rows = [r for r in _installed_plugins() if r["name"] in PIPELINE]
    declared = {t for r in rows for t in (*r["consumes"], *r["produces"])}
    missing = sorted(declared - broker.topics())
    if missing:
        broker.create(*missing)


def _catalogue_skus() -> list[str]:
    """The SKUs reserva knows: an order naming another one is answered sem_estoque and cancelled."""
    return [item["sku"] for item in json.loads(CATALOGUE.read_text())]


def _ends(broker: Broker, topic: str) -> dict[int, int]:
    """Each partition's high watermark now (0 for a missing topic)."""
    meta = broker.admin.list_topics(topic, timeout=10).topics.get(topic)
    if meta is None or meta.error:
        return {}
    probe = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "bench-watermarks"})
    try:
        return {p: watermarks(probe, TopicPartition(topic, p))[1] for p in meta.partitions}
    finally:
        probe.close()


def _wait_ready(broker: Broker, in_topic: str, out_topic: str, start_out: dict[int, int], prefix: str,
                procs: list[tuple[str, subprocess.Popen[bytes]]], skus: list[str] | None) -> bool:  # fmt: skip
    """Send a probe order every 0.5 s until one comes out: every consumer has joined."""
    producer = Producer({**PRODUCER, "bootstrap.servers": broker.bootstrap})
    consumer = _assigned(broker, out_topic, start_out)
    encode = msgspec.json.Encoder().encode
    rng = random.Random(3)
    deadline = time.monotonic() + READY_TIMEOUT
    sent = 0
    try:
        while time.monotonic() < deadline:
            if any(p.poll() is not None for _, p in procs):
                return False
            order_id = f"{prefix}-{sent:04d}"
            producer.produce(in_topic, encode(make_order(rng, order_id, criado_em=datetime.now(UTC), skus=skus)),
                             order_id.encode(), headers=[(CORRELATION_HEADER, order_id.encode())])  # fmt: skip
            producer.flush(5)
            sent += 1
            until = time.monotonic() + 0.5
            while time.monotonic() < until:
                msg = consumer.poll(0.1)
                if msg is not None and msg.error() is None and msg.value() and prefix.encode() in msg.value():
                    return True
        return False
    finally:
        consumer.close()


def _drain(broker: Broker, out_topic: str, start_out: dict[int, int], prefix: str, expected: int) -> None:
    """Wait until ``expected`` orders of this load have an output on the topic (or the drain timeout).

    Orders, not messages: picking writes two per order (iniciado, concluido), and counting
    messages ended the wait when half of the orders were through.
    """
    deadline = time.monotonic() + DRAIN_TIMEOUT
    needle = b'"' + prefix.encode()  # an order id that starts with the prefix (not the warm-up order)
    decode = msgspec.json.Decoder(_OrderId).decode
    seen: set[str] = set()
    consumer = _assigned(broker, out_topic, start_out)
    try:
        while len(seen) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is None and msg.value() and needle in msg.value():
                    seen.add(decode(msg.value()).order_id)
    finally:
        consumer.close()


class _LiveReader(threading.Thread):
    """Notes when each output of this load reaches a read_committed reader (wall clock, ms).

    ``consume(1000, 0.002)`` returns after at most 2 ms, so an arrival is noted at most 2 ms
    late; ``fetch.wait.max.ms`` = 10 bounds how long the broker holds a fetch.
    """

    def __init__(self, broker: Broker, topic: str, start: dict[int, int], prefix: str) -> None:
        super().__init__(daemon=True)
        self.consumer = _assigned(broker, topic, start, {"isolation.level": "read_committed", "fetch.wait.max.ms": 10})
        self.needle = b'"' + prefix.encode()
        self.seen: dict[str, float] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        decode = msgspec.json.Decoder(_OrderId).decode
        seen = self.seen
        try:
            while not self._halt.is_set():
                batch = self.consumer.consume(1000, 0.002)
                now = time.time() * 1000
                for msg in batch:
                    if msg.error() is None and msg.value() and self.needle in msg.value():
                        seen.setdefault(decode(msg.value()).order_id, now)
        finally:
            self.consumer.close()

    def wait(self, expected: int, timeout: float) -> None:
        """Until ``expected`` outputs arrived, or ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while len(self.seen) < expected and time.monotonic() < deadline and self.is_alive():
            time.sleep(0.1)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def _assigned(broker: Broker, topic: str, start: dict[int, int], extra: dict[str, Any] | None = None) -> Consumer:
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"bench-reader-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, **(extra or {})})  # fmt: skip
    meta = broker.admin.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, start.get(p, 0)) for p in meta.partitions])
    return consumer


def _read(broker: Broker, topic: str, start: dict[int, int], typ: type) -> list[tuple[tuple[int, int], Any]]:
    """Every message of ``topic`` from ``start`` to the current end, decoded as ``typ``."""
    ends = _ends(broker, topic)
    consumer = _assigned(broker, topic, start)
    decoder = msgspec.json.Decoder(typ)
    out = []
    remaining = {p for p, end in ends.items() if end > start.get(p, 0)}
    deadline = time.monotonic() + 120
    try:
        while remaining and time.monotonic() < deadline:
            for msg in consumer.consume(5000, 0.5):
                if msg.error() is not None:
                    continue
                try:
                    out.append((msg.timestamp(), decoder.decode(msg.value())))
                except msgspec.DecodeError:
                    continue
            # The position, not the last message: a transaction's commit marker takes an offset
            # that a read_committed reader never receives.
            for tp in consumer.position([TopicPartition(topic, p) for p in remaining]):
                if tp.offset >= ends[tp.partition]:
                    remaining.discard(tp.partition)
    finally:
        consumer.close()
    return out
