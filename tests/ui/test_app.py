"""The console over plain HTTP, served by uvicorn, on an in-memory broker holding dead letters.

Everything a browser does not need to show is checked here with ``urllib``: actions off
means 403, a forged or cross-site POST is refused, a replay needs its confirmation step,
bodies and headers are escaped, secrets never reach a page.
"""

from __future__ import annotations

import http.cookiejar
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgspec
import pytest
import uvicorn
from confluent_kafka import TopicPartition

from kafkaworkers import Context, Plugin, RetryPolicy
from kafkaworkers.config import Settings
from kafkaworkers.headers import H_EXCEPTION, H_ORIGINAL_OFFSET, H_ORIGINAL_PARTITION, H_ORIGINAL_TOPIC, H_REPLAYED_FROM
from kafkaworkers.plugins import PluginHost
from kafkaworkers.transports.memory import MemoryTransport
from kafkaworkers.ui import letters
from kafkaworkers.ui.app import create_app
from kafkaworkers.ui.live import Rates
from tests.conftest import free_port, wait_for

#: 2024-05-01T12:00:00Z and an hour later: the letters' broker timestamps.
NOON = 1714564800000
ONE = NOON + 3_600_000
SCRIPT = b'<script>document.title="pwned"</script>{"n": 1}'


class Order(msgspec.Struct, frozen=True):
    n: int


@dataclass
class Console:
    url: str
    transport: MemoryTransport

    def records(self, topic: str) -> list[object]:
        return self.transport.broker.records(topic)


class Browser:
    """A cookie-keeping HTTP client; answers (status, body) and never raises on 4xx."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        return self._open(urllib.request.Request(self.base + path, headers=headers or {}))

    def post(self, path: str, fields: list[tuple[str, str]], headers: dict[str, str] | None = None) -> tuple[int, str]:
        data = urllib.parse.urlencode(fields).encode()
        return self._open(urllib.request.Request(self.base + path, data=data, headers=headers or {}, method="POST"))

    def _open(self, request: urllib.request.Request) -> tuple[int, str]:
        try:
            with self.opener.open(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def token(self, path: str = "/dead-letters") -> str:
        status, page = self.get(path)
        assert status == 200, page
        found = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page)
        assert found, "no form token on the page"
        return found.group(1)


def billing() -> Plugin[None]:
    plugin: Plugin[None] = Plugin("billing", retry=RetryPolicy(delays=(1.0,)), description="Bills orders.")

    @plugin.consumes("orders", Order)
    def bill(order: Order, ctx: Context[None]) -> None:
        raise AssertionError("never run here")

    return plugin


@pytest.fixture
def serve() -> Iterator[Callable[..., Console]]:
    """Start the console (uvicorn on loopback) on a fresh in-memory broker with two dead letters."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(
        allow_actions: bool, plugins: dict[str, dict[str, object]] | None = None, bootstrap: str | None = None
    ) -> Console:
        name = f"ui-{uuid.uuid4().hex[:8]}"
        transport = MemoryTransport.named(name)
        for topic in ("orders", "billing-retry-1", "billing-dlq"):
            transport.broker.create_topic(topic, 1)
        producer = transport.producer({})
        letters = [
            (SCRIPT, NOON, b"PermanentError", [("x-note", b"<img src=x onerror=alert(1)>")]),
            (b'{"n": 2}', ONE, b"kafkaworkers.errors.DecodeError", []),
        ]
        for n, (value, ts, exc, extra) in enumerate(letters):
            headers = [(H_ORIGINAL_TOPIC, b"orders"), (H_ORIGINAL_PARTITION, b"0"),
                       (H_ORIGINAL_OFFSET, str(n).encode()), (H_EXCEPTION, exc), *extra]  # fmt: skip
            producer.produce("billing-dlq", value, f"order-{n}".encode(), timestamp=ts, headers=headers)
        producer.flush()
        host = PluginHost()
        host.register(billing(), "billing")
        settings = Settings(bootstrap_servers=bootstrap or f"memory://{name}", plugins=plugins or {})
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(create_app(settings, host, allow_actions=allow_actions), host="127.0.0.1", port=port,
                           log_level="warning")
        )  # fmt: skip
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        wait_for(lambda: server.started, 10, "the console to listen")
        return Console(f"http://127.0.0.1:{port}", transport)

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def test_with_actions_off_there_is_no_replay_button_and_every_action_answers_403(serve: Callable[..., Console]) -> None:
    console = serve(allow_actions=False)
    browser = Browser(console.url)
    status, page = browser.get("/dead-letters")
    assert status == 200
    assert "order-0" in page and "order-1" in page, "the letters are listed"
    assert "replay" not in page.lower().replace("not replayed", ""), "no replay control of any kind"
    assert 'type="checkbox"' not in page and "csrf_token" not in page
    status, page = browser.get("/dead-letters/billing/0/0")
    assert status == 200 and "Replay" not in page
    for path in ("/dead-letters/confirm", "/dead-letters/replay"):
        status, body = browser.post(path, [("letter", "billing|0|0"), ("confirmed", "yes")])
        assert status == 403, (path, status, body)
    assert console.records("billing-retry-1") == []


