"""``make bench``: kafkaworkers side by side with a hand-written loop and its peers.

Every figure comes from this one run on the given broker. Throughput contenders (W1-W4 and
the peers) each run as their own process, interleaved (A B C ... A B C ...), ``--reps``
times, every run in a fresh consumer group on one pre-filled orders topic; medians are
reported. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script: import the bench package from the repository root, not bench/'s modules bare.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import confluent_kafka  # noqa: E402
from confluent_kafka import KafkaException  # noqa: E402

from bench import latency, perftools, report, venvs  # noqa: E402
from bench.broker import Broker  # noqa: E402
from bench.common import (  # noqa: E402
    CONSUMER,
    PRODUCER,
    Spec,
)
from bench.orders import order_stream, payment_stream  # noqa: E402
from bench.otlp_sink import OtlpSink  # noqa: E402
from bench.runner import (  # noqa: E402
    Contender,
    RunResult,
    Workspace,
    free_port,
    make_spec,
    run_contender,
    start,
    stop,
)

W0_PY = Contender("w0-py", "W0", "confluent-kafka producer, 300 B", module="bench.contenders.raw_produce")

CONTENDERS = [
    Contender("w1", "W1", "confluent-kafka batch consume, no processing", module="bench.contenders.raw_consume"),
    Contender("w2", "W2", "hand-written confluent-kafka loop (baseline)", module="bench.contenders.raw_pipeline"),
    Contender("kw", "W3", "kafkaworkers run (metrics + observer hook on)", kind="kw-cli"),
    Contender("kw-eos", "W8", "kafkaworkers run, exactly_once (the default: gathers full batches up to 100 ms)",
              kind="kw-cli", options={"guarantee": "exactly_once"}),
    Contender("kw-eos-0", "W8", "kafkaworkers run, exactly_once, transaction_interval_ms = 0 (every batch)",
              kind="kw-cli", options={"guarantee": "exactly_once", "settings": {"transaction_interval_ms": 0}}),
    Contender("w2-small", "W3-small", "hand-written confluent-kafka loop, small message (baseline)",
              module="bench.contenders.raw_pipeline", options={"data": "payments"}),
    Contender("kw-small", "W3-small", "kafkaworkers run, small message (metrics + observer hook on)", kind="kw-cli",
              options={"data": "payments"}),
    Contender("kw-otel", "W9", "kafkaworkers run, OpenTelemetry tracing on (OTLP/HTTP to a local collector)",
              kind="kw-cli", options={"tracing": True}),
    Contender("kw-otel-small", "W9", "kafkaworkers run, small message, tracing on", kind="kw-cli",
              options={"tracing": True, "data": "payments"}),
    Contender("kw-otel-small-1pct", "W9", "kafkaworkers run, small message, tracing on, 1% of traces sampled",
              kind="kw-cli", options={"tracing": True, "data": "payments", "sampled": "0.01"}),
    Contender("kw-p1", "W7", "kafkaworkers run --processes 1", kind="kw-cli", options={"mode": "w7", "processes": 1}),
    Contender("kw-p2", "W7", "kafkaworkers run --processes 2", kind="kw-cli", options={"mode": "w7", "processes": 2}),
    Contender("kw-off", "W3", "kafkaworkers Worker in-process, metrics off, no hook",
              module="bench.contenders.kafkaworkers_inproc"),
    Contender("kw-fail1", "W4", "kafkaworkers run, 1% fail once (retry topic)", kind="kw-cli", fail_pct=1.0),
    Contender("kw-fail10", "W4", "kafkaworkers run, 10% fail once (retry topic)", kind="kw-cli", fail_pct=10.0),
    Contender("faststream-confluent", "peer", "FastStream [confluent]", module="bench.contenders.faststream_peer",
              args=("confluent",), venv="faststream-confluent"),
    Contender("faststream-aiokafka", "peer", "FastStream [kafka] (aiokafka)", module="bench.contenders.faststream_peer",
              args=("aiokafka",), venv="faststream-aiokafka"),
    Contender("quixstreams", "peer", "Quix Streams", module="bench.contenders.quixstreams_peer", venv="quixstreams"),
    Contender("faust", "peer", "Faust (faust-streaming)", module="bench.contenders.faust_peer", venv="faust"),
    Contender("aiokafka", "peer", "hand-written aiokafka loop", module="bench.contenders.aiokafka_peer",
              venv="aiokafka"),
]  # fmt: skip
WORKLOADS = ("w0", "w1", "w2", "w3", "w3-small", "w4", "peers", "w5", "w6", "w7", "w8", "w9", "capacity")
#: W8's latency rows: the pass-through plugin's spec options for each processing guarantee.
W8_LATENCY = (
    ("at_least_once", {}),
    ("exactly_once", {"guarantee": "exactly_once"}),
    ("exactly_once, every batch", {"guarantee": "exactly_once", "settings": {"transaction_interval_ms": 0}}),
)


def w6_contenders() -> list[Contender]:
    """W6: every contender at concurrency 1, 8 and 64 where it has such a setting (N in the labels)."""
    out = []
    for n in W6_CONCURRENCY:
        for io in ("sync", "async"):
            how = "sync handler on threads (http.client)" if io == "sync" else "async def handler (aiohttp)"
            out.append(Contender(f"kw-w6-{io}-c{n}", "W6", f"kafkaworkers run --concurrency N, {how}", kind="kw-cli",
                                 options={"mode": "w6", "io": io, "concurrency": n}))  # fmt: skip
        out.append(Contender(f"raw-w6-c{n}", "W6", "hand-written confluent-kafka loop + ThreadPoolExecutor(N)",
                             module="bench.contenders.raw_w6", options={"concurrency": n}))  # fmt: skip
        out.append(Contender(f"faststream-w6-c{n}", "W6", "FastStream [confluent] async subscriber, max_workers=N",
                             module="bench.contenders.faststream_w6", venv="faststream-confluent",
                             options={"concurrency": n}))  # fmt: skip
    out.append(Contender("quixstreams-w6-c1", "W6", "Quix Streams (no concurrency setting)",
                         module="bench.contenders.quixstreams_w6", venv="quixstreams", options={"concurrency": 1}))
    return out


#: W6's concurrency settings, and the rate each is sized for (msgs/s): a run lasts about --w6-seconds.
W6_CONCURRENCY = (1, 8, 64)
W6_KEYS = 10_000
KW = "kw"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bootstrap-servers", "-b", default="127.0.0.1:19092")
    p.add_argument("--messages", "-n", type=int, default=200_000, help="orders per run (default 200,000)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every contender (default 3)")
    p.add_argument("--workloads", help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)")
    p.add_argument(
        "--contenders",
        default="",
        help="comma-separated contender keys (default: all of the workloads; alone, only these run)",
    )
    p.add_argument("--w5-seconds", type=float, default=30.0, help="seconds of load per W5 run (default 30)")
    p.add_argument("--w5-reps", type=int, help="repetitions of each W5 load (default: --reps)")
    p.add_argument("--w5-loads", default="25,50", help="W5 load levels, percent of the W2 rate (default 25,50)")
    p.add_argument(
        "--w5-pipeline-rates",
        default="100",
        help="further W5 pipeline loads in orders/s, at which the six services keep up (default 100; '' for none)",
    )
    p.add_argument(
        "--w5-mode",
        choices=("auto", "pipeline", "passthrough"),
        default="auto",
        help="auto: the six-service pipeline (if installed) and one pass-through plugin",
    )
    p.add_argument("--w5-base-rate", type=float, help="msgs/s that W5's 25%%/50%% refer to (default: this run's W2)")
    p.add_argument("--w6-seconds", type=float, default=6.0,
                   help="W6: about how long each run lasts (its message count is sized for its concurrency)")
    p.add_argument("--w6-delay-ms", type=float, default=20.0, help="W6: the local HTTP server's answer delay")
    p.add_argument("--w8-rate", type=float, default=5000.0,
                   help="W8: msgs/s of the paced load through the pass-through plugin (default 5,000)")
    p.add_argument("--w8-seconds", type=float, default=20.0, help="W8: seconds of each paced load (default 20)")
    p.add_argument("--capacity-rate", type=float, default=3000.0,
                   help="capacity: the orders/s offered, above what the pipeline carries (default 3,000)")
    p.add_argument("--capacity-seconds", type=float, default=15.0, help="capacity: seconds of that load (default 15)")
    p.add_argument("--capacity-settings", default="defaults;notificacao=1,pagamento=1;notificacao=32,pagamento=32",
                   help="capacity: the services' settings to try, ';'-separated; each a comma list of "
                        "SERVICE=CONCURRENCY ('defaults': the services' own)")
    p.add_argument("--capacity-rates", default="100,350",
                   help="capacity: further loads in orders/s at the best setting, as long as the half one "
                        "(default 100,350; '' for none)")  # fmt: skip
    p.add_argument("--capacity-half-seconds", type=float, default=30.0,
                   help="capacity: seconds of load at half the best capacity (default 30)")
    p.add_argument("--timeout", type=float, help="seconds one contender run may take (default 60 + N/1000)")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results.md")
    p.add_argument(
        "--keep-topics", action="store_true", help="keep this run's topics, groups and worker state at the end"
    )
    p.add_argument("--note", default="", help="a line to print under the title of the results (e.g. the conditions)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of the benchmark: W3 under cProfile (bench/profiler.py), top frames printed",
    )
    return p.parse_args(argv)  # fmt: skip


def say(text: str) -> None:
    print(text, flush=True)


def selected(args: argparse.Namespace) -> tuple[set[str], list[Contender]]:
    if args.workloads is None:
        args.workloads = "w1,w2,w3,w3-small,w4,peers" if args.contenders else ",".join(WORKLOADS)
    workloads = {w.strip().lower() for w in args.workloads.split(",") if w.strip()}
    unknown = workloads - set(WORKLOADS)
    if unknown:
        sys.exit(f"bench: unknown workload(s) {', '.join(sorted(unknown))}; choose from {', '.join(WORKLOADS)}")
    keys = [k.strip() for k in args.contenders.split(",") if k.strip()]
    known = {c.key for c in CONTENDERS} | {c.key for c in w6_contenders()}
    if set(keys) - known:
        sys.exit(
            f"bench: unknown contender(s) {', '.join(sorted(set(keys) - known))}; known: {', '.join(sorted(known))}"
        )
    # W8 and W9 are read against W3 of the same run: they bring W3's kafkaworkers runs along.
    chosen = [c for c in CONTENDERS + w6_contenders() if (c.key in keys if keys else c.workload.lower() in workloads
              or (c.workload == "peer" and "peers" in workloads) or (c.key == KW and "w8" in workloads)
              or (c.key in (KW, "kw-small") and "w9" in workloads))]  # fmt: skip
    return workloads, chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile:
        profile = [sys.executable, str(ROOT / "bench" / "profiler.py"), "-b", args.bootstrap_servers,
                   "--messages", str(min(args.messages, 100_000))]  # fmt: skip
        return subprocess.call(profile)
    workloads, contenders = selected(args)
    exe = Path(sys.executable)
    command = shlex.join([str(exe.relative_to(ROOT)) if exe.is_relative_to(ROOT) else str(exe), "bench/run.py",
                          *(sys.argv[1:] if argv is None else argv)])  # fmt: skip
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    broker = Broker(args.bootstrap_servers)
    try:
        broker.topics()
    except KafkaException as exc:
        say(f"bench: no Kafka broker at {args.bootstrap_servers} ({exc}); start one with `make kafka-up`")
        return 2
    ws = Workspace(ROOT / ".cache" / "bench" / "runs" / prefix, prefix, args.bootstrap_servers)
    n = args.messages
    timeout = args.timeout or 60 + n / 1000
    say(f"bench: run {prefix}, {n:,} messages, {args.reps} repetitions; work files in {ws.path}")

    # --- peers' environments ---------------------------------------------------------
    versions = venvs.versions(sys.executable, ["kafkaworkers", "confluent-kafka", "msgspec", "pluggy",
                                               "prometheus-client"])  # fmt: skip
    versions["librdkafka"] = confluent_kafka.libversion()[0]
    failures: list[str] = []
    usable: list[Contender] = []
    for c in contenders:
        if not c.venv:
            usable.append(c)
            continue
        env = venvs.ensure(c.venv, log=say)
        if not env.ok:
            failures.append(f"{c.label} ({c.key}): could not be installed: {env.error}")
            say(f"bench: {c.key}: {env.error}")
            continue
        label = f"{c.label} " + " ".join(f"{d} {v}" for d, v in env.versions.items() if d != "msgspec")
        usable.append(replace(c, label=label))
        versions.update({f"{d} ({c.venv} venv)": v for d, v in env.versions.items() if d != "msgspec"})

    perf: list[tuple[str, perftools.PerfResult]] = []
    results: list[RunResult] = []
    lat: list[latency.LatencyResult] = []
    w8_lat: list[latency.LatencyResult] = []
    capacity: list[latency.LatencyResult] = []
    w5_note = ""
    try:
        # --- W0: the broker ceiling --------------------------------------------------
        if "w0" in workloads:
            why = perftools.available()
            for rep in range(args.reps):
                topic = f"{prefix}-w0-r{rep}"
                broker.create(topic)
                if why is None:
                    r = perftools.produce(args.bootstrap_servers, topic, n, ws.path / f"{topic}-producer.log")
                    perf.append(("ProducerPerformance (Java), 300 B, acks=all, idempotent", r))
                    say(f"W0 ProducerPerformance r{rep}: {r.rate:,.0f} msgs/s {r.detail}")
                    r = perftools.consume(
                        args.bootstrap_servers, topic, n, f"{topic}-c", ws.path / f"{topic}-consumer.log"
                    )
                    perf.append(("ConsumerPerformance (Java)", r))
                    say(f"W0 ConsumerPerformance r{rep}: {r.rate:,.0f} msgs/s {r.detail}")
                py_topic = f"{prefix}-w0py-r{rep}"
                broker.create(py_topic)
                r = run_contender(W0_PY, make_spec(W0_PY, ws, py_topic, py_topic, n, f"r{rep}"), ws, rep, timeout)
                results.append(r)
                say(_progress(W0_PY, r))
            if why:
                failures.append(f"W0 Java perf tools: {why}")

        # --- the orders (and W3-small's payments), once ------------------------------
        orders, out = f"{prefix}-orders", f"{prefix}-results"
        topics = {"orders": orders, "payments": f"{prefix}-payments"}
        fill_lines: list[str] = []
        streams = {"orders": (order_stream, "orders"), "payments": (payment_stream, "payment events")}
        needed = dict.fromkeys(c.options.get("data", "orders") for c in usable if c.workload not in ("W0", "W6"))
        if any(c.workload == "W7" for c in usable):
            needed.setdefault("orders")
        if needed:
            broker.create(out)
        for data in needed:
            make, what = streams[data]
            broker.create(topics[data])
            records = list(make(n, prefix[-6:]))
            mean_size = statistics.mean(len(v) for _, v, _ in records)
            count, seconds = broker.fill(topics[data], records)
            del records
            fill_lines.append(
                f"Pre-fill: {count:,} {what} (mean {mean_size:.0f} B of JSON) written in {seconds:.1f} s "
                f"= {count / seconds:,.0f} msgs/s by one confluent-kafka producer (acks=all, idempotent)."
            )
            say(f"bench: {fill_lines[-1]}")

        # --- W1-W4 and the peers, interleaved ----------------------------------------
        rotation = [c for c in usable if c.workload not in ("W0", "W6", "W7")]
        sink = OtlpSink() if any(c.workload == "W9" for c in rotation) else None
        for rep in range(args.reps):
            for c in rotation:
                topic = topics[c.options.get("data", "orders")]
                spec = make_spec(c, ws, topic, out, n, f"r{rep}")
                if sink is not None and c.options.get("tracing"):
                    spec.options["otlp_endpoint"] = sink.endpoint
                r = run_contender(c, spec, ws, rep, timeout)
                if sink is not None and c.options.get("tracing"):
                    r.extra["spans"] = sink.spans[spec.group]
                results.append(r)
                say(_progress(c, r))
                time.sleep(1.0)  # let the previous process's sockets and the broker settle

        summary = report.summarize(results)
        baseline = summary.get("w2", {}).get("rate", float("nan"))

        # --- W7: W3 in 2 processes against 1 -----------------------------------------
        for rep in range(args.reps):
            for c in [c for c in usable if c.workload == "W7"]:
                r = run_w7(c, make_spec(c, ws, orders, out, n, f"r{rep}"), ws, rep, timeout)
                results.append(r)
                say(_progress(c, r))
                time.sleep(1.0)

        # --- W6: 20 ms of I/O per message, at concurrency 1, 8 and 64 ----------------
        w6 = [c for c in usable if c.workload == "W6"]
        if w6:
            w6_results, w6_line = run_w6(args, ws, broker, w6)
            results += w6_results
            fill_lines.append(w6_line)

        # --- W5: latency at 25% and 50% of W2 ----------------------------------------
        if "w5" in workloads:
            base = args.w5_base_rate or baseline
            if not base or base != base:
                say("bench: W5 needs a base rate: measuring W2 once")
                c = next(c for c in CONTENDERS if c.key == "w2")
                if orders not in broker.topics():
                    broker.create(orders, out)
                    broker.fill(orders, order_stream(n, prefix[-6:]))
                base = run_contender(c, make_spec(c, ws, orders, out, n, "w5base"), ws, 0, timeout).rate
            modes, w5_note = _w5_modes(args.w5_mode)
            loads = [(int(x), base * int(x) / 100) for x in args.w5_loads.split(",") if x.strip()]
            absolute = [(0, float(x)) for x in args.w5_pipeline_rates.split(",") if x.strip()]
            for rep in range(args.w5_reps or args.reps):
                for mode in modes:
                    for pct, rate in loads + (absolute if mode == "pipeline" else []):
                        r = latency.run(ws, broker, mode, pct, rate, args.w5_seconds, rep)
                        lat.append(r)
                        say(f"W5 {mode} {r.load} r{rep}: " + (
                            f"p50 {r.p50:.1f} ms, p99 {r.p99:.1f} ms, p99.9 {r.p999:.1f} ms, {r.matched}/{r.sent} out, "
                            f"sent {r.achieved_rate:,.0f} msgs/s, out {r.out_rate:,.0f} msgs/s"
                            if r.ok else f"failed: {r.error}"))  # fmt: skip

        # --- W8: the latency exactly-once adds, at one paced load ----------------------
        if "w8" in workloads:
            for rep in range(args.reps):
                for variant, options in W8_LATENCY:
                    r = latency.run(ws, broker, "passthrough", 0, args.w8_rate, args.w8_seconds, rep,
                                    variant=variant.replace(", ", "-").replace(" ", ""), options=options, live=True)
                    r.variant = variant
                    w8_lat.append(r)
                    say(f"W8 {variant} {r.load} r{rep}: " + (
                        f"appended p50 {r.p50:.1f} / p99 {r.p99:.1f} ms, visible p50 {r.visible_p50:.1f} / "
                        f"p99 {r.visible_p99:.1f} ms, {r.matched}/{r.sent} out" if r.ok else f"failed: {r.error}"))

        # --- the pipeline's capacity, and its latency at half of it --------------------
        if "capacity" in workloads:
            capacity = run_capacity(args, ws, broker)
    finally:
        if not args.keep_topics:
            deleted = broker.delete_prefixed(prefix)
            groups = broker.delete_groups_prefixed(prefix)
            say(f"bench: deleted the {len(deleted)} topics and {len(groups)} consumer groups of this run")
            # The workers' state (the pipeline's SQLite and DuckDB files, Faust's data dirs); logs stay.
            for state in [ws.path / "data", *ws.path.glob("*-data")]:
                shutil.rmtree(state, ignore_errors=True)

    # --- the report ------------------------------------------------------------------
    summary = report.summarize(results)
    for key, s in summary.items():
        for error in s["errors"]:
            failures.append(f"{key}: {error}")
    peers = [c.key for c in contenders if c.workload == "peer"]
    lines = [
        "# kafkaworkers benchmark: latest results",
        "",
        *([f"**{args.note}**", ""] if args.note else []),
        f"Command: `make bench` = `{command}` (run `{prefix}`).",
        "",
        "## Machine",
        "",
        *report.machine(versions),
        "",
        "## Targets",
        "",
        *report.targets(summary, peers, KW, baseline, lat),
        *report.w8_targets(summary, KW, w8_lat),
        *report.capacity_targets(capacity),
        "",
        "## Set-up",
        "",
        f"- {n:,} orders per run on a 6-partition topic, {args.reps} repetitions per contender, interleaved "
        f"in this order: {', '.join(c.key for c in usable if c.workload != 'W0')}; medians reported "
        "(W6 and W7 rotate among their own contenders after the others).",
        "- Every run: its own process, a fresh consumer group, results to one shared 6-partition topic.",
        f"- librdkafka consumer (every confluent-kafka contender): `{CONSUMER}`",
        f"- librdkafka producer: `{PRODUCER}`",
        "- msgs/s: orders finished per second of the contender's measured window (first message in, to last "
        "result acknowledged and offsets stored/committed). CPU: whole-process CPU time in that window "
        "(getrusage, all threads). Peak RSS: the process's VmHWM (/proc/<pid>/status), sampled by the parent "
        "every 50 ms until the process exits.",
        *(f"- {line}" for line in fill_lines),
        "",
    ]
    if perf or any(r.contender == "w0-py" for r in results):
        lines += ["## W0: broker ceiling", "", *report.perf_table(perf), ""]
        w0 = report.summarize([r for r in results if r.contender == "w0-py"])
        if w0:
            lines += [*report.throughput_table([W0_PY], w0, float("nan")), ""]
    rotation = [c for c in usable if c.workload not in ("W0", "W3-small", "W6", "W7", "W8")]
    if rotation:
        lines += ["## Throughput: W1-W4 and peers", "", *report.throughput_table(rotation, summary, baseline), ""]
    small = [c for c in usable if c.workload == "W3-small"]
    if small:
        small_base = summary.get("w2-small", {}).get("rate", float("nan"))
        lines += [
            "## W3-small: the framework's own cost per message",
            "",
            "A flat ~230-byte `Pagamento` decoded with msgspec, one ~70-byte `PagamentoResumo` produced per input "
            "(key and correlation header carried along), offsets stored after delivery; the same client settings "
            "for both; concurrency 1. `vs W2` here: against the hand-written loop on the same small messages.",
            "",
            *report.throughput_table(small, summary, small_base),
            "",
            *report.small_lines(summary, "kw-small", "w2-small"),
            "",
        ]
    w6 = [c for c in usable if c.workload == "W6"]
    if w6:
        lines += [
            "## W6: 20 ms of I/O per message, at concurrency 1, 8 and 64",
            "",
            "W3-small's work plus one call per message to a local HTTP server that answers after "
            f"{args.w6_delay_ms:.0f} ms (bench/httpserver.py), 6 partitions, 10,000 keys. msgs/s: the target count "
            "over the span from the first message received to the target-th handler returning (medians). FastStream "
            "accepts `max_workers` > 1 only with `AckPolicy.ACK_FIRST` (offset committed on receipt, before the "
            "handler ran): it runs so at every setting. The hand-written loop waits for its batch's slowest call "
            "and keeps no per-key order; Quix Streams has no concurrency setting.",
            "",
            *report.w6_lines(w6, summary),
            "",
        ]
    if any(c.workload == "W7" for c in usable):
        lines += [
            "## W7: W3 in 2 processes against 1",
            "",
            f"`kafkaworkers run --processes N` on W3's {n:,} orders; each process reports its count every 500 orders "
            "and the run stops at 90% of them; msgs/s = orders reported / span from the first order any process "
            "handled to the latest report (the second process's group join and the rebalance included). "
            f"{os.cpu_count()} cores, shared with the broker.",
            "",
            *report.w7_lines(summary),
            "",
        ]
    if any(c.workload == "W8" for c in usable) or w8_lat:
        w8 = [c for c in usable if c.key == KW or c.workload == "W8"]
        lines += [
            "## W8: exactly-once against W3",
            "",
            "W3's plugin and `kafkaworkers run`, metrics and the observer hook on, in `processing_guarantee = "
            "\"exactly_once\"`: one transactional producer, each batch's outputs and consumed offsets in one "
            "transaction gathering full batches for up to 100 ms and committing once the consumer has caught up "
            "(the default), and once with a transaction per batch (`transaction_interval_ms = 0`). Interleaved "
            "with W3 in the same rotation. The window closes when the last batch's transaction has committed. "
            "`vs W2` here: against W3.",
            "",
            *report.throughput_table(w8, summary, summary.get(KW, {}).get("rate", float("nan"))),
            "",
            *report.w8_lines(summary, KW),
            "",
        ]
        if w8_lat:
            lines += [
                f"Latency at a paced load of {args.w8_rate:,.0f} msgs/s for {args.w8_seconds:.0f} s through W5's "
                "pass-through plugin, the three settings interleaved. *appended*: W5's method, the output's "
                "broker timestamp (LogAppendTime) minus the order's `criado_em`; for a transactional output "
                "that is when it was written, not when it became readable. *visible*: when a `read_committed` "
                "reader running during the load received it (wall clock, at most 2 ms late) minus `criado_em`: "
                "what a downstream consumer sees.",
                "",
                *report.w8_latency_table(w8_lat),
                "",
            ]
    if any(c.workload == "W9" for c in usable):
        w9 = [c for c in usable if c.key in (KW, "kw-small") or c.workload == "W9"]
        lines += [
            "## W9: OpenTelemetry tracing on against off",
            "",
            "W3's and W3-small's `kafkaworkers run` with tracing on (`OTEL_TRACES_EXPORTER=otlp`, the `otel` extra): "
            "a consumer span per order and a producer span per output, the W3C context read from and written into "
            "the headers, exported in batches over OTLP/HTTP to a collector on the bench's own process (its CPU is "
            "not the contender's). Interleaved with W3 and W3-small, tracing off, in the same rotation; the window "
            "closes once the worker has exported its last span. `vs W2` here: against W2.",
            "",
            *report.throughput_table(w9, summary, baseline),
            "",
            *report.w9_lines(summary),
            "",
        ]
    if capacity:
        lines += [
            "## The order pipeline: capacity, and latency at half of it",
            "",
            "The six services, one `kafkaworkers run --plugin X` each (W5's set-up), on the shared 2 cores with "
            "the broker and the load producer. Capacity: orders offered at "
            f"{args.capacity_rate:,.0f}/s for {args.capacity_seconds:.0f} s, more than the services carry; "
            "out msgs/s = orders reaching `processo-picking` iniciado per second from the first to the last "
            f"(the backlog drains within {latency.DRAIN_TIMEOUT:.0f} s); cancelled orders, the other terminal "
            "state, are counted apart (none expected: unlimited stock, approved cards). Then a load at half the "
            "best setting's capacity, latency as in W5, and the same at each of `--capacity-rates`.",
            "",
            *report.capacity_lines(capacity),
            "",
            "Where the time and the cores go at each paced load: each order's slowest first answer "
            "(reserva-estoque, processo-pagamento and fraude-verificado, by their broker timestamps) minus its "
            "`criado_em`, then picking's output minus that answer; cores = CPU seconds each service process, and "
            "the local broker, used while the load ran, per second (the load producer's own are not counted).",
            "",
            *report.pipeline_split_lines(capacity),
            "",
        ]
    if lat:
        lines += [
            "## W5: end-to-end latency",
            "",
            f"{w5_note}. Latency: the output's broker timestamp minus the order's `criado_em`. Percentiles cover the "
            f"orders that came out within {latency.DRAIN_TIMEOUT:.0f} s after the load ended: out/sent below 1 means "
            "the workers fell behind the load, and the real tail is worse than shown.",
            "",
            *report.latency_table(lat),
            "",
        ]
    if failures:
        lines += ["## Failures", "", *(f"- {f}" for f in failures), ""]
    text = "\n".join(lines)
    say("\n" + text)
    args.output.write_text(text)
    say(f"bench: written to {args.output}")
    return 0


def _service_args(setting: str) -> dict[str, list[str]]:
    """``notificacao=32,pagamento=32`` -> each service's ``--concurrency``; ``defaults`` -> none."""
    out = {}
    for item in setting.split(","):
        if item.strip() and item.strip() != "defaults":
            name, value = item.split("=")
            out[name.strip()] = ["--concurrency", str(int(value))]
    return out


