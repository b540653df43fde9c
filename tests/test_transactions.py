"""The transactional producer's calls: one that blocks past its own timeout stops the worker."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from kafkaworkers.errors import ProducerFatal
from kafkaworkers.transactions import _HANG_MARGIN, Transactions


class _StuckCoordinator:
    """A transactional producer whose offsets call never returns, as librdkafka's does while the
    group coordinator's broker is down (confluentinc/librdkafka#5511)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[str] = []

    def init_transactions(self, timeout: float) -> None:
        self.calls.append("init")

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def send_offsets_to_transaction(self, offsets: Any, metadata: Any, timeout: float) -> None:
        self.calls.append("send_offsets")
        self.release.wait(60)

    def commit_transaction(self, timeout: float) -> None:
        self.calls.append("commit")

    def abort_transaction(self, timeout: float) -> None:
        self.calls.append("abort")


class _Consumer:
    def consumer_group_metadata(self) -> object:
        return object()


def test_a_call_blocked_past_its_timeout_stops_the_worker_and_nothing_commits() -> None:
    producer = _StuckCoordinator()
    txn = Transactions(producer, call_timeout=0.1)
    txn.start()
    txn.begin()
    txn.consumed(_Consumer(), {("in", 0): 5}, {("in", 0): 9})  # type: ignore[arg-type]
    started = time.monotonic()
    try:
        with pytest.raises(ProducerFatal, match="send_offsets_to_transaction did not return"):
            txn.commit()
        waited = time.monotonic() - started
    finally:
        producer.release.set()
    assert waited < 0.1 + _HANG_MARGIN + 2, f"gave up only after {waited:.1f} s"
    assert "commit" not in producer.calls, "a transaction was committed without its offsets"
    # Nothing may use the producer again: the worker's close neither commits nor aborts it.
    assert not txn.open
    txn.abort()
    assert "abort" not in producer.calls
    with pytest.raises(ProducerFatal, match="did not return"):
        txn.begin()
    assert producer.calls.count("begin") == 1
