"""Talking to the broker from the orchestrator: topics, the pre-fill, reading results.

Project venv only (confluent-kafka). Every topic a run makes starts with the run's prefix,
and so do its consumer groups, so :meth:`Broker.delete_prefixed` and
:meth:`Broker.delete_groups_prefixed` clean up exactly what this run made on the shared broker.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from bench.common import PRODUCER


class Broker:
    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.admin = AdminClient({"bootstrap.servers": bootstrap})

    def topics(self) -> set[str]:
        return set(self.admin.list_topics(timeout=15).topics)

    def create(self, *names: str, partitions: int = 6, config: dict[str, str] | None = None) -> None:
        futures = self.admin.create_topics([NewTopic(n, partitions, 1, config=config or {}) for n in names])
        for future in futures.values():
            future.result(30)
        # Wait until the metadata shows every partition with a leader.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            meta = self.admin.list_topics(timeout=10).topics
            if all(n in meta and len(meta[n].partitions) == partitions and not meta[n].error for n in names):
                return
            time.sleep(0.1)

    def delete_prefixed(self, prefix: str) -> list[str]:
        names = sorted(t for t in self.topics() if t.startswith(prefix))
        if names:
            for future in self.admin.delete_topics(names, operation_timeout=30).values():
                with contextlib.suppress(KafkaException):
                    future.result(30)
        return names

    def delete_groups_prefixed(self, prefix: str) -> list[str]:
        """Delete the (empty) consumer groups whose id starts with ``prefix``."""
        try:
            listed = self.admin.list_consumer_groups(request_timeout=15).result()
        except KafkaException:
            return []
        ids = sorted(g.group_id for g in listed.valid if g.group_id.startswith(prefix))
        if ids:
            for future in self.admin.delete_consumer_groups(ids, request_timeout=30).values():
                with contextlib.suppress(KafkaException):
                    future.result(30)
        return ids

    def fill(self, topic: str, records: Iterable[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> tuple[int, float]:
        """Produce every record (idempotent, acks=all, the shared settings); return (count, seconds)."""
        producer = Producer({**PRODUCER, "bootstrap.servers": self.bootstrap})
        errors: list[Any] = []

        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(err)

        count = 0
        start = time.perf_counter()
        for key, value, headers in records:
            while True:
                try:
                    producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.05)
            count += 1
        remaining = producer.flush(120)
        elapsed = time.perf_counter() - start
        if remaining or errors:
            raise RuntimeError(f"pre-fill of {topic}: {remaining} undelivered, {len(errors)} failed ({errors[:1]})")
        return count, elapsed

    def reader(self, topic: str, group: str) -> Consumer:
        """A plain consumer of ``topic`` from its start, committing nothing."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        consumer.subscribe([topic])
        return consumer
