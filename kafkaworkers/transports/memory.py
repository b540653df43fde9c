"""An embedded in-memory Kafka-like broker behind the confluent-kafka client interface.

The demo, fast unit tests and plugin authors run the real worker loop against it, so its
clients keep confluent-kafka's semantics, checked against Apache Kafka by
``tests/transports/test_contract.py``:

- rebalance callbacks run inside the member's own ``consume()`` (any call, so a partition
  can be revoked between two calls of one fetch), before it returns messages; every member
  of a rebalanced group gets an ``on_assign``, with ``[]`` when it gains nothing.
- ``partition.assignment.strategy`` picks the protocol: ``range`` (librdkafka's default,
  ``roundrobin`` is treated as ``range``) is eager, every member revokes everything it holds
  and gets its new assignment whole; ``cooperative-sticky`` moves only the partitions that
  change owner, a partition leaving its old owner before the new one gets it.
- a paused partition stays paused for that consumer after it is revoked and assigned to it
  again (librdkafka keeps the application's pause flag per consumer and partition).
- delivery reports wait for ``poll()``/``flush()``; only stored offsets are committed;
  ``produce()`` raises ``MSG_SIZE_TOO_LARGE`` past the producer's ``message.max.bytes``,
  sized as librdkafka sizes a record; subscribing to a missing topic reports
  ``UNKNOWN_TOPIC_OR_PART`` through ``consume()`` once.

Faults are injected through :class:`MemoryBroker`: :meth:`~MemoryBroker.fail_deliveries`,
:meth:`~MemoryBroker.inject_consumer_error` and :meth:`~MemoryBroker.expire` (a member that
outlived ``max.poll.interval.ms``). Not modelled: timeouts of their own (a member that never
calls ``consume()`` holds up a rebalance forever), several ``on_assign([])`` calls per
cooperative rebalance (one is made), ``enable.partition.eof``, transactions.
"""

from __future__ import annotations

import itertools
import random
import re
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    OFFSET_INVALID,
    OFFSET_STORED,
    TIMESTAMP_CREATE_TIME,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from kafkaworkers.transports import GroupMember, Message, TopicDescription

__all__ = ["MemoryAdmin", "MemoryBroker", "MemoryConsumer", "MemoryMessage", "MemoryProducer",
           "MemoryTransport", "murmur2"]

Headers = list[tuple[str, bytes | None]]
Callback = Callable[[Any, list[TopicPartition]], None]
_TP = tuple[str, int]

_MASK = 0xFFFFFFFF
_RESETS = {"earliest": True, "smallest": True, "beginning": True,
           "latest": False, "largest": False, "end": False}
