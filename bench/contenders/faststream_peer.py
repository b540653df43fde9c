"""Peer: FastStream, on either of its Kafka backends (``confluent`` or ``aiokafka``).

At-least-once the FastStream way: a batch subscriber (``batch=True``, 500 records) with
``AckPolicy.ACK``, so the batch is committed only after the handler returned. The handler
publishes one result per order with ``no_confirm=True`` and awaits every delivery before
returning, the same order of events as kafkaworkers (produce all, flush, then commit).
Decoding: a custom FastStream ``decoder`` with msgspec into the same ``PedidoNovo`` struct
(FastStream's default would be pydantic validation of a pydantic model). Per-message access
logs are left at FastStream's INFO level but sent to a WARNING logger, so they cost a level
check only.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import msgspec

from bench.common import AIOKAFKA_CONSUMER, AIOKAFKA_PRODUCER, CONSUMER, PREFETCH, PRODUCER, Meter, Spec
from bench.orders import CORRELATION_HEADER, PedidoNovo, process

BACKEND = sys.argv[1] if len(sys.argv) > 1 else "confluent"
spec = Spec.load()
meter = Meter(spec)
logger = logging.getLogger("bench.faststream")
logging.basicConfig(level=logging.WARNING)

if BACKEND == "confluent":
    from faststream.confluent import KafkaBroker
    from faststream.confluent.annotations import KafkaMessage

    broker = KafkaBroker(
        spec.bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=PRODUCER["linger.ms"],
        partitioner=PRODUCER["partitioner"],
        config={**PREFETCH, **{k: v for k, v in PRODUCER.items() if k not in ("acks", "enable.idempotence")}},
        logger=logger,
    )
    subscriber_options = {
        "max_partition_fetch_bytes": PREFETCH["max.partition.fetch.bytes"],
        "fetch_max_bytes": PREFETCH["fetch.max.bytes"],
        "partition_assignment_strategy": (CONSUMER["partition.assignment.strategy"],),
    }

    def key(raw):
        return raw.key()

    def value(raw):
        return raw.value()

    def correlation(raw):
        for k, v in raw.headers() or ():
            if k == CORRELATION_HEADER:
                return {k: v.decode()}
        return None

else:
    from faststream.kafka import KafkaBroker
    from faststream.kafka.annotations import KafkaMessage

    broker = KafkaBroker(spec.bootstrap, logger=logger, **AIOKAFKA_PRODUCER)
    subscriber_options = {
        "max_partition_fetch_bytes": AIOKAFKA_CONSUMER["max_partition_fetch_bytes"],
        "fetch_max_bytes": AIOKAFKA_CONSUMER["fetch_max_bytes"],
    }

    def key(raw):
        return raw.key

    def value(raw):
        return raw.value

    def correlation(raw):
        for k, v in raw.headers or ():
            if k == CORRELATION_HEADER:
                return {k: v.decode()}
        return None


from faststream import AckPolicy  # noqa: E402

_decode = msgspec.json.Decoder(PedidoNovo).decode
_encode = msgspec.json.Encoder().encode
state = {"done": 0}
finished = asyncio.Event()


def decode_batch(msg) -> list[PedidoNovo]:
    """FastStream decoder: the batch's bodies as ``PedidoNovo`` structs (msgspec)."""
    return [_decode(value(raw)) for raw in msg.raw_message]


@broker.subscriber(
    spec.topic,
    group_id=spec.group,
    auto_offset_reset="earliest",
    batch=True,
    max_records=spec.batch_size,
    ack_policy=AckPolicy.ACK,
    decoder=decode_batch,
    **subscriber_options,
)
async def handle(orders: list, msg: KafkaMessage) -> None:
    meter.start()
    pending = []
    for order, raw in zip(orders, msg.raw_message, strict=True):
        result = _encode(process(order))
        pending.append(
            await broker.publish(result, spec.out_topic, key=key(raw), headers=correlation(raw), no_confirm=True)
        )
    await asyncio.gather(*pending)
    state["done"] += len(orders)
    if state["done"] >= spec.target and not finished.is_set():
        await msg.ack()  # the last batch's commit belongs inside the measured window
        meter.stop(state["done"])
        finished.set()


async def main() -> None:
    async with broker:
        await broker.start()
        await finished.wait()


if __name__ == "__main__":
    asyncio.run(main())
