"""Property-based fuzzing of everything that reads bytes from the wire: payloads and headers.

A worker reads whatever is on its topics: bytes from any client, any version, any bug. The
contract is that a payload either decodes into the topic's declared type or fails with
``msgspec.DecodeError`` (which the worker turns into a dead letter with ``DecodeError`` on
the first attempt), and that headers never make the runtime raise. The payload properties
go through the decoders the worker itself uses (``Plugin.subscriptions[topic].decoder``), and
once more end to end through the worker loop on the in-memory broker.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kafkaworkers import Context, DecodeError, Plugin, RetryPolicy
from kafkaworkers.headers import (
    H_ATTEMPT,
    H_DUE,
    H_EXCEPTION,
    H_FIRST_FAILURE,
    H_LAST_FAILURE,
    H_MESSAGE,
    H_ORIGINAL_OFFSET,
    H_ORIGINAL_PARTITION,
    H_ORIGINAL_TIMESTAMP,
    H_ORIGINAL_TOPIC,
    H_PLUGIN,
    parse_headers,
)
from kafkaworkers.retry import MAX_ERROR_TEXT, failure_headers
from kafkaworkers.testing import Harness
from kafkaworkers.transports.memory import MemoryMessage
from kafkaworkers_orders import contracts


class Ping(msgspec.Struct, frozen=True):
    n: int
    fail: str = ""


TYPES: dict[str, type] = {"fuzz-ping": Ping, **contracts.TOPICS}

#: One valid document per topic, mutated below into near-misses.
VALID: dict[str, dict[str, Any]] = {
    "fuzz-ping": {"n": 1, "fail": ""},
    "pedido-novo": {
        "order_id": "o-1",
        "cliente": {"id": "c-1", "nome": "Ana", "email": "ana@example.com"},
        "itens": [{"sku": "SKU-1", "quantidade": 2, "preco_unitario_centavos": 1500}],
        "cartao": {"token": "tok_abcd", "final": "4242", "pais_emissor": "BR"},
        "pais_entrega": "BR",
        "criado_em": "2024-05-01T12:00:00Z",
    },
    "reserva-estoque": {"order_id": "o-1", "status": "reservado"},
    "processo-pagamento": {"order_id": "o-1", "status": "aprovado", "valor_centavos": 3000},
    "fraude-verificado": {"order_id": "o-1", "fraude": False, "score": 10, "motivos": ["cep"]},
    "processo-picking": {"order_id": "o-1", "status": "iniciado"},
    "pedido-cancelado": {"order_id": "o-1", "motivo": "fraude"},
}
DEEP = b"[" * 10_000 + b"]" * 10_000

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fuzz_plugin() -> tuple[Plugin, list[tuple[str, Any]]]:
    """One plugin consuming every fuzzed topic; no retries, so any failure goes straight to the DLQ."""
    plugin = Plugin("fuzz", retry=RetryPolicy(delays=(), jitter=0.0))
    handled: list[tuple[str, Any]] = []
    for topic, typ in TYPES.items():

        def handle(value: Any, ctx: Context, topic: str = topic) -> None:
            handled.append((topic, value))

        plugin.consumes(topic, typ)(handle)
    return plugin, handled


PLUGIN, _ = fuzz_plugin()
DECODERS = {topic: sub.decoder for topic, sub in PLUGIN.subscriptions.items()}

# --- strategies -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)


def _slots(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a document a value sits at, as a path of keys and indexes."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield (*path, key)
        yield from _slots(value, (*path, key))


@st.composite
def near_misses(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid document of some topic with one value replaced, one key dropped, or one key added."""
    topic = draw(st.sampled_from(sorted(VALID)))
    doc = copy.deepcopy(VALID[topic])
    path = draw(st.sampled_from(list(_slots(doc))))
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    action = draw(st.sampled_from(["replace", "drop", "add"]))
    if action == "replace":
        parent[path[-1]] = draw(json_values)
    elif action == "drop":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=12))] = draw(json_values)
    else:
        parent.append(draw(json_values))
    return topic, json.dumps(doc).encode()


topics = st.sampled_from(sorted(TYPES))
payloads = st.one_of(
    st.tuples(topics, st.binary(max_size=300)),
    st.tuples(topics, json_values.map(lambda v: json.dumps(v).encode())),
    near_misses(),
)

