"""``kafkaworkers config``: the effective settings and where each value came from."""

from __future__ import annotations

import json
from typing import Any

import click

from kafkaworkers.clikit import OneLineErrors, resolve_cli_settings, settings_options

__all__ = ["config"]


@click.group(cls=OneLineErrors)
def config() -> None:
    """Inspect the settings kafkaworkers resolves from defaults, file, environment and flags."""


@config.command("show")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True, help="Output format."
)
@settings_options
def show(fmt: str, config_file: str | None, **overrides: Any) -> None:
    """Print every setting, its value and its source (default, file, variable or flag), secrets redacted.

    The settings are checked as a command that runs would check them: a bad value is an error here too.
    """
    rows = [
        {"name": name, "value": value, "source": source.name or source.layer, "layer": source.layer}
        for name, value, source in resolve_cli_settings(config_file, **overrides).effective()
    ]
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    texts = [(row["name"], _text(row["value"]), row["source"]) for row in rows]
    name_width = max(len(name) for name, _, _ in texts)
    value_width = max(len(value) for _, value, _ in texts)
    for name, value, source in texts:
        click.echo(f"{name:{name_width}}  {value:{value_width}}  {source}".rstrip())


def _text(value: Any) -> str:
    """A value as TOML would spell it, so a line can be copied into kafkaworkers.toml."""
    if value is None:
        return "(unset)"
    return json.dumps(value, default=str)
