"""The results: machine description, Markdown tables, and the PASS/FAIL targets."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from bench.latency import LatencyResult
from bench.perftools import LIB, PerfResult
from bench.runner import Contender, RunResult

MIB = 1024.0


def _first_line(path: str, prefix: str) -> str | None:
    try:
        with open(path) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(prefix)), None)
    except OSError:
        return None


def machine(versions: dict[str, str]) -> list[str]:
    """Lines describing where the figures were taken."""
    cpu = _first_line("/proc/cpuinfo", "model name") or "?"
    mem_kb = _first_line("/proc/meminfo", "MemTotal")
    mem = f"{int(mem_kb.split()[0]) / MIB / MIB:.1f} GiB" if mem_kb else "?"
    jars = sorted(LIB.glob("kafka-server-[0-9]*.jar"))
    broker = re.sub(r"^kafka-server-|\.jar$", "", jars[-1].name) if jars else "?"
    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0]
    except (OSError, IndexError):
        java = "no java"
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}",
        f"- machine: {os.cpu_count()} cores ({cpu}), {mem} RAM, {platform.system()} {platform.release()}",
        f"- load average (1/5/15 min) when the report was written: {load}",
        f"- Python {platform.python_version()} ({sys.implementation.name}), every contender",
        f"- broker: Apache Kafka {broker} (KRaft, single node, local), {java}",
        "- libraries: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
    ]


def _median(values: Iterable[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def _fmt(value: float, digits: int = 0) -> str:
    if value != value:
        return "-"
    return f"{value:,.{digits}f}"


def summarize(results: list[RunResult]) -> dict[str, dict]:
    """Per contender: medians of rate, CPU per 100k, peak RSS over its successful runs."""
    out: dict[str, dict] = {}
    for key in dict.fromkeys(r.contender for r in results):
        runs = [r for r in results if r.contender == key]
        ok = [r for r in runs if r.ok]
        out[key] = {
            "runs": runs,
            "ok": ok,
            "rate": _median(r.rate for r in ok),
            "cpu": _median(r.cpu_per_100k for r in ok),
            "rss": _median(r.peak_rss_kb / MIB for r in ok),
            "errors": [r.error for r in runs if not r.ok],
        }
    return out


def throughput_table(contenders: list[Contender], summary: dict[str, dict], baseline: float) -> list[str]:
    lines = [
        "| workload | contender | msgs/s (median) | runs (msgs/s) | CPU s / 100k msgs | peak RSS MiB | vs W2 | notes |",
        "|---|---|--:|---|--:|--:|--:|---|",
    ]
    for c in contenders:
        s = summary.get(c.key)
        if s is None:
            continue
        runs = ", ".join(_fmt(r.rate) if r.ok else "failed" for r in s["runs"])
        ratio = s["rate"] / baseline if baseline == baseline and baseline > 0 else float("nan")
        lines.append(
            f"| {c.workload} | {c.label} | {_fmt(s['rate'])} | {runs} | {_fmt(s['cpu'], 2)} | {_fmt(s['rss'], 1)} "
            f"| {_fmt(ratio, 2)} | {_notes(s['ok'])} |"
        )
    return lines


def _notes(ok: list[RunResult]) -> str:
    tails = [r.extra["retry_tail_s"] for r in ok if "retry_tail_s" in r.extra]
    if tails:
        return f"{_median(tails):.2f} s (median) from the last first-attempt success to the last retry's"
    return ""


def pair_ratios(summary: dict[str, dict], contender: str, baseline: str) -> dict[str, object]:
    """``contender`` against ``baseline``: ratios of their medians (throughput, CPU per message) and
    the same ratios within each repetition (the two ran next to each other in it)."""
    a, b = summary.get(contender), summary.get(baseline)
    nan = float("nan")
    if not a or not b or not a["ok"] or not b["ok"]:
        return {"rate": nan, "cpu": nan, "rate_runs": [], "cpu_runs": []}
    paired = [(x, y) for x in a["ok"] for y in b["ok"] if x.rep == y.rep]
    return {
        "rate": a["rate"] / b["rate"] if b["rate"] else nan,
        "cpu": a["cpu"] / b["cpu"] if b["cpu"] else nan,
        "rate_runs": [x.rate / y.rate for x, y in paired if y.rate],
        "cpu_runs": [x.cpu_per_100k / y.cpu_per_100k for x, y in paired if y.cpu_per_100k],
    }


def small_lines(summary: dict[str, dict], kw: str, baseline: str) -> list[str]:
    """W3-small's ratios, with the per-repetition ones."""
    r = pair_ratios(summary, kw, baseline)
    if r["rate"] != r["rate"]:
        return ["W3-small did not complete: no ratios."]
    a, b = summary[kw], summary[baseline]
    per_msg = (a["cpu"] - b["cpu"]) / 100_000 * 1e6
    rate_runs = ", ".join(_fmt(x, 2) for x in r["rate_runs"])  # type: ignore[attr-defined]
    cpu_runs = ", ".join(_fmt(x, 2) for x in r["cpu_runs"])  # type: ignore[attr-defined]
    return [
        f"- throughput, kafkaworkers / hand-written: **{_fmt(r['rate'], 2)}** (medians; per repetition {rate_runs})",
        f"- CPU per message, kafkaworkers / hand-written: **{_fmt(r['cpu'], 2)}** (medians; per repetition "
        f"{cpu_runs}); {_fmt(a['cpu'] / 100_000 * 1e6, 1)} against {_fmt(b['cpu'] / 100_000 * 1e6, 1)} us per "
        f"message, {_fmt(per_msg, 1)} us more",
    ]


