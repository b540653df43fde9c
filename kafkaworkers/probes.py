"""The worker's HTTP endpoint: ``/metrics``, ``/livez``, ``/readyz`` (``/healthz`` = ``/livez``).

It runs in a daemon thread and only reads what the loop already keeps (a heartbeat
timestamp, the join state, the metric registry), so a scrape never blocks or slows the
consumer loop. Each connection gets its own thread and a read timeout, so a client that
connects and never asks cannot hold the server either.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

__all__ = ["ProbeServer"]

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]

#: Seconds a connection may take to send its request.
_REQUEST_TIMEOUT = 10.0


class ProbeServer:
    """Serve metrics and probes on ``host:port`` (port 0 picks a free port; see :attr:`port`).

    :param registry: the registry ``/metrics`` exposes.
    :param live: returns (alive, reason) for ``/livez``.
    :param ready: returns (ready, reason) for ``/readyz``.
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry, live: Check, ready: Check) -> None:
        handler = type(
            "Handler",
            (_Handler,),
            {"registry": registry, "checks": {"/livez": live, "/healthz": live, "/readyz": ready}},
        )
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), handler)
        # The bound address (port 0 resolved), as server_address holds it; typeshed types that
        # for any socket family, a host in bytes included, so it is read from the socket itself.
        self.host: str
        self.port: int
        self.host, self.port = self._server.socket.getsockname()[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="kafkaworkers-http", daemon=True)

    def start(self) -> ProbeServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A scraper that hung up mid-reply is no news: no traceback on stderr (it would break JSON logs)."""
        log.debug("HTTP request from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    """The same server on an IPv6 address (``--metrics-host ::`` listens on every address)."""

    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry
    checks: dict[str, Check]
    timeout = _REQUEST_TIMEOUT

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, encoder(self.registry), content_type)
        elif path in self.checks:
            try:
                ok, reason = self.checks[path]()
            except Exception as exc:  # a probe must answer, not drop the connection
                log.exception("%s check failed", path)
                ok, reason = False, f"{path} check failed: {type(exc).__name__}: {exc}"
            line = " ".join(reason.split()) + "\n"  # one line, whatever the reason says
            self._reply(200 if ok else 503, line.encode(), "text/plain; charset=utf-8")
        else:
            self._reply(404, b"not found: try /metrics, /livez or /readyz\n", "text/plain; charset=utf-8")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every few seconds would drown the worker's own log."""
