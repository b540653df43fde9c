"""Several hosts and a replicated cluster on one machine: network namespaces on a bridge.

The bridge ``kw-br0`` has :data:`BRIDGE_ADDRESS` on the root side, where the three brokers
(scripts/kafka/cluster.sh) and a PostgreSQL server (tests/pgserver.py) listen; each worker
host is a network namespace ``kw-host-<x>`` joined to it by a veth pair, with an address of
its own and its own loopback. Cutting a
host's network sets the root side of its veth down: the host's processes keep running and
reach nothing until it is set up again. Everything here needs root; the namespaces, links
and brokers are removed at the end of the session, and any left by a crashed run at its start.
"""

from __future__ import annotations

import collections
import fcntl
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from confluent_kafka.admin import AdminClient

from tests.conftest import FAST_GROUP, KW, ROOT, stop_processes, wait_for
from tests.judging import holdings
from tests.pgserver import PgServer

BRIDGE = "kw-br0"
SUBNET = "10.77.0"
BRIDGE_ADDRESS = f"{SUBNET}.1"
HOSTS = ("a", "b")
CLUSTER_SH = ROOT / "scripts" / "kafka" / "cluster.sh"
PG_PORT = 25432
#: Held by the test session that owns the bridge; released by the kernel if it crashes.
LOCK = Path("/run/lock/kafkaworkers-cluster-tests.lock")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        pytest.fail(f"ip {' '.join(args)}: {done.stderr.strip()}", pytrace=False)
    return done


class Network:
    """The bridge and one namespace per host, made and removed with ``ip``."""

    def __init__(self, hosts: tuple[str, ...] = HOSTS) -> None:
        self.hosts = {name: f"{SUBNET}.{i + 2}" for i, name in enumerate(hosts)}

    @staticmethod
    def namespace(host: str) -> str:
        return f"kw-host-{host}"

    @staticmethod
    def veth(host: str) -> str:
        """The root side of the host's veth pair (the host's side is ``eth0`` in its namespace)."""
        return f"kw-{host}-br"

    def remove(self) -> None:
        """Remove every namespace and link of this harness, this run's or a crashed one's."""
        for name in ip("netns", "list", check=False).stdout.split():
            if name.startswith("kw-host-"):
                ip("netns", "del", name, check=False)
        for host in self.hosts:
            ip("link", "del", self.veth(host), check=False)
        ip("link", "del", BRIDGE, check=False)

    def create(self) -> None:
        self.remove()
        ip("link", "add", BRIDGE, "type", "bridge")
        ip("addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        for host, address in self.hosts.items():
            ns, veth = self.namespace(host), self.veth(host)
            ip("netns", "add", ns)
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", veth, "master", BRIDGE)
            ip("link", "set", veth, "up")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def cut(self, host: str) -> None:
        ip("link", "set", self.veth(host), "down")

    def restore(self, host: str) -> None:
        ip("link", "set", self.veth(host), "up")


class Cluster:
    """Three brokers on the bridge, driven by scripts/kafka/cluster.sh."""

    def __init__(self, home: Path) -> None:
        self.env = {
            **os.environ,
            "KAFKA_CLUSTER_HOST": BRIDGE_ADDRESS,
            "KAFKA_CLUSTER_HOME": str(home),
        }
        self.home = home
        self.bootstrap = self("bootstrap").strip()

    def __call__(self, *args: str) -> str:
        done = subprocess.run(["bash", str(CLUSTER_SH), *args], env=self.env, capture_output=True, text=True,
                              timeout=240)  # fmt: skip
        assert done.returncode == 0, f"cluster.sh {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def leaders(self, topics: list[str]) -> dict[tuple[str, int], int]:
        """The broker leading each partition of ``topics``."""
        metadata = AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=15)
        return {(t, i): p.leader for t in topics for i, p in metadata.topics[t].partitions.items()}

    def fully_replicated(self, topics: list[str]) -> bool:
        """Whether every partition of ``topics`` has a leader and a copy in sync on each of the three brokers."""
        metadata = AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=15)
        partitions = (
            [p for t in topics for p in metadata.topics[t].partitions.values()]
            if all(t in metadata.topics for t in topics)
            else []
        )
        return bool(partitions) and all(p.leader >= 0 and len(p.isrs) == len(p.replicas) == 3 for p in partitions)


@pytest.fixture(scope="session")
def network() -> Iterator[Network]:
    """The bridge and the hosts, one test session at a time on this machine: a second session
    waits for the first's lock rather than removing its network under it."""
    if os.geteuid() != 0:
        pytest.fail("the cluster tests make network namespaces: run them as root", pytrace=False)
    with open(LOCK, "w") as lock:
        wait_for(lambda: _locked(lock), 1800, f"the other cluster test session to release {LOCK}", interval=1)
        net = Network()
        net.create()
        try:
            yield net
        finally:
            net.remove()


