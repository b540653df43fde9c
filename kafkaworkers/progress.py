"""Progress of long commands (``produce``, ``dlq replay``, ``demo``): a bar on a terminal, nothing in a pipe.

The bar goes to stderr, so a command's own output (its summary, ``--format json``) stays
clean; when stderr is not a terminal (a pipe, a CI log) nothing is drawn and the command's
final summary line is the whole report.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

__all__ = ["progress", "rate"]

T = TypeVar("T")


def on_terminal() -> bool:
    """Whether stderr, where bars go, is a terminal someone watches."""
    return sys.stderr.isatty()


@contextmanager
def progress(items: Iterable[T], label: str, length: int | None = None) -> Iterator[Iterable[T]]:
    """``items`` as they are used, drawn on a bar with the count and the rate (and the share done if ``length``)."""
    if not on_terminal():
        yield items
        return
    started = time.monotonic()
    drawn: list[Any] = []  # the bar, once made: its rate reads the bar's own count

    def show_rate(_item: object) -> str:
        return rate(drawn[0].pos if drawn else 0, time.monotonic() - started)

    with click.progressbar(
        items, length=length, label=label, file=sys.stderr, show_pos=True, item_show_func=show_rate
    ) as bar:
        drawn.append(bar)
        yield bar


def rate(count: int, seconds: float) -> str:
    """``count`` over ``seconds`` for a summary line, e.g. ``1,204/s``."""
    return f"{count / seconds:,.0f}/s" if seconds > 0 else "-"
