"""Settings: defaults < ``kafkaworkers.toml`` (or ``[tool.kafkaworkers]``) < ``KAFKAWORKERS_*`` < flags.

Any librdkafka property passes through (``[kafka]`` for both clients, ``[consumer]`` and
``[producer]`` for one; ``KAFKAWORKERS_KAFKA_SASL_PASSWORD`` sets ``sasl.password``).
Secret values never leave this module unredacted except into the client configuration.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from kafkaworkers.errors import ConfigError

__all__ = ["DEFAULT_PARTITIONS", "Settings", "admin_config", "load_settings", "redact"]

ENV_PREFIX = "KAFKAWORKERS_"
_SECRET = re.compile(r"password|secret|token|private|\.pem$|jaas|oauthbearer\.config|credentials", re.I)
REDACTED = "***"
#: Partitions of a topic kafkaworkers creates when nothing tells it how many:
#: ``kafkaworkers topics create``'s default, and a plugin's retry and dead-letter topics
#: when none of its source topics exists yet to size them by.
DEFAULT_PARTITIONS = 3


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything a worker or command needs to know, resolved from every layer."""

    bootstrap_servers: str = "localhost:9092"
    group_id: str | None = None
    group_prefix: str = ""
    data_dir: str = "data"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9400
    batch_size: int = 500
    poll_timeout: float = 0.5
    liveness_timeout: float = 30.0
    kafka: dict[str, Any] = {}
    consumer: dict[str, Any] = {}
    producer: dict[str, Any] = {}
    plugins: dict[str, dict[str, Any]] = {}

    def __repr__(self) -> str:
        fields = {f: getattr(self, f) for f in self.__struct_fields__}
        for section in ("kafka", "consumer", "producer"):
            fields[section] = redact(fields[section])
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"

    __str__ = __repr__

    def group_for(self, plugin: str) -> str:
        """The consumer group of a plugin: ``group_id`` if set, else ``group_prefix`` + its name."""
        return self.group_id or self.group_prefix + plugin

    def plugin_config(self, name: str) -> dict[str, Any]:
        """A plugin's own ``[plugins.<name>]`` table."""
        return dict(self.plugins.get(name, {}))


def redact(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a client configuration with every secret value replaced by ``***``."""
    return {k: REDACTED if _SECRET.search(k) else v for k, v in config.items()}


def admin_config(settings: Settings) -> dict[str, Any]:
    """The client configuration for admin calls: the shared ``[kafka]`` table and the servers."""
    return {**settings.kafka, "bootstrap.servers": settings.bootstrap_servers}


def load_settings(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Resolve settings from every layer; a bad value raises :class:`ConfigError` naming its source."""
    environ = os.environ if environ is None else environ
    layers: list[tuple[str, dict[str, Any]]] = []
    file_layer = _file_layer(config_file, cwd or Path.cwd())
    if file_layer:
        layers.append(file_layer)
    layers.append(("environment", _env_layer(environ)))
    layers.append(("command line", {k: v for k, v in (overrides or {}).items() if v is not None}))

    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, layer in layers:
        for key, value in layer.items():
            if key in ("kafka", "consumer", "producer", "plugins") and isinstance(value, dict):
                merged[key] = {**merged.get(key, {}), **value}
            else:
                merged[key] = value
            origin[key] = source
    try:
        return msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        field = _field_of(str(exc))
        source = origin.get(field, "configuration")
        hint = f" (env {ENV_PREFIX}{field.upper()})" if source == "environment" else ""
        raise ConfigError(f"bad setting {field!r} from {source}{hint}: {exc}") from None


def _file_layer(config_file: str | Path | None, cwd: Path) -> tuple[str, dict[str, Any]] | None:
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing --config file")
        return str(path), _read_toml(path, tool_table=path.name == "pyproject.toml")
    if (cwd / "kafkaworkers.toml").is_file():
        return "kafkaworkers.toml", _read_toml(cwd / "kafkaworkers.toml", tool_table=False)
    if (cwd / "pyproject.toml").is_file():
        table = _read_toml(cwd / "pyproject.toml", tool_table=True)
        return ("pyproject.toml [tool.kafkaworkers]", table) if table else None
    return None


def _read_toml(path: Path, tool_table: bool) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from None
    if tool_table:
        data = data.get("tool", {}).get("kafkaworkers", {})
    return {k.replace("-", "_"): v for k, v in data.items()}


def _env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    simple = set(Settings.__struct_fields__) - {"kafka", "consumer", "producer", "plugins"}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key in simple:
            layer[key] = value
            continue
        for section in ("kafka", "consumer", "producer"):
            if key.startswith(section + "_"):
                prop = key[len(section) + 1 :].replace("_", ".")
                layer.setdefault(section, {})[prop] = value
    return layer


def _field_of(message: str) -> str:
    match = re.search(r"at `\$\.([A-Za-z_]+)", message)
    if match:
        return match.group(1)
    match = re.search(r"unknown field `([^`]+)`", message)
    return match.group(1) if match else "?"
