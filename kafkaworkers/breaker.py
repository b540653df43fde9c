"""The circuit breaker: stop calling a dependency that keeps failing, and probe it later.

Closed: calls pass and their outcomes fill a sliding window of the last ``window`` calls.
When at least ``min_calls`` are in the window and the failure rate reaches
``failure_rate``, it opens: calls raise :class:`~kafkaworkers.errors.CircuitOpenError` for
``wait`` seconds. Then it is half-open: up to ``probes`` calls go through; if they all
succeed it closes, one failure opens it again. With a ``timeout``, every call runs on a
helper thread so a hung dependency counts as a failure instead of wedging the worker. Python
cannot stop a thread, so a call that timed out is abandoned and runs on; at most
``max_abandoned`` of them per breaker, after which calls fail at once (as failures) until one
returns, instead of piling up threads on a dependency that hangs. With ``timeout=None`` calls
run on the caller's thread, for a callee that bounds its own time (an
HTTP client with a socket timeout) and is called often: the hand-off to a thread costs
~100 µs per call, and milliseconds on a busy machine. The worker reacts to
``CircuitOpenError`` by pausing the partition, never by retrying or dead-lettering.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from kafkaworkers.errors import CircuitOpenError

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "CallTimeout", "CircuitBreaker", "TooManyAbandonedCalls"]

T = TypeVar("T")

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
#: The value of ``kafkaworkers_circuit_breaker_state`` for each state.
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class CallTimeout(TimeoutError):
    """A call guarded by a breaker did not finish within the breaker's timeout."""


class TooManyAbandonedCalls(CallTimeout):
    """A call was not started: the breaker's ``max_abandoned`` timed-out calls are all still running."""


class CircuitBreaker:
    """A failure-rate circuit breaker with a call timeout.

    :param name: names the breaker in metrics, logs and :class:`CircuitOpenError`.
    :param failure_rate: the share of failed calls in the window that opens it.
    :param window: how many recent calls the rate is computed over.
    :param min_calls: calls needed in the window before the rate is judged.
    :param wait: seconds it stays open before letting probes through.
    :param probes: calls let through while half-open.
    :param timeout: seconds a call may take; a slower call counts as a failure. ``None``: run
        calls on the caller's thread, without a timeout of the breaker's own.
    :param ignore: exception types that are business outcomes, not failures: they are
        re-raised but leave the breaker's statistics alone.
    :param max_abandoned: timed-out calls that may still be running on their threads; with
        that many, a call fails at once with :class:`TooManyAbandonedCalls` (a failure)
        without starting a thread.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_rate: float = 0.5,
        window: int = 20,
        min_calls: int = 10,
        wait: float = 30.0,
        probes: int = 3,
        timeout: float | None = 10.0,
        ignore: tuple[type[BaseException], ...] = (),
        max_abandoned: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < failure_rate <= 1 or window < 1 or not 1 <= min_calls <= window or probes < 1 or max_abandoned < 1:
            raise ValueError(f"breaker {name!r}: bad thresholds")
        self.name = name
        self.failure_rate = failure_rate
        self.min_calls = min_calls
        self.wait = wait
        self.probes = probes
        self.timeout = timeout
        self.ignore = ignore
        self.max_abandoned = max_abandoned
        self._clock = clock
        self._lock = threading.Lock()
        self._outcomes: deque[bool] = deque(maxlen=window)
        self._state = CLOSED
        self._opened_at = 0.0
        self._probes_started = 0
        self._probes_ok = 0
        self._pool: ThreadPoolExecutor | None = None
        self._abandoned = 0

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name} {self.state}>"

    @property
    def state(self) -> str:
        """``closed``, ``half_open`` or ``open``, as of now."""
        with self._lock:
            return self._current_state()

    @property
    def abandoned(self) -> int:
        """Calls that timed out and are still running on their threads."""
        with self._lock:
            return self._abandoned

    def retry_at(self) -> float:
        """The clock value from which a call may be let through again."""
        with self._lock:
            if self._current_state() == OPEN:
                return self._opened_at + self.wait
            return self._clock()

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn`` through the breaker; raise :class:`CircuitOpenError` if it is open.

        A failure that opens the breaker (the one that trips it, or a failed probe) also
        raises :class:`CircuitOpenError`, chained to the real error: the message was not at
        fault, so the worker pauses and tries it again, instead of spending one of its retries.
        """
        self._before()
        try:
            result = self._run(fn, args, kwargs)
        except self.ignore:
            self._record_ignored()
            raise
        except Exception as exc:
            if self._record(False):
                raise CircuitOpenError(self.name, self.retry_at()) from exc
            raise
        self._record(True)
        return result

    def force_open(self) -> None:
        """Open now, as if the failure threshold was reached (operators and tests)."""
        with self._lock:
            self._open()

    def reset(self) -> None:
        """Close and forget every outcome."""
        with self._lock:
            self._state = CLOSED
            self._outcomes.clear()

    def _current_state(self) -> str:
        if self._state == OPEN and self._clock() >= self._opened_at + self.wait:
            self._state = HALF_OPEN
            self._probes_started = self._probes_ok = 0
        return self._state

    def _before(self) -> None:
        with self._lock:
            state = self._current_state()
            if state == OPEN:
                raise CircuitOpenError(self.name, self._opened_at + self.wait)
            if state == HALF_OPEN:
                if self._probes_started >= self.probes:
                    # Probes are in flight: ask again shortly rather than a whole wait later.
                    raise CircuitOpenError(self.name, self._clock() + min(self.wait, 0.5))
                self._probes_started += 1

    def _record(self, ok: bool) -> bool:
        """Count an outcome; whether the breaker is open after it."""
        with self._lock:
            if self._state == HALF_OPEN:
                if not ok:
                    self._open()
                    return True
                self._probes_ok += 1
                if self._probes_ok >= self.probes:
                    self._state = CLOSED
                    self._outcomes.clear()
                return False
            if self._state == OPEN:
                return True
            self._outcomes.append(ok)
            calls = len(self._outcomes)
            if calls >= self.min_calls and self._outcomes.count(False) / calls >= self.failure_rate:
                self._open()
            return self._state == OPEN

    def _record_ignored(self) -> None:
        """A business outcome: the dependency answered. A probe succeeded; otherwise no statistics."""
        with self._lock:
            half_open = self._state == HALF_OPEN
        if half_open:
            self._record(True)

    def _open(self) -> None:
        self._state = OPEN
        self._opened_at = self._clock()
        self._outcomes.clear()

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        if self.timeout is None:
            return fn(*args, **kwargs)
        with self._lock:
            if self._abandoned >= self.max_abandoned:
                raise TooManyAbandonedCalls(
                    f"{self.name}: not calling: {self._abandoned} earlier calls timed out and are still running"
                    f" (max_abandoned={self.max_abandoned}); the dependency hangs"
                )
            if self._pool is None:
                # Room for the abandoned calls beside the live ones, so a live call never queues behind them.
                self._pool = ThreadPoolExecutor(
                    max_workers=self.max_abandoned + self.probes + 1, thread_name_prefix=f"breaker-{self.name}"
                )
        future = self._pool.submit(fn, *args, **kwargs)
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout:
            if not future.cancel():
                with self._lock:
                    self._abandoned += 1
                future.add_done_callback(self._returned)
            raise CallTimeout(f"{self.name}: call took longer than {self.timeout} s") from None

    def _returned(self, future: Future[Any]) -> None:
        """An abandoned call finished at last: it no longer holds a thread."""
        with self._lock:
            self._abandoned -= 1
