"""Running one contender as its own process and measuring it.

A contender is a command plus the :class:`~bench.common.Spec` it reads. The parent starts
it, reaps it with ``wait4`` (whole-process CPU time), samples its peak RSS (VmHWM), and reads
the figures of the measured window that the contender's :class:`~bench.common.Meter` wrote.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import venvs
from bench.common import Spec, proc_status_kb

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PYTHON = Path(sys.executable)
KW = PROJECT_PYTHON.parent / "kafkaworkers"
#: After its result is written, a contender has this long to exit by itself.
EXIT_GRACE = 20.0


@dataclass(frozen=True)
class Contender:
    """One line of the results table.

    :param key: short name used in group ids and ``--contenders``.
    :param workload: W1, W2, W3, W4 or "peer".
    :param kind: ``module`` (``python -m module`` in the project venv or ``venv``), or
        ``kw-cli`` (a real ``kafkaworkers run`` process).
    """

    key: str
    workload: str
    label: str
    kind: str = "module"
    module: str = ""
    args: tuple[str, ...] = ()
    venv: str | None = None
    fail_pct: float = 0.0
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    notes: str = ""


@dataclass
class RunResult:
    contender: str
    rep: int
    ok: bool
    error: str = ""
    messages: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_kb: int = 0
    process_cpu_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed_s if self.ok and self.elapsed_s > 0 else 0.0

    @property
    def cpu_per_100k(self) -> float:
        return self.cpu_s / self.messages * 100_000 if self.ok and self.messages else 0.0


class Workspace:
    """The run's directory: specs, result files, logs, the kafkaworkers config and dist-info."""

    def __init__(self, path: Path, prefix: str, bootstrap: str) -> None:
        self.path = path = path.resolve()
        self.prefix = prefix
        self.bootstrap = bootstrap
        path.mkdir(parents=True, exist_ok=True)
        self.site = path / "site"
        self._make_dist_info()

    def _make_dist_info(self) -> None:
        """The bench plugin and observer, visible to ``kafkaworkers run`` like any installed plugin."""
        dist = self.site / "kafkaworkers_bench-1.0.dist-info"
        dist.mkdir(parents=True, exist_ok=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kafkaworkers-bench\nVersion: 1.0\n")
        (dist / "entry_points.txt").write_text(
            "[kafkaworkers]\n"
            "bench-plugin = bench.contenders.kafkaworkers_plugin:plugin\n"
            "bench-observer = bench.contenders.kafkaworkers_plugin:observer\n"
        )

    def kw_config(self, spec: Spec, plugins: dict[str, dict[str, Any]] | None = None) -> Path:
        """A kafkaworkers.toml with the shared client settings (the same librdkafka settings)."""
        path = self.path / f"{spec.group}.toml"
        lines = [f"batch_size = {spec.batch_size}", "poll_timeout = 0.5", 'log_level = "WARNING"']
        # A contender's own framework settings (W8: transaction_interval_ms).
        lines += [f"{k} = {json.dumps(v)}" for k, v in spec.options.get("settings", {}).items()]
        lines.append("")
        tables = [("consumer", spec.consumer), ("producer", spec.producer)]
        tables += [(f"plugins.{name}", values) for name, values in (plugins or {}).items()]
        for section, values in tables:
            lines.append(f"[{section}]")
            lines += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in values.items()]
            lines.append("")
        path.write_text("\n".join(lines))
        return path


