"""Settings: defaults < ``kafkaworkers.toml`` (or ``[tool.kafkaworkers]``) < ``KAFKAWORKERS_*`` < flags.

Any librdkafka property passes through (``[kafka]`` for both clients, ``[consumer]`` and
``[producer]`` for one; ``KAFKAWORKERS_KAFKA_SASL_PASSWORD`` sets ``sasl.password``).
A plugin's own table ``[plugins.<name>]`` is set from the environment with double
underscores between the levels, since plugin and setting names contain single ones:
``KAFKAWORKERS_PLUGINS__PAGAMENTO__GATEWAY_TIMEOUT=5`` sets ``[plugins.pagamento]
gateway_timeout = 5``. Names are lower-cased; a value is read as a TOML value where it is
one (``5``, ``2.5``, ``true``, ``"quoted"``, ``[1, 2]``) and as a string otherwise.

Every value is checked once, when the settings are loaded, and a bad one raises
:class:`ConfigError` naming the setting, the value, where it came from and what is allowed.
A ``KAFKAWORKERS_*`` variable that names no setting is reported with the closest known
name. Secret values never leave this module unredacted except into the client configuration.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, time
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
import msgspec.inspect as mi

from kafkaworkers.errors import ConfigError

__all__ = [
    "DEFAULT_PARTITIONS",
    "ResolvedSettings",
    "Settings",
    "Source",
    "admin_config",
    "load_settings",
    "redact",
    "redact_url",
    "resolve_settings",
]

log = logging.getLogger(__name__)

ENV_PREFIX = "KAFKAWORKERS_"
_SECRET = re.compile(r"password|secret|token|private|\.pem$|jaas|oauthbearer\.config|credentials", re.I)
REDACTED = "***"
#: Partitions of a topic kafkaworkers creates when nothing tells it how many:
#: ``kafkaworkers topics create``'s default, and a plugin's retry and dead-letter topics
#: when none of its source topics exists yet to size them by.
DEFAULT_PARTITIONS = 3

#: Group ids name the retry and dead-letter topics (``<group>-retry-1``, ``<group>-dlq``),
#: so they keep to the characters and length Kafka allows in a topic name.
_GROUP_CHARS = "letters, digits, '.', '_' or '-' (it names the retry and dead-letter topics)"
_GROUP_ID = msgspec.Meta(
    min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._-]+$", extra={"allowed": f"1 to 200 {_GROUP_CHARS}"}
)
_GROUP_PREFIX = msgspec.Meta(
    max_length=200, pattern=r"^[A-Za-z0-9._-]*$", extra={"allowed": f"at most 200 {_GROUP_CHARS}"}
)
_DATABASE_URL = r"^postgres(ql)?://"
_DATABASE_URL_RULE = msgspec.Meta(pattern=_DATABASE_URL, extra={"allowed": "a postgresql:// URL"})
_TOPIC_NAME = msgspec.Meta(
    min_length=1,
    max_length=249,
    pattern=r"^[A-Za-z0-9._-]+$",
    extra={"allowed": "a topic name: 1 to 249 letters, digits, '.', '_' or '-'"},
)
_HOST_RULE = "an IP address or host name of this machine (0.0.0.0 or :: for every interface)"


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything a worker or command needs to know, resolved from every layer.

    The constraints are checked by :func:`load_settings`; building a ``Settings`` directly
    (the test harness does, with ``poll_timeout=0``) checks nothing.
    """

    bootstrap_servers: Annotated[
        str, msgspec.Meta(min_length=1, extra={"allowed": "host:port[,host:port...], or memory://NAME"})
    ] = "localhost:9092"
    group_id: Annotated[str, _GROUP_ID] | None = None
    group_prefix: Annotated[str, _GROUP_PREFIX] = ""
    data_dir: Annotated[str, msgspec.Meta(min_length=1, extra={"allowed": "a directory path"})] = "data"
    # Plugin state in PostgreSQL, shared by a service's instances on every host; unset, each
    # plugin keeps SQLite files under data_dir. A plugin may have its own: [plugins.X] database_url.
    database_url: Annotated[str, _DATABASE_URL_RULE] | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    metrics_host: Annotated[str, msgspec.Meta(min_length=1, extra={"allowed": _HOST_RULE})] = "127.0.0.1"
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9400
    # librdkafka's consume() takes at most a million messages.
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 500
    # How long an idle loop waits for messages, hence how late it notices a stop request.
    poll_timeout: Annotated[float, msgspec.Meta(gt=0, le=10)] = 0.5
    liveness_timeout: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    # How long a stopping worker may spend flushing, committing and leaving its groups: well
    # inside Kubernetes' default 30 s before it sends SIGKILL, even with the broker down.
    shutdown_grace: Annotated[float, msgspec.Meta(gt=0, le=600)] = 20.0
    # Messages of one plugin in flight at once; unset, each plugin's own default (most: 1).
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=10_000)] | None = None
    # exactly_once: what a batch produces and its consumed offsets commit in one Kafka transaction.
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    # In exactly_once: how long a transaction may gather batches before it commits. It commits
    # sooner whenever the consumer has caught up (a batch came back short), so the interval
    # costs latency only under a load that keeps batches full; 0 commits every batch.
    transaction_interval_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 100
    # Where `kafkaworkers control` writes commands and the workers answer; every `run` reads the first.
    control_topic: Annotated[str, _TOPIC_NAME] = "kafkaworkers-control"
    control_replies_topic: Annotated[str, _TOPIC_NAME] = "kafkaworkers-control-replies"
    kafka: dict[str, Any] = {}
    consumer: dict[str, Any] = {}
    producer: dict[str, Any] = {}
    plugins: dict[str, dict[str, Any]] = {}

    def __repr__(self) -> str:
        fields = {f: getattr(self, f) for f in self.__struct_fields__}
        for section in _TABLES:
            fields[section] = redact(fields[section])
        fields["database_url"] = _masked("database_url", self.database_url)
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"

    __str__ = __repr__

    def group_for(self, plugin: str) -> str:
        """The consumer group of a plugin: ``group_id`` if set, else ``group_prefix`` + its name."""
        return self.group_id or self.group_prefix + plugin

    def plugin_config(self, name: str) -> dict[str, Any]:
        """A plugin's own ``[plugins.<name>]`` table, without the framework's per-plugin settings."""
        return {k: v for k, v in self.plugins.get(name, {}).items() if k not in PER_PLUGIN}

    def database_url_for(self, name: str) -> str | None:
        """Where a plugin keeps its state: ``[plugins.<name>] database_url``, else ``database_url``."""
        value = self.plugins.get(name, {}).get("database_url", self.database_url)
        if value is not None and not (isinstance(value, str) and re.match(_DATABASE_URL, value)):
            raise ConfigError(
                f"bad setting [plugins.{name}] database_url={_shown(('database_url',), value)}:"
                " must be a postgresql:// URL"
            )
        return value

    def guarantee_for(self, name: str) -> str:
        """A plugin's processing guarantee: ``[plugins.<name>] processing_guarantee``, else the global one."""
        value = self.plugins.get(name, {}).get("processing_guarantee", self.processing_guarantee)
        if value not in ("at_least_once", "exactly_once"):
            raise ConfigError(
                f"bad setting [plugins.{name}] processing_guarantee={value!r}: must be at_least_once or exactly_once"
            )
        return str(value)

    def concurrency_for(self, name: str, declared: int = 1) -> int:
        """A plugin's concurrency: ``[plugins.<name>] concurrency``, else ``concurrency``, else
        what the plugin declares."""
        value = self.plugins.get(name, {}).get("concurrency", self.concurrency)
        if value is None:
            return declared
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_CONCURRENCY:
            raise ConfigError(
                f"bad setting [plugins.{name}] concurrency={value!r}: must be between 1 and {_MAX_CONCURRENCY}"
            )
        return value


