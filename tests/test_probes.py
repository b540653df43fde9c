"""The HTTP endpoint: /metrics in both formats, liveness of the loop, readiness, 404s."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from kafkaworkers import Context, Plugin
from kafkaworkers.config import Settings
from kafkaworkers.metrics import Metrics
from kafkaworkers.plugins import PluginHost
from kafkaworkers.probes import ProbeServer
from kafkaworkers.testing import Harness
from kafkaworkers.transports.memory import MemoryBroker, MemoryTransport
from kafkaworkers.worker import Worker
from tests.conftest import KwTest, free_port, http_get, wait_for

LIVENESS_TIMEOUT = 0.5


@pytest.fixture
def server() -> Iterator[tuple[str, dict[str, tuple[bool, str]]]]:
    """A probe server over a fresh registry whose checks answer what the test puts in ``state``."""
    state = {"live": (True, "alive"), "ready": (False, "waiting to join groups: echo")}
    probe = ProbeServer(
        "127.0.0.1", 0, Metrics().registry, live=lambda: state["live"], ready=lambda: state["ready"]
    ).start()
    yield f"http://127.0.0.1:{probe.port}", state
    probe.close()


def test_probes_answer_200_or_503_with_a_one_line_reason_and_healthz_is_livez(server) -> None:
    base, state = server
    assert http_get(f"{base}/livez") == (200, "text/plain; charset=utf-8", "alive\n")
    assert http_get(f"{base}/healthz") == (200, "text/plain; charset=utf-8", "alive\n")
    assert http_get(f"{base}/readyz") == (503, "text/plain; charset=utf-8", "waiting to join groups: echo\n")
    state["live"] = (False, "consumer loop has not completed an iteration for 31 s\n(more)")
    assert http_get(f"{base}/livez")[::2] == (503, "consumer loop has not completed an iteration for 31 s (more)\n")
    assert http_get(f"{base}/healthz")[0] == 503
    state["ready"] = (True, "ready")
    assert http_get(f"{base}/readyz?verbose=1")[::2] == (200, "ready\n")


def test_unknown_paths_are_404(server) -> None:
    base, _ = server
    for path in ("/", "/nope", "/metrics/x", "/livez/"):
        status, _, body = http_get(base + path)
        assert status == 404, path
        assert "/metrics" in body


def test_metrics_are_prometheus_text_unless_the_scraper_asks_for_openmetrics(server) -> None:
    base, _ = server
    status, content_type, body = http_get(f"{base}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    assert 'kafkaworkers_build_info{version="' in body

    status, content_type, body = http_get(f"{base}/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert status == 200
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith("# EOF\n")
    assert "# TYPE kafkaworkers_build info" in body


def test_a_check_that_raises_answers_503_instead_of_dropping_the_connection() -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    probe = ProbeServer("127.0.0.1", 0, Metrics().registry, live=broken, ready=broken).start()
    try:
        assert http_get(f"http://127.0.0.1:{probe.port}/livez")[::2] == (
            503,
            "/livez check failed: RuntimeError: boom\n",
        )
    finally:
        probe.close()


def test_a_client_that_connects_and_never_asks_does_not_hold_the_server(server) -> None:
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)), socket.create_connection(("127.0.0.1", port)):
        started = time.monotonic()
        assert http_get(f"{base}/livez")[0] == 200
        assert time.monotonic() - started < 2


# --- against a real Worker on the in-memory broker -------------------------------------


class Job(msgspec.Struct):
    block: bool = False


class Wedge:
    """A plugin whose handler blocks on ``release`` for a job that says so."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.plugin = Plugin("wedge")
        self.plugin.consumes("jobs", Job)(self.handle)

    def handle(self, job: Job, ctx: Context) -> None:
        if job.block:
            self.entered.set()
            assert self.release.wait(30), "the test never released the handler"


