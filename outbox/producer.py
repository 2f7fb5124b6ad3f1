"""The relay's Kafka producer: idempotent, one per process, created after fork.

``send`` produces a batch and waits for every delivery report. Only a report
without error proves a message is in Kafka; an error or a missing report
proves nothing (the message may be there), so such rows are retried and a
duplicate downstream is possible and harmless.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from outbox.kafka import admin_client, create_topics, max_message_bytes, producer_config
from outbox.settings import Settings

log = logging.getLogger(__name__)

# Errors that say no broker could be reached, not that the message is bad: the relay
# releases such rows without spending an attempt and opens its circuit.
BROKER_UNAVAILABLE = frozenset(
    {
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TRANSPORT,
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError._RESOLVE,
        KafkaError._PURGE_QUEUE,
        KafkaError._PURGE_INFLIGHT,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
    }
)
# Errors of one topic or partition while the brokers answer (no leader, too few
# replicas, a topic the broker lost): only that topic's rows back off, and the circuit
# stays closed for every other topic.
TOPIC_UNAVAILABLE = frozenset(
    {
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    }
)
# Errors after which this producer instance is unusable whatever the message: its
# idempotence session with the broker is gone (fenced after a broker pause, a broker
# that lost its state, a fatal librdkafka error). librdkafka reports some of these only
# in delivery reports, without marking them fatal, and every later message then fails
# the same way: the producer is replaced, and the rows go again without spending an
# attempt.
PRODUCER_UNUSABLE = frozenset(
    {
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.INVALID_PRODUCER_ID_MAPPING,
        KafkaError._FENCED,
        KafkaError._FATAL,
        KafkaError._GAPLESS_GUARANTEE,
    }
)
TOPIC_MISSING = frozenset({KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART})
PING_TIMEOUT_S = 2.0
# A record batch's header and the record's own framing, rounded up.
RECORD_OVERHEAD_BYTES = 100


class Outgoing(NamedTuple):
    """One claimed row, ready to produce (a tuple: a claim makes thousands at a time)."""

    id: int
    topic: str
    key: str | None
    value: bytes
    headers: list[tuple[str, str | bytes | None]]


@dataclasses.dataclass
class DeliveryReport:
    """What Kafka said about one row: where it landed, or why not."""

    id: int
    partition: int | None = None
    offset: int | None = None
    error: KafkaError | None = None
    # Not produced, because an earlier row of its key was refused in this batch.
    held: bool = False

    @property
    def broker_unavailable(self) -> bool:
        """The broker could not be reached: the row goes back untouched, the circuit opens."""
        return self.error is not None and self.error.code() in BROKER_UNAVAILABLE

    @property
    def topic_unavailable(self) -> bool:
        """Its topic or partition cannot take records now: the row backs off."""
        return self.error is not None and self.error.code() in TOPIC_UNAVAILABLE

    @property
    def producer_unusable(self) -> bool:
        """The producer, not the message, failed: the row goes back untouched."""
        return self.error is not None and _unusable(self.error)


def _unusable(error: KafkaError) -> bool:
    return error.fatal() or error.code() in PRODUCER_UNUSABLE


class RelayProducer:
    """An idempotent producer that creates missing topics and reports each delivery."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.known_topics: set[str] = set()
        self.topic_limits: dict[str, int] = {}
        self.brokers_down = False
        self.fatal: KafkaError | None = None
        # Why each replaced producer was replaced (error names), for the relay's metrics.
        self.replaced: list[str] = []
        self.producer = self._make()

    def _make(self) -> Producer:
        s = self.settings
        # The broker must accept the largest message publish() lets through.
        max_message = s.max_payload_bytes + s.max_key_bytes + s.max_headers_bytes + 65536
        self.fatal = None
        return Producer(
            producer_config(
                s,
                **{
                    "message.timeout.ms": s.relay_delivery_timeout_ms,
                    "message.max.bytes": max_message,
                    "queue.buffering.max.messages": max(100000, s.relay_batch_size * 4),
                    # A record the broker refuses for good stops this producer (replaced
                    # on the next pass) instead of letting later records of the
                    # partition, and so of its key, be written after the gap.
                    "enable.gapless.guarantee": True,
                    "error_cb": self._on_error,
                },
            )
        )

    def _on_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self.brokers_down = True
        if _unusable(error):
            self.fatal = error
        log.warning("producer: %s", error)

    def ping(self) -> bool:
        """True when a broker answers a metadata request."""
        try:
            metadata = self.producer.list_topics(timeout=PING_TIMEOUT_S)
        except Exception as exc:
            log.warning("producer: broker did not answer: %s", exc)
            return False
        self.brokers_down = not metadata.brokers
        return not self.brokers_down

    def prepare_topics(self, topics: set[str]) -> dict[str, KafkaError]:
        """Create any of ``topics`` not known to exist, with the configured partitions, and
        learn their ``max.message.bytes``; return the error of each the broker refused to
        create (an unreachable broker raises)."""
        missing = topics - self.known_topics
        if not missing:
            return {}
        admin = admin_client(self.settings)
        _, failed = create_topics(admin, missing, self.settings.kafka_topic_partitions)
        made = missing - set(failed)
        self.topic_limits.update(max_message_bytes(admin, made))
        self.known_topics |= made
        for topic, exc in failed.items():
            log.warning("producer: the broker refused to create topic %r: %s", topic, exc)
        return {topic: exc.args[0] for topic, exc in failed.items()}

    def send(self, rows: Sequence[Outgoing]) -> list[DeliveryReport]:
        """Produce ``rows`` in order and wait for every delivery report."""
        if self.fatal is not None:
            self._replace()
        reports: dict[int, DeliveryReport] = {}
        try:
            refused_topics = self.prepare_topics({r.topic for r in rows})
        except KafkaException as exc:
            # No broker answered the metadata or creation request: nothing was sent.
            unreachable = KafkaError(KafkaError._TRANSPORT, f"topics not ready: {exc.args[0]}")
            return [DeliveryReport(r.id, error=unreachable) for r in rows]

        def on_delivery(row_id: int) -> Any:
            def report(error: KafkaError | None, msg: Message) -> None:
                if error is None:
                    reports[row_id] = DeliveryReport(row_id, msg.partition(), msg.offset())
                else:
                    reports[row_id] = DeliveryReport(row_id, error=error)

            return report

        refused_keys: set[str] = set()
        for row in rows:
            if self.fatal is not None:
                reports[row.id] = DeliveryReport(row.id, error=self.fatal)
                continue
            if row.key is not None and row.key in refused_keys:
                reports[row.id] = DeliveryReport(row.id, held=True)
                continue
            refusal = refused_topics.get(row.topic) or self._too_large(row)
            if refusal is not None:
                reports[row.id] = DeliveryReport(row.id, error=refusal)
                if row.key is not None:
                    refused_keys.add(row.key)
                continue
            while True:
                try:
                    self.producer.produce(
                        row.topic,
                        value=row.value,
                        key=row.key,
                        headers=row.headers,
                        on_delivery=on_delivery(row.id),
                    )
                    break
                except BufferError:
                    self.producer.poll(0.01)
                except KafkaException as exc:
                    error = exc.args[0]
                    reports[row.id] = DeliveryReport(row.id, error=error)
                    if _unusable(error):
                        self.fatal = error
                    elif row.key is not None:
                        # Refused before sending (e.g. over message.max.bytes): later
                        # rows of its key must not overtake it.
                        refused_keys.add(row.key)
                    break
        deadline = time.monotonic() + self.settings.relay_delivery_timeout_ms / 1000 + 5
        while len(reports) < len(rows) and time.monotonic() < deadline and self.fatal is None:
            try:
                self.producer.flush(max(deadline - time.monotonic(), 0.01))
            except (KafkaException, SystemError) as exc:
                # librdkafka raises a fatal error out of flush, in the middle of
                # dispatching delivery reports; rows without a report are retried.
                error = exc.args[0] if isinstance(exc, KafkaException) else None
                self.fatal = (
                    error
                    if error is not None
                    else KafkaError(KafkaError._FATAL, str(exc), fatal=True)
                )
        missing = self.fatal or KafkaError(KafkaError._TIMED_OUT, "no delivery report")
        deliveries = [reports.get(r.id) or DeliveryReport(r.id, error=missing) for r in rows]
        unusable = next((d.error for d in deliveries if d.producer_unusable), None)
        if unusable is not None and self.fatal is None:
            self.fatal = unusable
        if any(d.error is not None and d.error.code() in TOPIC_MISSING for d in deliveries):
            # The broker lost the topic (a memory-only broker restarted): make it again.
            self.known_topics.clear()
            self.topic_limits.clear()
        elif deliveries and all(d.error is None and not d.held for d in deliveries):
            self.brokers_down = False
        return deliveries

    def _too_large(self, row: Outgoing) -> KafkaError | None:
        """The broker's refusal of a record over its topic's ``max.message.bytes``, made
        before producing it: refused by the broker, it would fail in its delivery report,
        after later records of its key had gone."""
        limit = self.topic_limits.get(row.topic)
        if limit is None:
            return None
        size = len(row.value) + len(row.key or "") + RECORD_OVERHEAD_BYTES
        for name, value in row.headers:  # a loop, not sum() of a generator: once per row
            size += len(name) + len(value or "")
        if size <= limit:
            return None
        return KafkaError(
            KafkaError.MSG_SIZE_TOO_LARGE,
            f"a record of about {size} bytes is over topic {row.topic!r}'s "
            f"max.message.bytes of {limit}",
        )

    def _replace(self) -> None:
        """A new producer (a new idempotence session) in place of the unusable one."""
        assert self.fatal is not None
        reason = self.fatal.name() or str(self.fatal.code())
        log.warning("producer: replacing it, it is unusable after %s: %s", reason, self.fatal)
        old = self.producer
        self.producer = self._make()
        self.replaced.append(reason)
        # What the old one still holds failed with it; it has nothing worth delivering.
        try:
            old.purge()
            old.flush(0)
        except (KafkaException, RuntimeError) as exc:
            log.debug("producer: the replaced one did not purge: %s", exc)

    def close(self) -> None:
        """Deliver what is queued, within the delivery timeout."""
        self.producer.flush(self.settings.relay_delivery_timeout_ms / 1000)
