"""Dead-letter replay on the in-memory broker: back to the group that failed, each letter once.

Two plugins read the same topic: ``billing`` fails while its bug is "deployed", ``audit``
never does. Whatever replay does for billing's dead letters must not make audit handle a
message twice, unless the operator asks for the shared original topic (``--to original``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner

from kafkaworkers import Context, KafkaWorkersError, Plugin, RetryPolicy
from kafkaworkers.cli import cli
from kafkaworkers.dlq import replay
from kafkaworkers.headers import (
    H_ATTEMPT,
    H_CORRELATION_ID,
    H_DUE,
    H_EXCEPTION,
    H_ORIGINAL_OFFSET,
    H_ORIGINAL_PARTITION,
    H_ORIGINAL_TOPIC,
    H_REPLAYED_AT,
    H_REPLAYED_FROM,
)
from kafkaworkers.plugins import PluginHost
from kafkaworkers.testing import Harness
from kafkaworkers.transports.memory import MemoryTransport

MakeHarness = Callable[..., Harness]


class Order(msgspec.Struct, frozen=True):
    n: int


class Pipeline:
    """billing (fails while ``broken``) and audit, both consuming ``orders``, on one harness."""

    def __init__(self, make: MakeHarness, delays: tuple[float, ...] = (0.0, 0.0)) -> None:
        self.broken = True
        #: (n, attempt, topic) of every billing call; n of every audit call.
        self.billing: list[tuple[int, int, str]] = []
        self.audit: list[int] = []
        billing = Plugin("billing", retry=RetryPolicy(delays=delays, jitter=0.0))
        audit = Plugin("audit")

        @billing.consumes("orders", Order)
        def bill(order: Order, ctx: Context) -> None:
            self.billing.append((order.n, ctx.attempt, ctx.topic))
            if self.broken:
                raise ConnectionError(f"the bug met order {order.n}")

        @audit.consumes("orders", Order)
        def note(order: Order, ctx: Context) -> None:
            self.audit.append(order.n)

        self.harness = make(billing, audit, partitions=1)

    def dead_letter(self, n: int) -> Any:
        """Publish order ``n`` and let billing's retries run out; return its dead letter."""
        self.harness.produce("orders", Order(n), key=f"order-{n}", headers={H_CORRELATION_ID: f"corr-{n}".encode()})
        self.harness.run_until_idle(wait_for_retries=True)
        [letter] = [r for r in self.harness.records("billing-dlq") if r.key() == f"order-{n}".encode()]
        return letter

    def replay(self, **options: Any) -> Any:
        return replay(self.harness.settings, "billing", transport=self.harness.transport, **options)

    def run(self) -> None:
        self.harness.run_until_idle(wait_for_retries=True)


def headers(record: Any) -> dict[str, bytes]:
    return dict(record.headers() or [])


def test_a_replayed_letter_goes_to_its_own_groups_retry_topic_and_only_that_group_handles_it(
    kafkaworkers_harness: MakeHarness,
) -> None:
    p = Pipeline(kafkaworkers_harness)
    letter = p.dead_letter(1)
    assert p.billing == [(1, 1, "orders"), (1, 2, "orders"), (1, 3, "orders")]
    assert p.audit == [1]
    [original] = p.harness.records("orders")

    p.broken = False
    before = int(time.time() * 1000)
    report = p.replay()
    assert (report.matched, report.replayed, report.to) == (1, 1, "group")
    p.run()

    assert p.billing[3:] == [(1, 1, "orders")], "handled once more, by the handler of its original topic"
    assert p.audit == [1], "the other group reading the topic never sees the replay"
    assert len(p.harness.records("orders")) == 1
    [replayed] = [r for r in p.harness.records("billing-retry-1") if H_REPLAYED_FROM in headers(r)]
    h = headers(replayed)
    assert (replayed.key(), replayed.value()) == (letter.key(), letter.value())
    assert h[H_REPLAYED_FROM] == f"billing-dlq:{letter.partition()}:{letter.offset()}".encode()
    assert before <= int(h[H_REPLAYED_AT]) <= int(time.time() * 1000)
    assert before <= int(h[H_DUE]) <= int(h[H_REPLAYED_AT]), "due at once"
    assert h[H_ORIGINAL_TOPIC] == b"orders"
    assert (h[H_ORIGINAL_PARTITION], h[H_ORIGINAL_OFFSET]) == (
        str(original.partition()).encode(),
        str(original.offset()).encode(),
    )
    assert h[H_CORRELATION_ID] == b"corr-1"
    assert H_ATTEMPT not in h and H_EXCEPTION not in h

    again = p.replay()
    assert (again.matched, again.replayed, again.already_replayed) == (1, 0, 1)
    p.run()
    assert len(p.billing) == 4 and p.audit == [1]


def test_a_replay_is_a_fresh_start_a_letter_failing_again_takes_every_retry_before_it_is_dead_again(
    kafkaworkers_harness: MakeHarness,
) -> None:
    p = Pipeline(kafkaworkers_harness)
    first = p.dead_letter(2)

    assert p.replay().replayed == 1
    p.run()

    assert p.billing[3:] == [(2, 1, "orders"), (2, 2, "orders"), (2, 3, "orders")]
    [_, second] = p.harness.records("billing-dlq")
    assert headers(second)[H_ATTEMPT] == headers(first)[H_ATTEMPT] == b"3"
    assert headers(second)[H_ORIGINAL_OFFSET] == headers(first)[H_ORIGINAL_OFFSET], "the origin survives a replay"
    assert p.audit == [2]


