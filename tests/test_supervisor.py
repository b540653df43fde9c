"""The supervisor of ``run --processes N`` with fake children (no Kafka): restarts, backoff,
giving up, wedged children, a graceful stop, the merged metrics, and orphans that stop."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kafkaworkers.errors import KafkaWorkersError
from kafkaworkers.supervisor import ENV_FD, ENV_INSTANCE_ID, Supervisor, instance_ids
from tests.conftest import ROOT, KwTest, wait_for

#: A child speaking the supervisor's protocol through kafkaworkers' own reporter. FAKE_MODE:
#: ready (reports ready; SIGTERM -> records it and exits 0), fail (exits 1 at once with the
#: CLI's error line), die (ready, then exits 3), stop-once (ready, then SIGSTOPs itself; its
#: replacements are ready), stubborn (ready, ignores SIGTERM), metrics (ready, serves a
#: counter worth FAKE_VALUE on an ephemeral port).
FAKE_CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from kafkaworkers.supervisor import report_health, supervisor_fd

    mode, out = os.environ["FAKE_MODE"], os.environ["FAKE_DIR"]
    pid = os.getpid()
    with open(os.path.join(out, "pids"), "a") as f:
        f.write(f"{pid} {os.environ.get('KAFKAWORKERS_CONSUMER_GROUP_INSTANCE_ID', '')}\\n")
    print(f"fake child {pid} says hello", file=sys.stderr, flush=True)
    if mode == "fail":
        print(f"kafkaworkers: error: plugin 'fake' failed to start: boom in {pid}", file=sys.stderr)
        sys.exit(1)
    stop = []
    signal.signal(signal.SIGTERM, (lambda *a: None) if mode == "stubborn" else (lambda *a: stop.append(1)))
    port = None
    if mode == "metrics":
        from prometheus_client import CollectorRegistry, Counter, start_http_server
        registry = CollectorRegistry()
        Counter("kafkaworkers_messages_handled", "h", ["outcome"], registry=registry).labels("ok").inc(
            float(os.environ["FAKE_VALUE"]))
        server, _ = start_http_server(0, "127.0.0.1", registry)
        port = server.server_port
    report_health(supervisor_fd(), lambda: (True, "alive"), lambda: (True, "ready"), port, lambda: None, 0.05)
    time.sleep(0.3)
    if mode == "die":
        sys.exit(3)
    if mode == "stop-once":
        # O_EXCL: the children start together, and only the first to create the file stops.
        try:
            os.close(os.open(os.path.join(out, "stopped-once"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            os.kill(pid, signal.SIGSTOP)
    while not stop:
        time.sleep(0.02)
    open(os.path.join(out, f"stopped-{pid}"), "w").close()
    """
)


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    script = tmp_path / "fake_child.py"
    script.write_text(FAKE_CHILD)
    return script


