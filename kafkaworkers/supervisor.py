"""Several worker processes on one host: ``kafkaworkers run --processes N``.

The supervisor holds no Kafka client and opens no Kafka socket. It starts N fresh
interpreters (``python -m kafkaworkers run ...``: librdkafka does not survive a fork, so
each child builds its own clients), all members of the same consumer groups, and:

- reads one health line a second from each child over an inherited pipe (whether its loop
  is alive, whether it joined its groups, the port of its own ``/metrics``);
- restarts a child that exits, after a backoff that doubles while children die young and
  is capped; SIGKILLs and restarts one that stops reporting, or reports its loop stalled,
  for longer than ``liveness_timeout`` (wedged);
- gives up, with the last error line of the child, when one fails before it became ready
  ``start_failures`` times in a row (a plugin that cannot start would only crash-loop);
- on :meth:`Supervisor.stop` sends each child SIGTERM, waits for their graceful shutdown
  and SIGKILLs what is left when the stop timeout ends;
- serves one ``/metrics``: every child's scrape, each sample labelled ``process``.

A child notices its supervisor is gone when a health line cannot be written (the pipe's
only reader closed) and stops its worker, so no orphan keeps consuming.
"""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from kafkaworkers.errors import KafkaWorkersError

__all__ = ["ENV_FD", "ENV_INDEX", "ENV_INSTANCE_ID", "Supervisor", "instance_ids", "report_health", "supervisor_fd"]

log = logging.getLogger(__name__)

#: The number of the inherited pipe a child writes its health lines to.
ENV_FD = "KAFKAWORKERS_SUPERVISOR_FD"
#: A child's index (0 to N-1): part of its transactional id in exactly-once mode.
ENV_INDEX = "KAFKAWORKERS_PROCESS_INDEX"
#: How a child gets its ``group.instance.id``: the ``[consumer]`` table from the environment.
ENV_INSTANCE_ID = "KAFKAWORKERS_CONSUMER_GROUP_INSTANCE_ID"

Check = Callable[[], tuple[bool, str]]

#: A new child may take this long to import itself and its plugins before its first report.
_FIRST_REPORT = 30.0
#: A child that ran this long before it died restarts after the shortest backoff again.
_STABLE = 30.0
_TICK = 0.2
_SCRAPE_TIMEOUT = 2.0
#: The line the CLI prints for an error (``kafkaworkers: error: ...``); the supervisor says it for the child.
_ERROR_PREFIX = b"kafkaworkers: error: "
_INSTANCE_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def instance_ids(plugins: Sequence[str], host: str, processes: int) -> list[str]:
    """One ``group.instance.id`` per process index: ``<plugins>-<host>-<index>``.

    Every consumer of one process shares it; they are all in different groups (a plugin's
    group and its retry group), and Kafka wants an instance id unique within a group only.
    Kafka allows letters, digits, ``.``, ``_`` and ``-`` in it, at most 249 characters.
    """
    stem = _INSTANCE_CHARS.sub("_", f"{'.'.join(sorted(plugins))}-{host}")[:240]
    return [f"{stem}-{index}" for index in range(processes)]


# --- the child's side ------------------------------------------------------------------


def supervisor_fd(environ: Mapping[str, str] | None = None) -> int | None:
    """The health pipe a supervisor gave this process, or None when it runs on its own."""
    value = (os.environ if environ is None else environ).get(ENV_FD)
    return int(value) if value else None


def report_health(
    fd: int,
    live: Check,
    ready: Check,
    metrics_port: int | None,
    on_orphan: Callable[[], None],
    interval: float = 1.0,
    exit_after: float = 30.0,
) -> threading.Thread:
    """Write a health line to ``fd`` every ``interval`` seconds from a daemon thread.

    When a line cannot be written the supervisor is gone: call ``on_orphan`` (stop the
    worker), and end the process ``exit_after`` seconds later if it is still running.
    """

    def loop() -> None:
        while True:
            alive, why = live()
            is_ready, ready_why = ready()
            line = {"alive": alive, "live": why, "ready": is_ready, "why": ready_why, "port": metrics_port}
            try:
                # One line is far below PIPE_BUF: a single write, never interleaved or torn.
                os.write(fd, json.dumps(line).encode() + b"\n")
            except OSError:
                log.warning("the supervisor is gone: stopping")
                on_orphan()
                time.sleep(exit_after)
                log.error("still running %.0f s after the supervisor went: exiting", exit_after)
                os._exit(1)
            time.sleep(interval)

    thread = threading.Thread(target=loop, name="kafkaworkers-health", daemon=True)
    thread.start()
    return thread


