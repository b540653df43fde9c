"""A topic's declared type as a JSON Schema, and valid example messages made from it.

``kafkaworkers schema TOPIC`` prints what ``msgspec.json.schema`` makes of the type;
``kafkaworkers sample TOPIC`` writes example messages, one JSON object a line, that
``kafkaworkers produce`` accepts. Examples are made by walking the type (``msgspec.inspect``)
within its constraints (bounds, lengths, regex patterns, literals), then checked by
decoding them as the type; the same seed gives the same examples.
"""

from __future__ import annotations

import base64
import json
import random
import re
import uuid
from datetime import UTC, datetime, timedelta

# re's own parser reads a pattern into a tree of (opcode, argument): the one complete reading
# of Python's regex syntax. Private, but where it has lived since Python 3.11.
from re import _constants as sre  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

import click
import msgspec
from msgspec import inspect as mi

from kafkaworkers.clikit import plugin_host
from kafkaworkers.errors import KafkaWorkersError
from kafkaworkers.topics import topic_type

__all__ = ["SampleError", "examples", "sample", "schema"]

#: Tries per example before giving up: constraints a walk cannot see (a pattern and a length
#: together, a set's distinct items) are met by trying again.
ATTEMPTS = 50
#: Where optional nesting stops: deeper than this, unions take None and collections their minimum.
_MAX_DEPTH = 6
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
_PRINTABLE = _ALPHABET + _ALPHABET.upper() + "0123456789"
_EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


class SampleError(KafkaWorkersError):
    """The type has a part no example can be made of (a custom type, or constraints never met)."""


def examples(typ: Any, count: int, seed: int) -> list[bytes]:
    """``count`` JSON-encoded values of ``typ``, each decoded once as ``typ`` to prove it valid."""
    rng = random.Random(seed)
    decoder = msgspec.json.Decoder(typ)
    info = mi.type_info(typ)
    out = []
    for _ in range(count):
        last: Exception | None = None
        for _attempt in range(ATTEMPTS):
            encoded = msgspec.json.encode(_value(info, rng, 0))
            try:
                decoder.decode(encoded)
            except msgspec.ValidationError as exc:
                last = exc
                continue
            out.append(encoded)
            break
        else:
            raise SampleError(f"no valid example of {_name(typ)} in {ATTEMPTS} tries: {last}")
    return out


def _name(typ: Any) -> str:
    return getattr(typ, "__name__", repr(typ))


