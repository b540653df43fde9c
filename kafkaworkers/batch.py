"""The per-batch bookkeeping: what a batch handled, produced and may store, and where partitions stand.

A :class:`Batch` lives from one fetch to its stored offsets, as Quix Streams' checkpoint does:

1. the loop marks each message ``handled`` (its offset may be stored), ``failed`` (routed to
   a retry or dead-letter topic, which is handled too) or ``blocked`` (its partition paused:
   a retry not yet due, an open breaker; nothing from it on is stored);
2. what handlers and the failure router produce goes through :meth:`Batch.output` and
   :meth:`Batch.write`: straight to the producer, or held until the plugin's batch scope
   committed; a failed message's held outputs are dropped with its savepoint;
3. :meth:`Batch.finish` flushes the producer, then judges every refusal the producer or
   the broker reported: a fatal producer stops the worker; a message too large for the
   broker dead-letters the message that produced it; anything else (an outage) stores
   nothing and rewinds the batch's partitions. Only a batch with nothing refused stores its
   offsets.

:class:`Partitions` is one plugin's view of its assigned partitions: flowing, or paused for a
reason it knows and logs, until a time it knows; it pauses, resumes, rewinds and stores.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from kafkaworkers.clock import Clock
from kafkaworkers.errors import CircuitOpenError, MessageTooLarge, ProducerFatal, StoreConflict
from kafkaworkers.producer import produce
from kafkaworkers.retry import DLQ, OUTPUT, FailureRouter
from kafkaworkers.transactions import Transactions
from kafkaworkers.transports import Consumer, Headers, Message, Producer

__all__ = [
    "BREAKER_OPEN",
    "REFUSED",
    "RETRY_IN_PLACE",
    "RETRY_NOT_DUE",
    "REWIND",
    "STORE_CONFLICT",
    "Batch",
    "Partitions",
    "fatal",
    "pause_reason",
]

log = logging.getLogger(__name__)

TP = tuple[str, int]
Held = tuple[str, "bytes | None", "bytes | None", Headers, Message, str]
#: A produced message as :meth:`Batch.finish` matches a failed delivery to it: (topic, key, value, source, kind).
Sent = tuple[str, "bytes | None", "bytes | None", Message, str]

#: Delivery errors about one message, not the broker's health: producing it again cannot help.
REFUSED = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.RECORD_LIST_TOO_LARGE,
    }
)
_MAX_REWIND_BACKOFF = 30.0

#: Why a partition is paused.
RETRY_NOT_DUE, BREAKER_OPEN, REWIND, RETRY_IN_PLACE = "retry not due", "breaker open", "rewind", "retry in place"
STORE_CONFLICT = "store conflict"


def pause_reason(error: CircuitOpenError | StoreConflict) -> str:
    """Why a handler's failure pauses its partition instead of retrying or dead-lettering it."""
    if isinstance(error, CircuitOpenError):
        return f"{BREAKER_OPEN}: {error.breaker!r}"
    return f"{STORE_CONFLICT}: {error}"


