"""The worker's clocks, injectable so that retry and breaker tests need not wait in real time.

The loop reads two clocks: a monotonic one for pauses (a retry not yet due, an open breaker,
a rewind's backoff) and the wall clock for due times written into retry headers, which other
processes read. :class:`ManualClock` moves both together, only when a test advances it.
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    """A monotonic clock and a wall clock, in seconds."""

    def monotonic(self) -> float: ...
    def time(self) -> float: ...


class SystemClock:
    """The real clocks: ``time.monotonic`` and ``time.time``."""

    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)


SYSTEM_CLOCK = SystemClock()


class ManualClock:
    """A clock that stands still until :meth:`advance` moves it.

    :param start: the wall-clock time it starts at (the monotonic clock starts at 0).
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._wall = start
        self._mono = 0.0

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._wall

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by ``seconds``."""
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self._mono += seconds
        self._wall += seconds
