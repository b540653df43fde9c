"""The ``kafkaworkers ui`` command: serve the console with uvicorn until Ctrl-C."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import click

from kafkaworkers.clikit import load_cli_settings, plugin_host, settings_options
from kafkaworkers.errors import KafkaWorkersError

__all__ = ["ui"]

log = logging.getLogger(__name__)

#: The web stack of the ``ui`` extra: (module, distribution).
_STACK = (("starlette", "starlette"), ("uvicorn", "uvicorn"), ("jinja2", "jinja2"))


@click.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8400, show_default=True, help="Port to listen on.")
@click.option(
    "--allow-actions",
    is_flag=True,
    help="Offer replay of dead letters and pause/resume of workers; without it the console only reads.",
)
@click.option("--group-id", help="The consumer group of the one plugin shown, if it runs with --group-id.")
@settings_options
@click.pass_context
def ui(
    ctx: click.Context, /, host: str, port: int, allow_actions: bool, config_file: str | None, **overrides: Any
) -> None:
    """Serve the web console: topology, throughput and lag, workers, breakers, retries, dead letters."""
    missing = [dist for module, dist in _STACK if not _importable(module)]
    if missing:
        raise KafkaWorkersError(
            f"the console needs {', '.join(missing)}: pip install 'kafkaworkers[ui]'"
            " (or, in a clone, pip install -e '.[ui]')"
        )
    import uvicorn

    from kafkaworkers.ui.app import create_app

    settings = load_cli_settings(config_file, **overrides)
    app = create_app(settings, plugin_host(ctx), allow_actions=allow_actions, bind=host)
    if not _loopback(host):
        log.warning("the console listens on %s: anyone who reaches that address sees it", host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"console on http://{shown}:{port}/ ({'actions on' if allow_actions else 'read-only'})", err=True)
    server.run()


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
