"""Every expected CLI failure prints one line naming the problem and exits non-zero."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import uuid
from pathlib import Path

import click
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


def test_produce_to_an_unreachable_broker_is_one_line_naming_what_was_tried(kwtest: KwTest) -> None:
    result = kwtest.cli("produce", kwtest.ping, "-b", "127.0.0.1:1", input='{"n": 1}\n')
    line = one_error_line(result)
    assert "cannot reach Kafka at 127.0.0.1:1 over PLAINTEXT: nothing listens there" in line
    assert "127.0.0.1:19092" in line, "the hint must name where `make kafka-up` listens"
    assert len(result.stderr.splitlines()) == 1, result.stderr


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
    assert "pick another --metrics-port" in line


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


# --- settings --------------------------------------------------------------------------------


def test_a_bad_setting_is_one_line_before_the_worker_starts(kwtest: KwTest) -> None:
    run = ("run", "--plugin", "echo", "-b", "memory://cli")
    line = one_error_line(kwtest.cli(*run, KAFKAWORKERS_METRICS_PORT="99999"))
    assert line == (
        "kafkaworkers: error: bad setting metrics_port=99999 from environment (KAFKAWORKERS_METRICS_PORT):"
        " must be between 0 and 65535"
    )
    # A poll timeout that would block the loop (and with it SIGTERM) is refused at start.
    line = one_error_line(kwtest.cli(*run, KAFKAWORKERS_POLL_TIMEOUT="-1"))
    assert "bad setting poll_timeout=-1 from environment (KAFKAWORKERS_POLL_TIMEOUT)" in line


def test_a_librdkafka_property_it_refuses_is_named_with_its_table_and_file(kwtest: KwTest, tmp_path: Path) -> None:
    config = tmp_path / "kafkaworkers.toml"
    config.write_text('[kafka]\n"security.protocol" = "SASL_FOO"\n"sasl.password" = "hunter2"\n')
    result = kwtest.cli("run", "--plugin", "echo", "-b", "memory://cli", "--config", str(config))
    line = one_error_line(result)
    assert line == (
        f"kafkaworkers: error: bad librdkafka property security.protocol='SASL_FOO' in [kafka] from {config}:"
        ' Invalid value "SASL_FOO" for configuration property "security.protocol"'
    )
    # A value that conflicts with a framework default names the property too, and never prints a secret.
    result = kwtest.cli(
        "produce", kwtest.ping, "-b", "memory://cli", input="",
        KAFKAWORKERS_PRODUCER_ACKS="1", KAFKAWORKERS_KAFKA_SASL_PASSWORD="hunter2",
    )  # fmt: skip
    line = one_error_line(result)
    assert "bad librdkafka property acks='1' in [producer] from environment (KAFKAWORKERS_PRODUCER_ACKS)" in line
    assert "`acks` must be set to `all` when `enable.idempotence` is true" in line
    assert "hunter2" not in result.stderr + result.stdout


def test_a_misspelled_variable_is_warned_about_with_the_closest_name(kwtest: KwTest) -> None:
    result = kwtest.cli("config", "show", KAFKAWORKERS_BOOTSTRAP_SERVER="broker:9092")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "KAFKAWORKERS_BOOTSTRAP_SERVER " in line]
    assert len(warnings) == 1
    assert warnings[0].endswith("did you mean KAFKAWORKERS_BOOTSTRAP_SERVERS?")


def test_config_show_prints_each_value_with_its_source_and_no_secret(kwtest: KwTest, tmp_path: Path) -> None:
    config = tmp_path / "kafkaworkers.toml"
    config.write_text('group_prefix = "team-"\n[plugins.pagamento]\ngateway_timeout = 2\n')
    env = {
        "KAFKAWORKERS_BATCH_SIZE": "20",
        "KAFKAWORKERS_PLUGINS__PAGAMENTO__GATEWAY_TIMEOUT": "5",
        "KAFKAWORKERS_PLUGINS__PAGAMENTO__GATEWAY_API_TOKEN": "tok-123456",
        "KAFKAWORKERS_KAFKA_SASL_PASSWORD": "hunter2",
    }
    args = ("config", "show", "-b", "memory://cli", "--config", str(config))
    result = kwtest.cli(*args, "--format", "json", **env)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: (row["value"], row["source"], row["layer"]) for row in json.loads(result.stdout)}
    assert rows["bootstrap_servers"] == ("memory://cli", "--bootstrap-servers", "command line")
    assert rows["batch_size"] == (20, "KAFKAWORKERS_BATCH_SIZE", "environment")
    assert rows["group_prefix"] == ("team-", str(config), "file")
    assert rows["log_format"] == ("text", "default", "default")
    assert rows["plugins.pagamento.gateway_timeout"][:2] == (5, "KAFKAWORKERS_PLUGINS__PAGAMENTO__GATEWAY_TIMEOUT")
    assert rows["plugins.pagamento.gateway_api_token"][0] == "***"
    assert rows["kafka.sasl.password"][0] == "***"

    text = kwtest.cli(*args, **env)
    assert text.returncode == 0, text.stderr
    assert re.search(r"^batch_size +20 +KAFKAWORKERS_BATCH_SIZE$", text.stdout, re.M), text.stdout
    assert re.search(r'^group_prefix +"team-" +' + re.escape(str(config)) + "$", text.stdout, re.M)
    for output in (result, text):
        assert "tok-123456" not in output.stdout + output.stderr
        assert "hunter2" not in output.stdout + output.stderr


def test_a_database_urls_password_never_shows_in_config_show_debug_lines_or_errors(kwtest: KwTest) -> None:
    env = {
        "KAFKAWORKERS_DATABASE_URL": "postgresql://app:hunter2@db-1:5432/orders",
        "KAFKAWORKERS_PLUGINS__RESERVA__DATABASE_URL": "postgresql://stock:s3cret@db-2/orders?password=again",
    }
    shown = kwtest.cli("config", "show", "--format", "json", "--log-level", "debug", **env)
    assert shown.returncode == 0, shown.stderr
    rows = {row["name"]: row["value"] for row in json.loads(shown.stdout)}
    assert rows["database_url"] == "postgresql://app:***@db-1:5432/orders", "host and user stay, to check them"
    assert rows["plugins.reserva.database_url"] == "postgresql://stock:***@db-2/orders?password=***"
    assert "database_url" in shown.stderr, "the debug lines name the setting"
    bad = kwtest.cli("config", "show", KAFKAWORKERS_DATABASE_URL="mysql://app:hunter2@db-1/orders")
    assert bad.returncode != 0 and "database_url" in bad.stderr
    for output in (shown, bad):
        for secret in ("hunter2", "s3cret", "again"):
            assert secret not in output.stdout + output.stderr


def test_log_level_debug_adds_debug_lines(kwtest: KwTest) -> None:
    quiet = kwtest.cli("config", "show", "--log-level", "info")
    assert " DEBUG " not in quiet.stderr
    loud = kwtest.cli("config", "show", "--log-level", "debug")
    assert loud.returncode == 0, loud.stderr
    assert "DEBUG   kafkaworkers.clikit: setting log_level = 'DEBUG' from command line (--log-level)" in loud.stderr
    assert "KAFKAWORKERS_KAFKA_DEBUG=" in loud.stderr, "says how to get librdkafka's own debug lines"


def test_a_metrics_host_that_cannot_be_bound_blames_the_host_not_the_port(kwtest: KwTest) -> None:
    # 192.0.2.1 is TEST-NET-1: never an address of this machine.
    args = ("run", "--plugin", "echo", "-b", "memory://cli", "--metrics-host", "192.0.2.1", "--metrics-port", "9400")
    line = one_error_line(kwtest.cli(*args))
    assert "cannot serve metrics on 192.0.2.1:9400" in line
    assert "pick a --metrics-host of this machine" in line and "--metrics-port" not in line


def test_every_settings_option_has_help() -> None:
    from kafkaworkers.cli import cli

    def commands(group: click.Group) -> list[click.Command]:
        found: list[click.Command] = []
        for command in group.commands.values():
            found += commands(command) if isinstance(command, click.Group) else [command]
        return found

    shared = {"bootstrap_servers", "config_file", "log_level", "log_format"}
    checked = 0
    for command in commands(cli):
        for param in command.params:
            if param.name in shared and isinstance(param, click.Option):
                assert param.help, f"{command.name} {param.opts[0]} has no help"
                checked += 1
    assert checked >= 4 * 3, "run, produce and config show at least"


# --- topics create ---------------------------------------------------------------------------


def test_topics_create_makes_retry_and_dead_letter_topics_and_flags_existing_ones_of_another_size(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from kafkaworkers import Context, Plugin, RetryPolicy
    from kafkaworkers.cli import cli
    from kafkaworkers.plugins import PluginHost
    from kafkaworkers.transports.memory import MemoryTransport

    topics = Plugin("topics", retry=RetryPolicy(delays=(1.0, 2.0)))
    paused = Plugin("paused", retry=RetryPolicy(delays=(1.0,), mode="pause"))
    for plugin in (topics, paused):

        @plugin.consumes("orders", dict)
        def handle(order: dict, ctx: Context) -> None:  # type: ignore[type-arg]
            """Never called: the command only reads the declarations."""

    host = PluginHost()
    for plugin in (topics, paused):
        host.register(plugin, plugin.name)
    name = f"topics-{uuid.uuid4().hex}"
    broker = MemoryTransport.named(name).broker
    broker.create_topic("topics-dlq", 1)  # as a worker made it before its source topic existed
    broker.create_topic("orders", 6)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        result = CliRunner().invoke(cli, ["topics", "create", "--partitions", "6", "-b", f"memory://{name}"], obj=host)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])

    assert result.exit_code == 0, result.output
    assert broker.list_topics() == {
        "orders": 6, "topics-dlq": 1, "topics-retry-1": 6, "topics-retry-2": 6, "paused-dlq": 6,
    }  # fmt: skip
    assert result.stdout.splitlines() == [
        "exists   orders",
        "created  paused-dlq",
        "exists   topics-dlq  with 1 partition, asked 6",
        "created  topics-retry-1",
        "created  topics-retry-2",
        "3 created, 2 existed",
    ]
    assert "1 existing topic(s) have another partition count than asked" in result.stderr
    assert f"kafka-topics.sh --bootstrap-server memory://{name} --alter --topic NAME --partitions 6" in result.stderr
