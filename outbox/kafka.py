"""Kafka client factories and topic creation, all from settings.

Producers are made per process after fork (confluent-kafka clients do not
survive ``fork``); nothing here creates a client at import time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from outbox.errors import SettingsError
from outbox.settings import Settings, env_name
from outbox.wire import ACK_TOPIC

log = logging.getLogger(__name__)

TOPIC_CREATE_TIMEOUT_S = 10.0


class _ChosenOnPurpose(logging.Filter):
    """Drops librdkafka's warning that the gapless guarantee is experimental: the relay
    turns it on knowingly, and every new producer would say it again."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "enable.gapless.guarantee is experimental" not in record.getMessage()


# librdkafka's own log lines go through logging (so they are JSON lines when logs are).
librdkafka_log = logging.getLogger("outbox.librdkafka")
librdkafka_log.addFilter(_ChosenOnPurpose())


def bootstrap(settings: Settings) -> str:
    """The configured bootstrap servers, or an error naming the variable to set."""
    if settings.kafka_bootstrap is None:
        raise SettingsError(
            f"{env_name('kafka_bootstrap')} is not set: run `outbox dev` or point it at Kafka"
        )
    return settings.kafka_bootstrap


def producer_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """An idempotent producer: acks from all replicas, no reordering on retry."""
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap(settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        "logger": librdkafka_log,
    }
    config.update(extra)
    return config


def consumer_config(
    settings: Settings, group: str, *, topics: Iterable[str] = (), **extra: Any
) -> dict[str, Any]:
    """A consumer of assigned partitions (``consumer.partitions`` shares them out) that
    commits to Kafka only when told to, after the inbox stored the offsets. One that reads
    ``outbox.acks`` alone lets the broker hold its fetches longer: an idle fetch costs the
    broker and the consumer CPU each time it ends empty, and an ack is not in a hurry."""
    acks_only = set(topics) == {ACK_TOPIC}
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap(settings),
        "group.id": group,
        "enable.auto.offset.store": False,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": (
            settings.kafka_ack_fetch_wait_max_ms if acks_only else settings.kafka_fetch_wait_max_ms
        ),
        "logger": librdkafka_log,
    }
    config.update(extra)
    return config


def admin_client(settings: Settings) -> AdminClient:
    """An admin client for metadata and topic creation."""
    config: dict[str, Any] = {"bootstrap.servers": bootstrap(settings), "logger": librdkafka_log}
    return AdminClient(config)


def ensure_topics(admin: AdminClient, topics: Iterable[str], partitions: int) -> list[str]:
    """Create the topics that do not exist yet; return the ones created.

    Raises the first topic's error when one could not be created."""
    created, failed = create_topics(admin, topics, partitions)
    for exc in failed.values():
        raise exc
    return created


def create_topics(
    admin: AdminClient, topics: Iterable[str], partitions: int
) -> tuple[list[str], dict[str, KafkaException]]:
    """Create the topics that do not exist yet; return those created and, per topic that
    the broker refused to create, its error. An unreachable broker raises."""
    existing = set(admin.list_topics(timeout=TOPIC_CREATE_TIMEOUT_S).topics)
    missing = [t for t in dict.fromkeys(topics) if t not in existing]
    if not missing:
        return [], {}
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in missing],
        request_timeout=TOPIC_CREATE_TIMEOUT_S,
    )
    created = []
    failed: dict[str, KafkaException] = {}
    for topic, future in futures.items():
        try:
            future.result()
            created.append(topic)
        except KafkaException as exc:
            # Another process may have created it between our look and our request.
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                failed[topic] = exc
    if created:
        log.info("created Kafka topics %s with %d partitions", created, partitions)
    return created, failed


def max_message_bytes(admin: AdminClient, topics: Iterable[str]) -> dict[str, int]:
    """Each topic's own ``max.message.bytes``, where the broker reports one."""
    resources = [ConfigResource(ResourceType.TOPIC, t) for t in topics]
    if not resources:
        return {}
    limits = {}
    for resource, future in admin.describe_configs(
        resources, request_timeout=TOPIC_CREATE_TIMEOUT_S
    ).items():
        try:
            entry = future.result().get("max.message.bytes")
        except KafkaException as exc:
            log.debug("no configuration for topic %s: %s", resource.name, exc)
            continue
        if entry is not None and entry.value is not None and entry.value.isdigit():
            limits[resource.name] = int(entry.value)
    return limits
