"""Concurrency inside one worker: up to N messages of a plugin in flight, in order per key.

At concurrency N > 1 the loop never waits for a handler. Each fetched message joins its
lane (its key on its partition; the whole partition, or nothing, if the plugin asks for that
order); a lane runs one message at a time, in offset order, and at most N run at once: sync
handlers on a thread pool, ``async def`` handlers on an event loop the worker owns. The loop
keeps polling, so heartbeats and ``max.poll.interval.ms`` never depend on handler time.

Handlers never wait for the loop: up to N more lane heads wait for a slot (in the pool's
queue, or for the event loop's semaphore), so a handler that finishes lets the next start at
once, and it wakes the loop only when few are left waiting; otherwise the loop gathers what
finished every few milliseconds. A message still waiting for a slot is never started once
its partition is revoked, rewound or shutting down.

What a handler produces is held with its message and sent from the loop's thread once the
handler returned (a failed handler's outputs are never sent). A message is *finished* when
its handler returned, or its failure was routed, and everything that produced is
acknowledged. A partition's offset is stored only up to the end of the unbroken run of
finished messages (Faust's rule: never the highest finished one), so a crash at any moment
redelivers from the first unfinished message and loses nothing.

A partition whose accepted-but-unfinished messages exceed the buffer is paused until half
of them finished, so memory stays bounded. An open breaker, a retry in place or an
unacknowledged output rewinds the partition to its first unfinished message: messages not
started yet are dropped and fetched again; the finished ones among them are not handled
twice. On revoke the partitions' messages in flight get a bounded time to finish, what
finished is stored, and the rest is left to the new owner; on loss they are dropped at once.

A batch scope (``around_batch``) is not entered at concurrency > 1: a database transaction
cannot span handlers running on several threads. Each message's own transaction commits it
(the order services' ``Store.transaction()`` outside a batch), on its thread's connection.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

import msgspec
from confluent_kafka import KafkaError, TopicPartition

from kafkaworkers.api import Context
from kafkaworkers.batch import REFUSED, RETRY_IN_PLACE, RETRY_NOT_DUE, fatal, pause_reason
from kafkaworkers.errors import (
    CircuitOpenError,
    DecodeError,
    MessageTooLarge,
    PluginError,
    ProducerFatal,
    StoreConflict,
)
from kafkaworkers.headers import H_DUE, H_ORIGINAL_TOPIC, number, parse_headers
from kafkaworkers.producer import produce
from kafkaworkers.retry import DLQ, OUTPUT
from kafkaworkers.transports import Headers, Message

if TYPE_CHECKING:
    from kafkaworkers.worker import PluginRunner, _Route

__all__ = ["BUFFER_FULL", "GATHER_WAIT", "Dispatcher", "EventLoopThread"]

log = logging.getLogger(__name__)

TP = tuple[str, int]
#: Why a partition is paused by back-pressure.
BUFFER_FULL = "buffer full"
_REWIND_BACKOFF = (0.5, 30.0)
#: Exactly-once at concurrency > 1: the shortest time a transaction gathers finished runs.
_MIN_TXN_INTERVAL = 0.1
#: While handlers finish without waking the loop, the longest it leaves what they produced
#: unsent: about librdkafka's own ``linger.ms`` default.
GATHER_WAIT = 0.005


class Job:
    """One message in flight: its handler's outcome, what it produced, what is still unacknowledged."""

    __slots__ = (
        "abandoned",
        "attempt",
        "deferred",
        "error",
        "finished",
        "lane",
        "limit",
        "msg",
        "offset",
        "outputs",
        "pending",
        "route",
        "seconds",
        "started",
        "tp",
        "value",
    )

    def __init__(self, msg: Message, tp: TP, offset: int, route: _Route, lane: object, limit: int) -> None:
        self.msg = msg
        self.tp = tp
        self.offset = offset
        self.route = route
        self.lane = lane
        self.limit = limit
        self.value: Any = None
        self.attempt = 0
        self.error: BaseException | None = None
        self.outputs: list[tuple[str, bytes | None, bytes | None, Headers]] = []
        self.pending = 0
        self.finished = False
        self.abandoned = False
        #: its handler was called (set on the thread that calls it, under the dispatcher's claims lock)
        self.started = False
        self.seconds = 0.0
        #: exactly-once: what it produced, sent in a transaction once its offset commits with it
        self.deferred: list[tuple[str, bytes | None, bytes | None, Headers, str]] = []

    def output(self, topic: str, value: bytes | None, key: bytes | None, headers: Headers) -> None:
        """A handler's ``ctx.produce``: held with the message, sent once the handler returned."""
        if value is not None and len(value) > self.limit:
            raise MessageTooLarge(
                f"a message of {len(value)} bytes to {topic!r} is over the producer's message.max.bytes"
                f" ({self.limit} bytes for the value)"
            )
        self.outputs.append((topic, value, key, headers))