def run_capacity(args: argparse.Namespace, ws: Workspace, broker: Broker) -> list[latency.LatencyResult]:
    """The pipeline under more load than it carries, for each setting (interleaved); then the best
    setting at half its capacity (median out msgs/s)."""
    settings = [s.strip() for s in args.capacity_settings.split(";") if s.strip()]
    results: list[latency.LatencyResult] = []
    for rep in range(args.reps):
        for i, setting in enumerate(settings):
            r = latency.run(ws, broker, "pipeline", 0, args.capacity_rate, args.capacity_seconds, rep,
                            variant=f"cap{i}", service_args=_service_args(setting))  # fmt: skip
            r.variant = setting
            results.append(r)
            say(f"capacity [{setting}] r{rep}: " + (
                f"{r.out_rate:,.0f} orders/s out, {r.matched}/{r.sent} picked, {r.cancelled} cancelled"
                if r.ok else f"failed: {r.error}"))  # fmt: skip
    best, rate = report.best_capacity(results)
    if not rate:
        return results
    for rep in range(args.reps):
        loads = [(rate / 2, "half"), *((float(x), f"{float(x):,.0f}/s") for x in args.capacity_rates.split(",")
                                        if x.strip())]  # fmt: skip
        for load, label in loads:
            tag = "half" if label == "half" else f"{load:.0f}ps"
            r = latency.run(ws, broker, "pipeline", 0, load, args.capacity_half_seconds, rep,
                            variant=tag, service_args=_service_args(best))  # fmt: skip
            r.variant = f"{best} ({label})"
            results.append(r)
            say(f"capacity [{best}] at {load:,.0f} orders/s r{rep}: " + (
                f"p50 {r.p50:.1f} ms, p99 {r.p99:.1f} ms, {r.matched}/{r.sent} out, {r.cancelled} cancelled"
                if r.ok else f"failed: {r.error}"))  # fmt: skip
    return results


