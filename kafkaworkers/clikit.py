"""What every command module shares: one-line errors, the broker options, settings and plugins.

``kafkaworkers.cli`` and command groups such as ``kafkaworkers.dlq`` both build on it, so
neither imports the other's internals.
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn, cast

import click
import confluent_kafka
import msgspec

from kafkaworkers.config import ResolvedSettings, Settings, admin_config, is_secret, resolve_settings
from kafkaworkers.consumer import consumer_config
from kafkaworkers.errors import ConfigError, KafkaWorkersError
from kafkaworkers.logs import configure
from kafkaworkers.plugins import PluginHost
from kafkaworkers.producer import producer_config

__all__ = [
    "EXIT_ERROR",
    "OneLineErrors",
    "admin_config",
    "check_client_properties",
    "load_cli_settings",
    "plugin_host",
    "resolve_cli_settings",
    "settings_options",
]

# admin_config lives in kafkaworkers.config; command modules that import it from here still can.

log = logging.getLogger(__name__)

EXIT_ERROR = 1


class OneLineErrors(click.Group):
    """A click group that turns kafkaworkers errors into one line on stderr and exit status 1.

    As the root group it prints click's own usage errors the same way (``kafkaworkers: error:``,
    exit status 2); as any group it suggests the closest command to a misspelled one.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KafkaWorkersError as exc:
            click.echo(f"kafkaworkers: error: {exc}", err=True)
            ctx.exit(EXIT_ERROR)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        # Click 8.1 (the oldest supported) suggests only options.
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=1, cutoff=0.6)
            if close:
                ctx.fail(f"no such command {name!r}; did you mean {close[0]!r}?")
        return super().resolve_command(ctx, args)

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> NoReturn:
        # Never standalone, whatever the caller asks: errors are reported here, in one format.
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            click.echo(f"kafkaworkers: error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"kafkaworkers: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("kafkaworkers: error: aborted", err=True)
            sys.exit(EXIT_ERROR)
        # Without standalone mode click returns an exit code from ctx.exit(), else the command's value.
        sys.exit(result if isinstance(result, int) else 0)


_settings_options = [
    click.option("--bootstrap-servers", "-b", help="Kafka bootstrap servers [env KAFKAWORKERS_BOOTSTRAP_SERVERS]."),
    click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        help="A kafkaworkers.toml file [default ./kafkaworkers.toml].",
    ),
    click.option(
        "--log-level",
        type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
        help="Least severe level logged [env KAFKAWORKERS_LOG_LEVEL; default INFO].",
    ),
    click.option(
        "--log-format",
        type=click.Choice(["text", "json"], case_sensitive=False),
        help="text for people, json for one object a line [env KAFKAWORKERS_LOG_FORMAT; default text].",
    ),
]


def settings_options(fn: Any) -> Any:
    """The options every broker-facing command shares."""
    for option in reversed(_settings_options):
        fn = option(fn)
    return fn


def load_cli_settings(config_file: str | None, **overrides: Any) -> Settings:
    """Resolve and check settings with the command's flags on top, and configure logging from them."""
    return resolve_cli_settings(config_file, **overrides).settings


def resolve_cli_settings(config_file: str | None, **overrides: Any) -> ResolvedSettings:
    """:func:`load_cli_settings` with the source of every value.

    Logging is configured before anything is logged, so warnings about the environment
    arrive in the chosen format; at DEBUG every value a layer set is logged with its source.
    """
    resolved = resolve_settings(config_file, overrides)
    settings = resolved.settings
    librdkafka_debug = any("debug" in getattr(settings, table) for table in ("kafka", "consumer", "producer"))
    configure(settings.log_level, settings.log_format, librdkafka_debug=librdkafka_debug)
    resolved.warn()
    for name, value, source in resolved.effective():
        if source.layer != "default":
            log.debug("setting %s = %r from %s", name, value, source)
    if not librdkafka_debug:
        log.debug("librdkafka logs its own debug lines when asked: e.g. KAFKAWORKERS_KAFKA_DEBUG=broker,cgrp,topic")
    check_client_properties(resolved)
    return resolved