class _Track:
    """One partition's accepted offsets in order, which are finished, which are in flight."""

    __slots__ = ("done", "full", "high", "inflight", "jobs", "offsets", "open")

    def __init__(self) -> None:
        self.offsets: deque[int] = deque()
        self.done: set[int] = set()
        #: exactly-once: finished jobs whose outputs wait for their offsets to commit
        self.jobs: dict[int, Job] = {}
        self.inflight: set[int] = set()
        self.high = -1
        self.open = 0
        self.full = False

    def advance(self) -> int | None:
        """Drop the finished run at the front; the last offset of it, if there was one."""
        run = self.run()
        return run[-1] if run else None

    def run(self) -> list[int]:
        """Drop the finished run at the front and return its offsets."""
        run = []
        offsets, done = self.offsets, self.done
        while offsets and offsets[0] in done:
            offset = offsets.popleft()
            done.discard(offset)
            run.append(offset)
        return run

    def first_unfinished(self) -> int:
        """Where the partition would be handled from again. Finished offsets are not dropped
        here: they must still be stored (or, exactly-once, their outputs sent) in order."""
        for offset in self.offsets:
            if offset not in self.done:
                return offset
        return self.high + 1


class _Ack:
    """The delivery callback of one message a job produced."""

    __slots__ = ("dispatcher", "job", "kind")

    def __init__(self, dispatcher: Dispatcher, job: Job, kind: str) -> None:
        self.dispatcher = dispatcher
        self.job = job
        self.kind = kind

    def __call__(self, err: KafkaError | None, msg: Any) -> None:
        self.dispatcher.acknowledged(self.job, self.kind, err)


