"""``kafkaworkers ui`` in a real browser (Debian's headless Chromium through Selenium) on the real broker.

The order pipeline runs with a group prefix of its own: notificacao as a process, its only
channel a webhook that answers 400 at first, so every order it is told about dead-letters
at once (a refusal is permanent); fraude is installed but stopped, its group committed at the
end of ``pedido-novo`` beforehand, so its lag is exactly what was published since. A
poison order whose body is a ``<script>`` element dead-letters too. The console runs as its
own process. The test reads the same topics and groups itself and holds the page to them;
then the webhook is fixed, one dead letter is replayed through the page, confirmation
included, and the notification it carried arrives.

Set ``KAFKAWORKERS_SCREENSHOTS=docs/screenshots`` to refresh the README's screenshots.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from kafkaworkers.breaker import STATE_VALUES
from kafkaworkers.plugins import PluginHost
from kafkaworkers.retry import dlq_topic, retry_topic
from kafkaworkers_orders.contracts import PEDIDO_NOVO
from kafkaworkers_orders.scenario import OrderScenario
from tests.conftest import FAST_GROUP, KW, SEED, free_port, http_get, stop_processes, wait_for
from tests.judging import Offsets, holdings, publish

pytestmark = pytest.mark.kafka

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ORDERS = 8
POISON = b'<script>document.title="pwned"</script>'


class Webhook:
    """notificacao's webhook: answers ``status`` and records the orders of the notifications it accepted."""

    def __init__(self) -> None:
        self.status = 400
        self.accepted: list[str] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if hook.status < 300:
                    hook.accepted.append(json.loads(body)["order_id"])
                self.send_response(hook.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Pipeline:
    """This module's processes (services and consoles), one group prefix, and what they were sent."""

    def __init__(self, bootstrap: str, tmp: Path, webhook: Webhook) -> None:
        self.bootstrap = bootstrap
        self.prefix = f"ui-{uuid.uuid4().hex[:8]}-"
        self.tmp = tmp
        self.metrics_port = free_port()
        self.env = {
            **os.environ,
            **FAST_GROUP,
            "KAFKAWORKERS_BOOTSTRAP_SERVERS": bootstrap,
            "KAFKAWORKERS_DATA_DIR": str(tmp / "data"),
            "KAFKAWORKERS_GROUP_PREFIX": self.prefix,
            "KAFKAWORKERS_METRICS_PORT": "0",
            "KAFKAWORKERS_PLUGINS__NOTIFICACAO__CHANNELS": '["webhook"]',
            "KAFKAWORKERS_PLUGINS__NOTIFICACAO__WEBHOOK_URL": webhook.url,
            "KAFKAWORKERS_PLUGINS__NOTIFICACAO__TIMEOUT": "5",
            # Control topics of this module's own: a pause reaches no other test's notificacao,
            # and no other notificacao answers this console's pings.
            "KAFKAWORKERS_CONTROL_TOPIC": f"{self.prefix}control",
            "KAFKAWORKERS_CONTROL_REPLIES_TOPIC": f"{self.prefix}control-replies",
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.orders: list[str] = []

    def group(self, plugin: str) -> str:
        return self.prefix + plugin

    def start(self, label: str, *args: str, **env: str) -> None:
        log = open(self.tmp / f"{label}.log", "wb")  # noqa: SIM115 - the process holds it until it exits
        self.procs[label] = subprocess.Popen([KW, *args], env={**self.env, **env}, stdout=log, stderr=log)
        log.close()

    def log(self, label: str) -> str:
        return (self.tmp / f"{label}.log").read_text(errors="replace")

    def console(self, label: str, *flags: str) -> str:
        port = free_port()
        self.start(label, "ui", "--port", str(port), *flags)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if self.procs[label].poll() is not None:
                pytest.fail(f"the console exited:\n{self.log(label)}")
            with contextlib.suppress(OSError):
                return http_get(url + "/")[0] == 200
            return False

        wait_for(up, 30, f"the console {label} to answer")
        return url

    def stop_all(self) -> None:
        stop_processes(self.procs.values())


def read_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every record of ``topic`` up to its end now (assigned, no group)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"ui-reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "enable.partition.eof": True})  # fmt: skip
    try:
        partitions = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=15).topics[topic]
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1] for p in partitions.partitions
        }
        pending = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, 0) for p in pending])
        out: list[Any] = []
        while pending:
            for msg in consumer.consume(500, 1.0):
                if msg.error() is None and msg.offset() < ends[msg.partition()]:
                    out.append(msg)
                if msg.offset() is not None and msg.offset() >= ends[msg.partition()] - 1:
                    pending.discard(msg.partition())
        return out
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture(scope="module")
def pipeline(bootstrap: str, tmp_path_factory: pytest.TempPathFactory, webhook: Webhook) -> Iterator[Pipeline]:
    """notificacao running and every order it saw dead-lettered; fraude's group waiting at the old end."""
    run = Pipeline(bootstrap, tmp_path_factory.mktemp("ui"), webhook)
    try:
        done = subprocess.run([KW, "topics", "create"], env=run.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        notificacao = run.group("notificacao")
        consumed = ["pedido-cancelado", PEDIDO_NOVO, "processo-pagamento", "processo-picking"]
        offsets = Offsets(bootstrap)
        retries = [retry_topic(notificacao, n) for n in (1, 2, 3)]
        offsets.start_at_end({run.group("fraude"): [PEDIDO_NOVO], notificacao: consumed,
                              f"{notificacao}-retry": retries})  # fmt: skip
        offsets.close()
        run.start("notificacao", "run", "--plugin", "notificacao", KAFKAWORKERS_METRICS_PORT=str(run.metrics_port))

        def joined() -> bool:
            assert run.procs["notificacao"].poll() is None, run.log("notificacao")
            return {t for t, _ in holdings(run.log("notificacao"))} >= {*consumed, *retries}

        wait_for(joined, 90, "notificacao to hold its partitions")
        scenario = OrderScenario(run_id=run.prefix.strip("-"))
        print(f"random seed {SEED}; replay with KAFKAWORKERS_TEST_SEED={SEED}")
        messages = list(scenario.generate(ORDERS, SEED))
        run.orders = list(scenario.tracks)
        publish(bootstrap, [*messages, (PEDIDO_NOVO, f"{run.prefix}poison".encode(), POISON, [])])
        ours = {*run.orders, f"{run.prefix}poison"}
        wait_for(
            lambda: ours <= {m.key().decode() for m in read_topic(bootstrap, dlq_topic(notificacao))},
            90,
            "every order and the poison in notificacao's dead-letter topic",
            interval=0.5,
        )
        yield run
    finally:
        run.stop_all()


@pytest.fixture(scope="module")
def chrome() -> Iterator[WebDriver]:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            pytest.fail(f"{path} is missing: apt-get install chromium chromium-driver", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    # The driver's path is given, so Selenium Manager has nothing to look up or download.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def shoot(driver: WebDriver, name: str) -> None:
    folder = os.environ.get("KAFKAWORKERS_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def element(driver: WebDriver, id: str, timeout: float = 30) -> Any:
    """The element ``#id`` once the page that has it has loaded (a click does not wait for the next page)."""
    deadline = time.monotonic() + timeout
    while not (found := driver.find_elements(By.ID, id)):
        if time.monotonic() > deadline:
            pytest.fail(f"no #{id} after {timeout} s; at {driver.current_url}:\n{driver.page_source[-3000:]}")
        time.sleep(0.1)
    return found[0]


def cells(driver: WebDriver, table: str, selector: str = "") -> list[dict[str, str]]:
    """The rows of ``#table`` (narrowed by a CSS attribute selector) as their data attributes plus cell texts."""
    rows = []
    for row in driver.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr{selector}"):
        data = {k: row.get_attribute(k) or "" for k in ("data-plugin", "data-group", "data-topic", "data-partition")}
        data["cells"] = "|".join(td.text for td in row.find_elements(By.TAG_NAME, "td"))
        for name in ("total", "waiting", "lag", "consumed"):
            found = row.find_elements(By.CSS_SELECTOR, f"td.{name}")
            if found:
                data[name] = found[0].text
        rows.append(data)
    return rows


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    status, _, text = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def dead_letter_counts(bootstrap: str, group: str) -> tuple[int, int]:
    """(letters in the group's DLQ, letters not recorded as replayed in its ledger), read from the topics."""
    letters = read_topic(bootstrap, dlq_topic(group))
    ledger = {m.key().decode(): m.value() for m in read_topic(bootstrap, f"{group}-dlq-replayed")} if any(
        t == f"{group}-dlq-replayed"
        for t in AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=15).topics
    ) else {}  # fmt: skip
    replayed = sum(f"{m.topic()}:{m.partition()}:{m.offset()}" in ledger for m in letters)
    return len(letters), len(letters) - replayed


@contextlib.contextmanager
def flowing(pipeline: Pipeline, per_second: float = 20.0) -> Iterator[None]:
    """New orders on pedido-novo at a steady pace (seeded, ids of their own) while the block runs."""
    stop = threading.Event()
    scenario = OrderScenario(run_id=f"{pipeline.prefix}flow")
    producer = Producer({"bootstrap.servers": pipeline.bootstrap})

    def publish_until_stopped() -> None:
        for topic, key, value, headers in scenario.generate(2_000, SEED + 1):
            if stop.wait(1 / per_second):  # pacing the flow, not waiting for a condition
                break
            producer.produce(topic, value, key, headers=headers)
            producer.poll(0)

    thread = threading.Thread(target=publish_until_stopped, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        producer.flush(30)


def test_the_console_shows_what_the_topics_and_groups_hold(
    pipeline: Pipeline, chrome: WebDriver, webhook: Webhook
) -> None:
    url = pipeline.console("console", "--allow-actions")

    chrome.get(url + "/")
    drawn = {e.get_attribute("data-name") for e in chrome.find_elements(By.CSS_SELECTOR, "#topology g.node.plugin")}
    host = PluginHost()
    host.load_entry_points()
    assert drawn == set(host.plugins), "every installed plugin is drawn"
    assert {e.get_attribute("data-name") for e in chrome.find_elements(By.CSS_SELECTOR, "#topology g.node.topic")} >= {
        PEDIDO_NOVO
    }
    shoot(chrome, "topology")

    # Dead letters: the page's counts are the topic's (foreign orders may still arrive: compare at one moment).
    notificacao = pipeline.group("notificacao")

    def letters_agree() -> bool:
        chrome.get(url + "/dead-letters")
        [row] = cells(chrome, "dlq-summary", '[data-plugin="notificacao"]')
        return (int(row["total"]), int(row["waiting"])) == dead_letter_counts(pipeline.bootstrap, notificacao)

    wait_for(letters_agree, 60, "the page's dead-letter counts to match the topic's", interval=1)
    [fraude] = cells(chrome, "dlq-summary", '[data-plugin="fraude"]')
    assert (fraude["total"], fraude["waiting"]) == ("0", "0")
    shoot(chrome, "dead-letters")

    # Lag: fraude's group never ran, so its lag on pedido-novo is everything published since its commit.
    def lag_agrees() -> bool:
        chrome.get(url + "/live")
        group = pipeline.group("fraude")
        shown = {int(r["data-partition"]): int(r["lag"]) for r in cells(chrome, "lag", f'[data-group="{group}"]')}
        offsets = Offsets(pipeline.bootstrap)
        try:
            ends = offsets.ends([PEDIDO_NOVO])
            reader = offsets._reader(group)
            committed = {tp.partition: tp.offset for tp in reader.committed(
                [TopicPartition(PEDIDO_NOVO, p) for _, p in ends], timeout=15)}  # fmt: skip
        finally:
            offsets.close()
        expected = {p: end - committed[p] for (_, p), end in ends.items()}
        return shown == expected and sum(expected.values()) >= ORDERS + 1

    wait_for(lag_agrees, 60, "the page's lag of fraude to match the group's committed offsets", interval=1)

    # Consumed counts and breaker states: what notificacao's own /metrics says, found by a ping.
    def metrics_agree() -> bool:
        chrome.get(url + "/live")
        consumed = {
            r["data-topic"]: float(r["consumed"]) for r in cells(chrome, "consumed", '[data-plugin="notificacao"]')
        }
        breakers = {(r["data-plugin"], r["cells"].split("|")[1], r["cells"].split("|")[3])
                    for r in cells(chrome, "breakers")}  # fmt: skip
        scraped = scrape(pipeline.metrics_port)
        expected_consumed = {
            labels["topic"]: value
            for name, labels, value in scraped
            if name == "kafkaworkers_messages_consumed_total" and labels["plugin"] == "notificacao"
        }
        states = {value: state for state, value in STATE_VALUES.items()}
        expected_breakers = {
            (labels["plugin"], labels["breaker"], states[int(value)])
            for name, labels, value in scraped
            if name == "kafkaworkers_circuit_breaker_state"
        }
        return consumed == expected_consumed and consumed[PEDIDO_NOVO] >= ORDERS + 1 and breakers == expected_breakers

    wait_for(metrics_agree, 60, "the page's consumed counts and breakers to match the worker's /metrics", interval=1)

    # While orders flow (the webhook accepting them for now), the page's rates are the flow's.
    def rates_shown() -> bool:
        chrome.get(url + "/live")
        [row] = cells(chrome, "plugins-live", '[data-plugin="notificacao"]')
        committed, consumed = row["cells"].split("|")[2:4]
        return committed not in ("–", "0.0") and consumed not in ("–", "0.0")

    webhook.status = 200
    try:
        with flowing(pipeline):
            wait_for(rates_shown, 60, "notificacao's msgs/s above 0 while orders flow", interval=1)
            shoot(chrome, "live")
    finally:
        webhook.status = 400

    # Workers: the members the coordinator knows for notificacao's two groups, and what each owns.
    def members_agree() -> bool:
        chrome.get(url + "/workers")
        shown = sorted(
            (r["data-group"], tuple(sorted(re.findall(r"[\w.-]+\[\d+\]", r["cells"]))))
            for r in cells(chrome, "members", '[data-plugin="notificacao"]')
        )
        admin = AdminClient({"bootstrap.servers": pipeline.bootstrap})
        groups = [notificacao, f"{notificacao}-retry"]
        described = {g: f.result(15) for g, f in admin.describe_consumer_groups(groups).items()}
        actual = sorted(
            (g, tuple(sorted(f"{tp.topic}[{tp.partition}]" for tp in m.assignment.topic_partitions)))
            for g, d in described.items()
            for m in d.members
        )
        return shown == actual and len(actual) == 2

    wait_for(members_agree, 60, "the page's workers to match the groups' members", interval=1)
    shoot(chrome, "workers")


def test_a_dead_letters_body_is_shown_as_text_never_run(pipeline: Pipeline, chrome: WebDriver) -> None:
    url = pipeline.console("console-body")
    [poison] = [m for m in read_topic(pipeline.bootstrap, dlq_topic(pipeline.group("notificacao")))
                if m.key() == f"{pipeline.prefix}poison".encode()]  # fmt: skip
    chrome.get(f"{url}/dead-letters/notificacao/{poison.partition()}/{poison.offset()}")
    assert chrome.find_element(By.ID, "body").text == POISON.decode(), "the markup shows as text"
    assert chrome.find_elements(By.CSS_SELECTOR, "main script") == []
    assert "pwned" not in chrome.title
    assert "DecodeError" in chrome.find_element(By.ID, "headers").text
    shoot(chrome, "dead-letter")


def test_with_actions_off_the_console_offers_no_replay_pause_or_resume(pipeline: Pipeline, chrome: WebDriver) -> None:
    url = pipeline.console("console-read-only")
    chrome.get(url + "/dead-letters?plugin=notificacao")
    assert len(chrome.find_elements(By.CSS_SELECTOR, "#letters tbody tr[data-ref]")) >= ORDERS + 1
    assert chrome.find_elements(By.CSS_SELECTOR, "input[type=checkbox], #replay-selected, form[method=post]") == []
    assert chrome.find_element(By.ID, "mode").text == "read-only"
    chrome.get(url + "/workers")
    assert chrome.find_elements(By.CSS_SELECTOR, "form[method=post], button") == []


def test_a_dead_letter_replayed_through_the_page_is_handled(
    pipeline: Pipeline, chrome: WebDriver, webhook: Webhook
) -> None:
    url = pipeline.console("console-replay", "--allow-actions")
    notificacao = pipeline.group("notificacao")
    chosen = pipeline.orders[3]
    # At least once: a redelivered order may have been dead-lettered twice; the first copy is replayed.
    letter = min(
        (m for m in read_topic(pipeline.bootstrap, dlq_topic(notificacao)) if m.key() == chosen.encode()),
        key=lambda m: m.timestamp()[1],
    )
    ref = f"{letter.topic()}:{letter.partition()}:{letter.offset()}"
    webhook.status = 200  # the cause is fixed

    chrome.get(url + "/dead-letters?plugin=notificacao")
    row = chrome.find_element(By.CSS_SELECTOR, f'#letters tr[data-ref="{ref}"]')
    row.find_element(By.CSS_SELECTOR, "input[type=checkbox]").click()
    chrome.find_element(By.ID, "replay-selected").click()
    assert element(chrome, "chosen").text == f"notificacao {letter.partition()}:{letter.offset()}"
    assert not set(webhook.accepted) & set(pipeline.orders), "the confirmation page sends nothing"
    shoot(chrome, "confirm-replay")
    chrome.find_element(By.ID, "confirm-replay").click()
    assert (
        element(chrome, "replay-result").find_element(By.CSS_SELECTOR, 'tr[data-plugin="notificacao"] td.replayed').text
        == "1"
    )

    wait_for(lambda: chosen in webhook.accepted, 60, f"the replayed notification of {chosen} at the webhook")
    # Other tests' orders on the shared pedido-novo reach this notificacao too, now that the webhook accepts.
    ours = [o for o in webhook.accepted if o in pipeline.orders]
    assert ours == [chosen], "of this test's dead letters, only the chosen one was handled again"
    ledger = {m.key().decode() for m in read_topic(pipeline.bootstrap, f"{notificacao}-dlq-replayed")}
    assert ref in ledger, "the replay is recorded, so it leaves the backlog"
    chrome.get(url + "/dead-letters?plugin=notificacao")
    row = chrome.find_element(By.CSS_SELECTOR, f'#letters tr[data-ref="{ref}"]')
    assert "replayed" in row.text
    assert row.find_element(By.CSS_SELECTOR, "input[type=checkbox]").get_attribute("disabled") is not None

    def counts_agree() -> bool:
        chrome.get(url + "/dead-letters?plugin=notificacao")
        [summary] = cells(chrome, "dlq-summary", '[data-plugin="notificacao"]')
        shown = (int(summary["total"]), int(summary["waiting"]))
        return shown == dead_letter_counts(pipeline.bootstrap, notificacao) and shown[1] < shown[0]

    wait_for(counts_agree, 60, "the page's dead-letter counts, one replayed, to match the topics", interval=1)


def test_pause_and_resume_through_the_page_reach_the_worker(pipeline: Pipeline, chrome: WebDriver) -> None:
    url = pipeline.console("console-control", "--allow-actions")
    ready = f"http://127.0.0.1:{pipeline.metrics_port}/readyz"
    assert http_get(ready)[0] == 200

    chrome.get(url + "/workers")
    element(chrome, "plugin-actions").find_element(
        By.CSS_SELECTOR, 'tr[data-plugin="notificacao"] button.pause'
    ).click()
    assert element(chrome, "answers").text == "1 worker answered."
    status, _, why = http_get(ready)
    assert status == 503 and "paused" in why, why
    chrome.get(url + "/workers")
    states = {r["cells"].split("|")[6] for r in cells(chrome, "members", '[data-plugin="notificacao"]')}
    assert states == {"paused (paused by control)"} or all(s.startswith("paused") for s in states), states

    element(chrome, "plugin-actions").find_element(
        By.CSS_SELECTOR, 'tr[data-plugin="notificacao"] button.resume'
    ).click()
    assert element(chrome, "answers").text == "1 worker answered."
    wait_for(lambda: http_get(ready)[0] == 200, 30, "notificacao to be ready again")
    chrome.get(url + "/workers")
    assert {r["cells"].split("|")[6] for r in cells(chrome, "members", '[data-plugin="notificacao"]')} == {"running"}
