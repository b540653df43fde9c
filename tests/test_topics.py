"""``kafkaworkers topics``: list, describe and delete on the in-memory broker, with the plugins' declarations."""

from __future__ import annotations

import json
import uuid

import pytest
from click.testing import CliRunner, Result

from kafkaworkers import topics as topics_module
from kafkaworkers.cli import cli
from kafkaworkers.plugins import PluginHost
from kafkaworkers.transports.memory import MemoryTransport


def kw(*args: str, input: str | None = None) -> Result:
    """The installed CLI, run in this process (so a memory:// broker outlives one command)."""
    host = PluginHost()
    host.load_entry_points()
    host.register_commands(cli)
    return CliRunner().invoke(cli, list(args), obj=host, input=input)


@pytest.fixture
def broker() -> str:
    """A fresh in-memory broker with every topic the installed plugins declare."""
    url = f"memory://topics-{uuid.uuid4().hex[:8]}"
    created = kw("topics", "create", "-b", url, "--partitions", "2")
    assert created.exit_code == 0, created.output
    return url


def topics_of(url: str) -> dict[str, int]:
    return MemoryTransport.named(url.removeprefix("memory://")).broker.list_topics()


def test_list_gives_each_topic_its_partitions_readers_writers_and_group_role(broker):
    MemoryTransport.named(broker.removeprefix("memory://")).broker.create_topic("stray", 1)

    result = kw("topics", "list", "-b", broker, "--format", "json")

    assert result.exit_code == 0, result.output
    rows = {row["topic"]: row for row in json.loads(result.stdout)}
    assert set(rows) == set(topics_of(broker))  # every topic on the broker, no ledger before a replay
    novo = rows["pedido-novo"]
    assert novo["partitions"] == 2 and novo["kind"] == "declared" and novo["type"].endswith("PedidoNovo")
    assert {"fraude", "reserva", "pagamento", "relatorios"} <= set(novo["readers"])
    assert rows["fraude-verificado"]["writers"] == ["fraude"]
    assert (rows["fraude-dlq"]["kind"], rows["fraude-dlq"]["group"]) == ("dlq", "fraude")
    assert rows["fraude-dlq"]["writers"] == ["fraude"] and rows["fraude-dlq"]["readers"] == ["dlq replay"]
    retries = [row for row in rows.values() if row["kind"] == "retry"]
    assert retries and all(row["readers"] == row["writers"] == [row["group"]] for row in retries)
    assert rows["stray"]["kind"] == "undeclared" and rows["stray"]["readers"] == []


def test_list_text_is_aligned_and_names_a_one_off_groups_topics(broker):
    memory = MemoryTransport.named(broker.removeprefix("memory://")).broker
    memory.create_topic("trial-retry-1", 2)
    memory.create_topic("trial-dlq", 2)

    result = kw("topics", "list", "-b", broker)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["TOPIC", "PARTITIONS", "ROLE", "READ", "BY", "WRITTEN", "BY"]
    by_topic = {line.split()[0]: line for line in lines[1:]}
    assert "retries of group trial" in by_topic["trial-retry-1"]
    assert "dead letters of group trial" in by_topic["trial-dlq"]
    # Columns line up: every role starts where the header's ROLE does.
    role_at = lines[0].index("ROLE")
    assert all(line[role_at - 2 : role_at] == "  " and line[role_at] != " " for line in lines[1:])


def test_list_names_the_control_topics_as_the_frameworks_with_the_workers_that_read_and_answer_them(
    broker, monkeypatch
):
    memory = MemoryTransport.named(broker.removeprefix("memory://")).broker
    memory.create_topic("ops-commands", 1)
    memory.create_topic("ops-answers", 1)
    monkeypatch.setenv("KAFKAWORKERS_CONTROL_TOPIC", "ops-commands")
    monkeypatch.setenv("KAFKAWORKERS_CONTROL_REPLIES_TOPIC", "ops-answers")

    rows = {row["topic"]: row for row in json.loads(kw("topics", "list", "-b", broker, "--format", "json").stdout)}
    text = {line.split()[0]: line for line in kw("topics", "list", "-b", broker).stdout.splitlines()}

    plugins = sorted(rows["fraude-dlq"]["writers"] + rows["reserva-dlq"]["writers"])
    commands, answers = rows["ops-commands"], rows["ops-answers"]
    assert commands["kind"] == "control" and answers["kind"] == "replies"
    assert set(plugins) <= set(commands["readers"]) and commands["readers"] == answers["writers"]
    assert commands["writers"] == answers["readers"] == ["control", "ui"]
    assert "kafkaworkers control commands" in text["ops-commands"] and "no installed plugin" not in text["ops-commands"]
    assert "kafkaworkers control replies" in text["ops-answers"]
    declared = kw("topics", "list", "--declared", "-b", broker).stdout
    assert "ops-commands" in declared, "present: listed with the declared topics"


