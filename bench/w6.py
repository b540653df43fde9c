"""W6's I/O: one call per message to the bench's local HTTP server (bench/httpserver.py).

Importable from every venv: :class:`SyncCaller` needs the standard library only,
:class:`AsyncCaller` aiohttp (in the project's venv and FastStream's). Both keep their
connections alive, as a service client would.
"""

from __future__ import annotations

import http.client
import threading
from typing import Any
from urllib.parse import urlsplit

__all__ = ["AsyncCaller", "SyncCaller"]


class SyncCaller:
    """``http.client`` with one keep-alive connection per calling thread."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path or "/"
        self._local = threading.local()

    def call(self, order_id: str) -> bytes:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        conn.request("GET", f"{self.path}?order={order_id}")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"W6 server answered {response.status}")
        return body


class AsyncCaller:
    """aiohttp with one session, made on first use on the caller's event loop."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._session: Any = None

    async def call(self, order_id: str) -> bytes:
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        async with self._session.get(self.url, params={"order": order_id}) as response:
            body = await response.read()
            if response.status != 200:
                raise RuntimeError(f"W6 server answered {response.status}")
            return body