def run_w7(c: Contender, spec: Spec, ws: Workspace, rep: int, timeout: float) -> RunResult:
    """One W7 run: ``kafkaworkers run --processes N`` until its processes together reported 90% of
    the orders; msgs/s = what they reported over the span from the first order any of them
    handled to the latest report (each process writes its figures every 500 orders)."""
    proc, log_path = start(c, spec, ws)
    deadline = time.monotonic() + timeout
    figures: list[dict] = []
    while time.monotonic() < deadline and proc.poll() is None:
        figures = []
        for path in Path(spec.result_file).parent.glob(Path(spec.result_file).name + ".*"):
            if not path.name.endswith(".tmp"):
                with contextlib.suppress(OSError, ValueError):
                    figures.append(json.loads(path.read_text()))
        if sum(f["count"] for f in figures) >= 0.9 * spec.target:
            break
        time.sleep(0.05)
    status, _usage, peak = stop(proc)
    total = sum(f["count"] for f in figures)
    if total < 0.9 * spec.target:
        error = f"{total:,} of {spec.target:,} orders (exit {status}); log: {log_path}"
        return RunResult(c.key, rep, False, error=error)
    span = max(f["last"] for f in figures) - min(f["first"] for f in figures)
    return RunResult(c.key, rep, True, messages=total, elapsed_s=span, cpu_s=float("nan"), peak_rss_kb=peak,
                     extra={"processes": len(figures), "log": str(log_path)})  # fmt: skip


