"""Every expected CLI failure prints one line naming the problem and exits non-zero."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import KwTest


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("kafkaworkers: ")]
    assert len(lines) >= 1, result.stderr
    return "\n".join(lines)


def test_unknown_plugin(kwtest: KwTest) -> None:
    line = one_error_line(kwtest.cli("run", "--plugin", "nope"))
    assert "unknown plugin 'nope'; installed:" in line and "echo" in line


def test_unreachable_broker(kwtest: KwTest) -> None:
    result = kwtest.cli("run", "--plugin", "echo", "-b", "127.0.0.1:1", "--broker-wait", "1")
    line = one_error_line(result)
    assert "cannot reach Kafka at 127.0.0.1:1" in line
    assert "make kafka-up" in line


def test_unreachable_broker_for_topics_create(kwtest: KwTest) -> None:
    assert "cannot reach Kafka" in one_error_line(kwtest.cli("topics", "create", "-b", "127.0.0.1:1"))


def test_bad_config_value(kwtest: KwTest) -> None:
    line = one_error_line(kwtest.cli("run", "--plugin", "echo", KAFKAWORKERS_BATCH_SIZE="lots"))
    assert "KAFKAWORKERS_BATCH_SIZE" in line


def test_missing_config_file(kwtest: KwTest) -> None:
    assert "does not exist" in one_error_line(kwtest.cli("run", "--plugin", "echo", "--config", "/nonexistent.toml"))


def test_metrics_port_in_use(kwtest: KwTest) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        line = one_error_line(kwtest.cli("run", "--plugin", "echo", "--metrics-port", port))
    assert f"cannot serve metrics on 127.0.0.1:{port}" in line


def test_run_needs_plugins_or_all(kwtest: KwTest) -> None:
    result = kwtest.cli("run")
    assert result.returncode == 2
    assert "name plugins with --plugin NAME, or pass --all" in result.stderr


def test_produce_reports_each_bad_line_and_fails(kwtest: KwTest) -> None:
    result = kwtest.cli("produce", kwtest.ping, "-b", "memory://cli", input='{"n": "x"}\nnot json\n\n')
    assert result.returncode == 1
    assert "rejected line 1: Expected `int`, got `str` - at `$.n`" in result.stderr
    assert "rejected line 2: JSON is malformed" in result.stderr
    assert "0 sent" in result.stdout and "2 rejected" in result.stdout


def test_produce_to_undeclared_topic(kwtest: KwTest) -> None:
    line = one_error_line(kwtest.cli("produce", "no-such-topic", "-b", "memory://cli", input="{}\n"))
    assert "no installed plugin declares topic 'no-such-topic'" in line


@pytest.mark.parametrize("argv", [["--version"], ["--help"]])
def test_python_dash_m_works_like_the_command(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "kafkaworkers", *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "kafkaworkers" in result.stdout
