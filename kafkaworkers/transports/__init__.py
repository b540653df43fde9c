"""Transports: where messages really go.

A transport hands out clients with the confluent-kafka interface, so the worker loop is
one piece of code whatever the broker is:

- :class:`~kafkaworkers.transports.kafka.KafkaTransport` talks to Apache Kafka through
  confluent-kafka (librdkafka).
- :class:`~kafkaworkers.transports.memory.MemoryTransport` is an embedded in-memory broker
  for the demo, fast unit tests and plugin authors. It never stands in for Kafka in an
  integration test.

The protocols below list exactly the part of confluent-kafka the framework uses; both
transports implement it, and nothing else may be relied on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import KafkaError, TopicPartition

__all__ = [
    "Admin",
    "Consumer",
    "GroupMember",
    "Headers",
    "Message",
    "Producer",
    "TopicDescription",
    "TopicPartition",
    "Transport",
    "transport_for",
]

# What a consumed record carries and what a produce sends: a header may have no value.
Headers = list[tuple[str, bytes | None]]


class Message(Protocol):
    """One consumed message (``confluent_kafka.Message`` or the in-memory twin).

    A message whose ``error()`` is set reports a consumer error, not a record: it may have
    no partition and has no offset, so those are read only after checking ``error()``.
    """

    def error(self) -> KafkaError | None: ...
    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> Headers | None: ...
    def timestamp(self) -> tuple[int, int]: ...


class Consumer(Protocol):
    """The consumer calls the worker loop and the dead-letter tools make."""

    def subscribe(
        self,
        topics: list[str],
        on_assign: Callable[[Any, list[TopicPartition]], None] = ...,
        on_revoke: Callable[[Any, list[TopicPartition]], None] = ...,
        on_lost: Callable[[Any, list[TopicPartition]], None] = ...,
    ) -> None: ...
    def assign(self, partitions: list[TopicPartition]) -> None: ...
    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        """Take over newly assigned partitions now (cooperative protocol), from inside ``on_assign``."""
        ...
    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]: ...
    def store_offsets(self, *, offsets: list[TopicPartition]) -> None: ...
    def commit(
        self, *, offsets: list[TopicPartition] | None = None, asynchronous: bool = True
    ) -> list[TopicPartition] | None: ...
    def pause(self, partitions: list[TopicPartition]) -> None: ...
    def resume(self, partitions: list[TopicPartition]) -> None: ...
    def seek(self, partition: TopicPartition) -> None: ...
    def assignment(self) -> list[TopicPartition]: ...
    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]: ...
    def consumer_group_metadata(self) -> Any:
        """The group's generation and member, for ``send_offsets_to_transaction`` (exactly-once)."""
        ...
    def committed(self, partitions: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]: ...
    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]: ...
    def close(self) -> None: ...


class Producer(Protocol):
    """The producer calls the worker loop makes."""

    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        *,
        partition: int = -1,
        on_delivery: Callable[[Any, Any], None] | None = None,
        timestamp: int = 0,
        headers: Headers | None = None,
    ) -> None: ...
    def poll(self, timeout: float = -1) -> int: ...
    def flush(self, timeout: float = -1) -> int: ...
    def __len__(self) -> int: ...


@dataclass(frozen=True)
class TopicDescription:
    """What ``kafkaworkers topics describe`` shows of one topic.

    :param config: the properties set on the topic itself (Kafka's dynamic topic configs),
        not the broker defaults it inherits.
    """

    partitions: int
    replication: int
    config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GroupMember:
    """One member of a consumer group as the group coordinator sees it.

    :param host: the address the broker sees the member connect from.
    :param partitions: (topic, partition) pairs assigned to it.
    """

    member_id: str
    client_id: str
    host: str
    partitions: list[tuple[str, int]] = field(default_factory=list)


class Admin(Protocol):
    """Topic and group administration, reduced to what ``kafkaworkers topics`` and ``inspect`` need."""

    def create_topics(
        self, topics: Sequence[tuple[str, int, int]], config: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """Create (name, partitions, replication) topics with topic ``config`` (e.g. compaction);
        map each name to "created" or "exists"."""
        ...

    def list_topics(self, timeout: float = 10.0) -> dict[str, int]:
        """Every topic with its partition count."""
        ...

    def broker_count(self, timeout: float = 10.0) -> int:
        """How many brokers the cluster has: how many copies a partition can have."""
        ...

    def describe_topic(self, name: str, timeout: float = 10.0) -> TopicDescription | None:
        """Partitions, replication and own config of a topic; None if it does not exist."""
        ...

    def delete_topics(self, names: Sequence[str], timeout: float = 30.0) -> dict[str, str]:
        """Delete topics; map each name to "deleted" or "missing"."""
        ...

    def describe_groups(self, groups: Sequence[str], timeout: float = 10.0) -> dict[str, list[GroupMember]]:
        """The members of each consumer group; a group without members (or unknown) maps to []."""
        ...


class Transport(Protocol):
    """A factory of clients for one broker."""

    name: str

    def consumer(self, config: Mapping[str, Any]) -> Consumer: ...
    def producer(self, config: Mapping[str, Any]) -> Producer: ...
    def admin(self, config: Mapping[str, Any]) -> Admin: ...


MEMORY_URL = "memory://"


def transport_for(bootstrap_servers: str) -> Transport:
    """The transport for a bootstrap string: ``memory://`` is the embedded broker, anything else Kafka."""
    if bootstrap_servers.startswith(MEMORY_URL):
        from kafkaworkers.transports.memory import MemoryTransport

        return MemoryTransport.named(bootstrap_servers[len(MEMORY_URL) :] or "default")
    from kafkaworkers.transports.kafka import KafkaTransport

    return KafkaTransport()
