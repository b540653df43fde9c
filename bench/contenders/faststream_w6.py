"""W6 peer: FastStream (confluent backend), an async subscriber with its own concurrency option.

FastStream 0.7 runs up to ``max_workers`` messages of a subscriber at once; it accepts
``max_workers > 1`` only with ``AckPolicy.ACK_FIRST`` (the offset is committed when the
message is received, before the handler ran), so this peer runs ACK_FIRST at every setting.
The handler decodes with msgspec, awaits the local HTTP server through aiohttp, and
publishes the result without waiting for its acknowledgement.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from faststream import AckPolicy
from faststream.confluent import KafkaBroker
from faststream.confluent.annotations import KafkaMessage

from bench.common import CONSUMER, PREFETCH, PRODUCER, Meter, Spec
from bench.orders import CORRELATION_HEADER, Pagamento, summarize
from bench.w6 import AsyncCaller

spec = Spec.load()
meter = Meter(spec)
logger = logging.getLogger("bench.faststream")
logging.basicConfig(level=logging.WARNING)
broker = KafkaBroker(
    spec.bootstrap,
    acks="all",
    enable_idempotence=True,
    linger_ms=PRODUCER["linger.ms"],
    partitioner=PRODUCER["partitioner"],
    config={**PREFETCH, **{k: v for k, v in PRODUCER.items() if k not in ("acks", "enable.idempotence")}},
    logger=logger,
)
workers = int(spec.options.get("concurrency", 1))
decode = msgspec.json.Decoder(Pagamento).decode
encode = msgspec.json.Encoder().encode
caller = AsyncCaller(spec.options["url"])
state = {"done": 0}
finished = asyncio.Event()


@broker.subscriber(
    spec.topic,
    group_id=spec.group,
    auto_offset_reset="earliest",
    ack_policy=AckPolicy.ACK_FIRST,
    max_workers=workers,
    decoder=lambda msg: msg.body,
    max_partition_fetch_bytes=PREFETCH["max.partition.fetch.bytes"],
    fetch_max_bytes=PREFETCH["fetch.max.bytes"],
    partition_assignment_strategy=(CONSUMER["partition.assignment.strategy"],),
)
async def handle(body: bytes, msg: KafkaMessage) -> None:
    meter.start()
    payment = decode(body)
    await caller.call(payment.order_id)
    raw = msg.raw_message
    headers = {k: v.decode() for k, v in raw.headers() or () if k == CORRELATION_HEADER} or None
    await broker.publish(encode(summarize(payment)), spec.out_topic, key=raw.key(), headers=headers, no_confirm=True)
    state["done"] += 1
    if state["done"] == spec.target:
        meter.stop(state["done"])
        finished.set()


async def main() -> None:
    async with broker:
        await broker.start()
        await finished.wait()


if __name__ == "__main__":
    asyncio.run(main())
