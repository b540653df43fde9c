"""W2 raw pipeline, the baseline: the hand-written confluent-kafka loop that does what
kafkaworkers does, and nothing more.

Per batch: consume, decode each order into ``PedidoNovo`` with msgspec, produce one
``PedidoProcessado`` per order (keyed like the order, its correlation header carried along),
flush until every result is acknowledged, then store each partition's next offset
(``enable.auto.offset.store=false``; librdkafka commits stored offsets every second). A failed
delivery stores nothing and rewinds the batch, as kafkaworkers does. With
``spec.options["data"] == "payments"`` (W3-small) the same loop decodes the small flat
``Pagamento`` and produces a ``PagamentoResumo``.
"""

from __future__ import annotations

import msgspec
from confluent_kafka import Consumer, Producer, TopicPartition

from bench.common import Meter, Spec
from bench.orders import CORRELATION_HEADER, Pagamento, PedidoNovo, process, summarize


def main() -> None:
    spec = Spec.load()
    meter = Meter(spec)
    consumer = Consumer(spec.consumer_config())
    producer = Producer(spec.producer_config())
    payments = spec.options.get("data") == "payments"
    decode = msgspec.json.Decoder(Pagamento if payments else PedidoNovo).decode
    work = summarize if payments else process
    encode = msgspec.json.Encoder().encode
    out = spec.out_topic
    failed = [0]

    def on_delivery(err, msg) -> None:
        if err is not None:
            failed[0] += 1

    consumer.subscribe([spec.topic])
    done = 0
    try:
        while done < spec.target:
            messages = consumer.consume(spec.batch_size, 0.5)
            if not messages:
                continue
            meter.start()
            first: dict[tuple[str, int], int] = {}
            last: dict[tuple[str, int], int] = {}
            handled = 0
            for msg in messages:
                if msg.error() is not None:
                    continue
                tp = (msg.topic(), msg.partition())
                if tp not in first:
                    first[tp] = msg.offset()
                result = encode(work(decode(msg.value())))
                headers = [(k, v) for k, v in (msg.headers() or ()) if k == CORRELATION_HEADER] or None
                while True:
                    try:
                        producer.produce(out, result, msg.key(), headers=headers, on_delivery=on_delivery)
                        break
                    except BufferError:
                        producer.poll(0.1)
                last[tp] = msg.offset()
                handled += 1
            while producer.flush(1.0) > 0:
                pass
            if failed[0]:
                failed[0] = 0
                for (topic, partition), offset in first.items():
                    consumer.seek(TopicPartition(topic, partition, offset))
                continue
            if last:
                consumer.store_offsets(offsets=[TopicPartition(t, p, o + 1) for (t, p), o in last.items()])
            done += handled
        meter.stop(done)
    finally:
        consumer.close()


if __name__ == "__main__":
    main()