def w6_target(concurrency: int, seconds: float) -> int:
    """Messages for one W6 run: about ``seconds`` at the rate ``concurrency`` calls of 20 ms allow
    (capped: on 2 cores the client's CPU caps it well below 64 x 50 msgs/s)."""
    return max(100, int(seconds * min(40 * concurrency, 2500)))


def run_w6(
    args: argparse.Namespace, ws: Workspace, broker: Broker, contenders: list[Contender]
) -> tuple[list[RunResult], str]:
    """Start the HTTP server, fill W6's topic (keyed by 10,000 customers), run the contenders interleaved."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bench.httpserver", str(port), str(args.w6_delay_ms)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    results: list[RunResult] = []
    try:
        if server.stdout is None or server.stdout.readline().strip() != "ready":
            raise RuntimeError("the W6 HTTP server did not start")
        topic = f"{ws.prefix}-w6"
        out = f"{ws.prefix}-w6-results"
        broker.create(topic, out)
        n = max(w6_target(c.options["concurrency"], args.w6_seconds) for c in contenders)
        count, _ = broker.fill(topic, payment_stream(n, ws.prefix[-6:], keys=W6_KEYS))
        line = (f"W6: {count:,} payment events keyed by {W6_KEYS:,} customers on a 6-partition topic; the local "
                f"HTTP server answers after {args.w6_delay_ms:.0f} ms; each run handles "
                + ", ".join(f"{w6_target(c, args.w6_seconds):,} at concurrency {c}" for c in W6_CONCURRENCY)
                + " and reads from the topic's start in a fresh group.")  # fmt: skip
        url = f"http://127.0.0.1:{port}/check"
        for rep in range(args.reps):
            for c in contenders:
                spec = make_spec(c, ws, topic, out, w6_target(c.options["concurrency"], args.w6_seconds), f"r{rep}")
                spec.options["url"] = url
                r = run_contender(c, spec, ws, rep, 60 + spec.target / 20)
                results.append(r)
                say(_progress(c, r))
                time.sleep(1.0)
        return results, line
    finally:
        server.terminate()
        server.wait(10)


def _w5_modes(requested: str) -> tuple[list[str], str]:
    """The W5 shapes to run: the order pipeline when it is installed, and the pass-through plugin."""
    installed, detail = latency.pipeline_status()
    if requested == "pipeline":
        return ["pipeline"], detail
    if requested == "passthrough":
        return ["passthrough"], "pass-through only (--w5-mode passthrough)"
    if installed:
        return ["pipeline", "passthrough"], detail + "; the pass-through plugin alone for comparison"
    return ["passthrough"], detail + "; measured on one pass-through plugin instead"


def _progress(c: Contender, r: RunResult) -> str:
    if not r.ok:
        return f"{c.workload} {c.key} r{r.rep}: FAILED {r.error}"
    return (f"{c.workload} {c.key} r{r.rep}: {r.rate:,.0f} msgs/s, {r.cpu_per_100k:.2f} CPU s/100k, "
            f"peak RSS {r.peak_rss_kb / 1024:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
