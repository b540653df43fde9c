"""Where kafkaworkers spends its time per message: W3 (metrics + observer hook on) under a profiler.

Fills a fresh topic with orders, runs the bench plugin in-process with ``Worker`` exactly as
``kafkaworkers run`` would (metrics on, the observer registered), and prints the top frames.
cProfile (standard library) by default; ``--pyinstrument`` uses pyinstrument if it is
installed in the venv (``.venv/bin/pip install pyinstrument``; not a project dependency).

    .venv/bin/python bench/profiler.py --messages 50000   (or: bench/run.py --profile)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script: import the bench package from the repository root, not bench/'s modules bare.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.broker import Broker  # noqa: E402
from bench.common import Spec  # noqa: E402
from bench.orders import order_stream, payment_stream  # noqa: E402
from bench.runner import Contender, Workspace, make_spec  # noqa: E402

KW_INPROC = Contender("prof", "W3", "kafkaworkers in-process", module="bench.contenders.kafkaworkers_inproc")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap-servers", "-b", default="127.0.0.1:19092")
    p.add_argument("--messages", "-n", type=int, default=50_000)
    p.add_argument("--top", type=int, default=25, help="frames to print per table")
    p.add_argument("--metrics", choices=("on", "off"), default="on")
    p.add_argument("--data", choices=("orders", "payments"), default="orders",
                   help="the 430-byte orders (W3) or the 230-byte payment events (W3-small)")  # fmt: skip
    p.add_argument("--py-spy", action="store_true",
                   help="sample with py-spy instead (.venv/bin/pip install py-spy); print its top frames")  # fmt: skip
    p.add_argument("--fail-pct", type=float, default=0.0, help="W4: percent of orders failing once (retry topic)")
    p.add_argument("--pyinstrument", action="store_true", help="use pyinstrument instead of cProfile")
    p.add_argument("--output", type=Path, help="also write the cProfile stats (pstats format) here")
    args = p.parse_args()

    prefix = f"bench-prof-{uuid.uuid4().hex[:6]}"
    broker = Broker(args.bootstrap_servers)
    ws = Workspace(ROOT / ".cache" / "bench" / "runs" / prefix, prefix, args.bootstrap_servers)
    orders, out = f"{prefix}-orders", f"{prefix}-results"
    try:
        broker.create(orders, out)
        stream = payment_stream if args.data == "payments" else order_stream
        broker.fill(orders, stream(args.messages, prefix[-6:]))
        spec = make_spec(KW_INPROC, ws, orders, out, args.messages, "r0")
        spec.fail_pct = args.fail_pct
        spec.options["data"] = args.data
        spec.options["config"] = str(ws.kw_config(spec))
        os.environ[Spec.ENV] = str(spec.save(ws.path / f"{spec.group}.spec.json"))
        from bench.contenders import kafkaworkers_inproc as inproc

        worker = inproc.build(metrics=args.metrics == "on", observer=args.metrics == "on")
        if args.pyinstrument:
            return _pyinstrument(worker, inproc)
        if args.py_spy:
            return _py_spy(worker, inproc, ws.path / "py-spy.txt")
        profiler = cProfile.Profile()
        profiler.enable()
        inproc.run(worker)
        profiler.disable()
        _print(profiler, args.top, args.messages)
        if args.output:
            profiler.dump_stats(args.output)
        return 0
    finally:
        broker.delete_prefixed(prefix)
        broker.delete_groups_prefixed(prefix)


def _print(profiler: cProfile.Profile, top: int, messages: int) -> None:
    from bench.contenders import kafkaworkers_plugin as kp

    m = kp.state.meter
    print(f"{m.count:,} orders in {m.elapsed:.2f} s under cProfile ({m.count / m.elapsed:,.0f} msgs/s, "
          f"profiler overhead included)\n")  # fmt: skip
    print(f"--- own time by component, microseconds per order (of {m.count:,}) ---")
    for name, seconds in _by_component(pstats.Stats(profiler)).items():
        print(f"{seconds / max(m.count, 1) * 1e6:9.2f} us  {name}")
    print()
    for order, title in (("tottime", "own time"), ("cumulative", "cumulative time")):
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats(order).print_stats(top)
        text = out.getvalue()
        body = text[text.index("   ncalls") :] if "   ncalls" in text else text
        print(f"--- top {top} frames by {title} (per-message cost: tottime / {messages:,}) ---")
        print(body.replace(str(ROOT) + "/", ""))


#: (component, how to recognise its frames) in the order they are tried.
_COMPONENTS = [
    ("librdkafka consume (waits for messages included)", lambda f, fn: "'consume' of 'cimpl.Consumer'" in fn),
    ("librdkafka flush (waits for acks included)", lambda f, fn: "'flush' of 'cimpl.Producer'" in fn),
    ("librdkafka produce", lambda f, fn: "'produce' of 'cimpl.Producer'" in fn),
    ("other confluent-kafka calls", lambda f, fn: "cimpl" in fn or "confluent_kafka" in f),
    ("msgspec decode/encode", lambda f, fn: "msgspec" in fn),
    ("prometheus_client (metrics)", lambda f, fn: "prometheus_client" in f),
    ("pluggy (hooks)", lambda f, fn: "pluggy" in f),
    ("kafkaworkers worker loop (worker.py)", lambda f, fn: f.endswith("kafkaworkers/worker.py")),
    ("kafkaworkers Context / encode (api.py)", lambda f, fn: f.endswith("kafkaworkers/api.py")),
    ("other kafkaworkers", lambda f, fn: "/kafkaworkers/" in f),
    ("the bench handler and its contract", lambda f, fn: "/bench/" in f or "/plugins/" in f),
]


def _by_component(stats: pstats.Stats) -> dict[str, float]:
    """Own time summed per component (the rest: builtins and the standard library)."""
    totals: dict[str, float] = {name: 0.0 for name, _ in _COMPONENTS}
    totals["builtins and standard library"] = 0.0
    for (filename, _line, func), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        name = next((n for n, match in _COMPONENTS if match(filename, func)), "builtins and standard library")
        totals[name] += tottime
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _pyinstrument(worker, inproc) -> int:
    try:
        from pyinstrument import Profiler
    except ImportError:
        print("pyinstrument is not installed: .venv/bin/pip install pyinstrument (not a project dependency)")
        return 1
    profiler = Profiler(interval=0.0005)
    profiler.start()
    inproc.run(worker)
    profiler.stop()
    print(profiler.output_text(unicode=True, color=False, show_all=False))
    return 0


def _py_spy(worker, inproc, raw: Path) -> int:
    """Sample this process with py-spy (native frames included) while the worker runs; print the
    functions with the most own samples, and the samples' total per kafkaworkers/bench line."""
    import shutil
    import subprocess
    import time

    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if exe is None:
        print("py-spy is not installed: .venv/bin/pip install py-spy (not a project dependency)")
        return 1
    spy = subprocess.Popen([exe, "record", "--pid", str(os.getpid()), "--rate", "1000", "--format", "raw",
                            "--output", str(raw), "--nonblocking"], stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(1.0)  # py-spy attaches
    inproc.run(worker)
    spy.send_signal(2)
    spy.wait(30)
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not any("run_once" in f for f in frames):
            continue  # start-up and shutdown
        total += int(count)
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + int(count)
    from bench.contenders import kafkaworkers_plugin as kp

    m = kp.state.meter
    print(f"{m.count:,} messages in {m.elapsed:.2f} s ({m.count / m.elapsed:,.0f} msgs/s) under py-spy; "
          f"{total} samples in the loop")  # fmt: skip
    for leaf, n in sorted(own.items(), key=lambda kv: -kv[1])[:40]:
        print(f"{100 * n / max(total, 1):6.2f}%  {leaf}")
    print(f"raw stacks: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
