"""The ``kafkaworkers ui`` command: where it listens, and what it says without its extra."""

from __future__ import annotations

import ipaddress
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kafkaworkers.cli import cli
from tests.conftest import KW, free_port, http_get, wait_for


def test_without_the_web_stack_the_command_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    result = CliRunner().invoke(cli, ["ui", "-b", "memory://ui-missing"])
    assert result.exit_code == 1
    assert "the console needs uvicorn: pip install 'kafkaworkers[ui]'" in result.output


def test_it_listens_on_loopback_by_default_and_says_where() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [KW, "ui", "-b", "memory://ui-command", "--port", str(port)], stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/"), 30, "the console to answer on 127.0.0.1")
        assert _listening(port) == ["127.0.0.1"]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert f"console on http://127.0.0.1:{port}/ (read-only)" in err


def _answers(url: str) -> bool:
    try:
        return http_get(url)[0] == 200
    except OSError:
        return False


def _listening(port: int) -> list[str]:
    """The IPv4 addresses a socket listens on at ``port``, from the kernel's table."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.append(str(ipaddress.IPv4Address(bytes.fromhex(address)[::-1])))
    return found