def _value(t: mi.Type, rng: random.Random, depth: int) -> Any:
    """A JSON-ready value of the inspected type ``t``, within the constraints ``t`` carries."""
    if isinstance(t, mi.StructType):
        fields = {f.encode_name: _field(f, rng, depth + 1) for f in t.fields}
        return {t.tag_field: t.tag, **fields} if t.tag_field else fields
    if isinstance(t, mi.DataclassType | mi.TypedDictType):
        return {f.encode_name: _field(f, rng, depth + 1) for f in t.fields}
    if isinstance(t, mi.NamedTupleType):
        return [_value(f.type, rng, depth + 1) for f in t.fields]
    if isinstance(t, mi.UnionType):
        options = [u for u in t.types if not isinstance(u, mi.NoneType)]
        return None if not options or depth > _MAX_DEPTH else _value(rng.choice(options), rng, depth)
    if isinstance(t, mi.LiteralType):
        return rng.choice(t.values)
    if isinstance(t, mi.EnumType):
        return rng.choice([member.value for member in t.cls])
    if isinstance(t, mi.BoolType):
        return rng.random() < 0.5
    if isinstance(t, mi.IntType):
        return _int(t, rng)
    if isinstance(t, mi.FloatType):
        return _float(t, rng)
    if isinstance(t, mi.StrType):
        return _str(t, rng)
    if isinstance(t, mi.NoneType):
        return None
    if isinstance(t, mi.DateTimeType):
        moment = _EPOCH + timedelta(seconds=rng.randrange(365 * 86400), microseconds=rng.randrange(1000) * 1000)
        return (moment if t.tz is not False else moment.replace(tzinfo=None)).isoformat()
    if isinstance(t, mi.DateType):
        return (_EPOCH + timedelta(days=rng.randrange(365))).date().isoformat()
    if isinstance(t, mi.TimeType):
        return f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}"
    if isinstance(t, mi.TimeDeltaType):
        return f"PT{rng.randrange(1, 3600)}S"
    if isinstance(t, mi.UUIDType):
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if isinstance(t, mi.DecimalType):
        return f"{rng.randrange(100_000) / 100:.2f}"
    if isinstance(t, mi.BytesType | mi.ByteArrayType | mi.MemoryViewType):
        size = _length(rng, t.min_length, t.max_length, depth)
        return base64.b64encode(rng.randbytes(size)).decode()
    if isinstance(t, mi.DictType):
        size = _length(rng, t.min_length, t.max_length, depth)
        return {str(_value(t.key_type, rng, depth + 1)): _value(t.value_type, rng, depth + 1) for _ in range(size)}
    if isinstance(t, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        size = _length(rng, t.min_length, t.max_length, depth)
        return [_value(t.item_type, rng, depth + 1) for _ in range(size)]
    if isinstance(t, mi.TupleType):
        return [_value(item, rng, depth + 1) for item in t.item_types]
    if isinstance(t, mi.AnyType):
        return rng.choice(_ALPHABET)
    raise SampleError(f"cannot make an example of {type(t).__name__} ({getattr(t, 'cls', t)!r})")


def _field(f: mi.Field, rng: random.Random, depth: int) -> Any:
    """A field's value: its default where it has a telling one (``schema_version = 1``), else made up."""
    if f.default is not msgspec.NODEFAULT and f.default not in ("", None, [], {}):
        return msgspec.to_builtins(f.default)
    return _value(f.type, rng, depth)


def _length(rng: random.Random, low: int | None, high: int | None, depth: int) -> int:
    """A collection or string length: at least one item where allowed, a few at most."""
    low = low or 0
    if depth > _MAX_DEPTH:
        return low
    top = low + 3 if high is None else min(high, low + 3)
    return rng.randint(min(max(low, 1), top), top)


def _int(t: mi.IntType, rng: random.Random) -> int:
    low = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else None)
    high = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else None)
    # Small, readable numbers where the bounds allow: an amount in cents, a count.
    if low is None:
        low = 0 if high is None or high >= 0 else high - 1000
    if high is None or high > low + 1000:
        high = low + 1000
    if not t.multiple_of:
        return rng.randint(low, high)
    first = -(-low // t.multiple_of) * t.multiple_of
    return first + t.multiple_of * rng.randint(0, max(0, (high - first) // t.multiple_of))


def _float(t: mi.FloatType, rng: random.Random) -> float:
    low = t.ge if t.ge is not None else t.gt if t.gt is not None else 0.0
    high = t.le if t.le is not None else t.lt if t.lt is not None else low + 1000.0
    value = round(rng.uniform(low, min(high, low + 1000.0)), 2)
    return round(value / t.multiple_of) * t.multiple_of if t.multiple_of else value


def _str(t: mi.StrType, rng: random.Random) -> str:
    if t.pattern:
        return _from_pattern(t.pattern, rng, t.max_length)
    # A word of 5 to 12 letters where the bounds allow.
    low = max(t.min_length or 0, min(5, t.max_length if t.max_length is not None else 5))
    high = low + 7 if t.max_length is None else min(t.max_length, low + 7)
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(low, high)))


def _from_pattern(pattern: str, rng: random.Random, max_length: int | None) -> str:
    """A string that ``re.search(pattern, ...)`` matches (anchors, classes, repeats, groups, alternation)."""
    try:
        parsed = sre_parse.parse(pattern)
    except re.error as exc:
        raise SampleError(f"cannot read pattern {pattern!r}: {exc}") from None
    # Without a ^ a pattern may match anywhere, so anything generated for it matches too.
    budget = 8 if max_length is None else max(1, min(8, max_length))
    return "".join(_pattern_part(parsed, rng, budget))


def _pattern_part(items: Any, rng: random.Random, budget: int) -> list[str]:
    out: list[str] = []
    for op, arg in items:
        if op is sre.LITERAL:
            out.append(chr(arg))
        elif op is sre.NOT_LITERAL:
            out.append(rng.choice([c for c in _PRINTABLE if ord(c) != arg]))
        elif op is sre.ANY:
            out.append(rng.choice(_PRINTABLE))
        elif op is sre.IN:
            out.append(_from_class(arg, rng))
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", None)):
            low, high, sub = arg
            high = low + budget if high is sre.MAXREPEAT else high
            for _ in range(rng.randint(low, max(low, min(high, low + budget)))):
                out += _pattern_part(sub, rng, budget)
        elif op is sre.SUBPATTERN:
            out += _pattern_part(arg[-1], rng, budget)
        elif op is sre.BRANCH:
            out += _pattern_part(rng.choice(arg[1]), rng, budget)
        elif op is sre.AT:
            continue
        else:
            raise SampleError(f"cannot make a string for the regex construct {op}")
    return out


def _from_class(items: Any, rng: random.Random) -> str:
    """One character of a ``[...]`` class (or ``\\d``, ``\\w``, ``\\s``), negated ones included."""
    negate = any(op is sre.NEGATE for op, _ in items)
    allowed: set[str] = set()
    for op, arg in items:
        if op is sre.LITERAL:
            allowed.add(chr(arg))
        elif op is sre.RANGE:
            allowed.update(chr(c) for c in range(arg[0], min(arg[1], arg[0] + 256) + 1))
        elif op is sre.CATEGORY:
            allowed.update(c for c in _PRINTABLE + " \t" if re.fullmatch(_CATEGORIES.get(arg, "(?!)"), c))
    pool = sorted(set(_PRINTABLE) - allowed) if negate else sorted(allowed)
    if not pool:
        raise SampleError("cannot make a string for an empty character class")
    return rng.choice(pool)


_CATEGORIES = {
    sre.CATEGORY_DIGIT: r"\d",
    sre.CATEGORY_NOT_DIGIT: r"\D",
    sre.CATEGORY_SPACE: r"\s",
    sre.CATEGORY_NOT_SPACE: r"\S",
    sre.CATEGORY_WORD: r"\w",
    sre.CATEGORY_NOT_WORD: r"\W",
}


@click.command()
@click.argument("topic")
@click.pass_context
def schema(ctx: click.Context, topic: str) -> None:
    """Print the JSON Schema of the type the installed plugins declare for TOPIC."""
    typ = topic_type(plugin_host(ctx), topic)
    click.echo(json.dumps(msgspec.json.schema(typ), indent=2, ensure_ascii=False))


@click.command()
@click.argument("topic")
@click.option("--count", "-n", type=click.IntRange(1), default=10, show_default=True, help="How many messages.")
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed gives the same messages.")
@click.pass_context
def sample(ctx: click.Context, topic: str, count: int, seed: int) -> None:
    """Write COUNT valid example messages of TOPIC's declared type, one JSON object a line, for `produce`."""
    typ = topic_type(plugin_host(ctx), topic)
    for line in examples(typ, count, seed):
        click.echo(line.decode())
