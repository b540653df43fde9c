"""The circuit breaker's state machine, driven by an injected clock.

closed -> open when the failure rate over the window reaches the threshold (once enough
calls were seen); open for ``wait``; then half-open, letting ``probes`` calls through: all
succeed and it closes, one fails and it opens again. Calls run under a timeout so a hung
dependency counts as a failure instead of blocking the worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from kafkaworkers.breaker import CLOSED, HALF_OPEN, OPEN, CallTimeout, CircuitBreaker, TooManyAbandonedCalls
from kafkaworkers.errors import CircuitOpenError
from tests.conftest import wait_for


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Down(Exception):
    """The dependency failed."""


class NotFound(Exception):
    """A business answer from a healthy dependency."""


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make(clock: FakeClock) -> Callable[..., CircuitBreaker]:
    def factory(**options: object) -> CircuitBreaker:
        defaults: dict[str, object] = dict(failure_rate=0.5, window=4, min_calls=4, wait=10.0, probes=2, timeout=5.0)
        return CircuitBreaker("db", clock=clock, **{**defaults, **options})  # type: ignore[arg-type]

    return factory


def ok() -> str:
    return "ok"


def down() -> None:
    raise Down("connection refused")


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    """Fail calls; the one that opens the breaker says so, with the real error as its cause."""
    for _ in range(times):
        with pytest.raises((Down, CircuitOpenError)) as raised:
            breaker.call(down)
        if isinstance(raised.value, CircuitOpenError):
            assert isinstance(raised.value.__cause__, Down)
            assert breaker.state == OPEN


def test_the_failure_that_opens_the_breaker_raises_circuit_open_chained_to_the_real_error(
    make: Callable[..., CircuitBreaker],
) -> None:
    breaker = make()
    fail(breaker, 3)
    assert breaker.state != OPEN
    with pytest.raises(CircuitOpenError) as tripped:
        breaker.call(down)
    assert isinstance(tripped.value.__cause__, Down)


def opened(make: Callable[..., CircuitBreaker], **options: object) -> CircuitBreaker:
    breaker = make(**options)
    fail(breaker, 4)
    assert breaker.state == OPEN
    return breaker


def test_a_new_breaker_is_closed_and_passes_calls_and_results_through(make: Callable[..., CircuitBreaker]) -> None:
    breaker = make()
    assert breaker.state == CLOSED
    assert breaker.call(lambda a, b=0: a + b, 2, b=3) == 5


def test_it_opens_when_the_failure_rate_reaches_the_threshold_over_min_calls(
    make: Callable[..., CircuitBreaker],
) -> None:
    breaker = make()
    breaker.call(ok)
    fail(breaker, 2)
    assert breaker.state == CLOSED, "3 calls are fewer than min_calls=4"
    fail(breaker)
    assert breaker.state == OPEN, "3 failures in 4 calls is above 50%"


def test_failures_below_min_calls_never_open_it(make: Callable[..., CircuitBreaker]) -> None:
    breaker = make(min_calls=4)
    fail(breaker, 3)
    assert breaker.state == CLOSED


def test_a_failure_rate_below_the_threshold_keeps_it_closed(make: Callable[..., CircuitBreaker]) -> None:
    breaker = make(window=4, min_calls=4, failure_rate=0.5)
    for _ in range(5):
        breaker.call(ok)
        breaker.call(ok)
        breaker.call(ok)
        fail(breaker)
    assert breaker.state == CLOSED


def test_while_open_calls_are_refused_without_calling_the_dependency(
    make: Callable[..., CircuitBreaker], clock: FakeClock
) -> None:
    breaker = opened(make)
    calls: list[int] = []
    with pytest.raises(CircuitOpenError) as refused:
        breaker.call(calls.append, 1)
    assert calls == []
    assert refused.value.breaker == "db"
    assert refused.value.retry_at == clock.now + 10.0
    assert breaker.retry_at() == clock.now + 10.0


def test_it_stays_open_for_the_whole_wait_then_turns_half_open(
    make: Callable[..., CircuitBreaker], clock: FakeClock
) -> None:
    breaker = opened(make)
    clock.advance(9.99)
    assert breaker.state == OPEN
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)
    clock.advance(0.01)
    assert breaker.state == HALF_OPEN


def test_half_open_lets_exactly_probes_calls_through_at_once(
    make: Callable[..., CircuitBreaker], clock: FakeClock
) -> None:
    breaker = opened(make, probes=2)
    clock.advance(10.0)
    release = threading.Event()
    entered = threading.Semaphore(0)
    results: list[object] = []

    def slow_ok() -> str:
        entered.release()
        release.wait(5)
        return "ok"

    probes = [threading.Thread(target=lambda: results.append(breaker.call(slow_ok))) for _ in range(2)]
    for probe in probes:
        probe.start()
    assert entered.acquire(timeout=5) and entered.acquire(timeout=5), "both probes should be let through"
    with pytest.raises(CircuitOpenError) as refused:
        breaker.call(ok)
    assert refused.value.retry_at <= clock.now + 0.5, "a refused caller while probing should ask again soon"
    release.set()
    for probe in probes:
        probe.join(5)
    assert results == ["ok", "ok"]
    assert breaker.state == CLOSED


def test_successful_probes_close_it_and_start_a_fresh_window(
    make: Callable[..., CircuitBreaker], clock: FakeClock
) -> None:
    breaker = opened(make, probes=2)
    clock.advance(10.0)
    breaker.call(ok)
    assert breaker.state == HALF_OPEN, "one of two probes succeeded"
    breaker.call(ok)
    assert breaker.state == CLOSED
    fail(breaker, 3)
    assert breaker.state == CLOSED, "the failures before opening must not count any more"


def test_a_failed_probe_opens_it_again_for_a_whole_wait(make: Callable[..., CircuitBreaker], clock: FakeClock) -> None:
    breaker = opened(make, probes=2)
    clock.advance(10.0)
    breaker.call(ok)
    fail(breaker)
    assert breaker.state == OPEN
    assert breaker.retry_at() == clock.now + 10.0
    clock.advance(9.0)
    assert breaker.state == OPEN


def test_ignored_business_outcomes_are_re_raised_and_never_open_it(make: Callable[..., CircuitBreaker]) -> None:
    breaker = make(ignore=(NotFound,))

    def missing() -> None:
        raise NotFound("no such order")

    for _ in range(20):
        with pytest.raises(NotFound):
            breaker.call(missing)
    assert breaker.state == CLOSED


def test_ignored_business_outcomes_leave_the_failure_statistics_alone(make: Callable[..., CircuitBreaker]) -> None:
    """The docstring says ignored types "leave the breaker's statistics alone": they must not
    count as failures, nor as successes that dilute the failure rate."""
    breaker = make(ignore=(NotFound,), window=10, min_calls=2, failure_rate=1.0)

    def missing() -> None:
        raise NotFound("no such order")

    fail(breaker)
    for _ in range(5):
        with pytest.raises(NotFound):
            breaker.call(missing)
    fail(breaker)
    assert breaker.state == OPEN, "2 failures out of 2 counted calls is a 100% failure rate"


def test_a_hung_call_times_out_without_blocking_the_caller_and_counts_as_a_failure(
    make: Callable[..., CircuitBreaker],
) -> None:
    breaker = make(timeout=0.1, min_calls=1, window=1, failure_rate=1.0)
    hung = threading.Event()
    try:
        start = time.monotonic()
        with pytest.raises(CircuitOpenError) as tripped:
            breaker.call(hung.wait, 30)
        elapsed = time.monotonic() - start
    finally:
        hung.set()
    assert 0.1 <= elapsed < 1.0
    assert isinstance(tripped.value.__cause__, CallTimeout)
    assert "longer than 0.1 s" in str(tripped.value.__cause__)
    assert isinstance(CallTimeout("x"), TimeoutError)
    assert breaker.state == OPEN


def breaker_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("breaker-db")}


def test_timed_out_calls_still_running_are_bounded_and_then_calls_fail_at_once_as_failures(
    make: Callable[..., CircuitBreaker],
) -> None:
    breaker = make(timeout=0.2, max_abandoned=2, window=3, min_calls=3, failure_rate=1.0)
    release = threading.Event()
    started: list[int] = []

    def hang() -> None:
        started.append(1)
        release.wait(60)

    try:
        for _ in range(2):
            with pytest.raises(CallTimeout):
                breaker.call(hang)
        assert breaker.abandoned == 2
        threads = breaker_threads()
        with pytest.raises(CircuitOpenError) as refused:
            breaker.call(hang)
        assert len(started) == 2, "the refused call ran anyway"
        assert breaker_threads() == threads, "the refused call started a thread"
        cause = refused.value.__cause__
        assert isinstance(cause, TooManyAbandonedCalls) and isinstance(cause, CallTimeout)
        assert "2 earlier calls timed out and are still running (max_abandoned=2)" in str(cause)
        assert breaker.state == OPEN, "the refused call counts as the third failure of three"
    finally:
        release.set()
    wait_for(lambda: breaker.abandoned == 0, 10, "the abandoned calls to return")
    breaker.reset()
    assert breaker.call(ok) == "ok"


def test_max_abandoned_must_allow_one(make: Callable[..., CircuitBreaker]) -> None:
    with pytest.raises(ValueError, match="bad thresholds"):
        make(max_abandoned=0)


def test_force_open_and_reset(make: Callable[..., CircuitBreaker], clock: FakeClock) -> None:
    breaker = make()
    breaker.force_open()
    assert breaker.state == OPEN
    assert breaker.retry_at() == clock.now + 10.0
    breaker.reset()
    assert breaker.state == CLOSED
    assert breaker.retry_at() == clock.now


@pytest.mark.parametrize(
    "options",
    [{"failure_rate": 0.0}, {"failure_rate": 1.5}, {"window": 0}, {"min_calls": 0}, {"min_calls": 5}, {"probes": 0}],
)
def test_impossible_thresholds_are_refused(options: dict[str, object]) -> None:
    base: dict[str, object] = dict(window=4, min_calls=2)
    with pytest.raises(ValueError, match="bad thresholds"):
        CircuitBreaker("db", **{**base, **options})  # type: ignore[arg-type]


def test_without_a_timeout_calls_run_on_the_callers_thread_and_still_count(
    make: Callable[..., CircuitBreaker],
) -> None:
    breaker = make(timeout=None, min_calls=2, window=2, failure_rate=1.0)
    assert breaker.call(threading.get_ident) == threading.get_ident()

    def boom() -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        breaker.call(boom)
    with pytest.raises(CircuitOpenError) as tripped:
        breaker.call(boom)
    assert isinstance(tripped.value.__cause__, ConnectionError)
    assert breaker.state == OPEN