_STRATEGIES = {"range", "roundrobin", "cooperative-sticky"}


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (Java ``Utils.murmur2``, seed 0x9747b28c) as an unsigned 32-bit int."""
    m = 0x5BD1E995
    length = len(data)
    h = 0x9747B28C ^ length
    tail = length - length % 4
    for i in range(0, tail, 4):
        k = int.from_bytes(data[i:i + 4], "little") * m & _MASK
        k = (k ^ k >> 24) * m & _MASK
        h = (h * m & _MASK) ^ k
    if tail < length:
        h = (h ^ int.from_bytes(data[tail:], "little")) * m & _MASK
    h = (h ^ h >> 13) * m & _MASK
    return h ^ h >> 15


# librdkafka's partitioners by their config names; "*_random" ones scatter keyless messages.
_PARTITIONERS: dict[str, Callable[[bytes | None, int], int]] = {
    "murmur2_random": lambda key, n: (
        random.randrange(n) if key is None else (murmur2(key) & 0x7FFFFFFF) % n
    ),
    "murmur2": lambda key, n: (murmur2(key or b"") & 0x7FFFFFFF) % n,
    "consistent_random": lambda key, n: zlib.crc32(key) % n if key else random.randrange(n),
    "consistent": lambda key, n: zlib.crc32(key or b"") % n,
    "random": lambda key, n: random.randrange(n),
}


def _invalid(prop: str, value: object) -> KafkaException:
    return KafkaException(KafkaError(
        KafkaError._INVALID_ARG, f'Invalid value "{value}" for configuration property "{prop}"'))


def _flag(config: Mapping[str, Any], prop: str, default: bool) -> bool:
    value = config.get(prop, default)
    if isinstance(value, str):
        return value.strip().lower() in ("true", "t", "1", "yes", "on")
    return bool(value)


def _bytes(value: Any) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    try:
        return bytes(memoryview(value))
    except TypeError:
        raise TypeError(f"a bytes-like object is required, not {type(value).__name__!r}") from None


def _headers(headers: Headers | Mapping[str, Any] | None) -> Headers | None:
    items = headers.items() if isinstance(headers, Mapping) else headers or ()
    out: Headers = []
    for name, value in items:
        if value is not None and not isinstance(value, bytes | str):
            raise TypeError("expected header value to be None, binary, or unicode string, "
                            f"not {type(value).__name__}")
        out.append((name, value.encode() if isinstance(value, str) else value))
    return out or None


# librdkafka's bound on a v2 record's own fields (length, attributes, timestamp and offset
# deltas, key and value lengths, header count), added to key, value and headers to size it.
_RECORD_OVERHEAD = 36


def _varint_size(n: int) -> int:
    """Bytes of ``n`` as a zigzag varint, as record lengths are written."""
    zigzag = (n << 1) ^ (n >> 63)
    return max(1, (zigzag.bit_length() + 6) // 7)


def _headers_size(headers: Headers) -> int:
    """Bytes of headers in a record: each name and value with its varint length (-1: None)."""
    size = 0
    for name, value in headers:
        encoded = len(name.encode())
        size += _varint_size(encoded) + encoded
        size += _varint_size(-1) if value is None else _varint_size(len(value)) + len(value)
    return size


def _tps(keys: Iterable[_TP]) -> list[TopicPartition]:
    return [TopicPartition(topic, partition) for topic, partition in sorted(keys)]


class MemoryMessage:
    """One record, consumed or delivery-reported: the twin of ``confluent_kafka.Message``."""

    __slots__ = ("_error", "_headers", "_key", "_offset", "_partition", "_timestamp", "_topic",
                 "_value")

    def __init__(self, topic: str, partition: int | None, offset: int | None, key: bytes | None,
                 value: bytes | None, headers: Headers | None, timestamp: int,
                 error: KafkaError | None = None) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset
        self._key, self._value, self._headers = key, value, headers
        self._timestamp, self._error = timestamp, error

    def error(self) -> KafkaError | None:
        """The delivery error of a failed produce, else None."""
        return self._error

    def topic(self) -> str:
        """The topic name."""
        return self._topic

    def partition(self) -> int | None:
        """The partition; None when a failed delivery never got one, as in confluent-kafka."""
        return self._partition

    def offset(self) -> int | None:
        """The offset in its partition; None for a failed delivery."""
        return self._offset

    def key(self) -> bytes | None:
        """The key bytes."""
        return self._key

    def value(self) -> bytes | None:
        """The value bytes."""
        return self._value

    def headers(self) -> Headers | None:
        """A fresh list of (name, value) pairs, or None when there are none."""
        return None if self._headers is None else list(self._headers)

    def timestamp(self) -> tuple[int, int]:
        """``(TIMESTAMP_CREATE_TIME, milliseconds since the epoch)``."""
        return TIMESTAMP_CREATE_TIME, self._timestamp

    def __len__(self) -> int:
        return len(self._value) if self._value else 0

    def __repr__(self) -> str:
        return f"MemoryMessage({self._topic}[{self._partition}]@{self._offset}, key={self._key!r})"


class MemoryBroker:
    """Topics, committed offsets and consumer groups of one in-memory cluster; thread-safe.

    :param auto_create_partitions: producing to an unknown topic creates it with this many
        partitions; None (the default) fails the delivery, like Kafka without auto-creation.
    """

    def __init__(self, auto_create_partitions: int | None = None) -> None:
        self.auto_create_partitions = auto_create_partitions
        self._cond = threading.Condition(threading.Lock())
        self._topics: dict[str, list[list[MemoryMessage]]] = {}
        self._committed: dict[tuple[str, str, int], int] = {}
        self._groups: dict[str, list[MemoryConsumer]] = {}
        # Bumped by every change a group's members must look at; a member compares it with
        # the last one it served, so a consume() with nothing to do takes no lock for it.
        self._epochs: dict[str, int] = {}
        self._failures: dict[str, tuple[int, KafkaError]] = {}

    def create_topic(self, name: str, partitions: int) -> bool:
        """Create a topic; False when it already exists (its partition count is kept)."""
        if partitions < 1:
            raise ValueError(f"topic {name!r} needs at least one partition, not {partitions}")
        with self._cond:
            if name in self._topics:
                return False
            self._create(name, partitions)
            return True

    def list_topics(self) -> dict[str, int]:
        """Every topic with its partition count."""
        with self._cond:
            return {name: len(parts) for name, parts in self._topics.items()}

    def delete_topic(self, name: str) -> bool:
        """Delete a topic with its records and committed offsets; False when there is none.

        Groups subscribed to it rebalance without it; a consumer that ``assign()``-ed one of
        its partitions is not told (not modelled).
        """
        with self._cond:
            if self._topics.pop(name, None) is None:
                return False
            self._committed = {k: v for k, v in self._committed.items() if k[1] != name}
            for group, members in self._groups.items():
                if any(member._subscribes(name) for member in members):
                    self._rebalance(group)
            return True

    def records(self, topic: str) -> list[MemoryMessage]:
        """Everything a topic holds, partition by partition, for assertions."""
        with self._cond:
            return list(itertools.chain.from_iterable(self._topics.get(topic, [])))

    def members(self, group: str) -> list[MemoryConsumer]:
        """The consumers now in ``group``, in the order they joined."""
        with self._cond:
            return list(self._groups.get(group, []))

    def fail_deliveries(self, topic: str, count: int = 1,
                        error: int | KafkaError = KafkaError._MSG_TIMED_OUT) -> None:
        """Make the next ``count`` produces to ``topic`` report ``error`` and not append.

        An error code is reported as librdkafka reports it (``fatal()`` and ``retriable()``
        false); pass a ``KafkaError`` built with ``fatal=True`` or ``retriable=True`` to
        report exactly that.
        """
        with self._cond:
            self._failures[topic] = (count, error if isinstance(error, KafkaError) else KafkaError(error))

    def inject_consumer_error(self, group: str, error: int | KafkaError, topic: str = "",
                              partition: int | None = None) -> None:
        """Make the next ``consume()`` of every member of ``group`` return a message whose
        ``error()`` is ``error`` (a code becomes a non-fatal ``KafkaError``)."""
        err = error if isinstance(error, KafkaError) else KafkaError(error)
        with self._cond:
            for member in self._groups.get(group, []):
                member._errors.append(MemoryMessage(topic, partition, None, None, None, None, 0, err))
            self._bump(group)

    def expire(self, member: MemoryConsumer) -> None:
        """End ``member``'s session as Kafka does when it stops polling past
        ``max.poll.interval.ms``: the group hands its partitions to the others at once; its
        next ``consume()`` runs ``on_lost`` (``on_revoke`` when unset), returns a
        ``_MAX_POLL_EXCEEDED`` error, and the member joins again."""
        with self._cond:
            members = self._groups.get(member.group_id, [])
            if member not in members:
                raise ValueError("the consumer is not a member of its group")
            members.remove(member)
            member._lost, member._target = True, set()
            self._rebalance(member.group_id)

    def _create(self, name: str, partitions: int) -> None:
        self._topics[name] = [[] for _ in range(partitions)]
        for group, members in self._groups.items():
            if any(member._subscribes(name) for member in members):
                self._rebalance(group)

    def _produce(self, topic: str, partition: int, key: bytes | None, value: bytes | None,
                 headers: Headers | None, timestamp: int,
                 partitioner: Callable[[bytes | None, int], int]) -> MemoryMessage:
        with self._cond:
            if topic not in self._topics and self.auto_create_partitions:
                self._create(topic, self.auto_create_partitions)
            parts = self._topics.get(topic)
            if parts is None:
                return MemoryMessage(topic, None, None, key, value, headers, timestamp,
                                     KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
            if partition < 0:
                partition = partitioner(key, len(parts))
            elif partition >= len(parts):
                raise KafkaException(KafkaError(
                    KafkaError._UNKNOWN_PARTITION, "Unable to produce message: Unknown partition"))
            failure = self._failures.get(topic) if self._failures else None
            if failure and failure[0]:
                count, error = failure
                self._failures[topic] = (count - 1, error)
                return MemoryMessage(topic, partition, None, key, value, headers, timestamp, error)
            log = parts[partition]
            log.append(MemoryMessage(topic, partition, len(log), key, value, headers, timestamp))
            self._cond.notify_all()
            return log[-1]

    def _bump(self, group: str) -> None:
        self._epochs[group] = self._epochs.get(group, 0) + 1
        self._cond.notify_all()

    def _rebalance(self, group: str) -> None:
        """Give each topic's partitions to the members subscribed to it, by the group's
        protocol (its first member's), and tell every member to take part."""
        members = self._groups.get(group, [])
        assign = _range if members and members[0]._eager else _sticky
        targets: dict[MemoryConsumer, set[_TP]] = {member: set() for member in members}
        for topic, parts in self._topics.items():
            subs = [member for member in members if member._subscribes(topic)]
            if subs:
                for member, kept in assign(topic, len(parts), subs).items():
                    targets[member].update((topic, p) for p in kept)
        for member, target in targets.items():
            member._target = target
            member._rejoin = True
        self._bump(group)


def _range(topic: str, partitions: int, subs: list[MemoryConsumer]) -> dict[MemoryConsumer, list[int]]:
    """The range assignor: consecutive partitions to the members in join order, the first
    ones taking one more when the count does not divide."""
    share, extra = divmod(partitions, len(subs))
    out, first = {}, 0
    for rank, member in enumerate(subs):
        count = share + (rank < extra)
        out[member] = list(range(first, first + count))
        first += count
    return out


def _sticky(topic: str, partitions: int, subs: list[MemoryConsumer]) -> dict[MemoryConsumer, list[int]]:
    """An even share for every member, moving as few partitions as possible: each member
    keeps what it already had up to its share."""
    held = {m: sorted(p for t, p in m._target if t == topic) for m in subs}
    ranked = sorted(subs, key=lambda m: -len(held[m]))
    share, extra = divmod(partitions, len(subs))
    quotas = {m: share + (rank < extra) for rank, m in enumerate(ranked)}
    kept: dict[MemoryConsumer, list[int]] = {}
    taken: set[int] = set()
    for m in ranked:
        kept[m] = [p for p in held[m] if p not in taken][:quotas[m]]
        taken.update(kept[m])
    free = iter(sorted(set(range(partitions)).difference(*kept.values())))
    for m in ranked:
        kept[m] += itertools.islice(free, quotas[m] - len(kept[m]))
    return kept


class MemoryConsumer:
    """A consumer-group member with the ``confluent_kafka.Consumer`` interface.

    A partition leaves its old owner, through that owner's ``on_revoke`` inside its own
    ``consume()``, before the new owner's ``on_assign`` hands it over, so two members never
    hold one partition.
    """

    def __init__(self, broker: MemoryBroker, config: Mapping[str, Any]) -> None:
        self.group_id: str = config.get("group.id") or ""
        if not self.group_id:
            raise ValueError("Failed to create consumer: group.id must be set")
        self.client_id = str(config.get("client.id", "rdkafka"))
        self.member_id = f"{self.client_id}-{uuid.uuid4()}"
        reset = str(config.get("auto.offset.reset", "latest")).lower()
        if reset not in _RESETS:
            raise _invalid("auto.offset.reset", reset)
        strategy = str(config.get("partition.assignment.strategy", "range,roundrobin"))
        names = {name.strip() for name in strategy.split(",")}
        if not names <= _STRATEGIES or ("cooperative-sticky" in names and len(names) > 1):
            raise _invalid("partition.assignment.strategy", strategy)
        self._eager = "cooperative-sticky" not in names
        self._earliest = _RESETS[reset]
        self._auto_store = _flag(config, "enable.auto.offset.store", True)
        self._auto_commit = _flag(config, "enable.auto.commit", True)
        self._broker = broker
        self._cond = broker._cond
        self._subscription: list[str] = []
        self._on_assign: Callback | None = None
        self._on_revoke: Callback | None = None
        self._on_lost: Callback | None = None
        self._target: set[_TP] = set()  # what the group gives this member
        self._owned: set[_TP] = set()  # what it has taken over through on_assign
        self._position: dict[_TP, int] = {}
        self._stored: dict[_TP, int] = {}
        # Kept across revocations: librdkafka keeps the application's pause flag on its
        # partition object, which outlives the assignment.
        self._paused: set[_TP] = set()
        self._errors: deque[MemoryMessage] = deque()
        self._rejoin = False  # the group rebalanced: revoke (all, if eager), then on_assign
        self._assign_due = False  # an on_assign is owed for the last rebalance
        self._lost = False  # expired: on_lost, then join again
        self._epoch = -1  # the group epoch last served
        self._cursor = 0
        self._closed = False

    def subscribe(self, topics: list[str], on_assign: Callback | None = None,
                  on_revoke: Callback | None = None, on_lost: Callback | None = None) -> None:
        """Join the group for ``topics`` (names, or regexes starting with ``^``); a named
        topic that does not exist is reported once as an ``UNKNOWN_TOPIC_OR_PART`` error."""
        self._check()
        with self._cond:
            self._subscription = list(topics)
            self._on_assign, self._on_revoke, self._on_lost = on_assign, on_revoke, on_lost
            for topic in topics:
                if not topic.startswith("^") and topic not in self._broker._topics:
                    self._errors.append(MemoryMessage(topic, 0, None, None, None, None, 0, KafkaError(
                        KafkaError.UNKNOWN_TOPIC_OR_PART, f"Subscribed topic not available: {topic}:"
                        " Broker: Unknown topic or partition")))
            self._join()

    def assign(self, partitions: list[TopicPartition]) -> None:
        """Read these partitions outside any group rebalance, each from its ``offset``
        (logical offsets too; ``OFFSET_INVALID`` starts at the committed offset)."""
        self._check()
        with self._cond:
            for tp in partitions:
                if tp.topic not in self._broker._topics:
                    raise KafkaException(KafkaError(KafkaError._UNKNOWN_TOPIC, f"Unknown topic {tp.topic}"))
            self._owned = {(tp.topic, tp.partition) for tp in partitions}
            self._target = set(self._owned)
            self._position = {(tp.topic, tp.partition): self._start((tp.topic, tp.partition), tp.offset)
                              for tp in partitions}
            self._cond.notify_all()

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        """Nothing to do: ``on_assign`` runs once the partitions are taken over already."""
        self._check()

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        """Up to ``num_messages`` records, round-robin over the assigned, unpaused partitions,
        waiting at most ``timeout`` seconds (-1: forever) for the first; [] on timeout.
        Rebalance callbacks due run first."""
        self._check()
        if not 0 <= num_messages <= 1_000_000:
            raise ValueError("num_messages must be between 0 and 1000000 (1M)")
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        if self._auto_commit:
            with self._cond:
                self._commit_stored(None)
        while True:
            if self._epoch != self._broker._epochs.get(self.group_id, 0):
                lost = self._serve_rebalance()
                if lost is not None:
                    return [lost]
            with self._cond:
                batch = self._fetch(num_messages) if not self._errors else self._take_errors(num_messages)
                if batch or not num_messages:
                    return batch
                # Checked under the lock so a rebalance notified just before is not slept through.
                if self._epoch != self._broker._epochs.get(self.group_id, 0):
                    continue
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return []
                self._cond.wait(remaining)
    def poll(self, timeout: float | None = None) -> Message | None:
        """One record, or None after ``timeout`` seconds (None or -1: forever)."""
        batch = self.consume(1, -1 if timeout is None else timeout)
        return batch[0] if batch else None

    def store_offsets(self, message: Message | None = None,
                      offsets: list[TopicPartition] | None = None) -> None:
        """Store the next offset to commit: ``message``'s offset + 1, or ``offsets`` as given.

        Offsets of partitions not assigned to this member are dropped; if none remain this
        raises ``_STATE``, as librdkafka does.
        """
        self._check()
        if (message is None) == (offsets is None):
            raise ValueError("expected either message or offsets")
        if self._auto_store:
            raise KafkaException(KafkaError(KafkaError._INVALID_ARG,
                                            "StoreOffsets failed: enable.auto.offset.store=true"))
        if message is not None:
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            if topic is None or partition is None or offset is None:
                # A consumer error is no record: librdkafka refuses it the same way.
                raise KafkaException(KafkaError(KafkaError._INVALID_ARG,
                                                f"Cannot store offsets for message with error: {message.error()}"))
            offsets = [TopicPartition(topic, partition, offset + 1)]
        assert offsets is not None  # one of message and offsets was checked to be given
        with self._cond:
            mine = [tp for tp in offsets if (tp.topic, tp.partition) in self._owned]
            if offsets and not mine:
                raise KafkaException(KafkaError(KafkaError._STATE, "StoreOffsets failed: "
                                                "partitions not assigned"))
            for tp in mine:
                self._stored[tp.topic, tp.partition] = tp.offset

    def commit(self, *, offsets: list[TopicPartition] | None = None,
               asynchronous: bool = True) -> list[TopicPartition] | None:
        """Commit the stored offsets, or ``offsets`` as given, for the group.

        Like confluent-kafka, returns None when asynchronous, otherwise the assignment with the
        offsets just committed, and raises ``_NO_OFFSET`` when there was nothing new to commit.
        """
        self._check()
        with self._cond:
            if offsets is not None:
                for tp in offsets:
                    self._broker._committed[self.group_id, tp.topic, tp.partition] = tp.offset
                done = [TopicPartition(tp.topic, tp.partition, tp.offset) for tp in offsets]
            else:
                committed = self._commit_stored(None)
                if not committed and not asynchronous:
                    raise KafkaException(KafkaError(KafkaError._NO_OFFSET,
                                                    "Commit failed: Local: No offset stored"))
                done = [TopicPartition(t, p, committed.get((t, p), OFFSET_INVALID))
                        for t, p in sorted(self._owned)]
        return None if asynchronous else done

    def committed(self, partitions: list[TopicPartition],
                  timeout: float = -1) -> list[TopicPartition]:
        """The group's committed offsets; ``OFFSET_INVALID`` where nothing was committed."""
        self._check()
        with self._cond:
            return [TopicPartition(tp.topic, tp.partition, self._broker._committed.get(
                (self.group_id, tp.topic, tp.partition), OFFSET_INVALID)) for tp in partitions]

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """The next offset this member will fetch; ``OFFSET_INVALID`` if not assigned."""
        self._check()
        with self._cond:
            return [TopicPartition(tp.topic, tp.partition, self._position.get(
                (tp.topic, tp.partition), OFFSET_INVALID)) for tp in partitions]

    def consumer_group_metadata(self) -> Any:
        """Not modelled: the in-memory broker has no transactions, so no exactly-once."""
        raise KafkaException(KafkaError(KafkaError._NOT_IMPLEMENTED, "the in-memory broker has no transactions"))

    def pause(self, partitions: list[TopicPartition]) -> None:
        """Stop fetching from these assigned partitions until resumed or reassigned."""
        self._check()
        with self._cond:
            self._paused |= {(tp.topic, tp.partition) for tp in partitions} & self._owned

    def resume(self, partitions: list[TopicPartition]) -> None:
        """Fetch again from paused partitions."""
        self._check()
        with self._cond:
            self._paused -= {(tp.topic, tp.partition) for tp in partitions}
            self._cond.notify_all()

    def seek(self, partition: TopicPartition) -> None:
        """Fetch an assigned partition from ``partition.offset`` next (logical offsets too)."""
        self._check()
        key = (partition.topic, partition.partition)
        with self._cond:
            if key not in self._owned:
                raise KafkaException(KafkaError(KafkaError._STATE, f"Failed to seek to offset "
                                                f"{partition.offset}: partition not assigned"))
            self._position[key] = self._start(key, partition.offset)

    def assignment(self) -> list[TopicPartition]:
        """The partitions this member holds."""
        self._check()
        with self._cond:
            return _tps(self._owned)

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = -1,
                              cached: bool = False) -> tuple[int, int]:
        """``(low, high)``: the first offset and the offset the next record will get."""
        self._check()
        with self._cond:
            parts = self._broker._topics.get(partition.topic, [])
            if not 0 <= partition.partition < len(parts):
                raise KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION,
                                                "Failed to get watermark offsets"))
            return 0, len(parts[partition.partition])

    def close(self) -> None:
        """Revoke the assignment (``on_revoke``), commit if auto-commit is on, leave the group."""
        if self._closed:
            return
        with self._cond:
            owned = set(self._owned) if self._subscription else set()
        try:
            if owned and self._on_revoke:
                self._on_revoke(self, _tps(owned))
        finally:
            with self._cond:
                if self._auto_commit:
                    self._commit_stored(None)
                self._closed = True
                members = self._broker._groups.get(self.group_id, [])
                if self in members:
                    members.remove(self)
                    self._broker._rebalance(self.group_id)
                self._owned.clear()

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError("Consumer closed")

    def _subscribes(self, topic: str) -> bool:
        return any(topic == name or (name.startswith("^") and re.match(name, topic))
                   for name in self._subscription)

    def _join(self) -> None:
        members = self._broker._groups.setdefault(self.group_id, [])
        if self not in members:
            members.append(self)
        self._broker._rebalance(self.group_id)

    def _take_errors(self, limit: int) -> list[Message]:
        errors = self._errors
        return [errors.popleft() for _ in range(min(limit, len(errors)))]

    def _serve_rebalance(self) -> MemoryMessage | None:
        """Run what the group asks of this member, callbacks outside the lock: on an expired
        session ``on_lost`` and the error to return; else the revocation, then ``on_assign``."""
        with self._cond:
            self._epoch = self._broker._epochs.get(self.group_id, 0)
            lost = self._lost
            if lost:
                revoke, self._lost, self._rejoin = set(self._owned), False, False
            elif self._rejoin:
                revoke = set(self._owned) if self._eager else self._owned - self._target
                self._rejoin, self._assign_due = False, True
            else:
                revoke = self._owned - self._target
        if revoke:
            callback = self._on_lost or self._on_revoke if lost else self._on_revoke
            try:
                if callback:
                    callback(self, _tps(revoke))
            finally:
                with self._cond:
                    if self._auto_commit and not lost:
                        self._commit_stored(revoke)
                    self._owned -= revoke
                    for key in revoke:
                        self._position.pop(key, None)
                        self._stored.pop(key, None)
                    self._broker._bump(self.group_id)
        if lost:
            with self._cond:
                self._join()
            return MemoryMessage("", None, None, None, None, None, 0, KafkaError(
                KafkaError._MAX_POLL_EXCEEDED, "Application maximum poll interval exceeded"))
        with self._cond:
            others = (m._owned for m in self._broker._groups.get(self.group_id, []) if m is not self)
            wanted = self._target - self._owned
            assign = wanted - set().union(*others)
            if self._eager and assign != wanted:
                return None  # an eager member gets its assignment whole, once the others let go
            announce, self._assign_due = self._assign_due, False
            for key in assign:
                self._position[key] = self._start(key, OFFSET_STORED)
            self._owned |= assign
        if (assign or announce) and self._on_assign:
            self._on_assign(self, _tps(assign))
        return None

    def _start(self, key: _TP, offset: int) -> int:
        high = len(self._broker._topics[key[0]][key[1]])
        if offset in (OFFSET_STORED, OFFSET_INVALID):
            offset = self._broker._committed.get((self.group_id, *key), OFFSET_INVALID)
        if offset == OFFSET_BEGINNING:
            return 0
        if 0 <= offset <= high:
            return offset
        # Nothing committed or out of range: a real fetch falls back to auto.offset.reset too.
        return 0 if self._earliest and offset != OFFSET_END else high

    def _fetch(self, limit: int) -> list[Message]:
        live = sorted(self._owned - self._paused)
        if not live:
            return []
        # Start one partition further each call so a hot partition cannot starve the others.
        start = self._cursor % len(live)
        self._cursor = start + 1
        queue = deque(live[start:] + live[:start])
        batch: list[Message] = []
        auto_store = self._auto_store
        while queue and len(batch) < limit:
            key = queue.popleft()
            log, pos = self._broker._topics[key[0]][key[1]], self._position[key]
            if pos < len(log):
                batch.append(log[pos])
                self._position[key] = pos + 1
                if auto_store:
                    self._stored[key] = pos + 1
                queue.append(key)
        return batch

    def _commit_stored(self, only: set[_TP] | None) -> dict[_TP, int]:
        done = {}
        for key, offset in self._stored.items():
            group_key = (self.group_id, *key)
            if (only is None or key in only) and self._broker._committed.get(group_key) != offset:
                self._broker._committed[group_key] = offset
                done[key] = offset
        return done