#: Framework settings a ``[plugins.<name>]`` table may set for that plugin alone; the plugin
#: does not see them in its own configuration.
PER_PLUGIN = frozenset({"concurrency", "processing_guarantee", "database_url"})
_MAX_CONCURRENCY = 10_000

_SECTIONS = ("kafka", "consumer", "producer")
_TABLES = (*_SECTIONS, "plugins")
_SIMPLE = tuple(f for f in Settings.__struct_fields__ if f not in _TABLES)
_TYPES = typing.get_type_hints(Settings, include_extras=True)
_DEFAULTS = Settings()

#: ``KAFKAWORKERS_*`` variables that are read elsewhere, not settings: known, so never warned about.
_OTHER_VARIABLES = frozenset(
    {
        "KAFKAWORKERS_DISABLE_PLUGINS",  # kafkaworkers.plugins
        "KAFKAWORKERS_SUPERVISOR_FD",  # kafkaworkers.supervisor: set for the processes of --processes
        "KAFKAWORKERS_PROCESS_INDEX",
        "KAFKAWORKERS_CHAOS_SCALE",  # the test suite: workers it starts inherit them
        "KAFKAWORKERS_TEST_SEED",
    }
)
_warned: set[str] = set()


class Source(NamedTuple):
    """Where a value came from: its layer and, in it, the file, variable or flag."""

    layer: Literal["default", "file", "environment", "command line"]
    name: str = ""

    def __str__(self) -> str:
        if self.layer == "file":
            return self.name
        return f"{self.layer} ({self.name})" if self.name else self.layer


