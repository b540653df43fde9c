"""Peer: a hand-written aiokafka loop, the asyncio counterpart of the W2 baseline.

``getmany`` a batch of up to 500 records, decode each with msgspec, ``send`` one result
per order, await every delivery, then commit the batch's next offsets (auto-commit off).
"""

from __future__ import annotations

import asyncio

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.common import AIOKAFKA_CONSUMER, AIOKAFKA_PRODUCER, Meter, Spec
from bench.orders import CORRELATION_HEADER, PedidoNovo, process


async def main() -> None:
    spec = Spec.load()
    meter = Meter(spec)
    decode = msgspec.json.Decoder(PedidoNovo).decode
    encode = msgspec.json.Encoder().encode
    consumer = AIOKafkaConsumer(
        spec.topic, bootstrap_servers=spec.bootstrap, group_id=spec.group, enable_auto_commit=False, **AIOKAFKA_CONSUMER
    )
    producer = AIOKafkaProducer(bootstrap_servers=spec.bootstrap, **AIOKAFKA_PRODUCER)
    await producer.start()
    await consumer.start()
    done = 0
    try:
        while done < spec.target:
            batches = await consumer.getmany(timeout_ms=500, max_records=spec.batch_size)
            if not batches:
                continue
            meter.start()
            pending = []
            offsets: dict[TopicPartition, int] = {}
            for tp, records in batches.items():
                for record in records:
                    headers = [(k, v) for k, v in record.headers if k == CORRELATION_HEADER]
                    result = encode(process(decode(record.value)))
                    pending.append(await producer.send(spec.out_topic, result, key=record.key, headers=headers))
                offsets[tp] = records[-1].offset + 1
            await asyncio.gather(*pending)
            await consumer.commit(offsets)
            done += len(pending)
        meter.stop(done)
    finally:
        await consumer.stop()
        await producer.stop()


if __name__ == "__main__":
    asyncio.run(main())
