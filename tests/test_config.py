"""Settings layering, validation messages and secret redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from kafkaworkers.config import REDACTED, load_settings, redact
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


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'batch_size' from environment \(env KAFKAWORKERS_BATCH_SIZE\)"):
        load_settings(environ={"KAFKAWORKERS_BATCH_SIZE": "many"}, cwd=tmp_path)


def test_unknown_file_setting_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kafkaworkers.toml").write_text("bootstrap = 'x'\n")
    with pytest.raises(ConfigError, match="bootstrap"):
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