def test_a_forged_post_without_the_pages_token_is_refused(serve: Callable[..., Console]) -> None:
    console = serve(allow_actions=True)
    browser = Browser(console.url)
    good = browser.token()
    fields = [("letter", "billing|0|0"), ("confirmed", "yes")]
    assert browser.post("/dead-letters/replay", fields)[0] == 403, "no token"
    assert browser.post("/dead-letters/replay", [*fields, ("csrf_token", "0" * 64)])[0] == 403, "a made-up token"
    stranger = Browser(console.url)  # another browser session: its cookie does not fit this token
    stranger.token()
    assert stranger.post("/dead-letters/replay", [*fields, ("csrf_token", good)])[0] == 403, "another session's token"
    assert console.records("billing-retry-1") == []


def test_a_post_from_another_origin_is_refused_even_with_a_valid_token(serve: Callable[..., Console]) -> None:
    console = serve(allow_actions=True)
    browser = Browser(console.url)
    fields = [("letter", "billing|0|0"), ("csrf_token", browser.token())]
    foreign = [{"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
               {"Sec-Fetch-Site": "same-site"}, {"Origin": console.url.replace("127.0.0.1", "localhost")}]  # fmt: skip
    for headers in foreign:
        status, _ = browser.post("/dead-letters/confirm", fields, headers)
        assert status == 403, headers
    status, page = browser.post(
        "/dead-letters/confirm", fields, {"Origin": console.url, "Sec-Fetch-Site": "same-origin"}
    )
    assert status == 200 and "Replay 1 dead letter?" in page


def test_a_replay_happens_only_after_its_confirmation_step_and_only_for_the_chosen_letter(
    serve: Callable[..., Console],
) -> None:
    console = serve(allow_actions=True)
    browser = Browser(console.url)
    token = browser.token()
    chosen = [("letter", "billing|0|1"), ("csrf_token", token)]
    status, page = browser.post("/dead-letters/replay", chosen)
    assert status == 400 and "confirmation" in page
    assert console.records("billing-retry-1") == []

    status, page = browser.post("/dead-letters/confirm", chosen)
    assert status == 200 and "billing <code>0:1</code>" in page
    assert console.records("billing-retry-1") == [], "confirming asks; it sends nothing"
    confirmed = re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', page)
    status, page = browser.post("/dead-letters/replay", confirmed)
    assert status == 200, page
    assert re.search(r'class="num replayed">1<', page)
    [replayed] = console.records("billing-retry-1")
    assert dict(replayed.headers())[H_REPLAYED_FROM] == b"billing-dlq:0:1"
    assert replayed.value() == b'{"n": 2}'

    status, page = browser.get("/dead-letters")
    assert re.search(r'<td class="num waiting">1</td>', page), "one letter left waiting"
    status, page = browser.post("/dead-letters/replay", confirmed)
    assert re.search(r'class="num replayed">0<', page), "a letter is replayed once"
    assert len(console.records("billing-retry-1")) == 1


def test_a_letters_body_and_headers_are_shown_escaped(serve: Callable[..., Console]) -> None:
    console = serve(allow_actions=False)
    status, page = Browser(console.url).get("/dead-letters/billing/0/0")
    assert status == 200
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;document.title=&#34;pwned&#34;&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert Browser(console.url).get("/dead-letters/billing/0/9")[0] == 404


def test_dead_letters_filter_by_plugin_exception_and_time(serve: Callable[..., Console]) -> None:
    browser = Browser(serve(allow_actions=False).url)

    def listed(query: str) -> list[str]:
        status, page = browser.get("/dead-letters?" + query)
        assert status == 200
        return re.findall(r'data-ref="billing-dlq:0:(\d+)"', page)

    assert listed("") == ["1", "0"], "newest first"
    assert listed("exception=decodeerror") == ["1"]
    assert listed("exception=Permanent&plugin=billing") == ["0"]
    assert listed("since=2024-05-01T12:30") == ["1"]
    assert listed("until=2024-05-01T12:30") == ["0"]
    assert listed("since=2024-05-01T13:00:01") == []


def test_secrets_in_plugin_settings_and_database_urls_never_reach_a_page(serve: Callable[..., Console]) -> None:
    secrets = {"api_token": "tok-SECRET-1", "dsn": "postgresql://kw:pw-SECRET-2@db:5432/billing",
               "nested": {"password": "pw-SECRET-3"}, "timeout": 5}  # fmt: skip
    browser = Browser(serve(allow_actions=True, plugins={"billing": secrets}).url)
    status, page = browser.get("/")
    assert status == 200
    assert "SECRET" not in page
    assert "postgresql://kw:***@db:5432/billing" in page and "timeout = 5" in page
    for path in ("/dead-letters", "/dead-letters/billing/0/0"):
        assert "SECRET" not in browser.get(path)[1]


def test_the_topology_page_draws_every_declared_plugin_and_topic(serve: Callable[..., Console]) -> None:
    status, page = Browser(serve(allow_actions=False).url).get("/")
    assert status == 200
    assert re.findall(r'<g class="node (\w+)" data-name="([^"]+)">', page) == [
        ("topic", "orders"),
        ("plugin", "billing"),
    ]
    assert "<title>orders consumes billing</title>" in page


def test_requests_naming_another_host_are_refused(serve: Callable[..., Console]) -> None:
    browser = Browser(serve(allow_actions=False).url)
    assert browser.get("/", {"Host": "evil.example"})[0] == 400, "a DNS-rebinding page's requests"
    status, _ = browser.get("/", {"Host": "localhost"})
    assert status == 200


def test_every_page_forbids_framing_and_foreign_scripts(serve: Callable[..., Console]) -> None:
    url = serve(allow_actions=False).url
    with urllib.request.urlopen(url + "/dead-letters", timeout=10) as response:
        policy = response.headers["Content-Security-Policy"]
        assert response.headers["X-Frame-Options"] == "DENY"
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy and "script-src" not in policy
    with urllib.request.urlopen(url + "/static/style.css", timeout=10) as response:
        assert response.status == 200 and b"svg.graph" in response.read()


def test_the_live_page_shows_each_partitions_lag_and_the_committed_offsets_rate(
    serve: Callable[..., Console],
) -> None:
    console = serve(allow_actions=False)
    producer = console.transport.producer({})
    for n in range(5):
        producer.produce("orders", f'{{"n": {n}}}'.encode(), b"k")
    producer.flush()
    reader = console.transport.consumer({"group.id": "billing"})
    reader.commit(offsets=[TopicPartition("orders", 0, 2)], asynchronous=False)
    browser = Browser(console.url)

    def orders_row(page: str) -> list[str]:
        row = re.search(r'data-group="billing" data-topic="orders" data-partition="0">(.*?)</tr>', page, re.S)
        assert row, page
        return re.findall(r'<td class="num[^"]*">([^<]*)</td>', row.group(1))

    status, page = browser.get("/live")
    assert status == 200
    assert orders_row(page) == ["0", "2", "5", "3", "–"], "partition, committed, end, lag, no rate yet"
    assert re.search(r'<tr data-plugin="billing"><td>billing</td><td class="num lag">3</td>', page)
    reader.commit(offsets=[TopicPartition("orders", 0, 5)], asynchronous=False)
    status, page = browser.get("/live")
    committed, rate = orders_row(page)[1], orders_row(page)[4]
    assert committed == "5" and float(rate) > 0, "three messages committed since the last look"


def test_a_rate_is_the_counters_progress_over_at_least_a_second() -> None:
    rates = Rates()
    assert rates.rate(("k",), 10, now=100.0) is None, "nothing to compare the first look with"
    assert rates.rate(("k",), 20, now=100.5) is None, "half a second is too short to say"
    assert rates.rate(("k",), 30, now=102.0) == 10.0
    assert rates.rate(("k",), 31, now=102.2) == 10.0, "a quick reload shows the last rate"
    assert rates.rate(("k",), 5, now=104.0) is None, "a counter that went back starts again"
    assert rates.rate(("k",), None) is None


def test_every_page_that_reads_the_cluster_answers_503_saying_why_when_no_broker_listens(
    serve: Callable[..., Console],
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"  # a real client against a port nothing listens on
    browser = Browser(serve(allow_actions=True, bootstrap=nowhere).url)
    pages = ["/live", "/workers", "/dead-letters", "/dead-letters/billing/0/0"]
    with ThreadPoolExecutor(len(pages)) as pool:  # each waits out the client's timeout: together, not in turn
        answers = dict(zip(pages, pool.map(browser.get, pages), strict=True))
    for path, (status, page) in answers.items():
        assert status == 503, (path, status, page)
        assert "Could not show this page" in page and f"cannot reach Kafka at {nowhere}" in page, (path, page)
    status, page = browser.get("/")
    assert status == 200, "the topology is what the plugins declare: it needs no broker"


def test_the_dead_letter_page_reads_only_the_newest_offsets_of_each_partition_and_says_how_far_back(
    serve: Callable[..., Console],
) -> None:
    console = serve(allow_actions=False)
    producer = console.transport.producer({})
    more = letters.DEPTH + 10  # after the fixture's two: offsets 2 .. DEPTH + 11
    for n in range(more):
        exc = b"TimeoutError" if n % 2 else b"PermanentError"
        headers = [(H_ORIGINAL_TOPIC, b"orders"), (H_EXCEPTION, exc)]
        producer.produce("billing-dlq", b"{}", f"late-{n}".encode(), timestamp=ONE + 1000 * (n + 1), headers=headers)
    producer.flush()
    browser = Browser(console.url)

    def summary(page: str) -> tuple[int, str]:
        total = re.search(r'<td class="num total">(\d+)</td>', page)
        unread = re.search(r'<td class="num unread">([^<]*)</td>', page)
        assert total and unread, page
        return int(total.group(1)), unread.group(1)

    status, page = browser.get("/dead-letters")
    assert status == 200
    assert summary(page) == (letters.DEPTH, "up to 12 (read back to 2024-05-01T13:00:11Z)"), "the newest DEPTH, no more"
    assert f"the newest {letters.DEPTH} offsets of each dead-letter partition" in page
    assert len(re.findall(r'data-ref="billing-dlq:0:(\d+)"', page)) == 200, "the page lists the newest 200"

    status, page = browser.get("/dead-letters?depth=20&exception=Permanent")
    assert summary(page)[0] == 20
    shown = [int(o) for o in re.findall(r'data-ref="billing-dlq:0:(\d+)"', page)]
    assert shown == list(range(more, more - 20, -2)), "the filter applies to the 20 read: 10 match"
    assert browser.get("/dead-letters?depth=999999999")[1].count(f'value="{letters.MAX_DEPTH}"') == 1, "bounded"

    status, page = browser.get("/dead-letters/billing/0/0")
    assert status == 200 and "order-0" in page, "a letter's own page reads it where it is, however old"
