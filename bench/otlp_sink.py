"""W9's trace collector: a local OTLP/HTTP endpoint that counts the spans each service sends.

It runs on a thread of the bench process, so its CPU is not a contender's; the contender pays
for making, encoding and sending its spans. The counts show every span arrived (none dropped
by a full export queue), so the cost measured is the cost of all of them.
"""

from __future__ import annotations

import collections
import http.server
import threading
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class OtlpSink(http.server.ThreadingHTTPServer):
    """``POST /v1/traces`` answered 200; spans counted per ``service.name``."""

    daemon_threads = True

    def __init__(self) -> None:
        self.spans: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session expects

            def do_POST(self) -> None:
                request = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
                for resource in request.resource_spans:
                    service = next(
                        (a.value.string_value for a in resource.resource.attributes if a.key == "service.name"), ""
                    )
                    count = sum(len(scope.spans) for scope in resource.scope_spans)
                    with sink._lock:
                        sink.spans[service] += count
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, name="otlp-sink", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"
