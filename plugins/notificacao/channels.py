"""Where notificacao delivers a rendered notification: the log, e-mail over SMTP, or a webhook.

A channel sends one :class:`Notificacao` or raises. A failure the recipient's side will
repeat forever (a refused address, a 4xx answer) is a :class:`~kafkaworkers.PermanentError`;
anything else is worth retrying. Secrets (the SMTP password, a webhook URL that may carry a
token) never appear in a log line, a repr or an exception text.
"""

from __future__ import annotations

import json
import logging
import smtplib
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formataddr
from typing import Protocol

from kafkaworkers import PermanentError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Notificacao:
    """One message to one customer about one event of one order."""

    order_id: str
    kind: str
    nome: str
    email: str
    assunto: str
    texto: str

    @property
    def idempotency_key(self) -> str:
        """The same for every attempt, so a receiver can drop the one duplicate a crash may cause."""
        return f"{self.order_id}.{self.kind}"


class Channel(Protocol):
    name: str

    def send(self, notificacao: Notificacao) -> None: ...


class LogChannel:
    """Writes the notification to the log: the default, for development and the demo."""

    name = "log"

    def send(self, notificacao: Notificacao) -> None:
        log.info(
            "notificacao %s para %s <%s>: %s | %s",
            notificacao.idempotency_key, notificacao.nome, notificacao.email, notificacao.assunto,
            notificacao.texto.replace("\n", " "),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class SmtpChannel:
    """Plain SMTP, optionally upgraded with STARTTLS and authenticated; one connection per e-mail."""

    host: str
    port: int
    sender: str
    starttls: bool = False
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 10.0
    name: str = "smtp"

    def send(self, notificacao: Notificacao) -> None:
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = formataddr((notificacao.nome, notificacao.email))
        message["Subject"] = notificacao.assunto
        domain = self.sender.rpartition("@")[2] or "localhost"
        message["Message-ID"] = f"<{notificacao.idempotency_key}@{domain}>"
        message.set_content(notificacao.texto)
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
                if self.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if self.user:
                    smtp.login(self.user, self.password or "")
                smtp.send_message(message)
        except smtplib.SMTPRecipientsRefused:
            raise PermanentError(f"the SMTP server refused the recipient of {notificacao.idempotency_key}") from None


@dataclass(frozen=True, slots=True)
class WebhookChannel:
    """POSTs the notification as JSON; any 2xx answer is success."""

    url: str = field(repr=False)
    timeout: float = 10.0
    name: str = "webhook"

    def send(self, notificacao: Notificacao) -> None:
        body = json.dumps(
            {
                "order_id": notificacao.order_id,
                "kind": notificacao.kind,
                "nome": notificacao.nome,
                "email": notificacao.email,
                "assunto": notificacao.assunto,
                "texto": notificacao.texto,
            },
            ensure_ascii=False,
        ).encode()
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json; charset=utf-8", "Idempotency-Key": notificacao.idempotency_key},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            # 408 and 429 ask to come back later; any other 4xx will be answered the same way again.
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                raise PermanentError(f"the webhook answered {exc.code} for {notificacao.idempotency_key}") from None
            raise