def test_replay_to_the_original_topic_is_the_explicit_option_and_every_group_sees_it(
    kafkaworkers_harness: MakeHarness,
) -> None:
    p = Pipeline(kafkaworkers_harness)
    letter = p.dead_letter(3)
    p.broken = False

    report = p.replay(to="original")
    assert (report.replayed, report.to) == (1, "original")
    p.run()

    assert p.billing[3:] == [(3, 1, "orders")]
    assert p.audit == [3, 3], "the shared topic is read by every group"
    [_, replayed] = p.harness.records("orders")
    assert headers(replayed)[H_REPLAYED_FROM] == f"billing-dlq:{letter.partition()}:{letter.offset()}".encode()
    assert H_ORIGINAL_TOPIC not in headers(replayed) and H_DUE not in headers(replayed)
    assert [r for r in p.harness.records("billing-retry-1") if H_REPLAYED_FROM in headers(r)] == []


def test_a_group_without_retry_topics_replays_nothing_unless_asked_for_the_original_topic(
    kafkaworkers_harness: MakeHarness,
) -> None:
    p = Pipeline(kafkaworkers_harness, delays=())
    p.dead_letter(4)
    assert p.billing == [(4, 1, "orders")]
    p.broken = False

    with pytest.raises(KafkaWorkersError, match=r"no retry topic billing-retry-1 .* pass --to original"):
        p.replay()
    with pytest.raises(KafkaWorkersError, match="no retry topic"):
        p.replay(dry_run=True)
    assert len(p.harness.records("orders")) == 1
    assert "billing-dlq-replayed" not in p.harness.broker.list_topics(), "nothing recorded either"

    assert p.replay(to="original").replayed == 1
    p.run()
    assert p.billing[1:] == [(4, 1, "orders")]


def test_replaying_a_dead_letter_topic_that_does_not_exist_is_an_error(kafkaworkers_harness: MakeHarness) -> None:
    p = Pipeline(kafkaworkers_harness)
    with pytest.raises(KafkaWorkersError, match="dead-letter topic nobody-dlq does not exist"):
        replay(p.harness.settings, "nobody", transport=p.harness.transport)


# --- the command ---------------------------------------------------------------------------


@pytest.fixture
def invoke(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[Callable[..., Any]]:
    """Run ``kafkaworkers`` in-process with these plugins, on a fresh named in-memory broker.

    The command configures logging for its run; the root logger is put back after it.
    """
    monkeypatch.chdir(tmp_path)  # no kafkaworkers.toml of the checkout
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    broker = f"memory://dlq-cli-{uuid.uuid4().hex}"

    def run(host: PluginHost, *args: str) -> Any:
        return CliRunner().invoke(cli, [*args, "-b", broker], obj=host)

    run.broker = MemoryTransport.named(broker.removeprefix("memory://")).broker  # type: ignore[attr-defined]
    yield run
    root.handlers[:], level = saved
    root.setLevel(level)


def host_with(*retries: float, mode: str = "topics") -> PluginHost:
    plugin = Plugin("billing", retry=RetryPolicy(delays=retries, jitter=0.0, mode=mode))  # type: ignore[arg-type]

    @plugin.consumes("orders", Order)
    def bill(order: Order, ctx: Context) -> None:
        """Never runs here: the commands only read the plugin's declarations."""

    host = PluginHost()
    host.register(plugin, "billing")
    return host


def test_the_command_says_in_one_line_when_the_dead_letter_topic_does_not_exist(invoke: Any) -> None:
    result = invoke(host_with(1.0), "dlq", "replay", "--plugin", "billing")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "kafkaworkers: error: dead-letter topic billing-dlq does not exist: group billing has dead-lettered"
        " nothing (if the plugin runs under another group, pass its --group-id)"
    ]


def test_the_command_replays_into_the_retry_topic_by_default_and_to_the_original_topic_when_asked(
    invoke: Any,
) -> None:
    for topic in ("orders", "billing-retry-1", "billing-dlq"):
        invoke.broker.create_topic(topic, 1)
    producer = MemoryTransport(invoke.broker).producer({})
    producer.produce("billing-dlq", b'{"n": 5}', b"order-5", headers=[(H_ORIGINAL_TOPIC, b"orders")])
    producer.flush()

    planned = invoke(host_with(1.0), "dlq", "replay", "--plugin", "billing", "--dry-run")
    assert planned.exit_code == 0, planned.output
    assert "would replay billing-dlq:0:0 -> billing-retry-1" in planned.stdout
    shared = invoke(host_with(1.0), "dlq", "replay", "--plugin", "billing", "--to", "original", "--dry-run")
    assert "would replay billing-dlq:0:0 -> orders" in shared.stdout

    for host in (host_with(), host_with(1.0, mode="pause")):
        no_retries = invoke(host, "dlq", "replay", "--plugin", "billing")
        assert no_retries.exit_code == 1
        assert no_retries.stderr.startswith("kafkaworkers: error: plugin billing has no retry topics")
        assert "--to original" in no_retries.stderr
    assert invoke.broker.records("billing-retry-1") == invoke.broker.records("orders") == []