def test_list_declared_does_not_call_control_topics_missing_before_anything_made_them(broker):
    url = f"memory://empty-{uuid.uuid4().hex[:8]}"
    rows = json.loads(kw("topics", "list", "--declared", "-b", url, "--format", "json").stdout)
    assert not {"kafkaworkers-control", "kafkaworkers-control-replies"} & {row["topic"] for row in rows}


def test_list_declared_shows_missing_topics(broker):
    url = f"memory://empty-{uuid.uuid4().hex[:8]}"
    result = kw("topics", "list", "--declared", "-b", url, "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows and all(row["partitions"] is None for row in rows)
    assert "pedido-novo" in {row["topic"] for row in rows}
    assert "missing" in kw("topics", "list", "--declared", "-b", url).stdout


def test_describe_gives_partitions_replication_and_who_uses_it(broker):
    result = kw("topics", "describe", "fraude-verificado", "-b", broker, "--format", "json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["partitions"], data["replication"], data["config"]) == (2, 1, {})
    assert data["writers"] == ["fraude"] and "relatorios" in data["readers"]
    text = kw("topics", "describe", "fraude-verificado", "-b", broker).stdout
    assert "Partitions:   2" in text and "Written by:   fraude" in text


def test_describe_of_a_missing_topic_is_one_line(broker):
    result = kw("topics", "describe", "nope", "-b", broker)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"kafkaworkers: error: no topic 'nope' on {broker}"


def test_delete_refuses_without_yes_when_stdin_is_not_a_terminal(broker):
    result = kw("topics", "delete", "fraude-dlq", "-b", broker)

    assert result.exit_code == 1
    assert "kafkaworkers: error: not deleting 1 topic(s) without --yes: stdin is not a terminal" in result.stderr
    assert "fraude-dlq" in topics_of(broker)


def test_delete_with_yes_deletes_only_the_named_topic(broker):
    before = set(topics_of(broker))
    result = kw("topics", "delete", "fraude-dlq", "--yes", "-b", broker)
    assert result.exit_code == 0, result.output
    assert "deleted  fraude-dlq" in result.stdout
    assert set(topics_of(broker)) == before - {"fraude-dlq"}


def test_delete_of_a_missing_topic_deletes_nothing(broker):
    before = set(topics_of(broker))
    result = kw("topics", "delete", "fraude-dlq", "nope", "--yes", "-b", broker)
    assert result.exit_code == 1 and "no topic 'nope'" in result.stderr
    assert set(topics_of(broker)) == before


def test_delete_group_id_removes_that_groups_retry_dlq_and_ledger_topics(broker):
    memory = MemoryTransport.named(broker.removeprefix("memory://")).broker
    left = ["trial-retry-1", "trial-retry-2", "trial-dlq", "trial-dlq-replayed"]
    for name in [*left, "trial-other", "trial2-dlq"]:
        memory.create_topic(name, 1)
    before = set(topics_of(broker))

    result = kw("topics", "delete", "--group-id", "trial", "--yes", "-b", broker)

    assert result.exit_code == 0, result.output
    assert set(topics_of(broker)) == before - set(left)
    assert "4 deleted" in result.stdout


def test_delete_asks_on_a_terminal_and_keeps_the_topic_on_no(broker, monkeypatch):
    monkeypatch.setattr(topics_module, "_stdin_is_terminal", lambda: True)

    kept = kw("topics", "delete", "fraude-dlq", "-b", broker, input="n\n")
    assert kept.exit_code == 1 and "fraude-dlq" in topics_of(broker)
    assert "Delete these 1 topic(s)" in kept.stdout

    gone = kw("topics", "delete", "fraude-dlq", "-b", broker, input="y\n")
    assert gone.exit_code == 0, gone.output
    assert "fraude-dlq" not in topics_of(broker)


def test_delete_needs_topics_or_a_group(broker):
    result = kw("topics", "delete", "-b", broker)
    assert result.exit_code == 2
    assert result.stderr.startswith("kafkaworkers: error: name topics to delete, or pass --group-id GROUP")


class _Brokers:
    """An admin that reports a cluster of ``count`` brokers: all the replication choice reads."""

    def __init__(self, count: int) -> None:
        self.count = count

    def broker_count(self, timeout: float = 10.0) -> int:
        return self.count


@pytest.mark.parametrize(
    ("brokers", "flags", "expected"),
    [
        (1, (None, None), (1, {})),
        (2, (None, None), (2, {})),
        (3, (None, None), (3, {"min.insync.replicas": "2"})),
        (5, (None, None), (3, {"min.insync.replicas": "2"})),
        (3, (2, None), (2, {})),
        (3, (3, 3), (3, {"min.insync.replicas": "3"})),
    ],
)
def test_create_gives_three_copies_two_in_sync_in_a_cluster_of_three_or_more(brokers, flags, expected):
    assert topics_module._replication(_Brokers(brokers), *flags) == expected


def test_create_refuses_more_in_sync_replicas_than_copies():
    result = kw("topics", "create", "-b", f"memory://isr-{uuid.uuid4().hex[:8]}", "--min-insync-replicas", "2")
    assert result.exit_code != 0
    assert "--min-insync-replicas" in result.output and "2 is more than the 1 copy" in result.output
