"""W1 raw consume: confluent-kafka batch consume of the orders, no processing, nothing stored."""

from __future__ import annotations

from confluent_kafka import Consumer

from bench.common import Meter, Spec


def main() -> None:
    spec = Spec.load()
    meter = Meter(spec)
    consumer = Consumer(spec.consumer_config())
    consumer.subscribe([spec.topic])
    seen = 0
    try:
        while seen < spec.target:
            messages = consumer.consume(spec.batch_size, 0.5)
            if not messages:
                continue
            meter.start()
            seen += sum(1 for m in messages if m.error() is None)
        meter.stop(seen)
    finally:
        consumer.close()


if __name__ == "__main__":
    main()