DEFAULT = Source("default")

#: A setting's place: ``("metrics_port",)``, ``("kafka", "sasl.password")``, ``("plugins", "x", "key")``.
Key = tuple[str, ...]


@dataclass(frozen=True)
class ResolvedSettings:
    """Settings with the source of every value a layer set, and the warnings about the environment."""

    settings: Settings
    sources: dict[Key, Source]
    warnings: list[str]

    def source(self, *key: str) -> Source:
        """Where the value at ``key`` came from (:data:`DEFAULT` when no layer set it)."""
        return self.sources.get(key, DEFAULT)

    def effective(self) -> list[tuple[str, Any, Source]]:
        """Every setting as ``(dotted name, value, source)``, secrets redacted; tables by their entries."""
        settings = self.settings
        rows = [(name, _masked(name, getattr(settings, name)), self.source(name)) for name in _SIMPLE]
        for section in _SECTIONS:
            table = redact(getattr(settings, section))
            rows += [(f"{section}.{prop}", table[prop], self.source(section, prop)) for prop in sorted(table)]
        for plugin, table in sorted(settings.plugins.items()):
            shown = redact(table)
            rows += [(f"plugins.{plugin}.{k}", shown[k], self.source("plugins", plugin, k)) for k in sorted(shown)]
        return rows

    def warn(self) -> None:
        """Log each warning about the environment, once per process."""
        for warning in self.warnings:
            if warning not in _warned:
                _warned.add(warning)
                log.warning("%s", warning)


