"""The kafkaworkers contender's plugin and observer, installed through a dist-info on PYTHONPATH.

``BENCH_SPEC`` names the run: the orders topic, the result topic, how many orders to finish.
Two shapes, chosen by ``spec.options["mode"]``:

* ``process`` (W3, W4): decode ``PedidoNovo``, produce one ``PedidoProcessado``; with
  ``fail_pct`` set, that share of the orders raises on its first attempt and comes back
  through the retry topic. After ``target`` orders the worker is asked to stop: it finishes
  the batch in hand (flush, store offsets) and the measured window closes.
* ``passthrough`` (W5 without the order pipeline): produce a ``ProcessoPicking`` iniciado
  per order, until SIGTERM.

The observer implements ``kafkaworkers_batch_received`` (so the per-batch hook path is
exercised, as with any installed observer) and closes the window when the worker stops.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import Meter, Spec
from bench.orders import PedidoNovo, PedidoProcessado, ProcessoPicking, fails_once, process
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

if MODE == "passthrough":
    plugin = Plugin("bench-passthrough", produces={spec.out_topic: ProcessoPicking}, description="W5 pass-through")

    @plugin.consumes(spec.topic, PedidoNovo)
    def start_picking(order: PedidoNovo, ctx: Context) -> None:
        ctx.produce(spec.out_topic, ProcessoPicking(order_id=order.order_id, status="iniciado"))

else:
    FAIL_PCT = spec.fail_pct
    TARGET = spec.target
    # W4 retries at once (delay 0); W3 keeps the framework's default policy, as a plugin author would.
    policy = RetryPolicy(delays=(0.0,), jitter=0.0) if FAIL_PCT else None
    plugin = Plugin(
        "bench-orders",
        produces={spec.out_topic: PedidoProcessado},
        retry=policy,
        description="benchmark: one result per order",
    )
    OUT = spec.out_topic
    meter = state.meter

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
            state.finished = True
            if state.worker is not None:
                state.worker.stop()


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
        if MODE != "passthrough":
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
