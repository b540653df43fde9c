"""``make bench``: kafkaworkers side by side with a hand-written loop and its peers.

Every figure comes from this one run on the given broker. Throughput contenders (W1-W4 and
the peers) each run as their own process, interleaved (A B C ... A B C ...), ``--reps``
times, every run in a fresh consumer group on one pre-filled orders topic; medians are
reported. See bench/README.md.
"""

from __future__ import annotations

import argparse
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
from bench.common import CONSUMER, PRODUCER  # noqa: E402
from bench.orders import order_stream  # noqa: E402
from bench.runner import Contender, RunResult, Workspace, make_spec, run_contender  # noqa: E402

W0_PY = Contender("w0-py", "W0", "confluent-kafka producer, 300 B", module="bench.contenders.raw_produce")

CONTENDERS = [
    Contender("w1", "W1", "confluent-kafka batch consume, no processing", module="bench.contenders.raw_consume"),
    Contender("w2", "W2", "hand-written confluent-kafka loop (baseline)", module="bench.contenders.raw_pipeline"),
    Contender("kw", "W3", "kafkaworkers run (metrics + observer hook on)", kind="kw-cli"),
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
WORKLOADS = ("w0", "w1", "w2", "w3", "w4", "peers", "w5")
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
        args.workloads = "w1,w2,w3,w4,peers" if args.contenders else ",".join(WORKLOADS)
    workloads = {w.strip().lower() for w in args.workloads.split(",") if w.strip()}
    unknown = workloads - set(WORKLOADS)
    if unknown:
        sys.exit(f"bench: unknown workload(s) {', '.join(sorted(unknown))}; choose from {', '.join(WORKLOADS)}")
    keys = [k.strip() for k in args.contenders.split(",") if k.strip()]
    known = {c.key for c in CONTENDERS}
    if set(keys) - known:
        sys.exit(
            f"bench: unknown contender(s) {', '.join(sorted(set(keys) - known))}; known: {', '.join(sorted(known))}"
        )
    chosen = [c for c in CONTENDERS if (c.key in keys if keys else c.workload.lower() in workloads or
              (c.workload == "peer" and "peers" in workloads))]  # fmt: skip
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

        # --- the orders, once --------------------------------------------------------
        orders, out = f"{prefix}-orders", f"{prefix}-results"
        fill_line = ""
        if usable and any(c.workload != "W0" for c in usable):
            broker.create(orders, out)
            records = list(order_stream(n, prefix[-6:]))
            mean_size = statistics.mean(len(v) for _, v, _ in records)
            count, seconds = broker.fill(orders, records)
            del records
            fill_line = (
                f"Pre-fill: {count:,} orders (mean {mean_size:.0f} B of JSON) written in {seconds:.1f} s "
                f"= {count / seconds:,.0f} msgs/s by one confluent-kafka producer (acks=all, idempotent)."
            )
            say(f"bench: {fill_line}")

        # --- W1-W4 and the peers, interleaved ----------------------------------------
        rotation = [c for c in usable if c.workload != "W0"]
        for rep in range(args.reps):
            for c in rotation:
                r = run_contender(c, make_spec(c, ws, orders, out, n, f"r{rep}"), ws, rep, timeout)
                results.append(r)
                say(_progress(c, r))
                time.sleep(1.0)  # let the previous process's sockets and the broker settle

        summary = report.summarize(results)
        baseline = summary.get("w2", {}).get("rate", float("nan"))

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
        "",
        "## Set-up",
        "",
        f"- {n:,} orders per run on a 6-partition topic, {args.reps} repetitions per contender, interleaved "
        f"in this order: {', '.join(c.key for c in usable if c.workload != 'W0')}; medians reported.",
        "- Every run: its own process, a fresh consumer group, results to one shared 6-partition topic.",
        f"- librdkafka consumer (every confluent-kafka contender): `{CONSUMER}`",
        f"- librdkafka producer: `{PRODUCER}`",
        "- msgs/s: orders finished per second of the contender's measured window (first message in, to last "
        "result acknowledged and offsets stored/committed). CPU: whole-process CPU time in that window "
        "(getrusage, all threads). Peak RSS: the process's VmHWM (/proc/<pid>/status), sampled by the parent "
        "every 50 ms until the process exits.",
        *([f"- {fill_line}"] if fill_line else []),
        "",
    ]
    if perf or any(r.contender == "w0-py" for r in results):
        lines += ["## W0: broker ceiling", "", *report.perf_table(perf), ""]
        w0 = report.summarize([r for r in results if r.contender == "w0-py"])
        if w0:
            lines += [*report.throughput_table([W0_PY], w0, float("nan")), ""]
    rotation = [c for c in usable if c.workload != "W0"]
    if rotation:
        lines += ["## Throughput: W1-W4 and peers", "", *report.throughput_table(rotation, summary, baseline), ""]
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
