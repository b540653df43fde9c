"""W6, hand-written: the confluent-kafka loop of W2 with a ThreadPoolExecutor of ``concurrency`` threads.

Per batch (up to 500): decode every message, call the local HTTP server for each on the pool
(``pool.map``), produce one result per message, flush, store the offsets. The simple way to
write it: the batch waits for its slowest call, and nothing keeps one key's messages in order.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import msgspec
from confluent_kafka import Consumer, Producer, TopicPartition

from bench.common import Meter, Spec
from bench.orders import CORRELATION_HEADER, Pagamento, summarize
from bench.w6 import SyncCaller


def main() -> None:
    spec = Spec.load()
    meter = Meter(spec)
    consumer = Consumer(spec.consumer_config())
    producer = Producer(spec.producer_config())
    decode = msgspec.json.Decoder(Pagamento).decode
    encode = msgspec.json.Encoder().encode
    caller = SyncCaller(spec.options["url"])
    pool = ThreadPoolExecutor(int(spec.options.get("concurrency", 1)))

    def work(payment: Pagamento) -> bytes:
        caller.call(payment.order_id)
        return encode(summarize(payment))

    consumer.subscribe([spec.topic])
    done = 0
    try:
        while done < spec.target:
            messages = [m for m in consumer.consume(spec.batch_size, 0.5) if m.error() is None]
            if not messages:
                continue
            meter.start()
            messages = messages[: spec.target - done]
            results = list(pool.map(work, [decode(m.value()) for m in messages]))
            last: dict[tuple[str, int], int] = {}
            for msg, result in zip(messages, results, strict=True):
                headers = [(k, v) for k, v in (msg.headers() or ()) if k == CORRELATION_HEADER] or None
                while True:
                    try:
                        producer.produce(spec.out_topic, result, msg.key(), headers=headers)
                        break
                    except BufferError:
                        producer.poll(0.1)
                last[(msg.topic(), msg.partition())] = msg.offset()
            while producer.flush(1.0) > 0:
                pass
            consumer.store_offsets(offsets=[TopicPartition(t, p, o + 1) for (t, p), o in last.items()])
            done += len(messages)
        meter.stop(done)
    finally:
        pool.shutdown(wait=False)
        consumer.close()


if __name__ == "__main__":
    main()
