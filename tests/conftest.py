"""Fixtures shared by the whole suite: the real broker, test plugins, worker processes."""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from kafkaworkers.producer import produce
from tests.pgserver import PgServer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
KW = str(Path(sys.executable).parent / "kafkaworkers")
#: Short sessions so a killed worker's partitions move on within seconds, not 45 s.
FAST_GROUP = {
    "KAFKAWORKERS_CONSUMER_SESSION_TIMEOUT_MS": "6000",
    "KAFKAWORKERS_CONSUMER_HEARTBEAT_INTERVAL_MS": "1000",
}


#: The one seed every test's random generator derives from: in the report header, and
#: replayed by setting KAFKAWORKERS_TEST_SEED to it.
SEED = int(os.environ.get("KAFKAWORKERS_TEST_SEED") or random.SystemRandom().randrange(2**32))


def pytest_report_header() -> str:
    return f"random seed {SEED}; replay with KAFKAWORKERS_TEST_SEED={SEED}"


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """This test's generator: the run's seed and the test's id, so one test replays on its own too."""
    print(f"random seed {SEED}; replay with KAFKAWORKERS_TEST_SEED={SEED}")
    return random.Random(f"{SEED}:{request.node.nodeid}")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET; connection errors raise ``OSError``."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def bootstrap() -> str:
    """The real broker's address. Unreachable is a failure, never a skip."""
    servers = os.environ.get("KAFKAWORKERS_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    try:
        AdminClient({"bootstrap.servers": servers}).list_topics(timeout=15)
    except KafkaException as exc:
        pytest.fail(f"no Kafka broker at {servers} ({exc}); start one with `make kafka-up`", pytrace=False)
    return servers


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the whole run (Debian's postgresql; .ci/run installs it)."""
    server = PgServer(port=free_port()).start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """Each test on both state backends: SQLite (no URL) and a fresh database of the real PostgreSQL."""
    if request.param == "sqlite":
        return None
    server: PgServer = request.getfixturevalue("pg_server")
    return server.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def kafka(bootstrap: str) -> KafkaHelper:
    return KafkaHelper(bootstrap)


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    """SIGTERM every process still running, all at once, then wait for each; one that outlives
    ``timeout`` is killed."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class KafkaHelper:
    """Plain confluent-kafka clients for setting up and checking what a worker did."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.admin = AdminClient({"bootstrap.servers": bootstrap})

    def create_topics(self, *names: str, partitions: int = 3) -> None:
        futures = self.admin.create_topics([NewTopic(n, partitions, 1) for n in names])
        for future in futures.values():
            future.result(30)

    def produce(self, topic: str, values: list[bytes], key: Callable[[int], bytes] | None = None) -> None:
        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "linger.ms": 5})
        for i, value in enumerate(values):
            produce(producer, topic, value, key(i) if key else str(i).encode())
        assert producer.flush(30) == 0

    def read_all(self, topic: str, expected: int, timeout: float = 60.0) -> list:
        """Every message of ``topic`` once at least ``expected`` are there (from a throwaway group)."""
        consumer = Consumer(
            {"bootstrap.servers": self.bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
             "auto.offset.reset": "earliest", "enable.auto.commit": False}
        )  # fmt: skip
        consumer.subscribe([topic])
        out: list = []
        deadline = time.monotonic() + timeout
        try:
            while len(out) < expected and time.monotonic() < deadline:
                out.extend(m for m in consumer.consume(1000, 0.5) if m.error() is None)
        finally:
            consumer.close()
        return out

    def committed(self, group: str, topic: str, partitions: int = 3) -> int:
        """The sum of the group's committed offsets over ``topic``'s partitions."""
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group})
        try:
            tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=15)
        except KafkaException:
            return -1  # the group coordinator is loading or moving; the caller polls again
        finally:
            consumer.close()
        return sum(max(tp.offset, 0) for tp in tps)


@pytest.fixture
def kwtest(tmp_path: Path) -> Iterator[KwTest]:
    """This test's copy of the test plugins (own topics, ledger, dist-info); its workers are stopped after."""
    plugins = KwTest(tmp_path)
    yield plugins
    plugins.stop_all()


class KwTest:
    """The ``kwtest`` plugin package made visible through a dist-info, as a third-party plugin."""

    def __init__(self, tmp_path: Path) -> None:
        self.prefix = f"kwtest-{uuid.uuid4().hex[:10]}"
        self.ping = f"{self.prefix}.ping"
        self.pong = f"{self.prefix}.pong"
        self.group = f"{self.prefix}-group"
        self.ledger = tmp_path / "ledger.sqlite3"
        self.site = tmp_path / "site"
        dist = self.site / "kwtest_plugins-1.0.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kwtest-plugins\nVersion: 1.0\n")
        (dist / "entry_points.txt").write_text("[kafkaworkers]\necho = kwtest:plugin\n")
        self.data_dir = tmp_path / "data"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs = tmp_path

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            **FAST_GROUP,
            "PYTHONPATH": os.pathsep.join([str(self.site), str(FIXTURES)]),
            "KWTEST_PREFIX": self.prefix,
            "KWTEST_LEDGER": str(self.ledger),
            "KAFKAWORKERS_DATA_DIR": str(self.data_dir),
            "KAFKAWORKERS_METRICS_PORT": "0",
            **extra,
        }

    def cli(self, *args: str, input: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [KW, *args], env=self.env(**env), input=input, capture_output=True, text=True, timeout=120
        )

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"worker-{len(self.procs)}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [KW, "run", "--plugin", "echo", "--group-id", self.group, *args],
            env=self.env(**env),
            stdout=log,
            stderr=log,
        )
        self.procs.append(proc)
        return proc

    def handled(self) -> list[int]:
        """Every ``n`` the plugin handled, one entry per handling."""
        if not self.ledger.exists():
            return []
        with sqlite3.connect(self.ledger, timeout=30) as db:
            return [n for (n,) in db.execute("SELECT n FROM handled")]

    def log(self, index: int = -1) -> str:
        return (self.logs / f"worker-{index % len(self.procs)}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        stop_processes(self.procs)
