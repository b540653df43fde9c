"""The command line's answers about the real broker: what was tried, what answered, what to do."""

from __future__ import annotations

import pytest

from tests.conftest import KafkaHelper, KwTest

pytestmark = pytest.mark.kafka


def test_sasl_against_a_plaintext_listener_says_the_listener_answered_and_names_the_setting(
    kafka: KafkaHelper, kwtest: KwTest
) -> None:
    result = kwtest.cli(
        "topics", "list", "-b", kafka.bootstrap,
        KAFKAWORKERS_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        KAFKAWORKERS_KAFKA_SASL_MECHANISM="PLAIN",
        KAFKAWORKERS_KAFKA_SASL_USERNAME="user",
        KAFKAWORKERS_KAFKA_SASL_PASSWORD="never-printed",
    )  # fmt: skip
    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if line.startswith("kafkaworkers: error:")]
    assert f"cannot talk to Kafka at {kafka.bootstrap} over SASL_PLAINTEXT" in line
    assert "accepts connections but no Kafka handshake completed" in line
    assert "security.protocol" in line
    assert "never-printed" not in result.stderr
