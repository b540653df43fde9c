"""The Apache Kafka transport: confluent-kafka clients, plus a small admin wrapper."""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import confluent_kafka
from confluent_kafka.admin import AdminClient, ConfigResource, ConfigSource, NewTopic, ResourceType

from kafkaworkers.errors import BrokerUnavailable
from kafkaworkers.transports import Consumer, GroupMember, Producer, TopicDescription

__all__ = ["KafkaAdmin", "KafkaTransport", "unreachable"]


class KafkaTransport:
    """Clients for a real Kafka cluster; the configuration is passed to librdkafka as is."""

    name = "kafka"

    # confluent-kafka's stubs fit its clients to the protocols only loosely: a consumed
    # message's headers() is typed as maybe a dict (one type serves produce's input too),
    # commit() is overloaded on a literal ``asynchronous`` flag, and produce() takes headers
    # as an invariant list of str | bytes values, refusing the list[tuple[str, bytes | None]]
    # librdkafka accepts. tests/transports/test_contract.py runs these clients against Kafka.
    def consumer(self, config: Mapping[str, Any]) -> Consumer:
        return confluent_kafka.Consumer(dict(config))  # type: ignore[return-value]

    def producer(self, config: Mapping[str, Any]) -> Producer:
        return confluent_kafka.Producer(dict(config))  # type: ignore[return-value]

    def admin(self, config: Mapping[str, Any]) -> KafkaAdmin:
        return KafkaAdmin(config)


_ADMIN_KEYS = ("bootstrap.servers", "security.protocol", "client.id")


