"""W6 peer: Quix Streams, W3-small's work plus a sync call to the local HTTP server per message.

Quix Streams handles a partition's messages one at a time in its one processing thread and
has no option to run several at once: its only setting is concurrency 1. At-least-once
as in W3 (offsets stored after processing, checkpoint every 5 s).
"""

from __future__ import annotations

import logging
import tempfile

import msgspec
from quixstreams import Application

from bench.common import PREFETCH, PRODUCER, Meter, Spec
from bench.orders import Pagamento, summarize
from bench.w6 import SyncCaller

spec = Spec.load()
meter = Meter(spec)
decode = msgspec.json.Decoder(Pagamento).decode
encode = msgspec.json.Encoder().encode
caller = SyncCaller(spec.options["url"])
state = {"done": 0}


def on_processed(topic: str, partition: int, offset: int) -> None:
    state["done"] += 1
    if state["done"] == spec.target:
        meter.stop(state["done"])
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
payments = app.topic(spec.topic, key_deserializer="bytes", value_deserializer="bytes")
results = app.topic(spec.out_topic, key_serializer="bytes", value_serializer="bytes")


def handle(raw: bytes) -> bytes:
    meter.start()
    payment = decode(raw)
    caller.call(payment.order_id)
    return encode(summarize(payment))


sdf = app.dataframe(payments)
sdf = sdf.apply(handle)
sdf.to_topic(results)

if __name__ == "__main__":
    app.run(sdf)