def test_livez_turns_503_while_the_loop_is_wedged_and_200_again_after(tmp_path: Path) -> None:
    wedge = Wedge()
    harness = Harness(wedge.plugin, data_dir=tmp_path, partitions=1)
    worker = harness.worker
    probe = ProbeServer(
        "127.0.0.1",
        0,
        harness.metrics.registry,
        live=lambda: worker.alive(LIVENESS_TIMEOUT),
        ready=worker.readiness,
    ).start()
    base = f"http://127.0.0.1:{probe.port}"
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            worker.run_once(timeout=0.05)

    thread = threading.Thread(target=loop, name="worker-loop")
    thread.start()
    try:
        wait_for(lambda: http_get(f"{base}/readyz")[0] == 200, 10, "/readyz 200 once the worker joined")
        assert http_get(f"{base}/livez")[::2] == (200, "alive\n")

        harness.produce("jobs", Job(block=True))
        assert wedge.entered.wait(10), "the handler was never called"
        _, _, reason = wait_for(
            lambda: (r := http_get(f"{base}/livez"))[0] == 503 and r, 10, "/livez 503 while the handler blocks"
        )
        assert reason.startswith("consumer loop has not completed an iteration for ") and reason.count("\n") == 1
        assert http_get(f"{base}/healthz")[0] == 503
        # The endpoint keeps answering while the loop is stuck, and stays ready: being stuck is liveness' business.
        assert http_get(f"{base}/metrics")[0] == 200
        assert http_get(f"{base}/readyz")[0] == 200

        wedge.release.set()
        wait_for(lambda: http_get(f"{base}/livez")[0] == 200, 10, "/livez 200 after the handler returned")
        registry = harness.metrics.registry
        labels = {"plugin": "wedge", "topic": "jobs", "outcome": "ok"}
        wait_for(
            lambda: registry.get_sample_value("kafkaworkers_messages_handled_total", labels) == 1,
            10,
            "the wedged job counted as handled",
        )
    finally:
        wedge.release.set()
        stop.set()
        thread.join(10)
        probe.close()
        harness.close()


def test_readyz_is_503_until_the_worker_reached_the_broker_and_joined(tmp_path: Path) -> None:
    wedge = Wedge()
    host = PluginHost()
    host.register(wedge.plugin, wedge.plugin.name)
    broker = MemoryBroker()
    broker.create_topic("jobs", 2)
    settings = Settings(bootstrap_servers="memory://probes", data_dir=str(tmp_path))
    worker = Worker([wedge.plugin], settings, host, transport=MemoryTransport(broker), metrics=Metrics())
    probe = ProbeServer(
        "127.0.0.1", 0, worker.metrics.registry, live=lambda: (True, "alive"), ready=worker.readiness
    )
    probe.start()
    readyz = f"http://127.0.0.1:{probe.port}/readyz"
    try:
        assert http_get(readyz)[::2] == (503, "broker not reached yet\n")
        worker.start(broker_wait=0)
        assert http_get(readyz)[::2] == (503, "waiting to join groups: wedge\n")
        worker.run_once(timeout=0.05)  # the assignment arrives inside consume()
        assert http_get(readyz)[::2] == (200, "ready\n")
    finally:
        probe.close()
        worker.close()


def test_a_worker_process_waiting_for_an_unreachable_broker_is_alive_but_not_ready(kwtest: KwTest) -> None:
    nothing_there = free_port()  # nothing listens here
    port = free_port()
    proc = kwtest.start("-b", f"127.0.0.1:{nothing_there}", "--broker-wait", "60", KAFKAWORKERS_METRICS_PORT=str(port))
    base = f"http://127.0.0.1:{port}"

    def answered(path: str) -> tuple[int, str, str] | None:
        try:
            return http_get(base + path)
        except OSError:
            return None  # not listening yet

    readyz = wait_for(lambda: answered("/readyz"), 30, "the worker's /readyz to answer")
    assert readyz[::2] == (503, "broker not reached yet\n")
    assert http_get(f"{base}/livez")[::2] == (200, "alive\n")
    assert http_get(f"{base}/metrics")[0] == 200
    assert proc.poll() is None, kwtest.log()
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
