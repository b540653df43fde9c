"""Peer: Faust (faust-streaming, aiokafka underneath), in its at-least-once mode.

An agent iterates the orders stream (raw bytes), decodes each with msgspec into the same
``PedidoNovo`` struct (Faust's idiom would be a ``faust.Record`` model with its JSON codec),
and sends one result per order to the result topic. Faust acknowledges an event once the
agent moved past it and commits acknowledged offsets every ``broker_commit_every`` events or
``broker_commit_interval`` (its defaults), flushing the producer before each commit.
Faust's producer is acks=all; idempotence is only available with its exactly-once mode.

After ``target`` orders the agent forces a commit (flush + commit), closes the measured
window and stops the worker with SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal

import faust
import msgspec

from bench.common import AIOKAFKA_CONSUMER, AIOKAFKA_PRODUCER, Meter, Spec
from bench.orders import CORRELATION_HEADER, PedidoNovo, process

spec = Spec.load()
meter = Meter(spec)
decode = msgspec.json.Decoder(PedidoNovo).decode
encode = msgspec.json.Encoder().encode

app = faust.App(
    spec.group,
    broker=f"kafka://{spec.bootstrap}",
    store="memory://",
    key_serializer="raw",
    value_serializer="raw",
    web_enabled=False,
    consumer_auto_offset_reset=AIOKAFKA_CONSUMER["auto_offset_reset"],
    consumer_max_fetch_size=AIOKAFKA_CONSUMER["max_partition_fetch_bytes"],
    broker_max_poll_records=AIOKAFKA_CONSUMER["max_poll_records"],
    producer_acks=-1,
    producer_linger=AIOKAFKA_PRODUCER["linger_ms"] / 1000,
    producer_max_batch_size=AIOKAFKA_PRODUCER["max_batch_size"],
)
orders = app.topic(spec.topic, key_type=bytes, value_type=bytes)
results = app.topic(spec.out_topic, key_type=bytes, value_type=bytes)
state = {"done": 0}


@app.agent(orders)
async def handle(stream):
    async for event in stream.events():
        meter.start()
        order = decode(event.value)
        headers = {k: v for k, v in (event.headers or {}).items() if k == CORRELATION_HEADER}
        await results.send(key=event.key, value=encode(process(order)), headers=headers or None)
        state["done"] += 1
        if state["done"] == spec.target:
            await app.consumer.commit()
            meter.stop(state["done"])
            os.kill(os.getpid(), signal.SIGTERM)  # the usual way to stop a Faust worker


worker = faust.Worker(app, loglevel=logging.WARNING, quiet=True)

if __name__ == "__main__":
    worker.execute_from_commandline()