class MemoryProducer:
    """A producer with the ``confluent_kafka.Producer`` interface.

    Records are in the log as soon as ``produce()`` returns; their delivery callbacks wait
    for ``poll()``/``flush()`` and run on the thread that calls them, as with librdkafka.
    """

    def __init__(self, broker: MemoryBroker, config: Mapping[str, Any]) -> None:
        name = config.get("partitioner", "murmur2_random")
        if name not in _PARTITIONERS:
            raise _invalid("partitioner", name)
        self._partitioner = _PARTITIONERS[name]
        max_bytes = config.get("message.max.bytes", 1_000_000)
        try:
            self._max_bytes = int(max_bytes)
        except ValueError:
            raise _invalid("message.max.bytes", max_bytes) from None
        if not 1000 <= self._max_bytes <= 1_000_000_000:
            raise _invalid("message.max.bytes", max_bytes)
        self._broker = broker
        self._default_callback = config.get("on_delivery")
        self._reports: deque[tuple[Callable[[Any, Any], None] | None, MemoryMessage]] = deque()
        self._cond = threading.Condition()

    def produce(self, topic: str, value: Any = None, key: Any = None, partition: int = -1,
                on_delivery: Callable[[Any, Any], None] | None = None, timestamp: int = 0,
                headers: Headers | Mapping[str, Any] | None = None, *,
                callback: Callable[[Any, Any], None] | None = None) -> None:
        """Append a record (str is UTF-8 encoded) and queue its delivery report; a record
        over ``message.max.bytes`` raises ``MSG_SIZE_TOO_LARGE`` here, as librdkafka does."""
        key, value, headers = _bytes(key), _bytes(value), _headers(headers)
        size = _RECORD_OVERHEAD + (len(key) if key else 0) + (len(value) if value else 0)
        if headers:
            size += _headers_size(headers)
        if size > self._max_bytes:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE,
                                            "Unable to produce message: Broker: Message size too large"))
        msg = self._broker._produce(topic, partition, key, value, headers,
                                    timestamp or int(time.time() * 1000), self._partitioner)
        with self._cond:
            self._reports.append((on_delivery or callback or self._default_callback, msg))
            self._cond.notify_all()

    def poll(self, timeout: float | None = None) -> int:
        """Run the queued delivery callbacks, first waiting up to ``timeout`` seconds (None or
        -1: forever) for one if none is queued; the number served."""
        with self._cond:
            self._cond.wait_for(lambda: self._reports,
                                None if timeout is None or timeout < 0 else timeout)
        return self._serve()

    def flush(self, timeout: float | None = None) -> int:
        """Run every queued delivery callback; the number still undelivered (always 0)."""
        self._serve()
        return len(self)

    def __len__(self) -> int:
        with self._cond:
            return len(self._reports)

    def _serve(self) -> int:
        served = 0
        while True:
            # One at a time: a raising callback leaves the rest queued, like librdkafka.
            with self._cond:
                if not self._reports:
                    return served
                callback, msg = self._reports.popleft()
            served += 1
            if callback:
                callback(msg.error(), msg)


