"""What keeps the console's actions to the operator in front of it, and secrets off its pages.

Actions (replay, pause, resume) are POSTs that change the running system, so a page on
another site must not be able to make the operator's browser send one. Two independent
checks, either of which stops such a request:

- **A CSRF token tied to the page's browser session.** The first page sets a random
  ``kw_session`` cookie (``HttpOnly``, ``SameSite=Strict``); every form carries
  ``HMAC(server key, session)``. A forged POST lacks the token (another site cannot read the
  console's pages), and ``SameSite=Strict`` keeps the cookie off cross-site requests anyway.
  The key is random per process, so restarting the console voids every old page.
- **The request's origin.** A POST whose ``Origin`` is not the console's own, or whose
  ``Sec-Fetch-Site`` is anything but ``same-origin``, is refused before the token is looked at.

``Host`` must name the console (its bind address, or a loopback name), which stops a DNS
rebinding page from reaching it under a name of its own.

Secrets: whatever a page shows of the settings goes through :func:`masked`, which hides the
values whose names say secret (:func:`kafkaworkers.config.redact`) and the password of any
value that is a URL (``postgresql://user:***@db/orders``), whatever its name.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from kafkaworkers.config import redact, redact_url

__all__ = ["SESSION_COOKIE", "TOKEN_FIELD", "CsrfGuard", "masked", "same_origin"]

SESSION_COOKIE = "kw_session"
TOKEN_FIELD = "csrf_token"


class CsrfGuard:
    """Issues and checks the per-session tokens the console's forms carry."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    @staticmethod
    def new_session() -> str:
        return secrets.token_urlsafe(24)

    def token(self, session: str) -> str:
        """The token every form of this browser session carries."""
        return hmac.new(self._key, session.encode(), hashlib.sha256).hexdigest()

    def valid(self, session: str | None, token: str | None) -> bool:
        if not session or not token:
            return False
        return hmac.compare_digest(self.token(session), token)


def same_origin(origin: str | None, fetch_site: str | None, scheme: str, host: str) -> bool:
    """Whether a POST's ``Origin`` and ``Sec-Fetch-Site`` headers allow it.

    A header the client did not send (curl, an old browser) does not refuse the request:
    the token still has to match. ``Origin: null`` (a sandboxed frame, a redirect) does.
    """
    if fetch_site is not None and fetch_site != "same-origin":
        return False
    if origin is None:
        return True
    parts = urlsplit(origin)
    return parts.scheme == scheme and parts.netloc.lower() == host.lower()


def masked(value: Any) -> Any:
    """``value`` fit to show: secret-named entries of tables redacted, URL passwords replaced."""
    if isinstance(value, Mapping):
        return {k: masked(v) for k, v in redact(value).items()}
    if isinstance(value, list | tuple):
        return [masked(v) for v in value]
    if isinstance(value, str):
        return redact_url(value)
    return value
