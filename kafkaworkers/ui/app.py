"""The console's pages and actions, as a Starlette application.

Pages read the cluster when they are asked for (the Admin API, the dead-letter topics, the
workers' ``/metrics``); nothing is cached but the previous offsets the throughput is
computed from. Reading endpoints are plain functions, which Starlette runs on its thread
pool, since every Kafka call here blocks.

Actions answer 403 unless the console was started with ``allow_actions``, and otherwise
only to a same-origin POST carrying the session's token (:mod:`kafkaworkers.ui.security`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import jinja2
from confluent_kafka import KafkaException
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kafkaworkers.config import Settings
from kafkaworkers.errors import KafkaWorkersError
from kafkaworkers.plugins import PluginHost
from kafkaworkers.retry import dlq_topic
from kafkaworkers.topology import Topology
from kafkaworkers.ui import letters, live
from kafkaworkers.ui.graph import draw
from kafkaworkers.ui.security import SESSION_COOKIE, TOKEN_FIELD, CsrfGuard, masked, same_origin

__all__ = ["create_app"]

log = logging.getLogger(__name__)

#: Every page may use the console's own files and nothing else; no page may be framed.
_CSP = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'"
_HEADERS = [
    (b"content-security-policy", f"{_CSP}; base-uri 'none'".encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # no-referrer would make a browser send Origin: null
    (b"x-frame-options", b"DENY"),
]
_LOOPBACK = ["127.0.0.1", "localhost", "[::1]"]
_COMMANDS = ("pause", "resume")
#: The dead letters a page lists at most, newest first.
_SHOWN = 200
#: What a page shows as "could not show this page" (503) instead of a bare 500: the broker's
#: errors, as kafkaworkers reports them or as librdkafka raised them.
_FAILURES = (KafkaWorkersError, KafkaException)


@dataclass
class Console:
    """What the pages share: settings, installed plugins, whether actions are on, the token issuer."""

    settings: Settings
    host: PluginHost
    allow_actions: bool
    guard: CsrfGuard = field(default_factory=CsrfGuard)
    rates: live.Rates = field(default_factory=live.Rates)

    @property
    def groups(self) -> dict[str, str]:
        """Installed plugin -> its consumer group."""
        return {name: self.settings.group_for(name) for name in sorted(self.host.plugins)}


def create_app(
    settings: Settings, host: PluginHost, *, allow_actions: bool = False, bind: str = "127.0.0.1"
) -> Starlette:
    """The console for ``host``'s installed plugins on the cluster ``settings`` names.

    :param allow_actions: offer replay, pause and resume; without it their endpoints answer 403.
    :param bind: the address the server listens on; requests must name it (or loopback) as ``Host``.
    """
    console = Console(settings, host, allow_actions)
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("kafkaworkers.ui", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    env.filters["iso"] = _iso
    env.filters["text"] = _text
    templates = Jinja2Templates(env=env)

    def render(request: Request, name: str, status: int = 200, **context: Any) -> Response:
        session = request.cookies.get(SESSION_COOKIE) or console.guard.new_session()
        context.update(
            actions=console.allow_actions,
            token=console.guard.token(session),
            token_field=TOKEN_FIELD,
            plugins=sorted(host.plugins),
            page=name.removesuffix(".html"),
        )
        response = templates.TemplateResponse(request, name, context, status_code=status)
        if request.cookies.get(SESSION_COOKIE) != session:
            response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="strict", path="/")
        return response

    def failed(request: Request, error: Exception) -> Response:
        log.warning("console page %s failed: %s", request.url.path, error)
        return render(request, "error.html", 503, error=str(error))

    async def form_of(request: Request) -> tuple[dict[str, list[str]], Response | None]:
        """The POST's fields, or the 403 answer when the request may not act."""
        fields: dict[str, list[str]] = defaultdict(list)
        for name, value in parse_qsl((await request.body()).decode("utf-8", "replace")):
            fields[name].append(value)
        if not console.allow_actions:
            return fields, _forbidden("actions are off: start the console with --allow-actions")
        origin_ok = same_origin(
            request.headers.get("origin"),
            request.headers.get("sec-fetch-site"),
            request.url.scheme,
            request.headers.get("host", ""),
        )
        if not origin_ok:
            return fields, _forbidden("cross-site request refused")
        token = fields.get(TOKEN_FIELD, [None])[0]
        if not console.guard.valid(request.cookies.get(SESSION_COOKIE), token):
            return fields, _forbidden("missing or stale form token: reload the page and try again")
        return fields, None

    def topology_page(request: Request) -> Response:
        graph = Topology.of(host.plugins.values())
        plugins = {
            name: {
                "description": plugin.description,
                "group": console.groups[name],
                "settings": masked(settings.plugins.get(name, {})),
                "breakers": sorted(plugin.breakers),
                "retry": list(plugin.retry.delays),
            }
            for name, plugin in sorted(host.plugins.items())
        }
        return render(request, "topology.html", graph=graph, drawing=draw(graph), details=plugins,
                      broker=masked(settings.bootstrap_servers))  # fmt: skip

    def letters_page(request: Request) -> Response:
        query = request.query_params
        plugin = query.get("plugin") or None
        filters = letters.Filters(
            plugin=plugin if plugin in host.plugins else None,
            exception=query.get("exception") or None,
            since_ms=_ms(query.get("since")),
            until_ms=_ms(query.get("until")),
        )
        asked = query.get("depth", "")
        depth = min(int(asked), letters.MAX_DEPTH) if asked.isdigit() and int(asked) > 0 else letters.DEPTH
        try:
            summaries, found = letters.browse(settings, console.groups, filters, limit=_SHOWN, depth=depth)
        except _FAILURES as exc:
            return failed(request, exc)
        return render(request, "letters.html", summaries=summaries, found=found, filters=filters,
                      since=query.get("since", ""), until=query.get("until", ""), depth=depth, shown=_SHOWN,
                      max_depth=letters.MAX_DEPTH)  # fmt: skip

    def letter_page(request: Request) -> Response:
        plugin = request.path_params["plugin"]
        if plugin not in host.plugins:
            return render(request, "error.html", 404, error=f"no installed plugin {plugin}")
        try:
            found = letters.find(
                settings, console.groups[plugin], request.path_params["partition"], request.path_params["offset"]
            )
        except _FAILURES as exc:
            return failed(request, exc)
        if found is None:
            return render(request, "error.html", 404, error="no such dead letter")
        return render(request, "letter.html", plugin=plugin, found=found)

    async def confirm_replay(request: Request) -> Response:
        fields, refused = await form_of(request)
        if refused is not None:
            return refused
        chosen = _chosen(fields.get("letter", []), host)
        if not chosen:
            return render(request, "error.html", 400, error="no dead letter chosen")
        return render(request, "confirm.html", chosen=chosen,
                      refs=[f"{p}|{part}|{off}" for p, part, off in chosen])  # fmt: skip

    async def replay(request: Request) -> Response:
        fields, refused = await form_of(request)
        if refused is not None:
            return refused
        if fields.get("confirmed") != ["yes"]:
            return render(request, "error.html", 400, error="a replay needs its confirmation step")
        per_group: dict[str, tuple[str, list[str]]] = {}
        for plugin, partition, offset in _chosen(fields.get("letter", []), host):
            group = console.groups[plugin]
            per_group.setdefault(group, (plugin, []))[1].append(f"{dlq_topic(group)}:{partition}:{offset}")
        results: list[tuple[str, dict[str, Any] | None, str | None]] = []
        for group, (plugin, refs) in sorted(per_group.items()):
            try:
                report = await run_in_threadpool(letters.replay_selected, settings, group, refs)
                results.append((plugin, report.counts(), None))
            except _FAILURES as exc:
                results.append((plugin, None, str(exc)))
        log.info("console replay: %s", [(p, c) for p, c, _ in results])
        return render(request, "replayed.html", results=results)

    def live_page(request: Request) -> Response:
        try:
            view = live.snapshot(settings, host, console.rates)
        except _FAILURES as exc:
            return failed(request, exc)
        return render(request, "live.html", view=view, due_sample=live.DUE_SAMPLE)

    def workers_page(request: Request) -> Response:
        try:
            members = live.members(settings, host)
        except _FAILURES as exc:
            return failed(request, exc)
        return render(request, "workers.html", members=members, commands=_COMMANDS)

    async def control(request: Request) -> Response:
        fields, refused = await form_of(request)
        if refused is not None:
            return refused
        command = request.path_params["command"]
        plugin = (fields.get("plugin") or [""])[0]
        worker = (fields.get("worker") or [""])[0] or None
        if command not in _COMMANDS or plugin not in host.plugins:
            return render(request, "error.html", 400, error="unknown command or plugin")
        try:
            replies = await run_in_threadpool(live.command, settings, command, plugin, worker)
        except _FAILURES as exc:
            return failed(request, exc)
        return render(request, "controlled.html", command=command, plugin=plugin, worker=worker, replies=replies)

    routes = [
        Route("/", topology_page),
        Route("/live", live_page),
        Route("/workers", workers_page),
        Route("/workers/{command}", control, methods=["POST"]),
        Route("/dead-letters", letters_page),
        Route("/dead-letters/confirm", confirm_replay, methods=["POST"]),
        Route("/dead-letters/replay", replay, methods=["POST"]),
        Route("/dead-letters/{plugin}/{partition:int}/{offset:int}", letter_page),
        Mount("/static", StaticFiles(packages=[("kafkaworkers.ui", "static")]), name="static"),
    ]
    # Starlette compares Host without its port, an IPv6 address in its brackets.
    hosts = ["*"] if bind in ("0.0.0.0", "::", "") else sorted({f"[{bind}]" if ":" in bind else bind, *_LOOPBACK})
    return Starlette(
        routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts), Middleware(_SecurityHeaders)]
    )


class _SecurityHeaders:
    """Adds :data:`_HEADERS` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def _forbidden(reason: str) -> Response:
    return HTMLResponse(f"<!doctype html><title>403</title><p>403 Forbidden: {reason}</p>", status_code=403)


def _chosen(values: list[str], host: PluginHost) -> list[tuple[str, int, int]]:
    """``plugin|partition|offset`` form values of installed plugins, parsed; anything else dropped."""
    out = []
    for value in values:
        plugin, _, rest = value.partition("|")
        partition, _, offset = rest.partition("|")
        if plugin in host.plugins and partition.isdigit() and offset.isdigit():
            out.append((plugin, int(partition), int(offset)))
    return sorted(set(out))


def _ms(value: str | None) -> int | None:
    """A ``datetime-local`` field (naive means UTC) as epoch milliseconds; empty or bad means no bound."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _text(raw: bytes | None) -> str:
    """Bytes as text for a page (the template escapes it): UTF-8 where valid, ``\\xNN`` where not."""
    return "(null)" if raw is None else raw.decode("utf-8", "backslashreplace")