class Dispatcher:
    """Runs one plugin's messages concurrently for its :class:`~kafkaworkers.worker.PluginRunner`.

    :param runner: the plugin's runner: its consumers, routes, failure router and partitions.
    :param concurrency: at most this many messages in flight at once.
    :param buffer: accepted but unfinished messages per partition before it is paused.
    :param revoke_timeout: how long a revoke waits for the revoked partitions' messages.
    :param wakeup: set whenever a handler finishes, for a loop waiting on several plugins.
    """

    def __init__(
        self, runner: PluginRunner, concurrency: int, buffer: int, revoke_timeout: float, wakeup: threading.Event
    ) -> None:
        self.runner = runner
        self.plugin = runner.plugin
        self.concurrency = concurrency
        self.buffer = buffer
        self.revoke_timeout = revoke_timeout
        self.ordering = runner.plugin.ordering
        self.tracks: dict[TP, _Track] = {}
        self.lanes: dict[object, deque[Job]] = {}
        self.busy: set[object] = set()
        self.ready: deque[object] = deque()
        self.running = 0
        self.completed: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.wakeup = wakeup
        self.fatal: KafkaError | None = None
        self._advanced: set[TP] = set()
        self._backoff: dict[TP, float] = {}
        self._pool: _Pool | None = None
        # Jobs submitted ahead wait for a pool thread or for a permit of ``_slots``, so never more
        # than N run at once. A plugin that mixes sync and async handlers has both kinds of
        # slot, N each: it queues nothing ahead and takes at most N at once.
        kinds = {route.asynchronous for route in runner.routes.values()}
        self._ahead = concurrency if len(kinds) == 1 else 0
        self._low = concurrency // 2
        self._claims = threading.Lock()
        self._slots = asyncio.Semaphore(concurrency)
        # Async jobs submitted and taken up: each counted by one thread, so neither count races.
        self._async_submitted = 0
        self._async_taken = 0
        self.loop = EventLoopThread(self.plugin.name)
        #: exactly-once: the worker's transactions; messages in flight commit in them as their runs close
        self.txn = runner.txn
        self._commit_every = max(self.txn.interval, _MIN_TXN_INTERVAL) if self.txn is not None else 0.0

    # --- the loop's step ---------------------------------------------------------------

    def step(self, timeout: float) -> int:
        """Accept what is waiting, start what may start, finish what completed; the messages accepted."""
        runner = self.runner
        if runner.partitions.paused:
            runner.partitions.resume_due()
        messages = runner._fetch(timeout)
        if messages:
            if runner._hook_batch:
                runner.host.batch_received(self.plugin, messages)
            self._accept(messages)
        self._start_ready()
        self.finish_completed()
        runner.producer.poll(0)
        self._check_fatal()
        self._store()
        if messages:
            runner._publish_counts(len(messages))
        return len(messages)

    @property
    def gathering(self) -> bool:
        """Whether handlers are finishing without waking the loop for each."""
        return self._waiting() > self._low

    def _waiting(self) -> int:
        """Submitted jobs waiting for a slot."""
        pool = self._pool
        return (pool.waiting() if pool is not None else 0) + self._async_submitted - self._async_taken

    @property
    def in_flight(self) -> int:
        """Messages accepted and not finished, over every partition."""
        return sum(track.open for track in self.tracks.values())

    def _accept(self, messages: list[Message]) -> None:
        runner = self.runner
        routes = runner.routes
        tracks = self.tracks
        limit = runner.router.max_bytes
        ordering = self.ordering
        rewound: set[TP] = set()
        for msg in messages:
            err = msg.error()
            if err is not None:
                runner._consumer_error(err)
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and partition is not None and offset is not None  # a record
            tp = (topic, partition)
            if tp in rewound:
                continue
            track = tracks.get(tp)
            if track is None:
                track = tracks[tp] = _Track()
            if offset <= track.high:
                continue  # fetched again after a pause or rewind: already accepted
            route = routes.get(topic)
            if route is None:
                route, due = self._retry_route(msg)
                if due is not None:
                    # Wait here for this message; what came before it in the partition stays as it is.
                    rewound.add(tp)
                    start = min(track.first_unfinished(), offset) if track.offsets else offset
                    self.rewind(tp, due, RETRY_NOT_DUE, quiet=True, start=start)
                    continue
            track.high = offset
            track.offsets.append(offset)
            if offset in track.done or offset in track.inflight:
                continue  # finished or still running since before a rewind
            track.open += 1
            route.consumed += 1
            lane: object = (tp, msg.key()) if ordering == "key" else tp if ordering == "partition" else None
            job = Job(msg, tp, offset, route, lane, limit)
            in_place = runner._in_place.get(tp) if runner._in_place else None
            if in_place is not None and in_place[0] == offset:
                job.attempt = in_place[1] + 1
            track.inflight.add(offset)
            if route is _UNROUTABLE:
                job.error = PluginError(f"no handler for original topic {_original(msg)!r}")
                self._finish(job)
                continue
            try:
                job.value = _decode(route, msg)
            except DecodeError as exc:
                job.error = exc
                self._finish(job)
                continue
            if lane is None:
                job.lane = job
            queued = self.lanes.get(job.lane)
            if queued is None:
                queued = self.lanes[job.lane] = deque()
            queued.append(job)
            if job.lane not in self.busy and len(queued) == 1:
                self.ready.append(job.lane)
        for tp, track in tracks.items():
            if not track.full and track.open > self.buffer and tp not in rewound:
                track.full = True
                runner.partitions.pause(tp, track.high + 1, float("inf"), BUFFER_FULL, quiet=True)

    def _retry_route(self, msg: Message) -> tuple[_Route, float | None]:
        """A retry-topic message's route, and the monotonic time it is due if that is later."""
        runner = self.runner
        headers = parse_headers(msg.headers())
        wait = number(headers.get(H_DUE)) / 1000 - runner.clock.time()
        if wait > 0:
            return _UNROUTABLE, runner.clock.monotonic() + wait
        route = runner.routes.get(_original(msg))
        return (route if route is not None else _UNROUTABLE), None

    # --- running handlers --------------------------------------------------------------

    def _start_ready(self) -> None:
        ready, lanes, busy = self.ready, self.lanes, self.busy
        limit = self.concurrency + self._ahead
        while ready and self.running < limit:
            lane = ready.popleft()
            queued = lanes.get(lane)
            if not queued or lane in busy:
                continue
            job = queued[0]
            busy.add(lane)
            self.running += 1
            self._submit(job)

    def _submit(self, job: Job) -> None:
        runner = self.runner
        send = runner.producing(job.output) if runner._hook_producing else job.output
        ctx = Context(self.plugin, job.msg, send, runner.state, job.attempt)
        if job.route.asynchronous:
            self._async_submitted += 1
            self.loop.submit(self._run_async(job, ctx))
            return
        if self._pool is None:
            self._pool = _Pool(self.concurrency, f"kw-{self.plugin.name}", self._run)
        self._pool.submit(job, ctx)

    def _claim(self, job: Job) -> bool:
        """On the handler's thread, before it runs: False if the loop gave the job up meanwhile."""
        with self._claims:
            job.started = not job.abandoned
        return job.started

    def _cancel(self, job: Job) -> bool:
        """On the loop's thread: give up a submitted job unless its handler started; whether it did."""
        with self._claims:
            if not job.started:
                job.abandoned = True
        return not job.started

    def _run(self, job: Job, ctx: Context[Any]) -> None:
        """On a pool thread: the handler, timed; the job goes back to the loop's thread."""
        if self._claim(job):
            self._call(job, ctx)
        self._returned(job)

    def _returned(self, job: Job) -> None:
        """Hand a job back to the loop; wake it unless enough others wait to keep handlers busy."""
        self.completed.put(job)
        if self._ahead == 0 or self._waiting() <= self._low:
            self.wakeup.set()

    def _call(self, job: Job, ctx: Context[Any]) -> None:
        start = time.perf_counter()
        try:
            if self.runner._hook_scope:
                with self.runner.host.message_scope(self.plugin, job.msg):
                    job.route.handler(job.value, ctx)
            else:
                job.route.handler(job.value, ctx)
        except BaseException as exc:  # the loop's thread routes it, as the sync loop does
            job.error = exc
        job.seconds = time.perf_counter() - start

    async def _run_async(self, job: Job, ctx: Context[Any]) -> None:
        async with self._slots:
            self._async_taken += 1
            if self._claim(job):
                await self._call_async(job, ctx)
        self._returned(job)

    async def _call_async(self, job: Job, ctx: Context[Any]) -> None:
        start = time.perf_counter()
        try:
            if self.runner._hook_scope:
                # Entered in this task: the context variables it sets stay with the handler's awaits.
                with self.runner.host.message_scope(self.plugin, job.msg):
                    pending = job.route.handler(job.value, ctx)
                    if pending is not None:
                        await pending
            else:
                pending = job.route.handler(job.value, ctx)
                if pending is not None:
                    await pending
        except BaseException as exc:
            job.error = exc
        job.seconds = time.perf_counter() - start

    # --- finishing ---------------------------------------------------------------------

    def finish_completed(self, wait: float = 0.0) -> int:
        """Handle every job whose handler returned; wait up to ``wait`` seconds for the first."""
        count = 0
        try:
            job = self.completed.get(timeout=wait) if wait > 0 else self.completed.get_nowait()
        except queue.Empty:
            return 0
        while True:
            self._completed(job)
            count += 1
            try:
                job = self.completed.get_nowait()
            except queue.Empty:
                return count

    def _completed(self, job: Job) -> None:
        """A handler returned or raised: free its lane, then send what it produced or route its failure."""
        self.running -= 1
        lane = job.lane
        self.busy.discard(lane)
        queued = self.lanes.get(lane)
        if queued and queued[0] is job:
            queued.popleft()
            if queued:
                self.ready.append(lane)
            else:
                del self.lanes[lane]
        self._start_ready()
        if job.abandoned:
            return
        if job.route.duration is not None:
            job.route.duration.observe(job.seconds)
        self._finish(job)

    def _finish(self, job: Job) -> None:
        """Send a returned handler's outputs, or route its failure; the job is done once acknowledged."""
        runner = self.runner
        error = job.error
        if error is None:
            job.route.ok += 1
            if runner._in_place:
                runner._in_place.pop(job.tp, None)
            if runner._hook_handled:
                runner.host.message_handled(self.plugin, job.msg, job.value)
            for topic, value, key, headers in job.outputs:
                self._produce(job, topic, value, key, headers, OUTPUT)
        elif isinstance(error, CircuitOpenError | StoreConflict):
            self.rewind(job.tp, error.retry_at, pause_reason(error), job=job)
            if runner._hook_failed:
                runner.host.message_failed(self.plugin, job.msg, error, "paused")
            return
        elif not isinstance(error, Exception):
            raise error  # KeyboardInterrupt, SystemExit: not the message's fault
        else:
            if not self._fail(job, error):
                return
        job.outputs = []
        job.finished = True
        if job.pending == 0:
            self._done(job)

    def _fail(self, job: Job, error: Exception) -> bool:
        """Route a failure by the retry policy; False when the partition waits to retry it in place."""
        runner = self.runner
        policy = runner.router.policy
        attempt = job.attempt or 1 if policy.mode == "pause" else 0
        decision = runner.router.fail(job.msg, job.route.topic, error, lambda *copy: self._produce(job, *copy), attempt)
        if decision.action == "retry" and not runner.router.retry_topics:
            runner._in_place[job.tp] = (job.offset, attempt)
            until = runner.clock.monotonic() + decision.delay
            self.rewind(job.tp, until, f"{RETRY_IN_PLACE} (attempt {attempt})", job=job, quiet=True)
            outcome = "paused"
        elif decision.action == "retry":
            job.route.retried += 1
            outcome = "retried"
        else:
            runner._in_place.pop(job.tp, None)
            job.route.dead += 1
            outcome = "dead_lettered"
        if runner._hook_failed:
            runner.host.message_failed(self.plugin, job.msg, error, outcome)
        return outcome != "paused"

    def _produce(
        self, job: Job, topic: str, value: bytes | None, key: bytes | None, headers: Headers, kind: str
    ) -> None:
        """Send one message ``job`` produced, counted until the broker acknowledges it (exactly-once:
        held until the job's offset commits, in the same transaction)."""
        if self.txn is not None:
            job.deferred.append((topic, value, key, headers, kind))
            return
        job.pending += 1
        try:
            produce(self.runner.producer, topic, value, key, headers, on_delivery=_Ack(self, job, kind))
        except Exception as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else KafkaError(KafkaError._FAIL)
            self.acknowledged(job, kind, err)
            return
        self.runner._produced[topic] += 1

    def acknowledged(self, job: Job, kind: str, err: KafkaError | None) -> None:
        """A produced message was acknowledged, or refused: for a refusal of the message itself,
        its source is dead-lettered; for an outage, its partition is rewound."""
        job.pending -= 1
        if job.abandoned:
            return
        if err is not None:
            if fatal(err):
                self.fatal = err
                return
            if err.code() in REFUSED:
                error = MessageTooLarge(f"the broker refused a message to {job.route.topic!r} ({kind}): {err.str()}")
                keep = 0 if kind == DLQ else None
                self.runner.router.dead_letter(job.msg, job.msg.topic() or "", error,
                                               lambda *copy: self._produce(job, *copy), keep=keep)  # fmt: skip
                return
            self.rewind(job.tp, None, f"a produced message was not acknowledged ({err.str()})", job=job)
            return
        if job.finished and job.pending == 0:
            self._done(job)

    def _done(self, job: Job) -> None:
        track = self.tracks.get(job.tp)
        if track is None or job.offset not in track.inflight:
            return
        track.inflight.discard(job.offset)
        track.done.add(job.offset)
        if job.deferred:
            track.jobs[job.offset] = job
        track.open -= 1
        self._advanced.add(job.tp)
        if track.full and track.open <= self.buffer // 2:
            track.full = False
            self.runner.partitions.resume(job.tp)

    def _store(self) -> None:
        """Store each partition's offset up to its unbroken run of finished messages."""
        if self.txn is not None:
            self._stage()
            return
        if not self._advanced:
            return
        last: dict[TP, int] = {}
        for tp in self._advanced:
            track = self.tracks.get(tp)
            offset = track.advance() if track is not None else None
            if offset is not None:
                last[tp] = offset
                self._backoff.pop(tp, None)
        self._advanced.clear()
        if last:
            self.runner.partitions.store(last)

    def _stage(self) -> None:
        """Exactly-once: put each partition's closed run (its outputs and its offsets) in the
        transaction, and commit the transaction when it has gathered long enough."""
        txn = self.txn
        assert txn is not None
        runs: dict[TP, list[int]] = {}
        for tp in self._advanced:
            track = self.tracks.get(tp)
            run = track.run() if track is not None else []
            if run:
                runs[tp] = run
                self._backoff.pop(tp, None)
        self._advanced.clear()
        if runs:
            txn.begin()
            refused = False
            by_consumer: dict[int, tuple[Any, dict[TP, int], dict[TP, int]]] = {}
            for tp, run in runs.items():
                jobs = self.tracks[tp].jobs
                for offset in run:
                    job = jobs.pop(offset, None)
                    for topic, value, key, headers, _ in job.deferred if job is not None else ():
                        refused |= not self._send_in_transaction(topic, value, key, headers)
                consumer = self.runner.partitions.consumer_of(tp[0])
                _, first, last = by_consumer.setdefault(id(consumer), (consumer, {}, {}))
                first[tp], last[tp] = run[0], run[-1]
            for consumer, first, last in by_consumer.values():
                txn.consumed(consumer, first, last if not refused else {})
            if refused:
                txn.abort()
                return
        if txn.open and txn.clock() - txn.started >= self._commit_every:
            txn.commit()

    def _send_in_transaction(self, topic: str, value: bytes | None, key: bytes | None, headers: Headers) -> bool:
        try:
            produce(self.runner.producer, topic, value, key, headers)
        except Exception as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            log.warning("%s: a message to %s was refused in a transaction (%s); aborting it",
                        self.plugin.name, topic, err.str() if err is not None else exc)  # fmt: skip
            return False
        self.runner._produced[topic] += 1
        return True

    def rewound(self, first: dict[TP, int]) -> None:
        """A transaction was aborted: handle again, from ``first``, what it held of these partitions."""
        for tp, start in first.items():
            self.rewind(tp, None, "its transaction was aborted", start=start)

    def _check_fatal(self) -> None:
        if self.fatal is not None:
            raise ProducerFatal(
                f"{self.plugin.name}: the producer failed fatally ({self.fatal.str()}); stopping without storing"
                " the offsets of what was in flight, so a restarted worker handles it again"
            )

    # --- rewinds, rebalances, shutdown ---------------------------------------------------

    def rewind(
        self, tp: TP, until: float | None, reason: str, job: Job | None = None, quiet: bool = False,
        start: int | None = None,
    ) -> None:  # fmt: skip
        """Pause ``tp`` at its first unfinished message (or ``start``) until ``until`` (a growing
        backoff when ``None``): what was not started is dropped and fetched again after."""
        track = self.tracks.get(tp)
        if track is None:
            return
        if job is not None and not job.abandoned:
            # Handled again from the fetch; its running copy's late results (or, if it had
            # finished, its other acknowledgements) are ignored.
            job.abandoned = True
            track.inflight.discard(job.offset)
            track.open -= 1
        if start is None:
            start = track.first_unfinished()
        self._drop_queued(tp, track)
        self._cancel_waiting({tp})
        # What finished before ``start`` stays, to be stored (or sent, exactly-once) in order;
        # from ``start`` on, the partition is fetched again.
        track.offsets = deque(offset for offset in track.offsets if offset < start)
        track.high = start - 1
        track.full = False
        if until is None:
            backoff = min(max(self._backoff.get(tp, 0.0) * 2, _REWIND_BACKOFF[0]), _REWIND_BACKOFF[1])
            self._backoff[tp] = backoff
            until = self.runner.clock.monotonic() + backoff
        self.runner.partitions.pause(tp, start, until, reason, quiet=quiet)

    def _drop_queued(self, tp: TP, track: _Track) -> None:
        # A lane's jobs share a partition, and an empty lane is deleted: its head says which.
        for lane in [lane for lane, queued in self.lanes.items() if queued and queued[0].tp == tp]:
            queued = self.lanes[lane]
            keep = [job for job in queued if lane in self.busy and job is queued[0]]
            for job in queued:
                if job not in keep:
                    track.inflight.discard(job.offset)
                    track.open -= 1
            if keep:
                self.lanes[lane] = deque(keep)
            else:
                del self.lanes[lane]

    def _cancel_waiting(self, tps: set[TP] | None) -> None:
        """Give up the submitted jobs of ``tps`` (all if ``None``) whose handlers have not started.

        They stay at their lanes' heads until the pool hands them back unrun, so a message of
        the same lane fetched again meanwhile still waits its turn; their offsets are unfinished.
        """
        for lane in self.busy:
            queued = self.lanes.get(lane)
            job = queued[0] if queued else None
            if job is None or job.abandoned or (tps is not None and job.tp not in tps) or not self._cancel(job):
                continue
            track = self.tracks.get(job.tp)
            if track is not None and job.offset in track.inflight:
                track.inflight.discard(job.offset)
                track.open -= 1

    def revoked(self, partitions: Iterable[TopicPartition], lost: bool = False) -> None:
        """Revoked partitions: give the messages accepted from them a bounded time to finish,
        store what finished, leave the rest to the new owner. Lost ones: drop at once
        (another member owns them already)."""
        tps = {(tp.topic, tp.partition) for tp in partitions} & set(self.tracks)
        if not tps:
            return
        if not lost:
            # All of what was accepted, not only what runs: a message dropped from a lane would
            # leave a gap, and the new owner would redo the finished messages after it.
            deadline = time.monotonic() + self.revoke_timeout
            while any(self.tracks[tp].open for tp in tps) and time.monotonic() < deadline:
                self._start_ready()
                self.finish_completed(wait=0.01)
                self.runner.producer.poll(0)
            self._advanced.update(tps)
            self._store()
        for tp in tps:
            self._drop_queued(tp, self.tracks[tp])
        abandoned = 0
        for tp in tps:
            abandoned += len(self.tracks.pop(tp).inflight)
        with self._claims:  # so no queued one starts after the revoke returns
            for job in self._jobs_of(tps):
                job.abandoned = True
        if abandoned:
            log.warning("%s: left %d message(s) in flight to the partitions' next owner", self.plugin.name, abandoned)

    def _jobs_of(self, tps: set[TP]) -> list[Job]:
        return [job for queued in self.lanes.values() for job in queued if job.tp in tps]

    def drain(self, deadline: float) -> None:
        """Shutdown: nothing new starts; what is in flight may finish until ``deadline``, and the
        unbroken run of finished messages is stored. The rest is handled again after a restart."""
        for tp, track in self.tracks.items():
            self._drop_queued(tp, track)
        self._cancel_waiting(None)
        self.ready.clear()
        while any(track.inflight for track in self.tracks.values()) and time.monotonic() < deadline:
            self.finish_completed(wait=0.05)
            self.runner.producer.poll(0)
        self._advanced.update(self.tracks)
        self._store()
        left = sum(len(track.inflight) for track in self.tracks.values())
        if left:
            log.warning("%s: %d message(s) unfinished at the end of the grace; they will be handled again",
                        self.plugin.name, left)  # fmt: skip
        self.close()

    def close(self) -> None:
        """Stop the pool and the event loop; handlers still running are left to finish unseen."""
        self._cancel_waiting(None)
        if self._pool is not None:
            self._pool.close()
        self.loop.close()


