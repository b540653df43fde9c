"""JSON logs: one object per line with the message context the worker knows."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import warnings
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import confluent_kafka
import msgspec
import pytest

from kafkaworkers import Context, PermanentError, Plugin, RetryPolicy
from kafkaworkers.clock import ManualClock
from kafkaworkers.logs import LIBRDKAFKA_LOGGER, JsonFormatter, RepeatSummary, configure
from kafkaworkers.testing import Harness


def record(message: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    log = logging.getLogger("kafkaworkers.test")
    rec = log.makeRecord(log.name, logging.WARNING, __file__, 1, message, args or ("world",), None)
    for name, value in extra.items():
        setattr(rec, name, value)
    return rec


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure() changes process-wide state: put it back after the test."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.excepthook, threading.excepthook)
    yield
    root.handlers[:], level, sys.excepthook, threading.excepthook = saved
    root.setLevel(level)
    logging.getLogger(LIBRDKAFKA_LOGGER).setLevel(logging.NOTSET)
    logging.captureWarnings(False)


def test_a_record_is_one_json_object_with_time_level_logger_message_and_context() -> None:
    line = JsonFormatter().format(
        record(plugin="echo", topic="pings", partition=2, offset=41, correlation_id="c-1", unrelated="x")
    )
    assert "\n" not in line
    entry = json.loads(line)
    assert entry == {
        "time": entry["time"],
        "level": "WARNING",
        "logger": "kafkaworkers.test",
        "message": "hello world",
        "plugin": "echo",
        "topic": "pings",
        "partition": 2,
        "offset": 41,
        "correlation_id": "c-1",
    }
    stamp = datetime.fromisoformat(entry["time"])
    assert stamp.utcoffset().total_seconds() == 0 and entry["time"].endswith("+00:00")
    assert len(entry["time"].split(".")[1]) == len("123+00:00"), "milliseconds"


def test_unknown_context_is_left_out_and_odd_values_still_serialise() -> None:
    entry = json.loads(JsonFormatter().format(record("multi\nline %s", Path("/x"), plugin="echo", correlation_id=None)))
    assert entry["message"] == "multi\nline /x"
    assert entry["plugin"] == "echo"
    assert not {"topic", "partition", "offset", "correlation_id"} & entry.keys()
    assert json.loads(JsonFormatter().format(record(offset=Path("/7"))))["offset"] == "/7"


def test_an_exception_stays_on_the_same_line() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        rec = record()
        rec.exc_info = sys.exc_info()
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    assert "ValueError: bad\nthing" in json.loads(line)["exception"]


def test_configure_json_sends_records_warnings_and_uncaught_exceptions_as_json_lines(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("INFO", "json")
    logging.getLogger("kafkaworkers.worker").info("started", extra={"plugin": "echo"})
    logging.getLogger("kafkaworkers.worker").debug("not at INFO")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("careful", UserWarning, stacklevel=1)
    try:
        raise RuntimeError("escaped")
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    thread = threading.Thread(target=lambda: 1 / 0, name="helper")
    thread.start()
    thread.join()

    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert (entries[0]["level"], entries[0]["message"], entries[0]["plugin"]) == ("INFO", "started", "echo")
    assert (entries[1]["level"], entries[1]["logger"]) == ("WARNING", "py.warnings")
    assert "UserWarning: careful" in entries[1]["message"]
    assert entries[2]["level"] == "CRITICAL" and "RuntimeError: escaped" in entries[2]["exception"]
    assert entries[3]["message"].startswith("uncaught exception in thread helper")
    assert "ZeroDivisionError" in entries[3]["exception"]
    assert len(entries) == 4


def test_configure_text_is_for_people(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure("WARNING", "text")
    logging.getLogger("kafkaworkers.worker").warning("careful")
    err = capsys.readouterr().err
    assert err.rstrip().endswith("WARNING kafkaworkers.worker: careful")
    assert sys.excepthook is sys.__excepthook__


def test_debug_level_shows_debug_lines_and_librdkafka_lines_only_when_asked(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("DEBUG", "text")
    logging.getLogger("kafkaworkers.worker").debug("a framework debug line")
    assert "DEBUG   kafkaworkers.worker: a framework debug line" in capsys.readouterr().err

    configure("WARNING", "text")
    _librdkafka_conf_dump()
    assert "kafkaworkers.librdkafka" not in capsys.readouterr().err

    # librdkafka's debug property asks for its lines: they show at any level.
    configure("WARNING", "text", librdkafka_debug=True)
    _librdkafka_conf_dump()
    err = capsys.readouterr().err
    assert "DEBUG   kafkaworkers.librdkafka: CONF" in err and "debug = conf" in err


def _librdkafka_conf_dump() -> None:
    """A real librdkafka client that logs its configuration at debug level through our logger."""
    producer = confluent_kafka.Producer({"debug": "conf", "logger": logging.getLogger(LIBRDKAFKA_LOGGER)})
    producer.poll(0)


class Ping(msgspec.Struct):
    n: int


def test_the_worker_logs_retries_and_dead_letters_with_their_message_context(tmp_path: Path) -> None:
    plugin = Plugin("logged", retry=RetryPolicy(delays=(0.01,), jitter=0.0))

    @plugin.consumes("pings", Ping)
    def handle(ping: Ping, ctx: Context) -> None:
        raise PermanentError(f"ping {ping.n} refused") if ping.n == 1 else RuntimeError(f"ping {ping.n} flaky")

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    # The package logger: which module of the loop logs a retry or a dead letter is not the point.
    log = logging.getLogger("kafkaworkers")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    harness = Harness(plugin, data_dir=tmp_path, partitions=1)
    try:
        harness.produce("pings", Ping(1), headers={"kw-correlation-id": b"corr-1"})
        harness.produce("pings", Ping(2))
        harness.run_until_idle(wait_for_retries=True)
    finally:
        harness.close()
        log.removeHandler(handler)
        log.setLevel(level)

    entries = [json.loads(line) for line in out.getvalue().splitlines()]
    dead = [e for e in entries if "dead-lettered" in e["message"]]
    retried = [e for e in entries if "retry in" in e["message"]]
    assert dead[0] == {
        "time": dead[0]["time"],
        "level": "WARNING",
        "logger": dead[0]["logger"],
        "message": dead[0]["message"],
        "plugin": "logged",
        "topic": "pings",
        "partition": 0,
        "offset": 0,
        "correlation_id": "corr-1",
    }
    assert dead[0]["logger"].startswith("kafkaworkers.")
    assert "PermanentError: ping 1 refused" in dead[0]["message"]
    # Ping 2 has no correlation id: the field is left out, the rest is there.
    assert retried[0]["level"] == "INFO" and retried[0]["offset"] == 1 and "correlation_id" not in retried[0]
    assert dead[1]["topic"] == "logged-retry-1" and "ping 2 flaky" in dead[1]["message"]


def test_repeated_librdkafka_errors_are_summarised_once_per_interval_with_a_count() -> None:
    clock = ManualClock()
    summary = RepeatSummary(interval=10.0, clock=clock.monotonic)

    def line(port: int, level: int = logging.ERROR) -> logging.LogRecord:
        text = f"FAIL [rdkafka#producer-{port}]: 127.0.0.1:{port}/bootstrap: Connect failed (after {port}ms)"
        return logging.LogRecord(LIBRDKAFKA_LOGGER, level, __file__, 1, text, None, None)

    shown = [summary.filter(line(n)) for n in range(20)]
    assert shown == [True] + [False] * 19, "lines differing only in numbers are one kind"
    assert summary.filter(line(1, logging.INFO)), "below WARNING nothing is held back"
    other = logging.LogRecord(LIBRDKAFKA_LOGGER, logging.ERROR, __file__, 1, "SASL authentication failed", None, None)
    assert summary.filter(other), "another kind of line is not held behind the first"
    clock.advance(10.0)
    record = line(99)
    assert summary.filter(record)
    assert record.getMessage().endswith("(19 more like it in the last 10 s)")