class Partitions:
    """One plugin's assigned partitions: flowing, or paused for a known reason until a known time.

    :param plugin: the plugin's name, for logs.
    :param consumer_of: the consumer that owns a topic (main or retry).
    :param clock: the monotonic clock pauses are measured on.
    :param on_change: called with the number of paused partitions after every change (a gauge).
    """

    def __init__(
        self,
        plugin: str,
        consumer_of: Callable[[str], Consumer],
        clock: Clock,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.plugin = plugin
        self.consumer_of = consumer_of
        self.clock = clock
        self.assigned: set[TP] = set()
        #: paused partition -> (until, reason)
        self.paused: dict[TP, tuple[float, str]] = {}
        self._on_change = on_change
        self._rewind_backoff = 0.0
        #: why every assigned partition is held paused (``control pause``); None while not held
        self.hold_reason: str | None = None

    def assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Newly assigned partitions flow: librdkafka keeps a partition's pause flag when the
        same consumer gets it back (an eager rebalance), though the worker forgot why it paused."""
        self.assigned.update((tp.topic, tp.partition) for tp in partitions)
        if self.hold_reason is not None and partitions:
            # librdkafka forgets a pause asked for a partition it has not taken over yet: take
            # them over now (the client then does not again), and pause them before any fetch.
            try:
                consumer.incremental_assign(partitions)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError._STATE:
                    raise
                consumer.assign(partitions)  # the eager protocol: on_assign hands the whole assignment
            consumer.pause(partitions)
            log.warning("%s: %s; keeping %s paused", self.plugin, self.hold_reason, _names(partitions))
            self._changed()
            return
        fresh = [tp for tp in partitions if (tp.topic, tp.partition) not in self.paused]
        if fresh:
            consumer.resume(fresh)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Revoked or lost partitions: no longer ours, nor paused by us."""
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self.assigned.discard(key)
            self.paused.pop(key, None)
        self._changed()

    def pause(self, tp: TP, offset: int, until: float, reason: str, quiet: bool = False) -> None:
        """Pause a partition and rewind it to ``offset``: what was prefetched is fetched again."""
        part = TopicPartition(tp[0], tp[1], offset)
        consumer = self.consumer_of(tp[0])
        try:
            consumer.pause([part])
            consumer.seek(part)
        except KafkaException as exc:
            # Revoked meanwhile: its next owner starts from the committed offset.
            log.info("%s: could not pause %s[%d]: %s", self.plugin, tp[0], tp[1], exc.args[0].str())
            return
        self.paused[tp] = (until, reason)
        if not quiet:
            wait = max(until - self.clock.monotonic(), 0.0)
            log.warning("%s: paused %s[%d] at %d for %.1f s: %s", self.plugin, tp[0], tp[1], offset, wait, reason)
        self._changed()

    def resume(self, tp: TP) -> None:
        """Resume one partition now (its buffer drained)."""
        if self.paused.pop(tp, None) is not None and self.hold_reason is None:
            try:
                self.consumer_of(tp[0]).resume([TopicPartition(*tp)])
            except KafkaException as exc:
                log.info("%s: could not resume %s[%d]: %s", self.plugin, tp[0], tp[1], exc.args[0].str())
            self._changed()

    def resume_due(self) -> None:
        """Resume every paused partition whose time has come."""
        now = self.clock.monotonic()
        due = [tp for tp, (until, _) in self.paused.items() if until <= now]
        if not due:
            return
        for tp in due:
            del self.paused[tp]
            if self.hold_reason is not None:
                continue
            try:
                self.consumer_of(tp[0]).resume([TopicPartition(*tp)])
            except KafkaException as exc:
                log.info("%s: could not resume %s[%d]: %s", self.plugin, tp[0], tp[1], exc.args[0].str())
        self._changed()

    def hold(self, reason: str) -> None:
        """Stop consuming every assigned partition, and those assigned later, until :meth:`release`;
        they stay assigned. What was fetched and not handled yet is fetched again after."""
        self.hold_reason = reason
        flowing = sorted(self.assigned - set(self.paused))
        for consumer, tps in self._by_consumer(flowing):
            try:
                consumer.pause(tps)
                # Partitions paused for their own reason were rewound already; these restart where handling is.
                for tp in consumer.position(tps):
                    if tp.offset >= 0:
                        consumer.seek(tp)
            except KafkaException as exc:
                log.info("%s: could not pause %s: %s", self.plugin, _names(tps), exc.args[0].str())
        log.warning("%s: %s: %d partition(s) paused", self.plugin, reason, len(self.assigned))
        self._changed()

    def release(self) -> None:
        """Undo :meth:`hold`: the partitions not paused for a reason of their own flow again."""
        if self.hold_reason is None:
            return
        self.hold_reason = None
        flowing = sorted(self.assigned - set(self.paused))
        for consumer, tps in self._by_consumer(flowing):
            try:
                consumer.resume(tps)
            except KafkaException as exc:
                log.info("%s: could not resume %s: %s", self.plugin, _names(tps), exc.args[0].str())
        log.warning("%s: resumed %d partition(s); %d stay paused for their own reason", self.plugin,
                    len(flowing), len(self.paused))  # fmt: skip
        self._changed()

    def _by_consumer(self, tps: Iterable[TP]) -> list[tuple[Consumer, list[TopicPartition]]]:
        grouped: dict[int, tuple[Consumer, list[TopicPartition]]] = {}
        for topic, partition in tps:
            consumer = self.consumer_of(topic)
            grouped.setdefault(id(consumer), (consumer, []))[1].append(TopicPartition(topic, partition))
        return list(grouped.values())

    def rewind(self, first: dict[TP, int], reason: str) -> None:
        """Store nothing of a batch and handle it again after a pause that grows while it keeps failing."""
        self._rewind_backoff = min(max(self._rewind_backoff * 2, 0.5), _MAX_REWIND_BACKOFF)
        log.warning("%s: %s; handling the batch again in %.1f s", self.plugin, reason, self._rewind_backoff)
        until = self.clock.monotonic() + self._rewind_backoff
        for tp, offset in first.items():
            self.pause(tp, offset, until, f"{REWIND}: {reason}", quiet=True)

    def settled(self) -> None:
        """A batch went through: the next rewind starts from the shortest pause again."""
        self._rewind_backoff = 0.0

    def store(self, last: dict[TP, int]) -> None:
        """Store each partition's next offset; librdkafka commits stored offsets in the background."""
        self._rewind_backoff = 0.0
        by_consumer: dict[int, tuple[Consumer, list[TopicPartition]]] = {}
        for (topic, partition), offset in last.items():
            consumer = self.consumer_of(topic)
            by_consumer.setdefault(id(consumer), (consumer, []))[1].append(TopicPartition(topic, partition, offset + 1))
        for consumer, offsets in by_consumer.values():
            try:
                consumer.store_offsets(offsets=offsets)
            except KafkaException as exc:
                # A partition revoked meanwhile: its next owner re-handles from the committed offset.
                log.info("%s: could not store offsets: %s", self.plugin, exc.args[0].str())

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(len(self.assigned) if self.hold_reason is not None else len(self.paused))


def _names(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions)


def fatal(err: KafkaError) -> bool:
    """Whether the producer can produce no more: librdkafka flags it on ``error_cb`` errors, but
    the errors ``produce()`` and delivery reports carry afterwards only have the ``_FATAL`` code."""
    return bool(err.fatal()) or err.code() == KafkaError._FATAL


class Batch:
    """One batch from fetch to stored offsets (see the module docstring).

    :param plugin: the plugin's name, for logs.
    :param producer: where outputs, retries and dead letters go.
    :param router: dead-letters a message whose output the broker refused.
    :param partitions: where offsets are stored, or partitions rewound.
    :param produced: per-topic counts of produced messages, for the metrics.
    :param held: hold what is produced until :meth:`release` (inside a batch scope).
    :param txn: in exactly-once mode, the worker's transactions: the batch's outputs and
        offsets commit together, or not at all.
    :param poisoned: in exactly-once mode, where messages whose outputs the broker refused are
        noted, so that handling the batch again dead-letters them instead.
    """

    __slots__ = (
        "blocked",
        "delivered",
        "failures",
        "fatal",
        "first",
        "held",
        "last",
        "max_bytes",
        "partitions",
        "plugin",
        "poisoned",
        "produced",
        "producer",
        "refusals",
        "router",
        "scope_error",
        "sent",
        "source",
        "txn",
    )

    def __init__(
        self,
        plugin: str,
        producer: Producer,
        router: FailureRouter,
        partitions: Partitions,
        produced: defaultdict[str, int],
        held: bool = False,
        txn: Transactions | None = None,
        poisoned: dict[tuple[str, int, int], Exception] | None = None,
    ) -> None:
        self.plugin = plugin
        self.producer = producer
        self.router = router
        self.max_bytes = router.max_bytes
        self.partitions = partitions
        self.produced = produced
        #: first and last handled offset per partition
        self.first: dict[TP, int] = {}
        self.last: dict[TP, int] = {}
        #: partitions paused during the batch: nothing of theirs from then on counts
        self.blocked: set[TP] = set()
        self.held: list[Held] | None = [] if held else None
        #: the message being handled, whose outputs are being produced
        self.source: Any = None
        #: what was produced, to tell which consumed message a failed delivery came from
        self.sent: list[Sent] = []
        #: failed delivery reports as (error, topic, key, value), matched to ``sent`` after the flush
        self.failures: list[tuple[KafkaError, str, bytes | None, bytes | None]] = []
        #: refusals with the consumed message they came from (``None``: not found in ``sent``)
        self.refusals: list[tuple[Message | None, str, str, KafkaError]] = []
        self.fatal: KafkaError | None = None
        self.scope_error: str | None = None
        self.txn = txn
        self.poisoned = poisoned
        failures = self.failures

        def delivered(err: KafkaError | None, msg: Any) -> None:
            # Every produced message's delivery report: one plain function per batch, as a
            # hand-written loop passes, and no object per message; a failure is matched to
            # its source only when one happened (:meth:`_collect`).
            if err is not None:
                failures.append((err, msg.topic(), msg.key(), msg.value()))

        self.delivered = delivered

    # --- producing -------------------------------------------------------------------

    def output(self, topic: str, value: bytes | None, key: bytes | None, headers: Headers) -> None:
        """A handler's ``ctx.produce``: sent now, or held until the batch scope committed.

        A value over the producer's size limit raises :class:`MessageTooLarge` here, in the
        handler, so its message is dead-lettered with the reason instead of failing the batch:
        the producer refuses it in ``produce()``, and a held one is measured before it is held.
        """
        if self.held is not None:
            if value is not None and len(value) > self.max_bytes:
                raise MessageTooLarge(
                    f"a message of {len(value)} bytes to {topic!r} is over the producer's message.max.bytes"
                    f" ({self.max_bytes} bytes for the value)"
                )
            self.held.append((topic, value, key, headers, self.source, OUTPUT))
            return
        try:
            # Once per output: the producer called straight, the produce() helper only when its queue is full.
            try:
                self.producer.produce(topic, value, key, on_delivery=self.delivered, headers=headers or None)
            except BufferError:
                produce(self.producer, topic, value, key, headers, self.delivered)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if fatal(err):
                self.fatal = err
            if err.code() in REFUSED:
                size = len(value) if value is not None else 0
                raise MessageTooLarge(
                    f"the producer refused a message of {size} bytes to {topic!r} (message.max.bytes"
                    f" {self.max_bytes}): {err.str()}"
                ) from None
            raise
        self.sent.append((topic, key, value, self.source, OUTPUT))
        self.produced[topic] += 1

    def write(
        self, topic: str, value: bytes | None, key: bytes | None, headers: Headers, kind: str
    ) -> None:
        """The framework's own copy of :attr:`source` (a retry or a dead letter): held like outputs."""
        if self.held is not None:
            self.held.append((topic, value, key, headers, self.source, kind))
        else:
            self._send(topic, value, key, headers, self.source, kind)

    def mark(self) -> int:
        """Where the held outputs stand before a message is handled."""
        return len(self.held) if self.held is not None else 0

    def drop(self, mark: int) -> None:
        """Forget what a failed message produced, as its savepoint forgets what it wrote."""
        if self.held is not None:
            del self.held[mark:]

    def release(self) -> None:
        """The batch scope committed: produce what it held."""
        held, self.held = self.held or [], None
        for topic, value, key, headers, source, kind in held:
            self._send(topic, value, key, headers, source, kind)

    def discard(self) -> None:
        """The batch scope failed: nothing it held is produced."""
        self.held = None

    def _send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: Headers,
        source: Message,
        kind: str,
    ) -> None:
        try:
            produce(self.producer, topic, value, key, headers, self.delivered)
        except KafkaException as exc:
            self.refused(source, kind, topic, exc.args[0])
            return
        self.sent.append((topic, key, value, source, kind))
        self.produced[topic] += 1

    def refused(self, source: Message | None, kind: str, topic: str, err: KafkaError) -> None:
        """The producer or the broker refused a message: judged in :meth:`finish`."""
        if fatal(err):
            self.fatal = err
        self.refusals.append((source, kind, topic, err))

    def _collect(self) -> None:
        """After a flush: each failed delivery becomes a refusal of the consumed message whose
        output or copy it was, found in :attr:`sent` by topic, key and value. Outputs equal in
        all three are told apart by order only, which judges them alike: what the broker
        refuses for itself (its size, its format) it refuses in each of them."""
        if not self.failures:
            return
        failures = self.failures[:]
        self.failures.clear()
        waiting: dict[tuple[str, bytes | None, bytes | None], list[int]] = {}
        for i, (topic, key, value, _, _) in enumerate(self.sent):
            waiting.setdefault((topic, key, value), []).append(i)
        matched: set[int] = set()
        for err, topic, key, value in failures:
            found = waiting.get((topic, key, value))
            if found:
                i = found.pop(0)
                matched.add(i)
                self.refused(self.sent[i][3], self.sent[i][4], topic, err)
            else:
                self.refused(None, OUTPUT, topic, err)
        self.sent = [sent for i, sent in enumerate(self.sent) if i not in matched]

    # --- the end ---------------------------------------------------------------------

    def finish(self, flush: Callable[[], int]) -> None:
        """Flush, then store the batch's offsets, or dead-letter what the broker refused, or rewind.

        :param flush: waits for the producer's acknowledgements; returns how many are still
            missing (the worker stops waiting when it is stopping and its grace runs out).
        :raises ProducerFatal: the producer cannot produce again; nothing is stored.
        """
        if flush():
            if self.txn is not None:
                self._abort_transaction()
                return
            self.partitions.rewind(self.first, "stopping before what the batch produced was acknowledged")
            return
        self._collect()
        if self.fatal is not None:
            raise ProducerFatal(
                f"{self.plugin}: the producer failed fatally ({self.fatal.str()}); stopping without storing"
                " the batch's offsets, so a restarted worker handles it again"
            )
        if self.scope_error is not None:
            if self.txn is not None:
                self._abort_transaction()
                return
            self.partitions.rewind(self.first, f"its around_batch scope failed ({self.scope_error})")
            return
        if self.txn is not None:
            self._finish_transaction()
            return
        if self.refusals:
            self._judge_refusals(flush)
            return
        if self.last:
            self.partitions.store(self.last)

    def _finish_transaction(self) -> None:
        """Exactly-once: add the batch's offsets to the transaction and commit it when due; or,
        if anything of the batch was refused, abort it (every runner handles again what it
        held), the messages whose outputs the broker refused for themselves going straight
        to the dead-letter topic the next time."""
        txn = self.txn
        assert txn is not None
        if self.refusals:
            for source, kind, topic, err in self.refusals:
                if err.code() in REFUSED and self.poisoned is not None and source is not None:
                    spot = (source.topic() or "", source.partition() or 0, source.offset() or 0)
                    self.poisoned[spot] = MessageTooLarge(
                        f"the broker refused a message to {topic!r} ({kind}): {err.str()}"
                    )
            self._abort_transaction()
            return
        self._stage(txn, commit=True)
        if txn.due:
            txn.commit()
        self.partitions.settled()

    def _abort_transaction(self) -> None:
        """Abort the transaction with this batch's partitions in it, so all of it is handled again."""
        assert self.txn is not None
        self._stage(self.txn, commit=False)
        self.txn.abort()

    def _stage(self, txn: Transactions, commit: bool) -> None:
        """Add the batch's partitions to the transaction, per consumer: where an abort rewinds
        them to, and with ``commit`` the offsets the transaction commits."""
        by_consumer: dict[int, tuple[Consumer, dict[TP, int], dict[TP, int]]] = {}
        for tp, offset in self.first.items():
            consumer = self.partitions.consumer_of(tp[0])
            _, first, last = by_consumer.setdefault(id(consumer), (consumer, {}, {}))
            first[tp] = offset
            if commit and tp in self.last:
                last[tp] = self.last[tp]
        for consumer, first, last in by_consumer.values():
            txn.consumed(consumer, first, last)

    def _judge_refusals(self, flush: Callable[[], int]) -> None:
        """Dead-letter each message whose output or copy the broker refused for itself; any other
        refusal (an outage, a timeout) means the batch is handled again."""
        refusals, self.refusals = self.refusals, []
        # A refusal whose source is unknown cannot be dead-lettered: the batch is handled again.
        transient = [r for r in refusals if r[3].code() not in REFUSED or r[0] is None]
        if transient:
            _, _, topic, err = transient[0]
            reason = f"{len(transient)} produced message(s) were not acknowledged ({topic}: {err.str()})"
            self.partitions.rewind(self.first, reason)
            return
        seen: set[int] = set()
        for source, kind, topic, err in refusals:
            assert source is not None  # refusals without one are transient (above)
            if id(source) in seen:
                continue
            seen.add(id(source))
            error = MessageTooLarge(f"the broker refused a message to {topic!r} ({kind}): {err.str()}")
            original = source.topic()
            assert original is not None  # a source is a record, never a consumer error
            # A dead letter that was itself refused is sent again with no value: its headers
            # still say where the original bytes are.
            self.source = source
            self.router.dead_letter(source, original, error, self.write, keep=0 if kind == DLQ else None)
        waiting = flush()
        self._collect()
        if waiting or self.refusals:
            self.partitions.rewind(self.first, "the dead letters of refused messages were not acknowledged")
            return
        if self.last:
            self.partitions.store(self.last)

