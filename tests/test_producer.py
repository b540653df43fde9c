"""The producer factory and the one shared producer per broker and configuration."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest

from kafkaworkers.config import Settings
from kafkaworkers.producer import produce, shared_producer
from kafkaworkers.transports.memory import MemoryBroker, MemoryTransport


@pytest.fixture
def settings() -> Settings:
    return Settings(bootstrap_servers=f"memory://shared-{uuid.uuid4().hex}")


@pytest.fixture
def librdkafka_log() -> Iterator[logging.Logger]:
    """The logger every client configuration carries; its level is put back after the test."""
    logger = logging.getLogger("kafkaworkers.librdkafka")
    level = logger.level
    yield logger
    logger.setLevel(level)


def test_workers_on_two_brokers_with_the_same_bootstrap_string_get_their_own_producers(settings: Settings) -> None:
    first, second = MemoryBroker(), MemoryBroker()
    for broker in (first, second):
        broker.create_topic("t", 1)

    one = shared_producer(settings, MemoryTransport(first))
    other = shared_producer(settings, MemoryTransport(second))
    produce(other, "t", b"for the second broker")
    other.flush()

    assert other is not one
    assert [r.value() for r in second.records("t")] == [b"for the second broker"]
    assert first.records("t") == []


def test_the_same_broker_through_another_transport_object_shares_the_producer(settings: Settings) -> None:
    broker = MemoryBroker()
    assert shared_producer(settings, MemoryTransport(broker)) is shared_producer(settings, MemoryTransport(broker))


def test_a_log_level_change_keeps_the_one_producer(settings: Settings, librdkafka_log: logging.Logger) -> None:
    transport = MemoryTransport(MemoryBroker())
    librdkafka_log.setLevel(logging.WARNING)
    before = shared_producer(settings, transport)
    librdkafka_log.setLevel(logging.DEBUG)

    assert shared_producer(settings, transport) is before


def test_another_configuration_gets_another_producer(settings: Settings) -> None:
    transport = MemoryTransport(MemoryBroker())
    tuned = Settings(bootstrap_servers=settings.bootstrap_servers, producer={"linger.ms": 50})

    assert shared_producer(tuned, transport) is not shared_producer(settings, transport)
    assert shared_producer(tuned, transport) is shared_producer(tuned, transport)