#: Header names the runtime interprets, mixed with arbitrary ones.
KW_NAMES = [
    H_ATTEMPT,
    H_DUE,
    H_ORIGINAL_TOPIC,
    H_ORIGINAL_PARTITION,
    H_ORIGINAL_OFFSET,
    H_ORIGINAL_TIMESTAMP,
    H_FIRST_FAILURE,
    "kw-correlation-id",
]
header_values = st.one_of(
    st.none(),
    st.binary(max_size=40),
    st.integers().map(lambda i: str(i).encode()),
    st.text(max_size=20).map(str.encode),
    st.just(b"9" * 5000),
)
header_lists = st.lists(st.tuples(st.sampled_from(KW_NAMES) | st.text(max_size=20), header_values), max_size=10)


# --- decoders ---------------------------------------------------------------------------


def test_every_valid_sample_decodes_so_the_near_misses_start_from_valid_input() -> None:
    for topic, doc in VALID.items():
        assert isinstance(DECODERS[topic].decode(json.dumps(doc).encode()), TYPES[topic])


def test_every_fuzzed_topic_has_a_valid_sample_for_the_near_misses() -> None:
    """A contract topic added without a sample here would get only random bytes, never near misses."""
    assert sorted(VALID) == sorted(TYPES)


#: Pathological payloads a fuzzer reaches only by luck: (topic, bytes), by name.
PATHOLOGICAL = {
    "deep-array": ("fuzz-ping", DEEP),
    "deep-array-in-unknown-field": ("fuzz-ping", b'{"n": 1, "x": ' + DEEP + b"}"),
    "deep-array-in-unknown-field-of-an-order": ("pedido-novo", b'{"order_id": "o-1", "extra": ' + DEEP + b"}"),
    "deep-object": ("fuzz-ping", b'{"a":' * 10_000 + b"1" + b"}" * 10_000),
    "100000-digit-int": ("fuzz-ping", b'{"n": ' + b"9" * 100_000 + b"}"),
    "100000-digit-float": ("fuzz-ping", b'{"n": 0.' + b"1" * 100_000 + b"}"),
    "nan": ("fuzz-ping", b'{"n": NaN}'),
    "infinity": ("fuzz-ping", b'{"n": Infinity}'),
    "escaped-nul": ("fuzz-ping", rb'{"n": 1, "fail": "\u0000"}'),
    "raw-nul": ("fuzz-ping", b'{"n": 1, "fail": "\x00"}'),
    "lone-surrogate": ("fuzz-ping", rb'{"n": 1, "fail": "\ud800"}'),
    "duplicate-keys": ("fuzz-ping", b'{"n": 1, "n": "x"}'),
    "bom": ("fuzz-ping", b'\xef\xbb\xbf{"n": 1}'),
    "trailing-garbage": ("fuzz-ping", b'{"n": 1} {"n": 2}'),
    "empty": ("fuzz-ping", b""),
}


def decode_like_the_worker(topic: str, raw: bytes) -> None:
    """The worker's decode step: its decoder for the topic returns the declared type or raises
    msgspec.DecodeError (ValidationError included), which the worker wraps as DecodeError.

    msgspec also raises RecursionError for nesting deeper than its limit (inside a field it
    skips): only for such input, and the worker must map it to DecodeError too (see the
    end-to-end tests below).
    """
    try:
        value = DECODERS[topic].decode(raw)
    except msgspec.DecodeError:
        return
    except RecursionError:
        assert raw.count(b"[") + raw.count(b"{") > 1000, "RecursionError from shallow input"
        return
    assert isinstance(value, TYPES[topic])


@pytest.mark.parametrize("case", list(PATHOLOGICAL.values()), ids=list(PATHOLOGICAL))
def test_pathological_payloads_decode_or_raise_a_decode_failure(case: tuple[str, bytes]) -> None:
    decode_like_the_worker(*case)


@FUZZ
@given(payloads)
def test_the_worker_decoders_return_the_declared_type_or_raise_only_msgspec_decode_error(
    case: tuple[str, bytes],
) -> None:
    decode_like_the_worker(*case)


