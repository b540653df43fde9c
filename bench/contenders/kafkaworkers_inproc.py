"""W3 in-process variants: the same plugin run by ``Worker`` in this process.

``--metrics off`` (the default here) runs with ``metrics=None`` and no observer hook: the
framework's floor, since the CLI always counts. ``--metrics on --observer`` reproduces what
``kafkaworkers run`` does, for profiling (bench/profile.py imports :func:`build`).
"""

from __future__ import annotations

import argparse
import os

from bench.contenders import kafkaworkers_plugin as kp
from kafkaworkers.config import load_settings
from kafkaworkers.metrics import Metrics
from kafkaworkers.plugins import PluginHost
from kafkaworkers.worker import Worker


def build(metrics: bool, observer: bool) -> Worker:
    spec = kp.spec
    settings = load_settings(
        spec.options["config"],
        {
            "bootstrap_servers": spec.bootstrap,
            "group_id": spec.group,
            "data_dir": spec.options.get("data_dir", os.path.join(os.path.dirname(spec.result_file), "data")),
            "metrics_port": 0,
        },
        environ={},
    )
    host = PluginHost()
    host.register(kp.plugin, kp.plugin.name)
    if observer:
        host.register(kp.observer, "bench-observer")
    worker = Worker([kp.plugin], settings, host, metrics=Metrics() if metrics else None)
    kp.state.worker = worker
    return worker


def run(worker: Worker) -> None:
    """Worker.run's loop, closing the measured window before close() leaves the group."""
    worker.start()
    try:
        while not kp.state.finished:
            worker.run_once()
        kp.finish()
    finally:
        worker.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--metrics", choices=["on", "off"], default="off")
    parser.add_argument("--observer", action="store_true")
    args = parser.parse_args()
    run(build(args.metrics == "on", args.observer))


if __name__ == "__main__":
    main()
