"""``kafkaworkers topics describe|delete`` against Apache Kafka: its replication, topic config and deletion."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
from confluent_kafka.admin import NewTopic

from tests.conftest import KW, KafkaHelper, wait_for

pytestmark = pytest.mark.kafka


def kw(bootstrap: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KW, *args, "-b", bootstrap], input="", capture_output=True, text=True, timeout=120)


def test_describe_gives_replication_and_the_topics_own_config(kafka: KafkaHelper):
    group = f"kwtopics-{uuid.uuid4().hex[:8]}"
    ledger = f"{group}-dlq-replayed"
    futures = kafka.admin.create_topics([NewTopic(ledger, 2, 1, config={"cleanup.policy": "compact"})])
    [future.result(30) for future in futures.values()]
    try:
        done = kw(kafka.bootstrap, "topics", "describe", ledger, "--format", "json")
        assert done.returncode == 0, done.stderr
        data = json.loads(done.stdout)
        assert (data["partitions"], data["replication"]) == (2, 1)
        assert data["config"] == {"cleanup.policy": "compact"}
        assert (data["kind"], data["group"]) == ("ledger", group)

        missing = kw(kafka.bootstrap, "topics", "describe", f"{group}-nope")
        assert missing.returncode == 1
        assert missing.stderr == f"kafkaworkers: error: no topic '{group}-nope' on {kafka.bootstrap}\n"
    finally:
        [f.result(30) for f in kafka.admin.delete_topics([ledger]).values()]


def test_delete_group_id_removes_a_one_off_groups_topics_after_yes(kafka: KafkaHelper):
    group = f"kwtopics-{uuid.uuid4().hex[:8]}"
    ours = [f"{group}-retry-1", f"{group}-retry-2", f"{group}-dlq", f"{group}-dlq-replayed"]
    other = f"{group}-other"
    kafka.create_topics(*ours, other, partitions=1)

    def present() -> set[str]:
        return {n for n in kafka.admin.list_topics(timeout=10).topics if n.startswith(group)}

    try:
        refused = kw(kafka.bootstrap, "topics", "delete", "--group-id", group)
        assert refused.returncode == 1
        assert "not deleting 4 topic(s) without --yes: stdin is not a terminal" in refused.stderr
        assert present() == {*ours, other}

        deleted = kw(kafka.bootstrap, "topics", "delete", "--group-id", group, "--yes")
        assert deleted.returncode == 0, deleted.stderr
        assert "4 deleted" in deleted.stdout
        wait_for(lambda: present() == {other}, 30, f"only {other} left")
    finally:
        leftover = list(present())
        if leftover:
            [f.result(30) for f in kafka.admin.delete_topics(leftover).values()]