def _locked(lock: IO[str]) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@pytest.fixture(scope="session")
def postgres(network: Network) -> Iterator[PgServer]:
    """The database server every host's services share, on the bridge; in a directory the
    ``postgres`` user it runs as can reach, unlike pytest's private temporary tree."""
    # The hosts connect from the bridge's subnet. Nothing here drops a vanished host's
    # sessions: the store asks for that per session, and scenario (b) depends on it.
    server = PgServer(host=BRIDGE_ADDRESS, port=PG_PORT, trust=[f"{SUBNET}.0/24"]).start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def cluster(network: Network, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    brokers = Cluster(tmp_path_factory.mktemp("cluster"))
    brokers("up")
    try:
        yield brokers
    finally:
        brokers("down")


@pytest.fixture(autouse=True)
def every_broker_up(cluster: Cluster) -> None:
    """Each test starts with the three brokers running: one that failed while a broker was down
    leaves the next with a whole cluster, not a cascade of failures."""
    cluster("up")


class Host:
    """One worker host: ``kafkaworkers run`` processes in the host's namespace, with its own data dir."""

    def __init__(self, name: str, network: Network, env: dict[str, str], base: Path) -> None:
        self.name = name
        self.namespace = network.namespace(name)
        self.data_dir = base / f"host-{name}" / "data"
        self.logs = base / f"host-{name}" / "logs"
        self.logs.mkdir(parents=True)
        self.env = {**env, "KAFKAWORKERS_DATA_DIR": str(self.data_dir)}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started: collections.Counter[str] = collections.Counter()
        #: (plugin, incarnation) of every process SIGKILLed.
        self.killed: set[tuple[str, int]] = set()

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *args]

    def cli(self, *args: str) -> str:
        done = subprocess.run(self.command(KW, *args), env=self.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"[{self.name}] kafkaworkers {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done.stdout

    def start(self, plugin: str) -> None:
        log = open(self.logs / f"{plugin}-{self.started[plugin]}.log", "wb")  # noqa: SIM115 - the process holds it
        self.started[plugin] += 1
        # `ip netns exec` execs the command: the pid is the worker's own.
        self.procs[plugin] = subprocess.Popen(
            self.command(KW, "run", "--plugin", plugin), env=self.env, stdout=log, stderr=log
        )
        log.close()

    def log(self, plugin: str) -> str:
        return "".join(
            (self.logs / f"{plugin}-{i}.log").read_text(errors="replace") for i in range(self.started[plugin])
        )

    def killed_log(self, plugin: str) -> str:
        """What the SIGKILLed processes of ``plugin`` logged."""
        return "".join(
            (self.logs / f"{plugin}-{i}.log").read_text(errors="replace") for p, i in sorted(self.killed) if p == plugin
        )

    def current_log(self, plugin: str) -> str:
        path = self.logs / f"{plugin}-{self.started[plugin] - 1}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def holdings(self, plugin: str) -> set[tuple[str, int]]:
        return holdings(self.current_log(plugin)) if self.running(plugin) else set()

    def running(self, plugin: str) -> bool:
        return plugin in self.procs and self.procs[plugin].poll() is None

    def kill(self, plugin: str) -> None:
        proc = self.procs[plugin]
        self.killed.add((plugin, self.started[plugin] - 1))
        proc.kill()
        assert proc.wait(30) == -signal.SIGKILL, f"[{self.name}] {plugin} exited by itself first"

    def stop_all(self) -> None:
        stop_processes(self.procs.values(), timeout=40)


class Hosts:
    """This test's hosts: one group prefix over all of them, as one deployment."""

    def __init__(self, network: Network, cluster: Cluster, base: Path, **env: str) -> None:
        self.prefix = f"scale-{uuid.uuid4().hex[:8]}-"
        self.database_url = env.get("KAFKAWORKERS_DATABASE_URL", "")
        self.cluster = cluster
        self.network = network
        self.env = {
            **os.environ,
            **FAST_GROUP,
            "KAFKAWORKERS_BOOTSTRAP_SERVERS": cluster.bootstrap,
            "KAFKAWORKERS_GROUP_PREFIX": self.prefix,
            "KAFKAWORKERS_METRICS_PORT": "0",
            "KAFKAWORKERS_LOG_LEVEL": "INFO",
            **env,
        }
        self.each = {name: Host(name, network, self.env, base) for name in network.hosts}

    def group(self, plugin: str) -> str:
        return self.prefix + plugin

    def check_running(self) -> None:
        """Fail, with its log, if a service exited (one SIGKILLed by the test has been replaced by then)."""
        for host in self.each.values():
            for plugin, proc in host.procs.items():
                if proc.poll() is not None:
                    pytest.fail(f"[{host.name}] {plugin} exited with {proc.returncode}:\n{host.log(plugin)[-4000:]}")

    def stop_all(self) -> None:
        for host in self.each.values():
            host.stop_all()


@pytest.fixture
def hosts(network: Network, cluster: Cluster, postgres: PgServer, tmp_path: Path) -> Iterator[Hosts]:
    """Hosts a and b, their services' state in a fresh database of their own on the shared server."""
    url = postgres.create_database(f"scale_{uuid.uuid4().hex[:8]}")
    running = Hosts(network, cluster, tmp_path, KAFKAWORKERS_DATABASE_URL=url)
    try:
        yield running
    finally:
        for host in network.hosts:
            network.restore(host)
        running.stop_all()


def wait_joined(hosts: Hosts, groups: dict[str, list[str]], partitions: dict[str, int], timeout: float = 120) -> None:
    """Wait until, for every plugin, the hosts' processes together hold each partition of its topics once."""

    def joined() -> bool:
        hosts.check_running()
        for plugin, topics in groups.items():
            held = [tp for h in hosts.each.values() for tp in h.holdings(plugin) if tp[0] in topics]
            if len(held) != len(set(held)) or len(held) != sum(partitions[t] for t in topics):
                return False
        return True

    wait_for(joined, timeout, "every service's partitions to be held once over the hosts", interval=0.5)