class Fuzzed:
    """The fuzz plugin running in a Harness, with what it handled (short repr for hypothesis reports)."""

    def __init__(self, harness: Harness, handled: list[tuple[str, Any]]) -> None:
        self.harness = harness
        self.handled = handled

    def __repr__(self) -> str:
        return f"<Fuzzed handled={len(self.handled)}>"

    def feed(self, topic: str, raw: bytes, raw_headers: list[Any] | None = None) -> None:
        """Publish ``raw`` as any client could, run the worker, and check it was handled or
        dead-lettered on its first attempt with DecodeError, and nothing else happened."""
        ok_before, dead_before = len(self.handled), len(self.harness.records("fuzz-dlq"))
        producer = self.harness.transport.producer({})
        producer.produce(topic, raw, b"key", headers=raw_headers or None)
        producer.flush()
        self.harness.run_until_idle()

        new_ok = self.handled[ok_before:]
        new_dead = self.harness.records("fuzz-dlq")[dead_before:]
        assert len(new_ok) + len(new_dead) == 1, f"handled {len(new_ok)}, dead-lettered {len(new_dead)}"
        if new_ok:
            assert new_ok[0][0] == topic and isinstance(new_ok[0][1], TYPES[topic])
            return
        dead = dict(new_dead[0].headers() or [])
        assert (dead[H_EXCEPTION], dead[H_ATTEMPT]) == (b"kafkaworkers.errors.DecodeError", b"1"), dead[H_MESSAGE]
        assert new_dead[0].value() == raw
        assert dead[H_ORIGINAL_TOPIC] == topic.encode(), "the dead letter must name where it really came from"


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    plugin, handled = fuzz_plugin()
    harness = Harness(plugin, data_dir=Path(tmp_path_factory.mktemp("fuzz")), partitions=1)
    yield Fuzzed(harness, handled)
    harness.close()


@pytest.mark.parametrize("case", list(PATHOLOGICAL.values()), ids=list(PATHOLOGICAL))
def test_the_worker_handles_or_dead_letters_pathological_payloads_with_decode_error(
    fuzzed: Fuzzed, case: tuple[str, bytes]
) -> None:
    fuzzed.feed(*case)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(payloads, header_lists)
@example(("fuzz-ping", b'{"n": 1}'), [("kw-correlation-id", b"\xff\xfe"), ("bin", None)])
def test_the_worker_handles_or_dead_letters_any_payload_with_decode_error_and_never_crashes(
    fuzzed: Fuzzed, case: tuple[str, bytes], raw_headers: list[Any]
) -> None:
    fuzzed.feed(*case, raw_headers)


# --- headers ----------------------------------------------------------------------------


@FUZZ
@given(header_lists)
def test_parse_headers_maps_every_name_to_its_last_value_as_bytes(raw: list[tuple[str, bytes | None]]) -> None:
    parsed = parse_headers(raw)
    expected: dict[str, bytes] = {}
    for name, value in raw:
        expected[name] = value if value is not None else b""
    assert parsed == expected
    assert all(isinstance(v, bytes) for v in parsed.values())


@FUZZ
@given(header_lists, st.integers(1, 10), st.none() | st.integers(0, 2**53), st.text(max_size=2000))
def test_failure_headers_of_any_source_headers_are_complete_unique_and_bytes(
    raw: list[tuple[str, bytes | None]], attempt: int, due_ms: int | None, reason: str
) -> None:
    headers = failure_headers(
        parse_headers(raw),
        topic="pedido-novo",
        partition=1,
        offset=9,
        timestamp_ms=1,
        plugin="fuzz",
        attempt=attempt,
        error=DecodeError(reason),
        due_ms=due_ms,
    )
    names = [name for name, _ in headers]
    assert len(names) == len(set(names))
    assert all(isinstance(n, str) and isinstance(v, bytes) for n, v in headers)
    as_dict = dict(headers)
    required = (
        H_ORIGINAL_TOPIC,
        H_ORIGINAL_PARTITION,
        H_ORIGINAL_OFFSET,
        H_ORIGINAL_TIMESTAMP,
        H_FIRST_FAILURE,
        H_LAST_FAILURE,
    )
    for name in required:
        assert as_dict[name], f"{name} is empty"
    assert as_dict[H_ATTEMPT] == str(attempt).encode()
    assert as_dict[H_PLUGIN] == b"fuzz"
    assert as_dict[H_EXCEPTION] == b"kafkaworkers.errors.DecodeError"
    assert (H_DUE in as_dict) == (due_ms is not None)
    message = as_dict[H_MESSAGE].decode("utf-8")
    assert len(message) <= MAX_ERROR_TEXT and "\n" not in message


@FUZZ
@given(header_lists)
@example([(H_ORIGINAL_TOPIC, b"\xff\xfe")])
@example([(H_ATTEMPT, b"9" * 5000)])
def test_context_reads_arbitrary_headers_without_raising(raw: list[tuple[str, bytes | None]]) -> None:
    """What a handler reads from the context of any message: never an exception of its own."""
    ctx = Context(PLUGIN, MemoryMessage("fuzz-ping", 0, 3, b"k", b"{}", raw or None, 1), lambda *a: None, None)
    assert isinstance(ctx.topic, str)
    assert isinstance(ctx.attempt, int) and ctx.attempt >= 1
    assert ctx.correlation_id is None or isinstance(ctx.correlation_id, str)
    assert set(ctx.headers) == {name for name, _ in raw}