class KafkaAdmin:
    """Topic creation and listing with errors turned into plain statements."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self._servers = config.get("bootstrap.servers", "?")
        self._protocol = str(config.get("security.protocol", "plaintext")).upper()
        # Consumer/producer-only properties make AdminClient warn; keep the shared ones.
        shared = {
            k: v
            for k, v in config.items()
            if k in _ADMIN_KEYS or k.startswith(("sasl.", "ssl.", "socket.", "broker.", "metadata."))
        }
        # librdkafka's own log lines go through Python logging, as the other clients' do.
        shared.setdefault("logger", logging.getLogger("kafkaworkers.librdkafka"))
        self._client = AdminClient(shared)

    def list_topics(self, timeout: float = 10.0) -> dict[str, int]:
        metadata = self._metadata(None, timeout)
        return {name: len(t.partitions) for name, t in metadata.topics.items() if not name.startswith("__")}

    def broker_count(self, timeout: float = 10.0) -> int:
        return len(self._metadata(None, timeout).brokers)

    def describe_topic(self, name: str, timeout: float = 10.0) -> TopicDescription | None:
        topic = self._metadata(name, timeout).topics.get(name)
        if topic is None or topic.error is not None:
            return None
        replication = max((len(p.replicas) for p in topic.partitions.values()), default=0)
        future = self._client.describe_configs([ConfigResource(ResourceType.TOPIC, name)])
        try:
            [entries] = [f.result(timeout) for f in future.values()]
        except confluent_kafka.KafkaException as exc:
            raise BrokerUnavailable(f"cannot read the config of topic {name!r}: {_reason(exc)}") from None
        # What kafka-topics.sh --describe calls Configs: the values set on the topic itself.
        config = {
            key: str(entry.value)
            for key, entry in sorted(entries.items())
            if entry.source == ConfigSource.DYNAMIC_TOPIC_CONFIG.value and not entry.is_sensitive
        }
        return TopicDescription(len(topic.partitions), replication, config)

    def delete_topics(self, names: Sequence[str], timeout: float = 30.0) -> dict[str, str]:
        if not names:
            return {}
        result: dict[str, str] = {}
        for name, future in self._client.delete_topics(list(names), operation_timeout=timeout).items():
            try:
                future.result(timeout)
                result[name] = "deleted"
            except confluent_kafka.KafkaException as exc:
                err = exc.args[0]
                if err.code() != confluent_kafka.KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise BrokerUnavailable(f"cannot delete topic {name!r}: {err.str()}") from None
                result[name] = "missing"
        return result

    def describe_groups(self, groups: Sequence[str], timeout: float = 10.0) -> dict[str, list[GroupMember]]:
        if not groups:
            return {}
        result: dict[str, list[GroupMember]] = {}
        for group, future in self._client.describe_consumer_groups(list(groups), request_timeout=timeout).items():
            try:
                # Longer than the request's own timeout, so that librdkafka answers first and why.
                description = future.result(timeout + 5)
            except confluent_kafka.KafkaException as exc:
                code = exc.args[0].code()
                if code == confluent_kafka.KafkaError.GROUP_ID_NOT_FOUND:
                    result[group] = []
                    continue
                if code not in _NO_ANSWER:
                    raise BrokerUnavailable(f"cannot describe group {group!r}: {_reason(exc)}") from None
                reason = f"no answer describing group {group!r}: {_reason(exc)}"
                raise BrokerUnavailable(unreachable(self._servers, self._protocol, reason)) from None
            except TimeoutError:  # not even librdkafka's timeout came back
                reason = f"no answer describing group {group!r} within {timeout + 5:.0f} s"
                raise BrokerUnavailable(unreachable(self._servers, self._protocol, reason)) from None
            result[group] = [
                GroupMember(
                    member.member_id,
                    member.client_id,
                    member.host,
                    sorted((tp.topic, tp.partition) for tp in member.assignment.topic_partitions),
                )
                for member in description.members
            ]
        return result

    def _metadata(self, topic: str | None, timeout: float) -> Any:
        try:
            return self._client.list_topics(topic, timeout=timeout)
        except confluent_kafka.KafkaException as exc:
            raise BrokerUnavailable(unreachable(self._servers, self._protocol, _reason(exc))) from None

    def create_topics(
        self, topics: Sequence[tuple[str, int, int]], config: Mapping[str, str] | None = None, timeout: float = 30.0
    ) -> dict[str, str]:
        existing = self.list_topics()
        result: dict[str, str] = {}
        wanted = []
        for name, partitions, replication in topics:
            if name in existing:
                result[name] = "exists"
            else:
                wanted.append(
                    NewTopic(name, num_partitions=partitions, replication_factor=replication, config=dict(config or {}))
                )
        if not wanted:
            return result
        for name, future in self._client.create_topics(wanted, operation_timeout=timeout).items():
            try:
                future.result(timeout)
                result[name] = "created"
            except confluent_kafka.KafkaException as exc:
                err = exc.args[0]
                if err.code() == confluent_kafka.KafkaError.TOPIC_ALREADY_EXISTS:
                    result[name] = "exists"
                else:
                    raise BrokerUnavailable(f"cannot create topic {name!r}: {err.str()}") from None
        return result


#: What librdkafka says when no broker answered a request, rather than a broker refusing it.
_NO_ANSWER = frozenset(
    {
        confluent_kafka.KafkaError._TIMED_OUT,
        confluent_kafka.KafkaError._TRANSPORT,
        confluent_kafka.KafkaError._ALL_BROKERS_DOWN,
    }
)


def _reason(exc: confluent_kafka.KafkaException) -> str:
    err = exc.args[0] if exc.args else None
    return err.str() if isinstance(err, confluent_kafka.KafkaError) else str(exc)


def unreachable(servers: str, protocol: str, reason: str) -> str:
    """Why no broker answered, said with what was tried and what to do.

    librdkafka reports "transport failure" both when nothing listens and when a listener
    refuses the client's protocol (SASL or TLS against a plaintext port); a TCP connect to
    each address tells the two apart.
    """
    listening = [address for address in servers.split(",") if _listens(address.strip())]
    tried = f"{servers} over {protocol}"
    if not listening:
        return (
            f"cannot reach Kafka at {tried}: nothing listens there ({reason}). Start a broker"
            " (`make kafka-up` starts one on 127.0.0.1:19092) or pass --bootstrap-servers /"
            " KAFKAWORKERS_BOOTSTRAP_SERVERS"
        )
    return (
        f"cannot talk to Kafka at {tried}: {', '.join(listening)} accepts connections but no Kafka"
        f" handshake completed ({reason}). Check that security.protocol and the sasl.* / ssl.*"
        " settings match that listener (KAFKAWORKERS_KAFKA_SECURITY_PROTOCOL, [kafka] in kafkaworkers.toml)"
    )


def _listens(address: str) -> bool:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return False
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except OSError:
        return False