def redact(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a configuration with every secret value replaced by ``***`` (nested tables too)."""
    return {
        k: REDACTED if _SECRET.search(k) else redact(v) if isinstance(v, Mapping) else _masked(k, v)
        for k, v in config.items()
    }


def redact_url(url: str) -> str:
    """A URL with its password replaced by ``***`` (``postgresql://app:***@db:5432/orders``)."""
    url = re.sub(r"^([a-z][a-z0-9+.-]*://[^/@:]*):[^/@]*@", rf"\1:{REDACTED}@", url, flags=re.I)
    return re.sub(r"([?&]password=)[^&]*", rf"\1{REDACTED}", url, flags=re.I)


def _masked(name: str, value: Any) -> Any:
    """A URL setting's value with its password redacted; any other value as it is."""
    return redact_url(value) if name.endswith("_url") and isinstance(value, str) else value


def is_secret(name: str) -> bool:
    """Whether a setting or property with this name holds a secret."""
    return bool(_SECRET.search(name))


def admin_config(settings: Settings) -> dict[str, Any]:
    """The client configuration for admin calls: the shared ``[kafka]`` table and the servers."""
    return {**settings.kafka, "bootstrap.servers": settings.bootstrap_servers}


def load_settings(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Resolve and check settings from every layer; a bad value raises :class:`ConfigError` naming its source."""
    resolved = resolve_settings(config_file, overrides, environ, cwd)
    resolved.warn()
    return resolved.settings


def resolve_settings(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ResolvedSettings:
    """:func:`load_settings` that also says where each value came from, and warns about nothing yet."""
    environ = os.environ if environ is None else environ
    leaves: dict[Key, tuple[Any, Source]] = {}
    file_layer = _file_layer(config_file, cwd or Path.cwd())
    if file_layer:
        leaves.update(_leaves(file_layer[1], Source("file", file_layer[0])))
    env_leaves, warnings = _env_layer(environ)
    leaves.update(env_leaves)
    for name, value in (overrides or {}).items():
        if value is not None:
            leaves[(name,)] = (value, Source("command line", "--" + name.replace("_", "-")))
    settings = _build(leaves)
    return ResolvedSettings(settings, {key: source for key, (_, source) in leaves.items()}, warnings)


def _build(leaves: Mapping[Key, tuple[Any, Source]]) -> Settings:
    values: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {section: {} for section in _TABLES}
    for key, (raw, source) in leaves.items():
        name = key[0]
        if name not in Settings.__struct_fields__:
            close = difflib.get_close_matches(name, Settings.__struct_fields__, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(Settings.__struct_fields__)}"
            raise ConfigError(f"unknown setting {name!r} in {source}{hint}")
        if name in _SECTIONS:
            if len(key) == 1:
                raise ConfigError(f"bad setting {name}={_shown(key, raw)} from {source}: must be a table of properties")
            tables[name][key[1]] = raw
        elif name == "plugins":
            if len(key) < 3:
                where = "[plugins.NAME]" if len(key) == 1 else f"[plugins.{key[1]}]"
                raise ConfigError(
                    f"bad setting {'.'.join(key)}={_shown(key, raw)} from {source}: must be a table {where}"
                )
            tables["plugins"].setdefault(key[1], {})[key[2]] = raw
        else:
            values[name] = _convert(name, raw, source)
    _check_timeouts(values, leaves)
    values.update(tables)
    return Settings(**values)


def _convert(name: str, raw: Any, source: Source) -> Any:
    """One simple setting converted to its type and checked against its constraints."""
    given = raw
    if name in ("log_level", "log_format", "processing_guarantee") and isinstance(raw, str):
        raw = raw.upper() if name == "log_level" else raw.lower()
    try:
        value = msgspec.convert(raw, _TYPES[name], strict=False)
    except msgspec.ValidationError as exc:
        # "Expected `int`, got `str`" is the wrong kind of value; "Expected `int` <= 65535" a value out of range.
        wrong_type = ", got `" in str(exc)
        raise ConfigError(
            f"bad setting {name}={_shown((name,), given)} from {source}: {_rule(name, wrong_type)}"
        ) from None
    if name == "metrics_host" and not _is_host(value):
        raise ConfigError(f"bad setting {name}={_shown((name,), given)} from {source}: must be {_HOST_RULE}")
    return value


def _check_timeouts(values: Mapping[str, Any], leaves: Mapping[Key, tuple[Any, Source]]) -> None:
    poll = values.get("poll_timeout", _DEFAULTS.poll_timeout)
    liveness = values.get("liveness_timeout", _DEFAULTS.liveness_timeout)
    if liveness > poll:
        return
    # Blame the one set in the higher layer (the one just changed); a tie: the liveness timeout.
    name = max(("liveness_timeout", "poll_timeout"), key=lambda n: _LAYERS.index(_source_of(n, leaves).layer))
    source = _source_of(name, leaves)
    rule = (
        f"greater than poll_timeout ({poll})"
        if name == "liveness_timeout"
        else f"less than liveness_timeout ({liveness})"
    )
    raise ConfigError(
        f"bad setting {name}={values.get(name, getattr(_DEFAULTS, name))} from {source}: must be {rule},"
        " or /livez fails while the loop waits for messages"
    )


_LAYERS = ("default", "file", "environment", "command line")


def _source_of(name: str, leaves: Mapping[Key, tuple[Any, Source]]) -> Source:
    return leaves[(name,)][1] if (name,) in leaves else DEFAULT


def _rule(name: str, wrong_type: bool) -> str:
    """What a simple setting allows, in words, from its type and ``msgspec.Meta`` constraints."""
    if typing.get_origin(_TYPES[name]) is Literal:
        return f"must be one of {', '.join(typing.get_args(_TYPES[name]))} (any case)"
    info = mi.type_info(_TYPES[name])
    if isinstance(info, mi.UnionType):
        info = next(t for t in info.types if not isinstance(t, mi.NoneType))
    extra: dict[str, Any] = {}
    if isinstance(info, mi.Metadata):
        extra = info.extra or {}
        info = info.type
    if "allowed" in extra:
        return f"must be {extra['allowed']}"
    if isinstance(info, mi.IntType | mi.FloatType):
        bounds = _bounds(info)
        noun = "a whole number" if isinstance(info, mi.IntType) else "a number"
        return f"must be {noun} {bounds}" if wrong_type else f"must be {bounds}"
    return "must be text"


def _bounds(info: mi.IntType | mi.FloatType) -> str:
    low = f"at least {info.ge}" if info.ge is not None else f"greater than {info.gt}" if info.gt is not None else ""
    if info.le is None:
        return low
    if info.ge is not None:
        return f"between {info.ge} and {info.le}"
    return f"{low} and at most {info.le}" if low else f"at most {info.le}"


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


def _is_host(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return bool(_HOSTNAME.match(value))
    return True


def _shown(key: Key, value: Any) -> str:
    """A value as an error line shows it: bare when plain, quoted when not, redacted when secret."""
    if is_secret(key[-1]):
        return REDACTED
    value = _masked(key[-1], value)
    if isinstance(value, str) and value and not re.search(r"[\s'\"=]", value):
        return value
    return repr(value)


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


def _leaves(table: Mapping[str, Any], source: Source) -> dict[Key, tuple[Any, Source]]:
    """A file's settings as one entry per value, so a later layer overrides single properties."""
    leaves: dict[Key, tuple[Any, Source]] = {}
    for name, value in table.items():
        if name in _SECTIONS and isinstance(value, dict):
            leaves.update({(name, prop): (v, source) for prop, v in value.items()})
        elif name == "plugins" and isinstance(value, dict):
            for plugin, settings in value.items():
                if isinstance(settings, dict):
                    leaves.update({("plugins", plugin, k): (v, source) for k, v in settings.items()})
                else:
                    leaves[("plugins", plugin)] = (settings, source)
        else:
            leaves[(name,)] = (value, source)
    return leaves


def _env_layer(environ: Mapping[str, str]) -> tuple[dict[Key, tuple[Any, Source]], list[str]]:
    """The settings ``KAFKAWORKERS_*`` variables set, and a warning for each that names none."""
    leaves: dict[Key, tuple[Any, Source]] = {}
    warnings: list[str] = []
    for var, value in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var in _OTHER_VARIABLES:
            continue
        rest = var[len(ENV_PREFIX) :]
        key = _env_key(rest)
        if key is None:
            warnings.append(_unknown_variable(var, rest))
        else:
            leaves[key] = (_toml_value(value) if key[0] == "plugins" else value, Source("environment", var))
    return leaves, warnings


def _env_key(rest: str) -> Key | None:
    """The setting a variable name (without the prefix) sets, or None if it names none."""
    lower = rest.lower()
    if lower in _SIMPLE:
        return (lower,)
    section, _, prop = lower.partition("_")
    if section in _SECTIONS and prop:
        return (section, prop.replace("_", "."))
    parts = rest.split("__")
    if len(parts) == 3 and parts[0] == "PLUGINS" and parts[1] and parts[2]:
        return ("plugins", parts[1].lower(), parts[2].lower())
    return None


def _unknown_variable(var: str, rest: str) -> str:
    said = f"{var} is not a kafkaworkers setting and is ignored"
    if rest.startswith("PLUGINS"):
        return f"{said}; a plugin setting is KAFKAWORKERS_PLUGINS__<PLUGIN>__<SETTING>, with double underscores"
    known = [f.upper() for f in _SIMPLE] + [v[len(ENV_PREFIX) :] for v in _OTHER_VARIABLES]
    # A misspelled table name ("CONSUMERS_SESSION_TIMEOUT_MS") is closest to the same property in a right one.
    tail = rest.partition("_")[2]
    if tail:
        known += [f"{section.upper()}_{tail}" for section in _SECTIONS]
    if "__" in rest:
        known.append("PLUGINS__" + rest.partition("__")[2])
    close = difflib.get_close_matches(rest, known, n=1, cutoff=0.75)
    if close:
        return f"{said}; did you mean {ENV_PREFIX}{close[0]}?"
    return f"{said}; `kafkaworkers config show` lists the settings"


def _toml_value(text: str) -> Any:
    """A variable's value as TOML reads it (number, boolean, quoted string, array), else the string itself."""
    try:
        document = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    value = document.get("v")
    # A date would surprise a plugin that expects the string it was given.
    if len(document) != 1 or isinstance(value, date | time):
        return text
    return value