# --- the supervisor's side -------------------------------------------------------------


class _Child:
    """One process slot: its current process, what it last reported, and its restart history."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.health = -1
        self.stderr: IO[bytes] | None = None
        self.buffers: dict[int, bytes] = {}
        self.started = 0.0
        self.reported = 0.0
        self.alive = True
        self.ready = False
        self.why = "starting"
        self.port: int | None = None
        self.ever_ready = False
        #: The child's ``kafkaworkers: error:`` line, and its last line on stderr whatever it said.
        self.last_error = ""
        self.last_line = ""
        #: Why the last process was killed as wedged, until its replacement reports.
        self.wedged = ""
        self.killed = False
        self.short_runs = 0
        self.start_failures = 0
        self.restart_at: float | None = 0.0


class Supervisor:
    """Keeps ``processes`` copies of ``command`` running (see the module's doc).

    :param command: the child's command line; it gets the health pipe's number in
        ``KAFKAWORKERS_SUPERVISOR_FD``.
    :param processes: how many children.
    :param liveness_timeout: how long a child may go without reporting before it is killed.
    :param stop_timeout: how long a stopping child may take before it is killed.
    :param env: the children's environment (default: this process's).
    :param instance_ids: a ``group.instance.id`` per child (static membership), or None.
    :param start_failures: failures before readiness, in a row, after which it gives up.
    :param backoff: the first restart delay and its cap, in seconds.
    """

    def __init__(
        self,
        command: Sequence[str],
        processes: int,
        *,
        liveness_timeout: float,
        stop_timeout: float,
        env: Mapping[str, str] | None = None,
        instance_ids: Sequence[str] | None = None,
        start_failures: int = 3,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.command = list(command)
        self.children = [_Child(i) for i in range(processes)]
        self.liveness_timeout = liveness_timeout
        self.stop_timeout = stop_timeout
        self.env = dict(os.environ if env is None else env)
        self.instance_ids = instance_ids
        self.start_failures = start_failures
        self.backoff = backoff
        self.registry = CollectorRegistry()
        self.restarts = Counter(
            "kafkaworkers_process_restarts",
            "Worker processes restarted by the supervisor, by reason: exited or wedged.",
            ["process", "reason"],
            registry=self.registry,
        )
        self.registry.register(_Children(self))
        self._selector = selectors.DefaultSelector()
        self._stopping = False
        self._beat = time.monotonic()

    # --- what the probes read (from the HTTP server's threads) -------------------------

    def live(self) -> tuple[bool, str]:
        """Alive unless a child is wedged (until its replacement reports) or the supervisor's loop stalled."""
        problems = [f"process {c.index}: {c.wedged}" for c in self.children if c.wedged]
        stalled = time.monotonic() - self._beat
        if stalled > self.liveness_timeout:
            problems.append(f"supervisor loop has not completed an iteration for {stalled:.0f} s")
        return (False, "; ".join(problems)) if problems else (True, "alive")

    def ready(self) -> tuple[bool, str]:
        """Ready when every child reports it reached the broker and joined its groups."""
        waiting = [f"process {c.index}: {c.why}" for c in self.children if not (c.proc and c.reported and c.ready)]
        return (False, "; ".join(waiting)) if waiting else (True, "ready")

    def ports(self) -> list[tuple[int, int]]:
        """(process index, metrics port) of every running child that reported one."""
        return [(c.index, c.port) for c in self.children if c.proc is not None and c.port]

    # --- control ------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every child gracefully and return from :meth:`run` (safe from a signal handler)."""
        self._stopping = True

    def kill(self) -> None:
        """SIGKILL every child now (a second signal: the operator does not want to wait)."""
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.kill()

    def run(self) -> int:
        """Start the children and keep them running until :meth:`stop`; return the exit status.

        0 when every child stopped by itself within the stop timeout, 1 otherwise. Raises
        :class:`KafkaWorkersError` with the child's last error line when it gives up.
        """
        try:
            failure = self._supervise()
            status = self._stop_all(quiet=failure is not None)
        finally:
            for child in self.children:
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.kill()
                    child.proc.wait()
                self._close_pipes(child)
            self._selector.close()
        if failure:
            raise KafkaWorkersError(failure)
        return status

    def _supervise(self) -> str | None:
        """Run until stopped (None), or until a child fails at start too often (why)."""
        while not self._stopping:
            now = self._tick()
            for child in self.children:
                if child.proc is None:
                    if child.restart_at is not None and now >= child.restart_at:
                        self._spawn(child)
                    continue
                if child.proc.poll() is not None:
                    failure = self._exited(child, now)
                    if failure:
                        return failure
                else:
                    self._check_wedged(child, now)
        return None

    def _tick(self) -> float:
        """Wait up to a tick for output from the children; forward it; return the time."""
        for key, _ in self._selector.select(_TICK):
            child, stream = key.data
            self._read(child, key.fd, stream)
        self._beat = time.monotonic()
        return self._beat

    def _spawn(self, child: _Child) -> None:
        read, write = os.pipe()
        env = {**self.env, ENV_FD: str(write), ENV_INDEX: str(child.index)}
        if self.instance_ids is not None:
            env[ENV_INSTANCE_ID] = self.instance_ids[child.index]
        try:
            # A session of its own: Ctrl-C in a terminal reaches the supervisor only, which
            # stops the children once (a second signal would make a child exit at once).
            proc = subprocess.Popen(
                self.command, env=env, pass_fds=(write,), stderr=subprocess.PIPE, start_new_session=True
            )
        finally:
            os.close(write)
        assert proc.stderr is not None
        child.proc, child.health, child.stderr = proc, read, proc.stderr
        os.set_blocking(read, False)
        os.set_blocking(proc.stderr.fileno(), False)
        self._selector.register(read, selectors.EVENT_READ, (child, "health"))
        self._selector.register(proc.stderr.fileno(), selectors.EVENT_READ, (child, "stderr"))
        child.started = time.monotonic()
        child.reported = 0.0
        child.alive, child.ready, child.why, child.port = True, False, "starting", None
        child.killed = False
        child.restart_at = None
        log.info("process %d started (pid %d)", child.index, proc.pid)

    def _read(self, child: _Child, fd: int, stream: str) -> bool:
        """Take what a pipe holds and act on each complete line; whether there may be more.

        EOF unregisters the pipe (and acts on an unfinished last line)."""
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return False
        if not data:
            self._selector.unregister(fd)
            rest = child.buffers.pop(fd, b"")
            if rest:
                self._line(child, stream, rest)
            return False
        lines = (child.buffers.pop(fd, b"") + data).split(b"\n")
        if lines[-1]:
            child.buffers[fd] = lines[-1]
        for line in lines[:-1]:
            self._line(child, stream, line)
        return True

    def _line(self, child: _Child, stream: str, line: bytes) -> None:
        if stream == "stderr":
            if line.startswith(_ERROR_PREFIX):
                # The supervisor says it, with the process it came from.
                child.last_error = line[len(_ERROR_PREFIX) :].decode(errors="replace").strip()
                return
            if line.strip():
                child.last_line = line.decode(errors="replace").strip()
            os.write(2, line + b"\n")
            return
        try:
            report = json.loads(line)
        except ValueError:
            log.debug("process %d: not a health line: %r", child.index, line)
            return
        child.reported = time.monotonic()
        child.alive = bool(report.get("alive"))
        child.ready = bool(report.get("ready"))
        child.why = "ready" if child.ready else str(report.get("why"))
        if not child.alive:
            child.why = str(report.get("live"))
        port = report.get("port")
        child.port = port if isinstance(port, int) else None
        if child.ready:
            child.ever_ready = True
            child.start_failures = 0
        if child.alive:
            child.wedged = ""

    def _check_wedged(self, child: _Child, now: float) -> None:
        if self._stopping or child.killed:
            return
        if child.reported:
            silent = now - child.reported
            why = f"no health report for {silent:.1f} s" if silent > self.liveness_timeout else ""
            why = why or ("" if child.alive else child.why)
        else:
            silent = now - child.started
            limit = max(self.liveness_timeout, _FIRST_REPORT)
            why = f"no health report {silent:.1f} s after it started" if silent > limit else ""
        if why:
            assert child.proc is not None
            log.error("process %d (pid %d) is wedged (%s): killing it", child.index, child.proc.pid, why)
            child.wedged = why
            child.killed = True
            child.proc.kill()

    def _exited(self, child: _Child, now: float) -> str | None:
        """Reap a child that exited and schedule its restart; a reason to give up, if it is time to."""
        assert child.proc is not None
        proc = child.proc
        self._drain(child)
        self._close_pipes(child)
        child.proc = None
        code = proc.returncode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        ran = now - child.started
        reason = "wedged" if child.killed else "exited"
        self.restarts.labels(str(child.index), reason).inc()
        child.short_runs = child.short_runs + 1 if ran < _STABLE else 1
        delay = min(self.backoff[1], self.backoff[0] * 2 ** (child.short_runs - 1))
        child.restart_at = now + delay
        # A traceback's last line says more than an exit status.
        error = child.last_error or child.last_line or how
        if not child.ever_ready:
            child.start_failures += 1
            if child.start_failures >= self.start_failures:
                return f"process {child.index} failed at start {child.start_failures} times in a row; the last: {error}"
            log.warning(
                "process %d (pid %d) %s before it was ready (%d of %d in a row); restarting in %.3g s",
                child.index, proc.pid, how, child.start_failures, self.start_failures, delay,
            )  # fmt: skip
        else:
            said = "" if child.killed or not child.last_error else f": {child.last_error}"
            log.warning("process %d (pid %d) %s%s; restarting in %.3g s", child.index, proc.pid, how, said, delay)
        child.ever_ready = False
        child.last_error = child.last_line = ""
        return None

    def _drain(self, child: _Child) -> None:
        """Read what an exited child left in its pipes (its last error line is there); a pipe
        a grandchild still holds open is read up to what it holds now."""
        streams = [(child.health, "health")]
        if child.stderr is not None:
            streams.append((child.stderr.fileno(), "stderr"))
        for fd, stream in streams:
            while fd in self._selector.get_map() and self._read(child, fd, stream):
                pass

    def _close_pipes(self, child: _Child) -> None:
        for fd in (child.health, child.stderr.fileno() if child.stderr else -1):
            if fd >= 0 and fd in self._selector.get_map():
                self._selector.unregister(fd)
            child.buffers.pop(fd, None)
        if child.health >= 0:
            os.close(child.health)
            child.health = -1
        if child.stderr is not None:
            child.stderr.close()
            child.stderr = None

    def _stop_all(self, quiet: bool) -> int:
        """SIGTERM every running child, wait for them up to the stop timeout, SIGKILL the rest.

        ``quiet`` (giving up): the reason is said once, so the others' failures are not logged."""
        running = [c for c in self.children if c.proc is not None]
        for child in running:
            assert child.proc is not None
            child.killed = False
            child.proc.send_signal(signal.SIGTERM)
        if running:
            log.info("stopping %d process(es): at most %.0f s", len(running), self.stop_timeout)
        deadline = time.monotonic() + self.stop_timeout
        status = 0
        while any(c.proc is not None for c in running):
            now = self._tick()
            for child in running:
                proc = child.proc
                if proc is None:
                    continue
                if proc.poll() is not None:
                    self._drain(child)
                    self._close_pipes(child)
                    child.proc = None
                    # Killed by SIGTERM: it had not started its worker yet, so it had nothing to finish.
                    if proc.returncode not in (0, -signal.SIGTERM) and not quiet:
                        status = 1
                        error = f": {child.last_error}" if child.last_error else ""
                        log.warning("process %d exited with status %d%s", child.index, proc.returncode, error)
                elif now > deadline and not child.killed:
                    log.warning("process %d did not stop within %.0f s: killing it", child.index, self.stop_timeout)
                    child.killed = True
                    proc.kill()
        return status


