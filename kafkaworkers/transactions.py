"""Exactly-once: what a batch produced and the offsets it consumed commit in one Kafka transaction.

In ``processing_guarantee = "exactly_once"`` a worker process has one transactional producer
(``transactional.id`` = its plugins, host and process index, stable across restarts, so a
restarted worker fences its zombie at once instead of after ``transaction.timeout.ms``).
A transaction holds one batch or, while batches come back full, up to ``transaction_interval_ms``
of them (the loop commits it as soon as the consumer has caught up): the handlers' outputs,
the retry-topic copies and dead letters, and the consumed offsets, sent with the consumer
group's metadata (KIP-447: a member that lost the group is fenced too). A ``read_committed``
reader sees all of it or none of it.

Errors, as librdkafka classifies them: a retriable one is retried; one that requires an
abort aborts the transaction and rewinds the partitions to the committed offsets, so the
batch is handled again; a fenced or fatal producer stops the worker (a supervisor restarts
it with a new producer). A call to the broker that has not returned well past its own timeout
stops the worker the same way: librdkafka can block in ``send_offsets_to_transaction`` for as
long as the dead group coordinator's broker stays down (confluentinc/librdkafka#5456, #5511),
and a restarted worker's new producer finds the new coordinator. A transaction open for longer
than most of ``transaction.timeout.ms`` is reported, never aborted in a loop.

Database effects are not part of the Kafka transaction: a batch scope commits the database
first, so a transaction aborted after it means the batch runs again against a database that
already has its effects. Those effects must be idempotent by event id (the order services'
are); the Kafka outputs are exactly once.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from kafkaworkers.errors import ProducerFatal
from kafkaworkers.transports import Consumer

__all__ = ["TRANSACTION_TIMEOUT_MS", "Transactions", "transactional_id"]

log = logging.getLogger(__name__)

TP = tuple[str, int]
#: The broker aborts a transaction open longer than this (librdkafka's default is 60 s).
TRANSACTION_TIMEOUT_MS = 60_000
_RETRIES = 5
_CALL_TIMEOUT = 30.0
#: How long past its own timeout a call to the broker may block before the producer is given up.
_HANG_MARGIN = 5.0


def transactional_id(groups: Sequence[str], index: int) -> str:
    """A worker's transactional id: the same consumer groups on the same host at the same
    process index get the same one, so a restart fences what it replaces, and nothing else."""
    return f"kw-{'.'.join(sorted(groups))}-{socket.gethostname()}-{index}"


class Transactions:
    """The worker's transactional producer and the transaction it has open.

    :param producer: a producer configured with ``transactional.id``.
    :param interval: seconds a transaction may gather batches before it commits (0: every batch).
    :param timeout_ms: the producer's ``transaction.timeout.ms``.
    :param clock: the monotonic clock.
    :param call_timeout: the timeout given to each call that reaches the broker.
    """

    def __init__(
        self, producer: Any, interval: float = 0.0, timeout_ms: int = TRANSACTION_TIMEOUT_MS,
        clock: Callable[[], float] = time.monotonic, call_timeout: float = _CALL_TIMEOUT,
    ) -> None:  # fmt: skip
        self.producer = producer
        self.call_timeout = call_timeout
        self.interval = interval
        self.timeout = timeout_ms / 1000
        self.clock = clock
        self.open = False
        self.started = 0.0
        #: per consumer: the first consumed offset of each partition in the open transaction
        #: (where an abort rewinds to) and the next offset to commit
        self.staged: dict[int, tuple[Consumer, dict[TP, int], dict[TP, int]]] = {}
        self._listeners: list[Callable[[Consumer, dict[TP, int]], None]] = []
        self._warned = False
        #: why the producer was given up (a call blocked past its timeout), if it was
        self._given_up = ""

    def start(self) -> None:
        """Register the transactional id with the coordinator, fencing an older producer with it."""
        timeout = self.call_timeout
        self._call(lambda: self.producer.init_transactions(timeout), "init_transactions", timeout)

    def begin(self) -> None:
        """Open a transaction unless one is open."""
        if self.open:
            self._check_age()
            return
        if self._given_up:
            raise ProducerFatal(self._given_up)
        self._call(self.producer.begin_transaction, "begin_transaction")
        self.open = True
        self.started = self.clock()
        self._warned = False

    def on_abort(self, listener: Callable[[Consumer, dict[TP, int]], None]) -> None:
        """Call ``listener(consumer, first offsets)`` for what an aborted transaction held, so
        the runner owning that consumer handles it again."""
        self._listeners.append(listener)

    def consumed(self, consumer: Consumer, first: dict[TP, int], last: dict[TP, int]) -> None:
        """Add consumed offsets to the transaction: the first and last offset of each partition
        (``last`` empty: offsets that only mark where an abort must rewind to)."""
        _, firsts, positions = self.staged.setdefault(id(consumer), (consumer, {}, {}))
        for tp, offset in first.items():
            firsts.setdefault(tp, offset)
        for tp, offset in last.items():
            positions[tp] = offset + 1

    @property
    def due(self) -> bool:
        """Whether the open transaction has gathered long enough to commit."""
        return self.open and self.clock() - self.started >= self.interval

    def commit(self) -> bool:
        """Send the consumed offsets and commit; False when it had to abort (rewind to :attr:`first`).

        :raises ProducerFatal: the producer is fenced or failed fatally.
        """
        if not self.open:
            return True
        timeout = self.call_timeout
        try:
            for consumer, _, positions in self.staged.values():
                if positions:
                    offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
                    metadata = consumer.consumer_group_metadata()
                    self._call(
                        lambda o=offsets, m=metadata: self.producer.send_offsets_to_transaction(o, m, timeout),  # type: ignore[misc]
                        "send_offsets_to_transaction",
                        timeout,
                    )
            self._call(lambda: self.producer.commit_transaction(timeout), "commit_transaction", timeout)
        except _Abortable as exc:
            log.warning("transaction aborted: %s; the batches in it are handled again", exc)
            self.abort()
            return False
        self._closed()
        return True

    def abort(self) -> None:
        """Abort the open transaction: nothing it produced becomes visible to read_committed
        readers, and every runner handles again what it held."""
        if not self.open:
            return
        staged = list(self.staged.values())
        timeout = self.call_timeout
        try:
            self._call(lambda: self.producer.abort_transaction(timeout), "abort_transaction", timeout)
        except _Abortable as exc:
            raise ProducerFatal(f"could not abort a transaction: {exc}") from None
        finally:
            self._closed()
        for consumer, first, _ in staged:
            for listener in self._listeners:
                listener(consumer, first)

    def _closed(self) -> None:
        self.open = False
        self.staged.clear()

    def _check_age(self) -> None:
        age = self.clock() - self.started
        if age > 0.8 * self.timeout and not self._warned:
            self._warned = True
            log.warning(
                "a transaction has been open for %.0f s, close to transaction.timeout.ms (%.0f s): a handler is slow;"
                " the broker aborts it at the timeout and the batch is handled again", age, self.timeout,
            )  # fmt: skip

    def _call(self, call: Callable[[], Any], what: str, timeout: float | None = None) -> Any:
        """Run a transactional call, retrying what librdkafka says is retriable; one that reaches
        the broker (``timeout``: its own) may block for ``_HANG_MARGIN`` more, no longer."""
        for attempt in range(_RETRIES):
            try:
                return call() if timeout is None else self._bounded(call, what, timeout + _HANG_MARGIN)
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if err.fatal() or err.code() in _FENCED:
                    raise ProducerFatal(
                        f"{what}: the transactional producer is fenced or failed ({err.str()}); another worker"
                        " with this transactional id took over, or the producer cannot go on: stopping"
                    ) from None
                if err.txn_requires_abort():
                    raise _Abortable(f"{what}: {err.str()}") from None
                if err.retriable() and attempt < _RETRIES - 1:
                    log.info("%s failed (%s); retrying", what, err.str())
                    continue
                raise _Abortable(f"{what}: {err.str()}") from None
        raise AssertionError("unreachable")

    def _bounded(self, call: Callable[[], Any], what: str, wait: float) -> Any:
        """``call()`` on a thread of its own, waited for at most ``wait`` seconds: past that the
        producer is given up (the thread is left blocked in librdkafka) and the worker stops."""
        outcome: list[Any] = []

        def run() -> None:
            try:
                outcome.append((True, call()))
            except BaseException as exc:  # raised again on the caller's thread
                outcome.append((False, exc))

        thread = threading.Thread(target=run, name=f"kw-{what}", daemon=True)
        thread.start()
        thread.join(wait)
        if not outcome:
            # Nothing may use this producer again: its transaction stays open on the broker
            # until the new producer's init_transactions (same transactional id) aborts it.
            self._closed()
            self._given_up = (
                f"{what} did not return within {wait:.0f} s (librdkafka can block while the transaction's or the"
                " group's coordinator is down: confluentinc/librdkafka#5511); stopping without storing, so a"
                " restarted worker's new producer finds the new coordinator and handles the rest"
            )
            raise ProducerFatal(self._given_up)
        returned, value = outcome[0]
        if not returned:
            raise value
        return value


class _Abortable(Exception):
    """A transactional call failed in a way that an abort (and handling the batch again) resolves."""


_FENCED = frozenset(
    {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH, KafkaError._FATAL}
)
