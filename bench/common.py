"""What every contender shares: its run spec, the client settings, and the measurement.

Standard library only, so the peers' virtual environments import it too. A contender
process reads its :class:`Spec` (``BENCH_SPEC`` names a JSON file), starts a :class:`Meter`
when its first message arrives, stops it once all its work is done (results acknowledged,
offsets stored or committed), and the meter writes the figures to the spec's result file.
The parent adds what it sees from outside (``wait4`` rusage of the whole process).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AIOKAFKA_CONSUMER",
    "AIOKAFKA_PRODUCER",
    "CONSUMER",
    "PREFETCH",
    "PRODUCER",
    "Meter",
    "Spec",
    "listening_pid",
    "percentile",
    "proc_status_kb",
    "process_cpu",
]

# --- the fairness knob: one set of client settings for every contender ------------------

#: librdkafka consumer settings of every confluent-kafka-based contender (kafkaworkers, the
#: raw loops, faststream[confluent], quixstreams). Prefetch is bounded the same way for all,
#: so resident memory is comparable: the values are kafkaworkers' own consumer defaults
#: (``kafkaworkers.consumer.CONSUMER_DEFAULTS``; this module also runs in the peers' venvs,
#: which lack kafkaworkers). ``fetch.queue.backoff.ms`` matters as much as the bound: with
#: librdkafka's 1 s default, a loop that drains a full queue waits a second for the next fetch.
#: Offsets: stored by the application after the work is acknowledged, committed in the
#: background every second.
CONSUMER: dict[str, Any] = {
    "auto.offset.reset": "earliest",
    "partition.assignment.strategy": "cooperative-sticky",
    "enable.auto.commit": True,
    "auto.commit.interval.ms": 1000,
    "enable.auto.offset.store": False,
    "queued.max.messages.kbytes": 2048,
    "fetch.queue.backoff.ms": 10,
    "fetch.max.bytes": 2 * 1024 * 1024,
    "max.partition.fetch.bytes": 512 * 1024,
}

#: librdkafka producer settings: idempotent, fully acknowledged writes (kafkaworkers' defaults).
PRODUCER: dict[str, Any] = {
    "acks": "all",
    "enable.idempotence": True,
    "linger.ms": 5,
    "batch.num.messages": 10_000,
    "queue.buffering.max.kbytes": 65_536,
    "compression.type": "none",
    "partitioner": "murmur2_random",
}

#: The prefetch bounds alone, for frameworks that manage commits themselves (they are given
#: these and the producer settings, never the offset-handling keys above).
PREFETCH: dict[str, Any] = {
    k: CONSUMER[k]
    for k in ("queued.max.messages.kbytes", "fetch.queue.backoff.ms", "fetch.max.bytes", "max.partition.fetch.bytes")
}

#: The nearest aiokafka equivalents (aiokafka-based peers: faststream[kafka], faust, aiokafka).
AIOKAFKA_CONSUMER: dict[str, Any] = {
    "auto_offset_reset": "earliest",
    "fetch_max_bytes": CONSUMER["fetch.max.bytes"],
    "max_partition_fetch_bytes": CONSUMER["max.partition.fetch.bytes"],
    "max_poll_records": 500,
}
AIOKAFKA_PRODUCER: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    "linger_ms": PRODUCER["linger.ms"],
    "max_batch_size": 1024 * 1024,
}

#: Messages per consume call, for every contender that has the knob (kafkaworkers' default).
BATCH_SIZE = 500


# --- the run spec ------------------------------------------------------------------------


@dataclass
class Spec:
    """What the parent tells a contender process."""

    bootstrap: str
    topic: str
    out_topic: str
    group: str
    #: Units of work to finish before stopping: results produced (or, W1, messages consumed).
    target: int
    result_file: str
    batch_size: int = BATCH_SIZE
    #: W4: percent of the orders whose first handling fails.
    fail_pct: float = 0.0
    consumer: dict[str, Any] = field(default_factory=lambda: dict(CONSUMER))
    producer: dict[str, Any] = field(default_factory=lambda: dict(PRODUCER))
    options: dict[str, Any] = field(default_factory=dict)

    ENV = "BENCH_SPEC"

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: str | None = None) -> Spec:
        path = path or os.environ[cls.ENV]
        return cls(**json.loads(Path(path).read_text()))

    def consumer_config(self) -> dict[str, Any]:
        return {**self.consumer, "bootstrap.servers": self.bootstrap, "group.id": self.group}

    def producer_config(self) -> dict[str, Any]:
        return {**self.producer, "bootstrap.servers": self.bootstrap}


# --- measurement -------------------------------------------------------------------------


def _cpu_seconds() -> float:
    """CPU time of this whole process, every thread (librdkafka's included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _stat_cpu(stat: Path) -> float:
    """User plus system CPU seconds from a ``/proc`` ``stat`` file (a process's or a thread's)."""
    # The command name in parentheses may hold spaces: count the fields after it.
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads so far, summed by thread name (``comm``): the main
    thread's Python against librdkafka's own threads (``rdk:main``, ``rdk:broker...``)."""
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            used = _stat_cpu(task / "stat")
        except OSError:
            continue
        name = "rdk:broker" if name.startswith("rdk:broker") else name
        out[name] = out.get(name, 0.0) + used
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def process_cpu(pid: int) -> float:
    """CPU seconds a process has used so far (all its threads); 0 if it is gone."""
    try:
        return _stat_cpu(Path(f"/proc/{pid}/stat"))
    except OSError:
        return 0.0


def listening_pid(port: int) -> int | None:
    """The local process listening on TCP ``port`` (the bench's own broker), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            # local address "HEX_IP:HEX_PORT"; state 0A is LISTEN
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{cols[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return int(pid)
            except OSError:
                continue
    return None


def proc_status_kb(field_name: str, pid: int | str = "self") -> int:
    """A ``kB`` field of ``/proc/<pid>/status``, e.g. ``VmHWM`` (peak RSS) or ``VmRSS``; 0 if absent."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Meter:
    """Wall time and CPU time of a contender's measured window, and its peak RSS.

    The window opens when the first message arrives (group join and start-up excluded, as
    for every contender) and closes when the last unit of work is durable.
    """

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.started: float | None = None
        self.cpu_start = 0.0
        self.elapsed = 0.0
        self.cpu = 0.0
        self.count = 0

    def start(self) -> None:
        """Open the window (only the first call counts)."""
        if self.started is None:
            self.started = time.perf_counter()
            self.cpu_start = _cpu_seconds()

    def stop(self, count: int, **extra: Any) -> None:
        """Close the window after ``count`` units of work and write the result file."""
        if self.started is None:
            self.start()
        self.elapsed = time.perf_counter() - self.started
        self.cpu = _cpu_seconds() - self.cpu_start
        self.count = count
        result = {
            "messages": count,
            "elapsed_s": self.elapsed,
            "cpu_s": self.cpu,
            "cpu_total_s": _cpu_seconds(),
            "vm_hwm_kb": proc_status_kb("VmHWM"),
            "vm_rss_kb": proc_status_kb("VmRSS"),
            "extra": {**extra, "threads": thread_cpu()},
        }
        Path(self.spec.result_file).write_text(json.dumps(result))


# --- statistics --------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; ``nan`` for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=1000, method="inclusive")[max(0, min(998, round(q * 10) - 1))]
