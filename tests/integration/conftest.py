"""What the real-broker tests share: workers of one plugin in this process, stepped by the test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kafkaworkers import Plugin
from kafkaworkers.config import Settings
from kafkaworkers.plugins import PluginHost
from kafkaworkers.worker import Worker
from tests.conftest import wait_for


class Ping(msgspec.Struct, frozen=True):
    n: int
    pad: str = ""


class Loop:
    """Workers of one plugin in this process, stepped together so that their groups can rebalance."""

    def __init__(self, bootstrap: str, tmp_path: Path, plugin: Plugin[Any], **settings: Any) -> None:
        self.plugin = plugin
        self.host = PluginHost()
        self.host.register(plugin, plugin.name)
        self.settings = Settings(
            bootstrap_servers=bootstrap,
            data_dir=str(tmp_path),
            poll_timeout=0.05,
            consumer={"session.timeout.ms": 6000, "heartbeat.interval.ms": 500, **settings.pop("consumer", {})},
            **settings,
        )
        self.workers: list[Worker] = []

    def add(self) -> Worker:
        worker = Worker([self.plugin], self.settings, self.host)
        worker.start(broker_wait=10)
        self.workers.append(worker)
        return worker

    def step(self) -> None:
        for worker in self.workers:
            worker.run_once(timeout=0.05)

    def until(self, condition: Any, timeout: float, what: str) -> None:
        def stepped() -> object:
            self.step()
            return condition()

        wait_for(stepped, timeout, what, interval=0)

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


@pytest.fixture
def loops(bootstrap: str, tmp_path: Path) -> Iterator[list[Loop]]:
    made: list[Loop] = []
    yield made
    for loop in made:
        loop.close()