def plugin_host(ctx: click.Context) -> PluginHost:
    """The plugin host ``main()`` loaded (loaded here when a group is invoked on its own)."""
    root = ctx.find_root()
    if root.obj is None:
        root.obj = PluginHost()
        root.obj.load_entry_points()
    # click types a context's obj as Any; the CLI's main() passes a PluginHost, else it is made here.
    return cast(PluginHost, root.obj)


_CHECK_GROUP = "kafkaworkers-config-check"
_silent = logging.Logger("kafkaworkers.config-check")
_silent.addHandler(logging.NullHandler())


def check_client_properties(resolved: ResolvedSettings) -> None:
    """Raise :class:`ConfigError` if librdkafka refuses a ``[kafka]``, ``[consumer]`` or ``[producer]`` property.

    librdkafka checks its whole configuration when a client is made, before it connects
    anywhere; a throwaway consumer and producer without bootstrap servers cost about a
    millisecond each. The error names the property, its table and its source: the one
    librdkafka's message mentions, else the first whose addition makes librdkafka refuse
    (which finds a property refused under an alias, or in conflict with a framework default).
    """
    settings = resolved.settings
    for client, tables in (("consumer", ("kafka", "consumer")), ("producer", ("kafka", "producer"))):
        reason = _refusal(client, settings)
        if reason is None:
            continue
        culprit = _mentioned(reason, settings, tables) or _first_refused(client, settings, tables)
        if culprit is None:
            raise ConfigError(f"librdkafka refuses the {client} configuration: {_scrub(reason, settings)}")
        table, prop = culprit
        value = getattr(settings, table)[prop]
        raise ConfigError(
            f"bad librdkafka property {prop}={'***' if is_secret(prop) else repr(value)} in [{table}]"
            f" from {resolved.source(table, prop)}: {_scrub(reason, settings)}"
        )


def _mentioned(reason: str, settings: Settings, tables: tuple[str, ...]) -> tuple[str, str] | None:
    """The user's property whose name, or else whose (non-secret) value, librdkafka's message quotes."""
    props = [(table, prop) for table in reversed(tables) for prop in getattr(settings, table)]
    for table, prop in props:
        if re.search(rf"[\"`]{re.escape(prop)}[\"`]", reason):
            return table, prop
    for table, prop in props:
        value = str(getattr(settings, table)[prop])
        if not is_secret(prop) and len(value) >= 3 and re.search(rf"\b{re.escape(value)}\b", reason):
            return table, prop
    return None


def _first_refused(client: str, settings: Settings, tables: tuple[str, ...]) -> tuple[str, str] | None:
    """The first user property, added one at a time in layering order, that makes librdkafka refuse."""
    added: dict[str, dict[str, Any]] = {table: {} for table in tables}
    for table in tables:
        for prop, value in getattr(settings, table).items():
            added[table][prop] = value
            if _refusal(client, msgspec.structs.replace(settings, **added)) is not None:
                return table, prop
    return None


def _refusal(client: str, settings: Settings) -> str | None:
    """librdkafka's reason for refusing this client's configuration, or None if it accepts it."""
    config = consumer_config(settings, _CHECK_GROUP) if client == "consumer" else producer_config(settings)
    config = {**config, "logger": _silent}
    del config["bootstrap.servers"]
    try:
        made = confluent_kafka.Consumer(config) if client == "consumer" else confluent_kafka.Producer(config)
    except confluent_kafka.KafkaException as exc:
        err = exc.args[0] if exc.args else None
        return (err.str() if isinstance(err, confluent_kafka.KafkaError) else str(exc)).strip()
    if isinstance(made, confluent_kafka.Consumer):
        made.close()
    return None


def _scrub(reason: str, settings: Settings) -> str:
    """librdkafka's message with every secret value in it replaced."""
    for table in ("kafka", "consumer", "producer"):
        for prop, value in getattr(settings, table).items():
            if is_secret(prop) and str(value):
                reason = reason.replace(str(value), "***")
    return reason
