"""W0, the broker ceiling: Apache Kafka's own perf tools (kafka-tools jars) on the local broker."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import proc_status_kb

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / ".cache" / "kafka" / "lib"
_PRODUCED = re.compile(r"(\d+) records sent, ([\d.]+) records/sec \(([\d.]+) MB/sec\), ([\d.]+) ms avg latency")


@dataclass
class PerfResult:
    tool: str
    ok: bool
    rate: float = 0.0
    detail: str = ""
    cpu_s: float = 0.0
    peak_rss_kb: int = 0


def available() -> str | None:
    """Why the Java tools cannot run, or None."""
    if not shutil.which("java"):
        return "no java on PATH"
    if not any(LIB.glob("kafka-tools-*.jar")):
        return f"no kafka-tools jar in {LIB} (run `bash scripts/kafka/broker.sh up` once)"
    return None


def _run(tool: str, args: list[str], log: Path, timeout: float) -> tuple[int | None, str, float, int]:
    """Run a kafka-tools class; return (exit code, output, CPU seconds, peak RSS kB) of the JVM."""
    argv = ["java", "-Xmx512m", "-cp", f"{LIB}/*", f"org.apache.kafka.tools.{tool}", *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    peak = 0
    while True:
        peak = max(peak, proc_status_kb("VmHWM", proc.pid))
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, log.read_text(errors="replace"), usage.ru_utime + usage.ru_stime, peak
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.1)


def produce(bootstrap: str, topic: str, count: int, log: Path, size: int = 300) -> PerfResult:
    """ProducerPerformance: ``count`` records of ``size`` bytes, acks=all, idempotent, linger 5 ms."""
    code, out, cpu, rss = _run(
        "ProducerPerformance",
        ["--bootstrap-server", bootstrap, "--topic", topic, "--num-records", str(count),
         "--record-size", str(size), "--throughput", "-1", "--command-property",
         "acks=all", "enable.idempotence=true", "linger.ms=5", "batch.size=262144"],
        log, timeout=300,
    )  # fmt: skip
    match = _PRODUCED.findall(out)
    if code != 0 or not match:
        return PerfResult("ProducerPerformance", False, detail=_last(out), cpu_s=cpu, peak_rss_kb=rss)
    _sent, rate, mb, latency = match[-1]
    return PerfResult("ProducerPerformance", True, float(rate), f"{float(mb):.1f} MB/s, avg latency {latency} ms",
                      cpu, rss)  # fmt: skip


def consume(bootstrap: str, topic: str, count: int, group: str, log: Path) -> PerfResult:
    """ConsumerPerformance: read ``count`` records; the rate is over the fetch time (group join excluded)."""
    code, out, cpu, rss = _run(
        "ConsumerPerformance",
        ["--bootstrap-server", bootstrap, "--topic", topic, "--num-records", str(count), "--group", group,
         "--timeout", "60000"],
        log, timeout=300,
    )  # fmt: skip
    lines = [line for line in out.splitlines() if line.count(",") >= 9 and not line.startswith("start.time")]
    if code != 0 or not lines:
        return PerfResult("ConsumerPerformance", False, detail=_last(out), cpu_s=cpu, peak_rss_kb=rss)
    fields = [f.strip() for f in lines[-1].split(",")]
    # start, end, MB, MB/s, nMsg, nMsg/s, rebalance ms, fetch ms, fetch MB/s, fetch nMsg/s
    return PerfResult("ConsumerPerformance", True, float(fields[9]),
                      f"{float(fields[8]):.1f} MB/s over the fetch time; {fields[5]} msg/s incl. group join",
                      cpu, rss)  # fmt: skip


def _last(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-400:] or "(no output)"
