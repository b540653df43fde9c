"""Peer: Quix Streams (confluent-kafka underneath), in its at-least-once mode.

A StreamingDataFrame reads the orders as bytes, decodes them with msgspec into the same
``PedidoNovo`` struct (Quix's idiom would be its ``json`` deserializer into a dict), and
``to_topic`` writes one result per order (the input key and headers travel along, as
Quix does by default). Quix stores each offset after processing and commits a checkpoint
(flush the producer, then commit) every ``commit_interval`` (its default 5 s) and once more
when stopped. The librdkafka prefetch and producer settings are the shared ones; the
offset-handling keys are left to Quix.

The measured window closes after the final forced checkpoint: the app's processing context
is wrapped (instrumentation only) to note when that commit returns.
"""

from __future__ import annotations

import logging
import tempfile

import msgspec
from quixstreams import Application

from bench.common import PREFETCH, PRODUCER, Meter, Spec
from bench.orders import PedidoNovo, process

spec = Spec.load()
meter = Meter(spec)
decode = msgspec.json.Decoder(PedidoNovo).decode
encode = msgspec.json.Encoder().encode
state = {"done": 0, "stopping": False}


def on_processed(topic: str, partition: int, offset: int) -> None:
    state["done"] += 1
    if state["done"] >= spec.target and not state["stopping"]:
        state["stopping"] = True
        app.stop()


app = Application(
    broker_address=spec.bootstrap,
    consumer_group=spec.group,
    auto_offset_reset="earliest",
    processing_guarantee="at-least-once",
    consumer_extra_config=dict(PREFETCH),
    producer_extra_config={k: v for k, v in PRODUCER.items() if k != "partitioner"},
    on_message_processed=on_processed,
    state_dir=tempfile.mkdtemp(prefix="quix-state-"),
    loglevel=logging.WARNING,
)
orders = app.topic(spec.topic, key_deserializer="bytes", value_deserializer="bytes")
results = app.topic(spec.out_topic, key_serializer="bytes", value_serializer="bytes")


def handle(raw: bytes) -> bytes:
    if meter.started is None:
        meter.start()
    return encode(process(decode(raw)))


sdf = app.dataframe(orders)
sdf = sdf.apply(handle)
sdf.to_topic(results)

_context = app._processing_context
_commit_checkpoint = _context.commit_checkpoint


def commit_checkpoint(force: bool = False, revoking: bool = False) -> None:
    _commit_checkpoint(force=force, revoking=revoking)
    if force and state["stopping"] and meter.count == 0:
        meter.stop(state["done"])


_context.commit_checkpoint = commit_checkpoint

if __name__ == "__main__":
    app.run(sdf)