class _Pool:
    """``size`` daemon threads running sync handlers.

    Not a ``ThreadPoolExecutor``: Python joins its threads at exit, so a handler stuck past
    the shutdown grace would keep the process from exiting; these are abandoned instead.
    """

    def __init__(self, size: int, name: str, run: Callable[[Job, Context[Any]], None]) -> None:
        self._jobs: queue.SimpleQueue[tuple[Job, Context[Any]] | None] = queue.SimpleQueue()
        self._run = run
        self._size = size
        for index in range(size):
            threading.Thread(target=self._serve, name=f"{name}-{index}", daemon=True).start()

    def submit(self, job: Job, ctx: Context[Any]) -> None:
        self._jobs.put((job, ctx))

    def waiting(self) -> int:
        """Jobs submitted and not yet taken by a thread."""
        return self._jobs.qsize()

    def close(self) -> None:
        """Let the threads end once they are idle."""
        for _ in range(self._size):
            self._jobs.put(None)

    def _serve(self) -> None:
        while (item := self._jobs.get()) is not None:
            self._run(*item)


class EventLoopThread:
    """An event loop the worker owns, on a thread of its own, for ``async def`` handlers.

    Started on first use, so a plugin without async handlers never starts it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Schedule ``coroutine`` on the loop without waiting for it."""
        asyncio.run_coroutine_threadsafe(coroutine, self._started())

    def run(self, awaitable: Awaitable[None] | None) -> None:
        """Run an ``async def`` handler's awaitable on the loop and wait for it (concurrency 1)."""
        if awaitable is not None:
            asyncio.run_coroutine_threadsafe(_awaited(awaitable), self._started()).result()

    def close(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None

    def _started(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name=f"kw-{self.name}-asyncio", daemon=True).start()
            self._loop = loop
        return self._loop


_UNROUTABLE: Any = object()  # a retry message this plugin has no handler for: dead-lettered


async def _awaited(awaitable: Awaitable[None]) -> None:
    await awaitable


def _original(msg: Message) -> str:
    return parse_headers(msg.headers()).get(H_ORIGINAL_TOPIC, b"").decode("utf-8", "replace")


def _decode(route: _Route, msg: Message) -> Any:
    raw = msg.value()
    if raw is None:
        raise DecodeError("null value (tombstone): a message must carry a body")
    try:
        return route.decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise DecodeError(f"not a valid {route.type_name}: {exc}") from None