class _Children:
    """A collector that serves every child's ``/metrics``, each sample labelled with its ``process``.

    The children's own registries hold collectors read at scrape time (handler-duration
    buckets, breaker states), which prometheus_client's multiprocess mode cannot share
    through its files; merging the children's scrapes keeps every metric as it is.
    ``kafkaworkers_process_up`` says which children answered.
    """

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        ports = self.supervisor.ports()
        up = GaugeMetricFamily(
            "kafkaworkers_process_up", "Whether the worker process answered this scrape.", labels=["process"]
        )
        if not ports:
            yield up
            return
        with ThreadPoolExecutor(max_workers=len(ports)) as pool:
            texts = list(pool.map(_scrape, [port for _, port in ports]))
        families: dict[str, Metric] = {}
        for (index, _), text in zip(ports, texts, strict=True):
            up.add_metric([str(index)], 1.0 if text is not None else 0.0)
            if text is None:
                continue
            # prometheus_client leaves the parser unannotated; it yields Metric families.
            for family in text_string_to_metric_families(text):  # type: ignore[no-untyped-call]
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type, family.unit)
                )
                label = {"process": str(index)}
                merged.samples += [s._replace(labels={**s.labels, **label}) for s in family.samples]
        yield from families.values()
        yield up


def _scrape(port: int) -> str | None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    try:
        with urllib.request.urlopen(request, timeout=_SCRAPE_TIMEOUT) as response:
            text: str = response.read().decode()
            return text
    except OSError as exc:
        log.debug("cannot scrape the worker on port %d: %s", port, exc)
        return None
