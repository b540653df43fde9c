"""Settings layering, validation messages and secret redaction."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kafkaworkers.config import REDACTED, Source, load_settings, redact, resolve_settings
from kafkaworkers.consumer import consumer_config
from kafkaworkers.errors import ConfigError
from kafkaworkers.producer import producer_config


def test_layers_apply_in_order_defaults_file_env_flags(tmp_path: Path) -> None:
    (tmp_path / "kafkaworkers.toml").write_text(
        'bootstrap_servers = "file:9092"\nbatch_size = 10\nlog_level = "DEBUG"\n[kafka]\n"client.id" = "from-file"\n'
    )
    env = {"KAFKAWORKERS_BATCH_SIZE": "20", "KAFKAWORKERS_KAFKA_SOCKET_TIMEOUT_MS": "5000"}
    settings = load_settings(overrides={"batch_size": 30, "group_id": None}, environ=env, cwd=tmp_path)
    assert settings.bootstrap_servers == "file:9092"
    assert settings.log_level == "DEBUG"
    assert settings.batch_size == 30
    assert settings.kafka == {"client.id": "from-file", "socket.timeout.ms": "5000"}
    assert settings.metrics_host == "127.0.0.1"


def test_pyproject_tool_table_is_read(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.kafkaworkers]\nmetrics-port = 9999\n")
    assert load_settings(environ={}, cwd=tmp_path).metrics_port == 9999


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("METRICS_PORT", "99999", "must be between 0 and 65535"),
        ("METRICS_PORT", "-1", "must be between 0 and 65535"),
        ("BATCH_SIZE", "-5", "must be between 1 and 1000000"),
        ("BATCH_SIZE", "lots", "must be a whole number between 1 and 1000000"),
        ("POLL_TIMEOUT", "-1", "must be greater than 0 and at most 10"),
        ("POLL_TIMEOUT", "60", "must be greater than 0 and at most 10"),
        ("LIVENESS_TIMEOUT", "0", "must be greater than 0"),
        ("LOG_LEVEL", "verbose", "must be one of DEBUG, INFO, WARNING, ERROR (any case)"),
        ("LOG_FORMAT", "xml", "must be one of text, json (any case)"),
        ("GROUP_ID", "my group", "must be 1 to 200 letters, digits, '.', '_' or '-'"),
        ("GROUP_PREFIX", "team/", "must be at most 200 letters, digits, '.', '_' or '-'"),
        ("METRICS_HOST", "not a host", "must be an IP address or host name of this machine"),
    ],
)
def test_a_bad_value_is_one_line_with_setting_value_variable_and_what_is_allowed(
    tmp_path: Path, variable: str, value: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={f"KAFKAWORKERS_{variable}": value}, cwd=tmp_path)
    message = str(raised.value)
    shown = repr(value) if " " in value else value
    assert message.startswith(
        f"bad setting {variable.lower()}={shown} from environment (KAFKAWORKERS_{variable}): {allowed}"
    ), message
    assert "\n" not in message


def test_a_bad_value_names_the_file_or_the_flag_it_came_from(tmp_path: Path) -> None:
    (tmp_path / "kafkaworkers.toml").write_text("batch_size = 0\n")
    with pytest.raises(ConfigError, match=r"^bad setting batch_size=0 from kafkaworkers.toml: must be between 1 and"):
        load_settings(environ={}, cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"^bad setting metrics_port=70000 from command line \(--metrics-port\)"):
        load_settings(overrides={"metrics_port": 70000}, environ={}, cwd=tmp_path / "elsewhere")


def test_liveness_timeout_must_outlast_the_poll_timeout(tmp_path: Path) -> None:
    env = {"KAFKAWORKERS_POLL_TIMEOUT": "5", "KAFKAWORKERS_LIVENESS_TIMEOUT": "2"}
    with pytest.raises(
        ConfigError, match=r"liveness_timeout=2.0 from environment .* greater than poll_timeout \(5.0\)"
    ):
        load_settings(environ=env, cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"poll_timeout=10.0 from .* less than liveness_timeout \(1.0\)"):
        load_settings(environ={"KAFKAWORKERS_LIVENESS_TIMEOUT": "1"}, overrides={"poll_timeout": 10}, cwd=tmp_path)


def test_edge_values_are_accepted_and_log_settings_take_any_case(tmp_path: Path) -> None:
    env = {
        "KAFKAWORKERS_METRICS_PORT": "65535",
        "KAFKAWORKERS_BATCH_SIZE": "1",
        "KAFKAWORKERS_POLL_TIMEOUT": "10",
        "KAFKAWORKERS_LOG_LEVEL": "debug",
        "KAFKAWORKERS_LOG_FORMAT": "JSON",
        "KAFKAWORKERS_METRICS_HOST": "::",
        "KAFKAWORKERS_GROUP_ID": "team.orders_v2-blue",
    }
    settings = load_settings(environ=env, cwd=tmp_path)
    assert (settings.metrics_port, settings.batch_size, settings.poll_timeout) == (65535, 1, 10.0)
    assert (settings.log_level, settings.log_format, settings.metrics_host) == ("DEBUG", "json", "::")
    assert settings.group_id == "team.orders_v2-blue"
    (tmp_path / "kafkaworkers.toml").write_text('log_level = "warning"\nmetrics_host = "localhost"\n')
    assert load_settings(environ={}, cwd=tmp_path).log_level == "WARNING"


def test_a_misspelled_variable_is_warned_about_once_with_the_closest_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = {
        "KAFKAWORKERS_BOOTSTRAP_SERVER": "broker:9092",
        "KAFKAWORKERS_CONSUMERS_SESSION_TIMEOUT_MS": "6000",
        "KAFKAWORKERS_PLUGINS_PAGAMENTO_GATEWAY_TIMEOUT": "5",
        "KAFKAWORKERS_XYZZY": "1",
    }
    with caplog.at_level(logging.WARNING, logger="kafkaworkers.config"):
        settings = load_settings(environ=env, cwd=tmp_path)
        load_settings(environ=env, cwd=tmp_path)
    assert settings.bootstrap_servers == "localhost:9092"
    assert [r.getMessage() for r in caplog.records] == [
        "KAFKAWORKERS_BOOTSTRAP_SERVER is not a kafkaworkers setting and is ignored;"
        " did you mean KAFKAWORKERS_BOOTSTRAP_SERVERS?",
        "KAFKAWORKERS_CONSUMERS_SESSION_TIMEOUT_MS is not a kafkaworkers setting and is ignored;"
        " did you mean KAFKAWORKERS_CONSUMER_SESSION_TIMEOUT_MS?",
        "KAFKAWORKERS_PLUGINS_PAGAMENTO_GATEWAY_TIMEOUT is not a kafkaworkers setting and is ignored;"
        " a plugin setting is KAFKAWORKERS_PLUGINS__<PLUGIN>__<SETTING>, with double underscores",
        "KAFKAWORKERS_XYZZY is not a kafkaworkers setting and is ignored;"
        " `kafkaworkers config show` lists the settings",
    ]


def test_every_variable_kafkaworkers_reads_is_known(tmp_path: Path) -> None:
    env = {
        "KAFKAWORKERS_GROUP_PREFIX": "t-",
        "KAFKAWORKERS_KAFKA_CLIENT_ID": "c",
        "KAFKAWORKERS_CONSUMER_SESSION_TIMEOUT_MS": "6000",
        "KAFKAWORKERS_PRODUCER_LINGER_MS": "1",
        "KAFKAWORKERS_PLUGINS__PAGAMENTO__GATEWAY_TIMEOUT": "5",
        "KAFKAWORKERS_DISABLE_PLUGINS": "x",
        "KAFKAWORKERS_CHAOS_SCALE": "4",
        "KAFKAWORKERS_TEST_SEED": "7",
        "OTHER_VARIABLE": "not ours",
    }
    assert resolve_settings(environ=env, cwd=tmp_path).warnings == []


def test_plugin_settings_from_the_environment_override_single_file_values(tmp_path: Path) -> None:
    (tmp_path / "kafkaworkers.toml").write_text(
        '[plugins.pagamento]\ngateway_timeout = 2\ngateway_url = "http://gw"\n[plugins.fraude]\nlimite = 1\n'
    )
    env = {
        "KAFKAWORKERS_PLUGINS__PAGAMENTO__GATEWAY_TIMEOUT": "5",
        "KAFKAWORKERS_PLUGINS__PAGAMENTO__RATIO": "2.5",
        "KAFKAWORKERS_PLUGINS__PAGAMENTO__ENABLED": "true",
        "KAFKAWORKERS_PLUGINS__PAGAMENTO__QUOTED": '"5"',
        "KAFKAWORKERS_PLUGINS__PAGAMENTO__CODES": "[1, 2]",
        "KAFKAWORKERS_PLUGINS__PAGAMENTO__GREETING": "hello world",
        "KAFKAWORKERS_PLUGINS__PAGAMENTO__DAY": "2024-01-31",
        "KAFKAWORKERS_PLUGINS__NOTIFICACAO__SMTP_HOST": "mail",
    }
    resolved = resolve_settings(environ=env, cwd=tmp_path)
    assert resolved.settings.plugin_config("pagamento") == {
        "gateway_timeout": 5,
        "gateway_url": "http://gw",
        "ratio": 2.5,
        "enabled": True,
        "quoted": "5",
        "codes": [1, 2],
        "greeting": "hello world",
        "day": "2024-01-31",
    }
    assert resolved.settings.plugin_config("fraude") == {"limite": 1}
    assert resolved.settings.plugin_config("notificacao") == {"smtp_host": "mail"}
    assert resolved.source("plugins", "pagamento", "gateway_timeout") == Source(
        "environment", "KAFKAWORKERS_PLUGINS__PAGAMENTO__GATEWAY_TIMEOUT"
    )
    assert resolved.source("plugins", "pagamento", "gateway_url") == Source("file", "kafkaworkers.toml")


def test_a_plugin_entry_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kafkaworkers.toml").write_text("[plugins]\npagamento = 5\n")
    with pytest.raises(ConfigError, match=r"bad setting plugins.pagamento=5 from kafkaworkers.toml: must be a table"):
        load_settings(environ={}, cwd=tmp_path)


def test_plugin_secrets_are_redacted_in_repr_and_in_the_effective_listing(tmp_path: Path) -> None:
    (tmp_path / "kafkaworkers.toml").write_text(
        '[plugins.pagamento]\ngateway_api_token = "tok-123456"\ngateway_timeout = 5\n'
        '[plugins.notificacao.smtp]\npassword = "mail-pass"\n'
    )
    env = {"KAFKAWORKERS_PLUGINS__FRAUDE__CLIENT_SECRET": "sec-abcdef", "KAFKAWORKERS_KAFKA_SASL_PASSWORD": "hunter2"}
    resolved = resolve_settings(environ=env, cwd=tmp_path)
    settings = resolved.settings
    assert settings.plugin_config("pagamento")["gateway_api_token"] == "tok-123456", "the plugin still gets it"
    listing = repr(resolved.effective())
    for text in (repr(settings), str(settings), listing):
        for secret in ("tok-123456", "mail-pass", "sec-abcdef", "hunter2"):
            assert secret not in text
        assert "gateway_timeout" in text and REDACTED in text
    rows = {name: (value, source) for name, value, source in resolved.effective()}
    assert rows["plugins.pagamento.gateway_api_token"] == (REDACTED, Source("file", "kafkaworkers.toml"))
    assert rows["plugins.fraude.client_secret"][0] == REDACTED
    assert rows["metrics_port"] == (9400, Source("default"))


def test_unknown_file_setting_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kafkaworkers.toml").write_text("bootstrap = 'x'\n")
    with pytest.raises(
        ConfigError, match=r"unknown setting 'bootstrap' in kafkaworkers\.toml; did you mean bootstrap_servers\?"
    ):
        load_settings(environ={}, cwd=tmp_path)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={}, cwd=tmp_path)


def test_secrets_pass_to_clients_but_never_into_repr(tmp_path: Path) -> None:
    env = {
        "KAFKAWORKERS_KAFKA_SASL_PASSWORD": "hunter2",
        "KAFKAWORKERS_KAFKA_SASL_USERNAME": "alice",
        "KAFKAWORKERS_KAFKA_SSL_KEY_PASSWORD": "s3cret",
    }
    settings = load_settings(environ=env, cwd=tmp_path)
    assert producer_config(settings)["sasl.password"] == "hunter2"
    assert consumer_config(settings, "g")["ssl.key.password"] == "s3cret"
    for text in (repr(settings), str(settings)):
        assert "hunter2" not in text and "s3cret" not in text
        assert "alice" in text
    assert redact({"sasl.oauthbearer.client.secret": "x", "bootstrap.servers": "b"}) == {
        "sasl.oauthbearer.client.secret": REDACTED,
        "bootstrap.servers": "b",
    }


def test_offset_store_stays_manual_whatever_the_user_sets(tmp_path: Path) -> None:
    settings = load_settings(environ={"KAFKAWORKERS_CONSUMER_ENABLE_AUTO_OFFSET_STORE": "true"}, cwd=tmp_path)
    config = consumer_config(settings, "g")
    assert config["enable.auto.offset.store"] is False
    assert config["partition.assignment.strategy"] == "cooperative-sticky"
    assert producer_config(settings)["enable.idempotence"] is True
    assert producer_config(settings)["acks"] == "all"
