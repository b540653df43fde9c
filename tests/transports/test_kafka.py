"""What only the Kafka transport does: how it says that no broker answers."""

from __future__ import annotations

import pytest

from kafkaworkers.errors import BrokerUnavailable
from kafkaworkers.transports.kafka import KafkaTransport
from tests.conftest import free_port


def test_describing_groups_when_no_broker_listens_says_kafka_cannot_be_reached() -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    admin = KafkaTransport().admin({"bootstrap.servers": nowhere, "log_level": 0})
    with pytest.raises(BrokerUnavailable) as caught:
        admin.describe_groups(["billing"], timeout=1.0)
    said = str(caught.value)
    assert f"cannot reach Kafka at {nowhere}" in said, said
    assert "'billing'" in said and "Timed out" in said, "librdkafka's own answer, not the caller's timeout"
