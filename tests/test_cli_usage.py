"""The command line's own usage: one error prefix, "did you mean", refused option combinations, help everywhere."""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from kafkaworkers.cli import cli
from kafkaworkers.plugins import PluginHost
from tests.conftest import KW

ROOT = Path(__file__).resolve().parents[1]


def kw(*args: str, input: str | None = None) -> Result:
    host = PluginHost()
    host.load_entry_points()
    host.register_commands(cli)
    return CliRunner().invoke(cli, list(args), obj=host, input=input, prog_name="kafkaworkers")


def one_line(result: Result, exit_code: int) -> str:
    assert result.exit_code == exit_code, result.output
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("kafkaworkers: error: ")
    return line


def test_run_refuses_a_plugin_named_twice():
    line = one_line(kw("run", "--plugin", "fraude", "--plugin", "reserva", "--plugin", "fraude", "-b", "memory://x"), 2)
    assert "--plugin fraude given more than once" in line


def test_run_says_all_and_plugin_do_not_combine():
    line = one_line(kw("run", "--all", "--plugin", "fraude", "-b", "memory://x"), 2)
    assert "--all runs every installed plugin; it does not combine with --plugin" in line


def test_run_without_plugins_says_how_to_name_them():
    assert "name plugins with --plugin NAME, or pass --all" in one_line(kw("run", "-b", "memory://x"), 2)


def test_unknown_plugin_suggests_the_closest():
    line = one_line(kw("run", "--plugin", "fraud", "-b", "memory://x"), 1)
    assert "unknown plugin 'fraud'; did you mean 'fraude'? installed: fraude," in line


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [(["topicz"], "did you mean 'topics'?"), (["topics", "lst"], "did you mean 'list'?"),
     (["dlq", "replai"], "did you mean 'replay'?")],
)  # fmt: skip
def test_unknown_command_suggests_the_closest(argv, suggestion):
    line = one_line(kw(*argv), 2)
    assert f"no such command {argv[-1]!r}; {suggestion}" in line


@pytest.mark.parametrize(
    ("argv", "command"),
    [(["run", "--bogus"], "run"), (["produce"], "produce"),
     (["topics", "create", "--partitions", "0"], "topics create"), (["demo", "--format", "xml"], "demo")],
)  # fmt: skip
def test_clicks_own_usage_errors_have_the_same_prefix(argv, command):
    line = one_line(kw(*argv), 2)
    assert line.endswith(f" (see `kafkaworkers {command} --help`)")


def test_the_installed_command_prints_usage_errors_the_same_way():
    done = subprocess.run([KW, "run", "--bogus"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == "kafkaworkers: error: No such option '--bogus'. (see `kafkaworkers run --help`)\n"


def test_every_option_of_every_command_has_help():
    host = PluginHost()
    host.load_entry_points()
    host.register_commands(cli)
    missing = []

    def walk(command: click.Command, path: str) -> None:
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden and not (param.help or "").strip():
                missing.append(f"{path} {param.opts[0]}")
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, f"{path} {name}")

    walk(cli, "kafkaworkers")
    assert len(cli.commands) > 10
    assert missing == []


# --- progress ---------------------------------------------------------------------------------


def on_a_terminal(*argv: str) -> str:
    """What the installed command writes when stdout and stderr are a terminal."""
    controller, terminal = pty.openpty()
    with open(ROOT / "examples/orders.jsonl", "rb") as source:
        proc = subprocess.Popen([KW, *argv], stdin=source, stdout=terminal, stderr=terminal)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the command exited and closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    assert proc.wait(timeout=60) == 0, b"".join(chunks)
    return b"".join(chunks).decode()


def test_produce_draws_a_bar_with_count_and_rate_on_a_terminal_only():
    argv = ["produce", "pedido-novo", "--dry-run", "-b", "memory://x"]
    drawn = on_a_terminal(*argv)
    assert "checking pedido-novo" in drawn and "/s" in drawn
    assert "5 valid for pedido-novo, 0 rejected" in drawn

    piped = subprocess.run(
        [KW, *argv, "--file", str(ROOT / "examples/orders.jsonl")], capture_output=True, text=True, timeout=60
    )
    assert piped.returncode == 0
    assert piped.stderr == ""
    assert piped.stdout == "5 valid for pedido-novo, 0 rejected (dry run: nothing sent)\n"


def test_demo_draws_a_bar_while_it_publishes_on_a_terminal_only():
    drawn = on_a_terminal("demo", "--orders", "50")
    assert "publishing the demo's orders" in drawn and "/s" in drawn
    assert "result: OK" in drawn

    piped = subprocess.run([KW, "demo", "--orders", "50"], capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert "publishing the demo's orders" not in piped.stderr + piped.stdout
