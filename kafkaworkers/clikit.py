"""What every command module shares: one-line errors, the broker options, settings and plugins.

``kafkaworkers.cli`` and command groups such as ``kafkaworkers.dlq`` both build on it, so
neither imports the other's internals.
"""

from __future__ import annotations

from typing import Any

import click

from kafkaworkers.config import Settings, load_settings
from kafkaworkers.errors import KafkaWorkersError
from kafkaworkers.logs import configure
from kafkaworkers.plugins import PluginHost

__all__ = ["EXIT_ERROR", "OneLineErrors", "admin_config", "load_cli_settings", "plugin_host", "settings_options"]

EXIT_ERROR = 1


class OneLineErrors(click.Group):
    """A click group that turns kafkaworkers errors into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KafkaWorkersError as exc:
            click.echo(f"kafkaworkers: error: {exc}", err=True)
            ctx.exit(EXIT_ERROR)


_settings_options = [
    click.option("--bootstrap-servers", "-b", help="Kafka bootstrap servers [env KAFKAWORKERS_BOOTSTRAP_SERVERS]."),
    click.option("--config", "config_file", type=click.Path(dir_okay=False), help="A kafkaworkers.toml file."),
    click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)),
    click.option("--log-format", type=click.Choice(["text", "json"])),
]


def settings_options(fn: Any) -> Any:
    """The options every broker-facing command shares."""
    for option in reversed(_settings_options):
        fn = option(fn)
    return fn


def load_cli_settings(config_file: str | None, **overrides: Any) -> Settings:
    """Resolve settings with the command's flags on top, and configure logging from them."""
    if overrides.get("log_level"):
        overrides["log_level"] = overrides["log_level"].upper()
    settings = load_settings(config_file, overrides)
    configure(settings.log_level, settings.log_format)
    return settings


def plugin_host(ctx: click.Context) -> PluginHost:
    """The plugin host ``main()`` loaded (loaded here when a group is invoked on its own)."""
    root = ctx.find_root()
    if root.obj is None:
        root.obj = PluginHost()
        root.obj.load_entry_points()
    return root.obj


def admin_config(settings: Settings) -> dict[str, Any]:
    """The client configuration for admin calls: the shared ``[kafka]`` table and the servers."""
    return {**settings.kafka, "bootstrap.servers": settings.bootstrap_servers}
