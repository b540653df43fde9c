"""Payment gateways: the interface pagamento charges through, a simulated one and an HTTP client.

Both take an idempotency key on every call and keep its first answer, as real gateways do:
calling again with the same key returns the recorded charge and moves no money, which is
what makes "charge, crash before recording it, charge again" safe. A decline is a result
(:class:`ChargeResult` with status ``recusado``); only a gateway that cannot answer raises
:class:`GatewayError`, which the worker retries.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from typing import Any, Literal, Protocol

import msgspec

from kafkaworkers import PermanentError, Store
from kafkaworkers_orders.contracts import Cartao

__all__ = ["LEDGER", "ChargeResult", "Gateway", "GatewayError", "HttpGateway", "SimulatedGateway"]


class ChargeResult(msgspec.Struct, frozen=True, kw_only=True):
    """A gateway's answer to a charge; also the JSON body :class:`HttpGateway` expects back."""

    status: Literal["aprovado", "recusado"]
    transacao_id: str = ""
    motivo: str = ""


class GatewayError(Exception):
    """The gateway could not answer (down, failing, unreachable): a transient failure."""


class Gateway(Protocol):
    def charge(self, idempotency_key: str, amount_cents: int, card: Cartao) -> ChargeResult: ...

    def refund(self, idempotency_key: str, transacao_id: str, amount: int) -> None: ...

    def close(self) -> None: ...


_DECLINES = {
    "tok_recusado": "cartão recusado pelo emissor",
    "tok_sem_saldo": "saldo insuficiente",
}

#: The simulated gateway's ledger: one charge and one refund per idempotency key, enforced by the primary keys.
LEDGER = """
CREATE TABLE IF NOT EXISTS cobranca (
    chave TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    transacao_id TEXT NOT NULL,
    motivo TEXT NOT NULL,
    valor BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS estorno (
    chave TEXT PRIMARY KEY,
    transacao_id TEXT NOT NULL,
    valor BIGINT NOT NULL
);
"""
_SELECT_CHARGE = "SELECT status, transacao_id, motivo FROM cobranca WHERE chave = ?"


class SimulatedGateway:
    """A deterministic gateway whose outcome is chosen by the card token.

    ``tok_recusado`` and ``tok_sem_saldo`` are declined, ``tok_erro`` raises
    :class:`GatewayError`, ``tok_timeout`` is approved but its answer is lost: the call raises
    :class:`GatewayError` after ``timeout`` seconds, as an HTTP client would (a charge that
    went through while the caller gave up); any other token is approved.
    Setting :attr:`down` makes every call fail, for taking the gateway down in fault tests.

    :param ledger: the store of its charges and refunds (tables :data:`LEDGER`), keyed by
        idempotency key. pagamento's instances on several hosts share one (the PostgreSQL
        database of ``database_url``), as they would share a real gateway.
    :param timeout: how long a ``tok_timeout`` call waits for its lost answer.
    """

    def __init__(self, ledger: Store, timeout: float = 10.0) -> None:
        self.store = ledger
        self.timeout = timeout
        self.down = False
        #: Charge calls per idempotency key, replays included.
        self.charge_calls: Counter[str] = Counter()

    def charge(self, idempotency_key: str, amount_cents: int, card: Cartao) -> ChargeResult:
        self.charge_calls[idempotency_key] += 1
        self._check_up()
        recorded = self._charge(idempotency_key)
        if recorded is not None:
            return recorded
        if card.token == "tok_erro":
            raise GatewayError("erro no processador do cartão")
        motivo = _DECLINES.get(card.token, "")
        row = ("recusado" if motivo else "aprovado", f"tx_{uuid.uuid4().hex[:16]}", motivo, amount_cents)
        with self.store.transaction() as db:
            # A concurrent call with the same key may have recorded first: its answer stands.
            db.execute("INSERT INTO cobranca VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", (idempotency_key, *row))
            status, transacao_id, motivo = db.execute(_SELECT_CHARGE, (idempotency_key,)).fetchone()
        if card.token == "tok_timeout":
            time.sleep(self.timeout)
            raise GatewayError(f"no answer within {self.timeout} s")
        return ChargeResult(status=status, transacao_id=transacao_id, motivo=motivo)

    def refund(self, idempotency_key: str, transacao_id: str, amount: int) -> None:
        self._check_up()
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO estorno VALUES (?, ?, ?) ON CONFLICT DO NOTHING", (idempotency_key, transacao_id, amount)
            )

    def charges_for(self, order_id: str) -> int:
        """How many charges were made with an order's idempotency key (pagamento uses the order id)."""
        return int(self.store.db.execute("SELECT count(*) FROM cobranca WHERE chave = ?", (order_id,)).fetchone()[0])

    def refunds_for(self, transacao_id: str) -> int:
        """How many refunds were made of one charge."""
        sql = "SELECT count(*) FROM estorno WHERE transacao_id = ?"
        return int(self.store.db.execute(sql, (transacao_id,)).fetchone()[0])

    def close(self) -> None:
        self.store.close()

    def _check_up(self) -> None:
        if self.down:
            raise GatewayError("gateway indisponível")

    def _charge(self, key: str) -> ChargeResult | None:
        row = self.store.db.execute(_SELECT_CHARGE, (key,)).fetchone()
        return ChargeResult(status=row[0], transacao_id=row[1], motivo=row[2]) if row else None


class HttpGateway:
    """A gateway's JSON API: ``POST /charges`` and ``POST /refunds`` with an ``Idempotency-Key`` header.

    A charge sends ``{"amount_cents", "card": {"token", "final", "pais_emissor"}}`` and gets a
    :class:`ChargeResult` back; a refund sends ``{"transacao_id", "amount_cents"}``. The API
    key travels as a bearer token and appears in no message, log or ``repr``. A 400, 404 or
    422 means the request itself is wrong (:class:`PermanentError`); any other failure is
    transient (:class:`GatewayError`).
    """

    def __init__(self, base_url: str, api_key: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._api_key = api_key

    def __repr__(self) -> str:
        return f"HttpGateway({self.base_url!r}, timeout={self.timeout})"

    def charge(self, idempotency_key: str, amount_cents: int, card: Cartao) -> ChargeResult:
        body = self._post("/charges", idempotency_key, {"amount_cents": amount_cents, "card": card})
        try:
            return msgspec.json.decode(body, type=ChargeResult)
        except msgspec.DecodeError as exc:
            raise GatewayError(f"gateway /charges answered something that is not a charge result: {exc}") from None

    def refund(self, idempotency_key: str, transacao_id: str, amount: int) -> None:
        self._post("/refunds", idempotency_key, {"transacao_id": transacao_id, "amount_cents": amount})

    def close(self) -> None:
        """Nothing to release: every request opens its own connection."""

    def _post(self, path: str, idempotency_key: str, payload: dict[str, Any]) -> bytes:
        request = urllib.request.Request(
            self.base_url + path,
            data=msgspec.json.encode(payload),
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {self._api_key}",
                "Idempotency-Key": idempotency_key,
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in (400, 404, 422):
                raise PermanentError(f"gateway refused {path}: HTTP {exc.code}") from None
            raise GatewayError(f"gateway {path} failed: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise GatewayError(f"gateway {path} unreachable: {reason}") from None