class MemoryAdmin:
    """Topic administration on a :class:`MemoryBroker`."""

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker

    def create_topics(self, topics: Sequence[tuple[str, int, int]],
                      config: Mapping[str, str] | None = None) -> dict[str, str]:
        """Create (name, partitions, replication) topics; map each name to "created"/"exists".
        Topic ``config`` (retention, compaction) has no meaning here and is ignored."""
        return {name: "created" if self._broker.create_topic(name, partitions) else "exists"
                for name, partitions, _replication in topics}

    def list_topics(self, timeout: float = 10.0) -> dict[str, int]:
        """Every topic with its partition count."""
        return self._broker.list_topics()

    def broker_count(self, timeout: float = 10.0) -> int:
        """One: the in-memory broker is a cluster of one."""
        return 1

    def describe_topic(self, name: str, timeout: float = 10.0) -> TopicDescription | None:
        """A topic's partitions; replication is 1 and no topic config is kept here."""
        partitions = self._broker.list_topics().get(name)
        return None if partitions is None else TopicDescription(partitions, 1)

    def delete_topics(self, names: Sequence[str], timeout: float = 30.0) -> dict[str, str]:
        """Delete topics; map each name to "deleted" or "missing"."""
        return {name: "deleted" if self._broker.delete_topic(name) else "missing" for name in names}

    def describe_groups(self, groups: Sequence[str], timeout: float = 10.0) -> dict[str, list[GroupMember]]:
        """Each group's members with what they own; the host is the in-memory broker's own name."""
        with self._broker._cond:
            return {
                group: [
                    GroupMember(member.member_id, member.client_id, "memory", sorted(member._owned))
                    for member in self._broker._groups.get(group, [])
                ]
                for group in groups
            }


class MemoryTransport:
    """Hands out in-memory clients for one :class:`MemoryBroker` (a fresh one by default)."""

    name = "memory"
    _named: ClassVar[dict[str, MemoryBroker]] = {}
    _named_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, broker: MemoryBroker | None = None) -> None:
        self.broker = broker or MemoryBroker()

    @classmethod
    def named(cls, name: str) -> MemoryTransport:
        """A transport on the process-wide broker called ``name`` (``memory://name``)."""
        with cls._named_lock:
            broker = cls._named.setdefault(name, MemoryBroker())
        return cls(broker)

    def consumer(self, config: Mapping[str, Any]) -> MemoryConsumer:
        """A consumer; needs ``group.id``, ignores settings it has no use for."""
        return MemoryConsumer(self.broker, config)

    def producer(self, config: Mapping[str, Any]) -> MemoryProducer:
        """A producer; ignores settings it has no use for."""
        return MemoryProducer(self.broker, config)

    def admin(self, config: Mapping[str, Any]) -> MemoryAdmin:
        """An admin client."""
        return MemoryAdmin(self.broker)