class Running:
    """A supervisor running on a thread, as ``run`` runs it on the main one."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.status: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.status = self.supervisor.run()
        except BaseException as exc:
            self.error = exc

    def finish(self, timeout: float = 30.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the supervisor did not return"


@pytest.fixture
def supervise(fake: Path, tmp_path: Path) -> Iterator[object]:
    started: list[Running] = []

    def start(mode: str, processes: int = 2, **options: object) -> Running:
        env = {**os.environ, "FAKE_MODE": mode, "FAKE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
        env.update(options.pop("env", {}))  # type: ignore[call-overload]
        settings: dict[str, object] = {
            "liveness_timeout": 1.0,
            "stop_timeout": 5.0,
            "backoff": (0.05, 0.4),
            **options,
        }
        running = Running(Supervisor([sys.executable, str(fake)], processes, env=env, **settings))  # type: ignore[arg-type]
        started.append(running)
        return running

    yield start
    for running in started:
        running.supervisor.stop()
        running.finish()


def pids(tmp_path: Path) -> list[int]:
    path = tmp_path / "pids"
    return [int(line.split()[0]) for line in path.read_text().splitlines()] if path.exists() else []


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is gone too: its parent (the supervisor's thread) reaps it when it can.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_sigterm_stops_every_child_gracefully_and_returns_0(supervise, tmp_path: Path) -> None:
    running = supervise("ready", processes=3)
    wait_for(lambda: running.supervisor.ready()[0], 20, "3 children ready")
    children = pids(tmp_path)
    assert len(children) == 3
    running.supervisor.stop()
    running.finish()
    assert running.error is None and running.status == 0
    assert sorted(p.name for p in tmp_path.glob("stopped-*")) == sorted(f"stopped-{pid}" for pid in children)


def test_a_child_that_dies_is_restarted_with_a_growing_capped_backoff(supervise, tmp_path: Path, caplog) -> None:
    caplog.set_level("WARNING", logger="kafkaworkers.supervisor")
    running = supervise("die", processes=1)
    wait_for(lambda: len(pids(tmp_path)) >= 6, 30, "six starts of a child that dies every time")
    delays = [float(d) for d in re.findall(r"exited with status 3; restarting in ([\d.]+) s", caplog.text)]
    assert delays[:5] == [0.05, 0.1, 0.2, 0.4, 0.4], caplog.text
    # It was ready each time: dying later is no failure at start, so it never gives up.
    assert running.thread.is_alive()
    assert running.supervisor.restarts.labels("0", "exited")._value.get() >= 5


def test_children_failing_at_start_make_it_give_up_saying_the_last_error_once(supervise, tmp_path: Path, capfd) -> None:
    running = supervise("fail", processes=2, start_failures=3)
    running.finish()
    assert isinstance(running.error, KafkaWorkersError)
    message = str(running.error)
    assert re.fullmatch(
        r"process [01] failed at start 3 times in a row; the last: plugin 'fake' failed to start: boom in \d+", message
    ), message
    err = capfd.readouterr().err
    # The children's own error lines are not repeated: the supervisor says it, once.
    assert "boom" not in err
    assert "says hello" in err  # any other output of a child is passed on
    assert all(gone(pid) for pid in pids(tmp_path))


def test_a_child_that_stops_reporting_is_killed_and_restarted_and_livez_fails_meanwhile(
    supervise, tmp_path: Path
) -> None:
    running = supervise("stop-once", processes=2, liveness_timeout=1.0, backoff=(1.0, 1.0))
    wait_for(lambda: (tmp_path / "stopped-once").exists(), 20, "a child to stop itself")
    stopped = pids(tmp_path)
    reason = wait_for(lambda: (lambda r: r[1] if not r[0] else None)(running.supervisor.live()), 10, "/livez to fail")
    assert re.fullmatch(r"process [01]: no health report for 1\.\d s", str(reason)), reason
    wait_for(lambda: len(pids(tmp_path)) == 3, 10, "a replacement")
    assert any(gone(pid) for pid in stopped)
    wait_for(lambda: running.supervisor.live()[0], 10, "/livez to pass with the replacement reporting")
    wait_for(lambda: running.supervisor.ready()[0], 10, "both children ready again")
    assert (
        running.supervisor.restarts.labels("0", "wedged")._value.get()
        + running.supervisor.restarts.labels("1", "wedged")._value.get()
        == 1
    )


def test_a_child_that_ignores_sigterm_is_killed_at_the_stop_timeout_and_the_status_says_so(
    supervise, tmp_path: Path
) -> None:
    running = supervise("stubborn", processes=1, stop_timeout=0.5)
    wait_for(lambda: running.supervisor.ready()[0], 20, "the child ready")
    running.supervisor.stop()
    running.finish(10)
    assert running.status == 1
    assert all(gone(pid) for pid in pids(tmp_path))


def test_readyz_waits_for_every_child(supervise, tmp_path: Path) -> None:
    running = supervise("ready", processes=2)
    ok, why = running.supervisor.ready()
    assert not ok and "process 0" in why and "process 1" in why
    wait_for(lambda: running.supervisor.ready()[0], 20, "both children ready")


def test_metrics_merge_every_childs_scrape_labelled_by_process(supervise, tmp_path: Path) -> None:
    running = supervise("metrics", processes=1, env={"FAKE_VALUE": "7"})
    wait_for(lambda: running.supervisor.ready()[0], 20, "the child ready")
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(running.supervisor.registry).decode())
    }
    handled = [s for s in families["kafkaworkers_messages_handled"].samples if s.name.endswith("_total")]
    assert [(s.labels, s.value) for s in handled] == [({"outcome": "ok", "process": "0"}, 7.0)]
    assert [(s.labels, s.value) for s in families["kafkaworkers_process_up"].samples] == [({"process": "0"}, 1.0)]


def test_static_membership_gives_each_child_its_own_instance_id(supervise, tmp_path: Path) -> None:
    ids = instance_ids(["echo", "b"], "host.example:1", 3)
    assert ids == ["b.echo-host.example_1-0", "b.echo-host.example_1-1", "b.echo-host.example_1-2"]
    running = supervise("ready", processes=3, instance_ids=ids, env={ENV_INSTANCE_ID: "shared-by-all"})
    wait_for(lambda: running.supervisor.ready()[0], 20, "3 children ready")
    given = sorted(line.split()[1] for line in (tmp_path / "pids").read_text().splitlines())
    assert given == ids


ORPHAN = textwrap.dedent(
    """
    import os, sys, threading
    from kafkaworkers.supervisor import report_health, supervisor_fd

    stopped = threading.Event()
    report_health(supervisor_fd(), lambda: (True, "alive"), lambda: (True, "ready"), None, stopped.set, 0.05, 5.0)
    sys.exit(0 if stopped.wait(20) else 2)
    """
)


def test_a_child_whose_supervisor_is_gone_stops_its_worker(tmp_path: Path) -> None:
    read, write = os.pipe()
    env = {**os.environ, ENV_FD: str(write), "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", ORPHAN], env=env, pass_fds=(write,))
    os.close(write)
    with os.fdopen(read, "rb") as health:
        assert b'"ready": true' in health.readline()
    # The read end is closed: the supervisor is gone.
    assert child.wait(20) == 0


def test_orphans_end_even_if_their_worker_does_not_stop(tmp_path: Path) -> None:
    read, write = os.pipe()
    env = {**os.environ, ENV_FD: str(write), "PYTHONPATH": str(ROOT)}
    script = ORPHAN.replace("stopped.set, 0.05, 5.0", "lambda: None, 0.05, 0.5")
    child = subprocess.Popen([sys.executable, "-c", script], env=env, pass_fds=(write,))
    os.close(write)
    with os.fdopen(read, "rb") as health:
        health.readline()
    assert child.wait(20) == 1


def test_children_run_in_sessions_of_their_own_so_ctrl_c_reaches_the_supervisor_only(supervise, tmp_path: Path) -> None:
    running = supervise("ready", processes=1)
    wait_for(lambda: running.supervisor.ready()[0], 20, "the child ready")
    (pid,) = pids(tmp_path)
    assert os.getsid(pid) == pid != os.getsid(0)


def test_static_membership_needs_several_processes(kwtest: KwTest) -> None:
    result = kwtest.cli("run", "--plugin", "echo", "--static-membership")
    assert result.returncode == 2
    assert result.stderr.startswith("kafkaworkers: error: --static-membership gives each of several --processes")


def test_one_instance_id_for_several_processes_is_refused(kwtest: KwTest) -> None:
    result = kwtest.cli(
        "run",
        "--plugin",
        "echo",
        "--processes",
        "2",
        "-b",
        "127.0.0.1:1",
        KAFKAWORKERS_CONSUMER_GROUP_INSTANCE_ID="one",
    )
    assert result.returncode == 1
    assert result.stderr == (
        "kafkaworkers: error: group.instance.id='one' would be shared by all 2 processes, each fencing the"
        " others out of the group; pass --static-membership to give each its own\n"
    )
