"""W0 raw produce: a confluent-kafka producer writing ``target`` 300-byte messages (the shared
producer settings: acks=all, idempotent, linger 5 ms), the Python-side broker ceiling."""

from __future__ import annotations

import os

from confluent_kafka import Producer

from bench.common import Meter, Spec


def main() -> None:
    spec = Spec.load()
    meter = Meter(spec)
    producer = Producer(spec.producer_config())
    payload = os.urandom(150).hex().encode()  # 300 bytes
    failed = [0]

    def on_delivery(err, msg) -> None:
        if err is not None:
            failed[0] += 1

    produce, poll, topic = producer.produce, producer.poll, spec.topic
    meter.start()
    for i in range(spec.target):
        while True:
            try:
                produce(topic, payload, str(i).encode(), on_delivery=on_delivery)
                break
            except BufferError:
                poll(0.05)
    producer.flush(120)
    meter.stop(spec.target - failed[0], failed=failed[0])


if __name__ == "__main__":
    main()