def w6_lines(contenders: list[Contender], summary: dict[str, dict]) -> list[str]:
    """W6 as one row per contender family, one column per concurrency, and the target lines."""
    families: dict[str, dict[int, str]] = {}
    labels: dict[str, str] = {}
    for c in contenders:
        family = c.key.rsplit("-c", 1)[0]
        families.setdefault(family, {})[c.options["concurrency"]] = c.key
        labels.setdefault(family, c.label)
    lines = [
        "| contender | c=1 msgs/s | c=8 msgs/s | c=64 msgs/s | c=64 / c=1 | CPU s / 100k msgs at its best "
        "| runs (msgs/s) |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    best: dict[str, float] = {}
    for family, keys in families.items():
        rates = {n: summary.get(k, {}).get("rate", float("nan")) for n, k in keys.items()}
        ok = {n: r for n, r in rates.items() if r == r}
        top = max(ok, key=ok.__getitem__) if ok else None
        best[family] = ok[top] if top is not None else float("nan")
        ratio = rates.get(64, float("nan")) / rates[1] if rates.get(1) else float("nan")
        cpu = summary[keys[top]]["cpu"] if top is not None else float("nan")
        runs = "; ".join(f"c={n}: " + ", ".join(_fmt(r.rate) if r.ok else "failed" for r in summary[k]["runs"])
                         for n, k in keys.items() if k in summary)  # fmt: skip
        at = [_fmt(rates.get(n, float("nan"))) for n in (1, 8, 64)]
        lines.append(f"| {labels[family]} | {' | '.join(at)} | {_fmt(ratio, 1)} | {_fmt(cpu, 1)} | {runs} |")
    return [*lines, "", *w6_targets(best, summary)]


def w6_targets(best: dict[str, float], summary: dict[str, dict]) -> list[str]:
    lines = []
    peers = {f: r for f, r in best.items() if not f.startswith("kw-")}
    for io in ("sync", "async"):
        family = f"kw-w6-{io}"
        if family not in best:
            continue
        c1 = summary.get(f"{family}-c1", {}).get("rate", float("nan"))
        c64 = summary.get(f"{family}-c64", {}).get("rate", float("nan"))
        ratio = c64 / c1 if c1 == c1 and c1 else float("nan")
        ahead = bool(peers) and all(c64 > r for r in peers.values() if r == r)
        detail = ", ".join(f"{f} {_fmt(r)}" for f, r in peers.items())
        lines.append(f"- {'PASS' if ratio >= 40 else 'FAIL'}: W6 kafkaworkers {io}, concurrency 64 >= 40x "
                     f"concurrency 1: {_fmt(c64)} / {_fmt(c1)} = {_fmt(ratio, 1)}x")  # fmt: skip
        lines.append(f"- {'PASS' if ahead else 'FAIL'}: W6 kafkaworkers {io} at 64 ({_fmt(c64)} msgs/s) ahead of "
                     f"every peer at its best setting: {detail or 'no peer ran'}")  # fmt: skip
    return lines


def w7_lines(summary: dict[str, dict]) -> list[str]:
    one, two = summary.get("kw-p1", {}), summary.get("kw-p2", {})
    r1, r2 = one.get("rate", float("nan")), two.get("rate", float("nan"))
    ratio = r2 / r1 if r1 == r1 and r1 else float("nan")
    runs = "; ".join(f"{k}: " + ", ".join(_fmt(r.rate) if r.ok else "failed" for r in s["runs"])
                     for k, s in (("--processes 1", one), ("--processes 2", two)) if s)  # fmt: skip
    return [
        f"- {'PASS' if ratio >= 1.5 else 'FAIL'}: W7 `--processes 2` / `--processes 1` >= 1.5: {_fmt(r2)} / "
        f"{_fmt(r1)} msgs/s = {_fmt(ratio, 2)} (medians; {runs})",
    ]


def w8_lines(summary: dict[str, dict], kw: str) -> list[str]:
    """Each exactly-once setting against W3: ratios of the medians and per repetition."""
    lines = []
    for key, what in (("kw-eos", "the default"), ("kw-eos-0", "a transaction per batch")):
        r = pair_ratios(summary, key, kw)
        if r["rate"] != r["rate"]:
            lines.append(f"- exactly_once ({what}) did not complete: no ratio.")
            continue
        per_rep = ", ".join(_fmt(x, 2) for x in r["rate_runs"])  # type: ignore[attr-defined]
        lines.append(f"- throughput, exactly_once ({what}) / W3: **{_fmt(r['rate'], 2)}** (medians; per repetition "
                     f"{per_rep}); CPU per message {_fmt(r['cpu'], 2)}x")  # fmt: skip
    return lines


def w9_lines(summary: dict[str, dict]) -> list[str]:
    """Tracing on against off, per message size: CPU per message and throughput, as ratios."""
    lines = []
    for on, off, what in (
        ("kw-otel", "kw", "orders (W3)"),
        ("kw-otel-small", "kw-small", "small (W3-small)"),
        ("kw-otel-small-1pct", "kw-small", "small, 1% of traces sampled"),
    ):
        r = pair_ratios(summary, on, off)
        if r["rate"] != r["rate"]:
            lines.append(f"- {what}: did not complete, no ratio.")
            continue
        us_on, us_off = (summary[k]["cpu"] / 100_000 * 1e6 for k in (on, off))
        spans = [run.extra.get("spans", 0) / run.messages for run in summary[on]["ok"] if run.messages]
        cpu_runs = ", ".join(_fmt(x, 2) for x in r["cpu_runs"])  # type: ignore[attr-defined]
        lines.append(
            f"- {what}: CPU per message, tracing on / off: **{_fmt(r['cpu'], 2)}** (medians; per repetition "
            f"{cpu_runs}), {_fmt(us_on, 1)} against {_fmt(us_off, 1)} us, {_fmt(us_on - us_off, 1)} us per message "
            f"more; throughput {_fmt(r['rate'], 2)}x; spans received per message "
            f"{', '.join(_fmt(s, 2) for s in spans) or 'none'}"
        )
    return lines


def w8_targets(summary: dict[str, dict], kw: str, latency: list[LatencyResult]) -> list[str]:
    """W8's target (throughput >= 0.9x W3) and the latency its default adds, when W8 ran."""
    if "kw-eos" not in summary and not latency:
        return []
    r = pair_ratios(summary, "kw-eos", kw)
    lines = [f"- {'PASS' if r['rate'] >= 0.9 else 'FAIL'}: W8 exactly_once / W3 >= 0.9: {_fmt(r['rate'], 2)}"]
    base = [x for x in latency if x.ok and x.variant == "at_least_once"]
    eos = [x for x in latency if x.ok and x.variant == "exactly_once"]
    if base and eos:
        added = [_median(x.visible_p50 for x in eos) - _median(x.visible_p50 for x in base),
                 _median(x.visible_p99 for x in eos) - _median(x.visible_p99 for x in base)]  # fmt: skip
        lines.append(f"- W8 latency its default adds at {_fmt(base[0].target_rate)} msgs/s, "
                     f"as a read_committed reader sees it: p50 {_fmt(added[0], 1)} ms, p99 {_fmt(added[1], 1)} ms "
                     "(no target)")  # fmt: skip
    return lines


def w8_latency_table(results: list[LatencyResult]) -> list[str]:
    lines = [
        "| guarantee | load | sent msgs/s | out / sent | appended p50 ms | appended p99 ms | visible p50 ms "
        "| visible p99 ms | visible p99.9 ms | runs: visible p99 ms |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for variant in dict.fromkeys(r.variant for r in results):
        runs = [r for r in results if r.variant == variant]
        ok = [r for r in runs if r.ok]
        each = ", ".join(_fmt(r.visible_p99, 1) if r.ok else "failed" for r in runs)
        lines.append(
            f"| {variant} | {runs[0].load} | {_fmt(_median(r.achieved_rate for r in ok))} "
            f"| {sum(r.matched for r in ok)} / {sum(r.sent for r in ok)} "
            f"| {_fmt(_median(r.p50 for r in ok), 1)} | {_fmt(_median(r.p99 for r in ok), 1)} "
            f"| {_fmt(_median(r.visible_p50 for r in ok), 1)} | {_fmt(_median(r.visible_p99 for r in ok), 1)} "
            f"| {_fmt(_median(r.visible_p999 for r in ok), 1)} | {each} |"
        )
    return lines


def best_capacity(results: list[LatencyResult]) -> tuple[str, float]:
    """The capacity runs' best setting and its median out rate (orders/s); ("", 0) if none ran."""
    # A variant ending in ")" is a paced load at the best setting ("... (half)", "... (100/s)").
    rates = {v: _median(r.out_rate for r in results if r.variant == v and r.ok and not v.endswith(")"))
             for v in dict.fromkeys(r.variant for r in results)}  # fmt: skip
    rates = {v: x for v, x in rates.items() if x == x}
    if not rates:
        return "", 0.0
    best = max(rates, key=rates.__getitem__)
    return best, rates[best]


def capacity_lines(results: list[LatencyResult]) -> list[str]:
    lines = [
        "| services' settings | offered orders/s | sent orders/s | out orders/s (median) | runs (out orders/s) "
        "| picked / sent | cancelled | p50 ms | p99 ms | p99.9 ms | workers' CPU s (last run) |",
        "|---|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    for variant in dict.fromkeys(r.variant for r in results):
        runs = [r for r in results if r.variant == variant]
        ok = [r for r in runs if r.ok]
        each = ", ".join(_fmt(r.out_rate) if r.ok else "failed" for r in runs)
        lines.append(
            f"| {variant} | {_fmt(runs[0].target_rate)} | {_fmt(_median(r.achieved_rate for r in ok))} "
            f"| {_fmt(_median(r.out_rate for r in ok))} | {each} "
            f"| {sum(r.matched for r in ok)} / {sum(r.sent for r in ok)} | {sum(r.cancelled for r in ok)} "
            f"| {_fmt(_median(r.p50 for r in ok), 1)} | {_fmt(_median(r.p99 for r in ok), 1)} "
            f"| {_fmt(_median(r.p999 for r in ok), 1)} | {_fmt(ok[-1].workers_cpu_s, 1) if ok else '-'} |"
        )
    return lines


def pipeline_split_lines(results: list[LatencyResult]) -> list[str]:
    """Where an order's time goes (the slowest of its three first answers, then picking's join)
    and which process used the cores while the load ran, for each load (medians of its runs)."""
    runs = [r for r in results if r.ok and r.load_cores]
    if not runs:
        return []
    names = list(dict.fromkeys(n for r in runs for n in r.load_cores))
    lines = [
        "| load | orders/s | p99 ms | first answer p50 / p99 ms | picking's join p50 / p99 ms | "
        + " | ".join(f"{n} cores" for n in names) + " | total cores |",
        "|---|--:|--:|--:|--:|" + "--:|" * (len(names) + 1),
    ]
    for variant in dict.fromkeys(r.variant for r in runs):
        ok = [r for r in runs if r.variant == variant]
        cores = [_median(r.load_cores.get(n, float("nan")) for r in ok) for n in names]
        lines.append(
            f"| {variant} | {_fmt(_median(r.achieved_rate for r in ok))} | {_fmt(_median(r.p99 for r in ok), 1)} "
            f"| {_fmt(_median(r.first_p50 for r in ok), 1)} / {_fmt(_median(r.first_p99 for r in ok), 1)} "
            f"| {_fmt(_median(r.join_p50 for r in ok), 1)} / {_fmt(_median(r.join_p99 for r in ok), 1)} | "
            + " | ".join(_fmt(c, 2) for c in cores) + f" | {_fmt(sum(c for c in cores if c == c), 2)} |"
        )
    return lines


def capacity_targets(results: list[LatencyResult]) -> list[str]:
    """The pipeline's capacity, and the p99 target at half of it."""
    if not results:
        return []
    best, rate = best_capacity(results)
    half = [r for r in results if r.variant.endswith("(half)") and r.ok]
    p99 = _median(r.p99 for r in half)
    complete = bool(half) and all(r.matched + r.cancelled >= r.sent for r in half)
    came = f"{sum(r.matched for r in half)} of {sum(r.sent for r in half)} orders picked" if half else "not measured"
    return [
        f"- pipeline capacity (six services, 2 cores shared with the broker): {_fmt(rate)} orders/s at its best "
        f"setting ({best or 'none ran'})",
        f"- {'PASS' if p99 <= 50 and complete else 'FAIL'}: pipeline p99 <= 50 ms at half its capacity "
        f"({_fmt(rate / 2)} orders/s): {_fmt(p99, 1)} ms ({came})",
    ]


def perf_table(results: list[tuple[str, PerfResult]]) -> list[str]:
    lines = [
        "| tool | msgs/s (median) | runs | detail (last run) | JVM CPU s | JVM peak RSS MiB |",
        "|---|--:|---|---|--:|--:|",
    ]
    for tool in dict.fromkeys(t for t, _ in results):
        runs = [r for t, r in results if t == tool]
        ok = [r for r in runs if r.ok]
        each = ", ".join(_fmt(r.rate) if r.ok else "failed" for r in runs)
        cpu = _fmt(_median(r.cpu_s for r in ok), 1)
        rss = _fmt(_median(r.peak_rss_kb / MIB for r in ok), 0)
        lines.append(f"| {tool} | {_fmt(_median(r.rate for r in ok))} | {each} | {runs[-1].detail} | {cpu} | {rss} |")
    return lines


def latency_table(results: list[LatencyResult]) -> list[str]:
    lines = [
        "| mode | load | target msgs/s | sent msgs/s | out msgs/s | out / sent | p50 ms | p99 ms | p99.9 ms | max ms "
        "| timestamps | workers' peak RSS MiB (last run) |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for mode, load in dict.fromkeys((r.mode, r.load) for r in results):
        runs = [r for r in results if r.load == load and r.mode == mode]
        ok = [r for r in runs if r.ok]
        rss = sorted(round(k / MIB) for k in (ok[-1].workers_peak_rss_kb if ok else []))
        lines.append(
            f"| {mode} | {load} | {_fmt(runs[0].target_rate)} | {_fmt(_median(r.achieved_rate for r in ok))} "
            f"| {_fmt(_median(r.out_rate for r in ok))} "
            f"| {sum(r.matched for r in ok)} / {sum(r.sent for r in ok)} "
            f"| {_fmt(_median(r.p50 for r in ok), 1)} | {_fmt(_median(r.p99 for r in ok), 1)} "
            f"| {_fmt(_median(r.p999 for r in ok), 1)} | {_fmt(_median(r.max for r in ok), 1)} "
            f"| {ok[0].timestamp_type if ok else '-'} | {', '.join(map(str, rss)) or '-'} |"
        )
    return lines


def targets(summary: dict[str, dict], peers: list[str], kw: str, baseline: float,
            latency: list[LatencyResult]) -> list[str]:  # fmt: skip
    """The issue's targets as PASS/FAIL lines (FAIL when a figure is missing, with the reason)."""
    lines = []

    def line(ok: bool | None, text: str) -> None:
        lines.append(f"- {'PASS' if ok else 'FAIL'}: {text}")

    if "kw-small" in summary or "w2-small" in summary:
        small = pair_ratios(summary, "kw-small", "w2-small")
        line(small["cpu"] <= 1.25, f"W3-small CPU per message, kafkaworkers / hand-written <= 1.25 (concurrency 1, "
             f"metrics on): {_fmt(small['cpu'], 2)} (throughput ratio {_fmt(small['rate'], 2)})")  # fmt: skip
    if kw not in summary and "w2" not in summary:
        return lines

    kw_s = summary.get(kw, {})
    kw_rate, kw_rss = kw_s.get("rate", float("nan")), kw_s.get("rss", float("nan"))
    ratio = kw_rate / baseline if baseline == baseline and baseline > 0 else float("nan")
    line(ratio >= 0.85, f"W3/W2 >= 0.85 (metrics + observer hook on): {_fmt(ratio, 3)}")
    if not peers and not latency:
        return lines  # a partial run (say W2/W3 and the newer workloads): the peers' and W5's targets need them
    ran = {p: summary[p] for p in peers if p in summary and summary[p]["ok"]}
    missing = [p for p in peers if p not in ran]
    faster = all(kw_rate > s["rate"] for s in ran.values()) and bool(ran)
    detail = ", ".join(f"{p} {_fmt(s['rate'])}" for p, s in ran.items())
    line(faster, f"W3 ({_fmt(kw_rate)} msgs/s) faster than every peer: {detail or 'no peer ran'}"
         + (f" (not measured: {', '.join(missing)})" if missing else ""))  # fmt: skip
    lighter = all(kw_rss < s["rss"] for s in ran.values()) and bool(ran)
    detail = ", ".join(f"{p} {_fmt(s['rss'], 1)}" for p, s in ran.items())
    line(lighter, f"kafkaworkers peak RSS ({_fmt(kw_rss, 1)} MiB) lower than every peer's: {detail or 'no peer ran'}")
    modes = {r.mode for r in latency}
    mode = "pipeline" if "pipeline" in modes else "passthrough"
    quarter = [r for r in latency if r.load_pct == 25 and r.ok and r.mode == mode]
    p99 = _median(r.p99 for r in quarter)
    came = f", {sum(r.matched for r in quarter)} of {sum(r.sent for r in quarter)} orders came out" if quarter else ""
    behind = [
        r
        for r in latency
        if r.mode == mode and r.load_pct and r.ok and (r.matched < r.sent or r.out_rate < 0.9 * r.achieved_rate)
    ]
    if behind:
        # Saturated: the out rate is what the workers can do on this machine at all.
        came += (
            f"; the {mode} keeps up with at most {_fmt(max(r.out_rate for r in behind))} orders/s here, "
            f"below the {_fmt(min(r.target_rate for r in behind))} orders/s asked"
        )
    through = [r for r in latency if r.load_pct == 25 and r.ok and r.mode == "passthrough"]
    if mode == "pipeline" and through:
        came += f"; one pass-through plugin at the same load: p99 {_fmt(_median(r.p99 for r in through), 1)} ms"
    line(
        p99 <= 50 and all(r.matched == r.sent for r in quarter),
        f"W5 p99 <= 50 ms at 25% load ({mode}): {_fmt(p99, 1)} ms{came}" + ("" if quarter else " (not measured)"),
    )
    return lines


def write(path: Path, text: str) -> None:
    path.write_text(text)