def other_plugins() -> list[str]:
    """Entry-point names of every installed kafkaworkers plugin: disabled in the bench's worker
    processes, as if only the benchmark plugin were installed."""
    names = set()
    for dist in importlib.metadata.distributions():
        names.update(ep.name for ep in dist.entry_points if ep.group == "kafkaworkers")
    return sorted(names)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(c: Contender, spec: Spec, spec_path: Path, ws: Workspace) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that start contender ``c``."""
    env = {**os.environ, Spec.ENV: str(spec_path), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("OTEL_")}  # tracing off unless W9 turns it on
    if "otlp_endpoint" in spec.options:
        # W9: tracing on, every span exported to the bench's sink; a queue large enough that none is dropped.
        env.update(OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_ENDPOINT=spec.options["otlp_endpoint"],
                   OTEL_SERVICE_NAME=spec.group, OTEL_BSP_MAX_QUEUE_SIZE="1000000")  # fmt: skip
        if "sampled" in spec.options:
            env.update(OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG=spec.options["sampled"])
    if c.kind == "kw-cli":
        env["PYTHONPATH"] = os.pathsep.join([str(ws.site), str(ROOT)])
        env["KAFKAWORKERS_DISABLE_PLUGINS"] = ",".join(other_plugins())
        env["KAFKAWORKERS_DATA_DIR"] = str(ws.path / "data" / spec.group)
        plugin = "bench-passthrough" if spec.options.get("mode") == "passthrough" else "bench-orders"
        argv = [
            str(KW), "run", "--plugin", plugin, "--group-id", spec.group,
            "--config", str(ws.kw_config(spec)), "-b", spec.bootstrap,
            "--metrics-port", str(free_port()), "--log-level", "WARNING",
        ]  # fmt: skip
        if "concurrency" in spec.options:
            argv += ["--concurrency", str(spec.options["concurrency"])]
        if "processes" in spec.options:
            argv += ["--processes", str(spec.options["processes"])]
        if "guarantee" in spec.options:
            argv += ["--processing-guarantee", spec.options["guarantee"]]
        return argv, env
    python = PROJECT_PYTHON
    if c.venv:
        venv = venvs.ensure(c.venv)
        if not venv.ok:
            raise RuntimeError(venv.error)
        python = venv.python
    if c.module == "bench.contenders.kafkaworkers_inproc":
        spec.options.setdefault("config", str(ws.kw_config(spec)))
        spec.save(spec_path)
    return [str(python), "-m", c.module, *c.args], env


def make_spec(c: Contender, ws: Workspace, topic: str, out_topic: str, target: int, tag: str) -> Spec:
    group = f"{ws.prefix}-{c.key}-{tag}"
    return Spec(
        bootstrap=ws.bootstrap,
        topic=topic,
        out_topic=out_topic,
        group=group,
        target=target,
        result_file=str(ws.path / f"{group}.result.json"),
        fail_pct=c.fail_pct,
        options=dict(c.options),
    )


def start(c: Contender, spec: Spec, ws: Workspace) -> tuple[subprocess.Popen[bytes], Path]:
    """Start contender ``c`` on ``spec``; its output goes to a log file in the workspace."""
    spec_path = spec.save(ws.path / f"{spec.group}.spec.json")
    Path(spec.result_file).unlink(missing_ok=True)
    log_path = ws.path / f"{spec.group}.log"
    argv, env = command(c, spec, spec_path, ws)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, cwd=ws.path, stdout=log, stderr=subprocess.STDOUT)
    return proc, log_path


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> tuple[int | None, Any, int]:
    """SIGTERM a long-running contender (a W5 worker) and reap it: (exit code, rusage, peak RSS kB)."""
    peak = proc_status_kb("VmHWM", proc.pid)
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    status, usage, _, last = _reap(proc, None, timeout)
    return status, usage, max(peak, last)


def run_contender(c: Contender, spec: Spec, ws: Workspace, rep: int, timeout: float) -> RunResult:
    """Run one repetition of ``c`` to completion and collect its figures."""
    result_path = Path(spec.result_file)
    try:
        proc, log_path = start(c, spec, ws)
    except RuntimeError as exc:
        return RunResult(c.key, rep, False, error=str(exc))
    status, usage, reason, peak = _reap(proc, result_path, timeout)
    cpu_total = usage.ru_utime + usage.ru_stime if usage else 0.0
    if not result_path.exists():
        tail = _tail(log_path)
        return RunResult(c.key, rep, False, error=f"{reason or f'exit status {status}'}; log: {tail}",
                         process_cpu_s=cpu_total, peak_rss_kb=peak)  # fmt: skip
    data = json.loads(result_path.read_text())
    return RunResult(
        c.key,
        rep,
        True,
        messages=data["messages"],
        elapsed_s=data["elapsed_s"],
        cpu_s=data["cpu_s"],
        peak_rss_kb=max(peak, data.get("vm_hwm_kb", 0)),
        process_cpu_s=cpu_total,
        extra={**data.get("extra", {}), "exit": status, "log": str(log_path)},
    )


def _reap(proc: subprocess.Popen[bytes], result_path: Path | None, timeout: float) -> tuple[int | None, Any, str, int]:
    """Wait for the child with wait4; stop it if it overruns.

    Returns (exit code, rusage, why it was stopped, peak RSS kB). Once ``result_path`` exists
    the child has :data:`EXIT_GRACE` seconds left to exit by itself. Peak RSS is the child's
    ``VmHWM``, sampled every 50 ms until it exits (monotonic, so the last sample is the peak
    up to then): wait4's ``ru_maxrss`` is no use here, since Linux carries the parent's
    high-water mark over into a forked child.
    """
    deadline = time.monotonic() + timeout
    grace_until: float | None = None
    reason = ""
    signalled = 0
    peak = 0
    while True:
        peak = max(peak, proc_status_kb("VmHWM", proc.pid))
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage, reason, peak
        now = time.monotonic()
        if grace_until is None and result_path is not None and result_path.exists():
            grace_until = now + EXIT_GRACE
        overdue = now > deadline or (grace_until is not None and now > grace_until)
        if overdue and signalled == 0:
            reason = reason or ("did not exit after its result" if grace_until and now > grace_until else
                                f"timed out after {timeout:.0f} s")  # fmt: skip
            proc.send_signal(signal.SIGTERM)
            signalled, deadline = 1, now + 10
        elif overdue and signalled == 1 and now > deadline:
            proc.kill()
            signalled = 2
        time.sleep(0.05)


def _tail(path: Path, lines: int = 4) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:])[-600:] or "(empty log)"
