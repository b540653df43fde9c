"""W5 load: orders produced at a fixed rate, each stamped ``criado_em`` = the moment it is sent.

``spec.options``: ``rate`` (orders/s), ``seconds``, ``id_prefix``, ``skus`` (optional). Writes how many it sent
and how far behind its schedule it ever fell (a producer that cannot keep the rate says so).
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime

import msgspec
from confluent_kafka import Producer

from bench.common import Meter, Spec
from bench.orders import CORRELATION_HEADER, make_order


def main() -> None:
    spec = Spec.load()
    rate = float(spec.options["rate"])
    total = int(rate * float(spec.options["seconds"]))
    prefix = spec.options["id_prefix"]
    skus = spec.options.get("skus")
    meter = Meter(spec)
    producer = Producer(spec.producer_config())
    encode = msgspec.json.Encoder().encode
    rng = random.Random(11)
    perf, sleep, now = time.perf_counter, time.sleep, datetime.now
    # Connect and get the idempotent producer id before the clock starts: otherwise the first
    # orders wait in the local queue for the handshake and the workers are blamed for it.
    warmup = f"warmup-{prefix}"
    producer.produce(spec.topic, encode(make_order(rng, warmup, criado_em=now(UTC), skus=skus)), warmup.encode())
    if producer.flush(30) > 0:
        raise SystemExit("rate producer: the warm-up order was not acknowledged within 30 s")
    behind = 0.0
    meter.start()
    start = perf()
    for i in range(total):
        delay = start + i / rate - perf()
        if delay > 0.0005:
            sleep(delay)
        else:
            behind = max(behind, -delay)
        order_id = f"{prefix}-{i:08d}"
        value = encode(make_order(rng, order_id, criado_em=now(UTC), skus=skus))
        while True:
            try:
                producer.produce(
                    spec.topic, value, order_id.encode(), headers=[(CORRELATION_HEADER, order_id.encode())]
                )
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    producer.flush(60)
    meter.stop(total, rate=rate, achieved_rate=total / (perf() - start), max_behind_s=behind)


if __name__ == "__main__":
    main()
