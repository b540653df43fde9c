"""The kafkaworkers contender's plugin and observer, installed through a dist-info on PYTHONPATH.

``BENCH_SPEC`` names the run: the orders topic, the result topic, how many orders to finish.
Two shapes, chosen by ``spec.options["mode"]``:

* ``process`` (W3, W4): decode ``PedidoNovo``, produce one ``PedidoProcessado``; with
  ``fail_pct`` set, that share of the orders raises on its first attempt and comes back
  through the retry topic. After ``target`` orders the worker is asked to stop: it finishes
  the batch in hand (flush, store offsets) and the measured window closes.
* ``payments`` (W3-small, ``spec.options["data"] == "payments"``): the same, on the small
  flat ``Pagamento``, producing a ``PagamentoResumo``.
* ``w6`` (W6): W3-small's work plus a call to the bench's local HTTP server (20 ms) per
  message, from a sync handler (``http.client``, one keep-alive connection per handler
  thread) or an ``async def`` one (aiohttp, one session on the worker's event loop), as
  ``spec.options["io"]`` says; the concurrency is ``kafkaworkers run --concurrency N``. The
  window closes when the ``target``-th handler returns.
* ``w7`` (W7): W3's work in each process of ``kafkaworkers run --processes N``; no process
  knows the total, so each writes its progress (count, first and latest handling time, CPU)
  to ``<result file>.<pid>`` every 500 orders, and the bench stops the supervisor once the
  processes together handled ``target`` (:func:`bench.run.run_w7`).
* ``passthrough`` (W5 without the order pipeline): produce a ``ProcessoPicking`` iniciado
  per order, until SIGTERM.

The observer implements ``kafkaworkers_batch_received`` (so the per-batch hook path is
exercised, as with any installed observer) and closes the window when the worker stops.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import Meter, Spec
from bench.orders import (
    Pagamento,
    PagamentoResumo,
    PedidoNovo,
    PedidoProcessado,
    ProcessoPicking,
    fails_once,
    process,
    summarize,
)
from kafkaworkers import Context, Plugin, RetryPolicy, hookimpl

spec = Spec.load()
MODE = spec.options.get("mode", "process")


class State:
    """What the handler and the observer share within the worker process."""

    def __init__(self) -> None:
        self.meter = Meter(spec)
        self.done = 0
        self.batches = 0
        self.messages = 0
        self.finished = False
        self.reported = False
        self.worker: Any = None
        #: W4: when the last order was finished on its first attempt (the rest is the retry tail).
        self.last_first_attempt: float | None = None


state = State()

if MODE == "w6":
    import threading

    from bench.w6 import AsyncCaller, SyncCaller

    OUT = spec.out_topic
    TARGET = spec.target
    plugin = Plugin("bench-orders", produces={OUT: PagamentoResumo}, description="W6: 20 ms of I/O per message")
    lock = threading.Lock()

    def w6_done() -> None:
        with lock:
            state.done += 1
            if state.done == TARGET:
                state.meter.stop(state.done)
                state.finished = True
                if state.worker is not None:
                    state.worker.stop()

    if spec.options.get("io") == "async":
        caller = AsyncCaller(spec.options["url"])

        @plugin.consumes(spec.topic, Pagamento)
        async def handle_w6_async(payment: Pagamento, ctx: Context) -> None:
            state.meter.start()
            await caller.call(payment.order_id)
            ctx.produce(OUT, summarize(payment))
            w6_done()

    else:
        sync_caller = SyncCaller(spec.options["url"])

        @plugin.consumes(spec.topic, Pagamento)
        def handle_w6(payment: Pagamento, ctx: Context) -> None:
            state.meter.start()
            sync_caller.call(payment.order_id)
            ctx.produce(OUT, summarize(payment))
            w6_done()

elif MODE == "w7":
    import json
    import os
    import resource

    OUT = spec.out_topic
    plugin = Plugin("bench-orders", produces={OUT: PedidoProcessado}, description="W7: W3 in several processes")
    progress = f"{spec.result_file}.{os.getpid()}"
    first_seen: list[float] = []

    def report_progress() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        figures = {"count": state.done, "first": first_seen[0], "last": time.time(),
                   "cpu": usage.ru_utime + usage.ru_stime}  # fmt: skip
        with open(progress + ".tmp", "w") as f:
            json.dump(figures, f)
        os.replace(progress + ".tmp", progress)

    @plugin.consumes(spec.topic, PedidoNovo)
    def handle_w7(order: PedidoNovo, ctx: Context) -> None:
        if not first_seen:
            first_seen.append(time.time())
        ctx.produce(OUT, process(order))
        state.done += 1
        if state.done % 500 == 0:
            report_progress()

elif MODE == "passthrough":
    plugin = Plugin("bench-passthrough", produces={spec.out_topic: ProcessoPicking}, description="W5 pass-through")

    @plugin.consumes(spec.topic, PedidoNovo)
    def start_picking(order: PedidoNovo, ctx: Context) -> None:
        ctx.produce(spec.out_topic, ProcessoPicking(order_id=order.order_id, status="iniciado"))

else:
    FAIL_PCT = spec.fail_pct
    TARGET = spec.target
    PAYMENTS = spec.options.get("data") == "payments"
    # W4 retries at once (delay 0); W3 keeps the framework's default policy, as a plugin author would.
    policy = RetryPolicy(delays=(0.0,), jitter=0.0) if FAIL_PCT else None
    plugin = Plugin(
        "bench-orders",
        produces={spec.out_topic: PagamentoResumo if PAYMENTS else PedidoProcessado},
        retry=policy,
        description="benchmark: one result per order",
    )
    OUT = spec.out_topic
    meter = state.meter

    def finished() -> None:
        state.finished = True
        if state.worker is not None:
            state.worker.stop()

    if PAYMENTS:

        @plugin.consumes(spec.topic, Pagamento)
        def handle_payment(payment: Pagamento, ctx: Context) -> None:
            if meter.started is None:
                meter.start()
            ctx.produce(OUT, summarize(payment))
            state.done += 1  # inline, as W2 counts: this is the workload that measures the framework's cost
            if state.done == TARGET:
                finished()

    else:

        @plugin.consumes(spec.topic, PedidoNovo)
        def handle(order: PedidoNovo, ctx: Context) -> None:
            if meter.started is None:
                meter.start()
            if FAIL_PCT and ctx.attempt == 1:
                if fails_once(order.order_id, FAIL_PCT):
                    raise RuntimeError("benchmark: the first attempt of this order fails")
                state.last_first_attempt = time.perf_counter()
            ctx.produce(OUT, process(order))
            state.done += 1
            if state.done == TARGET:
                finished()


class Observer:
    """An installed observer: counts batches, and closes the measured window at shutdown."""

    @hookimpl
    def kafkaworkers_worker_started(self, worker: Any) -> None:
        state.worker = worker

    @hookimpl
    def kafkaworkers_batch_received(self, plugin: Plugin, messages: list[Any]) -> None:
        state.batches += 1
        state.messages += len(messages)

    @hookimpl
    def kafkaworkers_worker_stopping(self, worker: Any) -> None:
        if MODE not in ("passthrough", "w6"):
            finish()


observer = Observer()


def finish() -> None:
    """Close the measured window (after the last batch was flushed and its offsets stored); once."""
    if state.reported:
        return
    state.reported = True
    extra: dict[str, Any] = {"batches": state.batches, "hook_messages": state.messages}
    if state.last_first_attempt is not None:
        extra["retry_tail_s"] = time.perf_counter() - state.last_first_attempt
    state.meter.stop(state.done, **extra)
