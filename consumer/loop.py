"""The consumer process: poll Kafka, record each batch in the inbox, then store offsets.

Offsets are stored only after the inbox transaction commits
(``enable.auto.offset.store=false``), so a crash between the two re-reads the
batch and the inbox's unique keys absorb the repeat. Committing stored offsets
is left to librdkafka's periodic auto-commit, plus an explicit commit when
partitions are revoked and on close.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from consumer.inbox import absorb_retries, inbox_row, poison_row, record
from consumer.lanes import lane_scope
from outbox import leases, queries
from outbox.agents import instance_id, upsert_agent
from outbox.db import make_engine, make_sessionmaker
from outbox.kafka import admin_client, consumer_config, ensure_topics
from outbox.publishing import Publisher
from outbox.settings import Settings, env_name
from outbox.wire import HEADER_RETRY_ATTEMPT, HEADER_TARGET_GROUP

log = logging.getLogger(__name__)

POLL_BATCH = 500
POLL_TIMEOUT_S = 0.5
# Pauses before a batch is tried again while PostgreSQL is away.
DB_RETRY_FIRST_S = 0.2
DB_RETRY_MAX_S = 5.0


class Consumer:
    """One member of consumer group ``group`` reading ``topics`` into the inbox."""

    def __init__(
        self,
        settings: Settings,
        group: str,
        topics: Sequence[str],
        *,
        sessions: sessionmaker[Session] | None = None,
        on_recorded: Callable[[str, set[int]], None] | None = None,
        on_targeted: Callable[[str, int, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.group = group
        self.topics = list(topics)
        self.instance = instance_id("consumer")
        self.sessions = sessions or make_sessionmaker(make_engine(settings, pool_size=2))
        # Told the lanes of each committed batch's new rows (to start their processing).
        self.on_recorded = on_recorded
        # Told a lane that a targeted retry wants run by one worker (group, lane, worker).
        self.on_targeted = on_targeted
        self.publisher = Publisher(settings)
        self.stopping = threading.Event()
        self.ready = threading.Event()  # set once it is subscribed
        self.received = 0
        self._kafka: KafkaConsumer | None = None
        self._last_heartbeat = 0.0

    def stop(self, *_: object) -> None:
        """Ask the loop to finish its batch, commit and close."""
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT finish the current batch instead of killing it."""

        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("consumer %s: signal %d, finishing the batch", self.instance, signum)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self) -> None:
        """Poll until stopped."""
        ensure_topics(
            admin_client(self.settings), self.topics, self.settings.kafka_topic_partitions
        )
        with self.sessions.begin() as session:
            # Rows are spread over the group's lanes by this count from now on.
            leases.fit_rows(
                session,
                lane_scope(self.group),
                self.settings.lanes,
                unfinished=queries.LANES_UNFINISHED,
                params={"group": self.group},
                setting=env_name("lanes"),
            )
        kafka = KafkaConsumer(consumer_config(self.settings, self.group))
        self._kafka = kafka
        kafka.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._heartbeat(force=True)
        self.ready.set()
        log.info(
            "consumer %s ready: group=%s topics=%s",
            self.instance,
            self.group,
            ",".join(self.topics),
        )
        try:
            while not self.stopping.is_set():
                # Wait for one message, then take what is already fetched without waiting:
                # consume(n, timeout) would hold a batch back until n arrive.
                batch = kafka.consume(1, POLL_TIMEOUT_S)
                if batch:
                    batch += kafka.consume(POLL_BATCH - 1, 0)
                self._ingest_until_stored(kafka, batch)
                self._heartbeat()
        finally:
            log.info("consumer %s: closing after %d messages", self.instance, self.received)
            kafka.close()
            self._kafka = None

    def _ingest_until_stored(self, kafka: KafkaConsumer, batch: list[Message]) -> None:
        """Record the batch, however long PostgreSQL is away: the next poll would move past
        it, so it is tried again (after a growing pause) until it is stored or the consumer
        is stopped (then its offsets are not stored, and the group reads it again)."""
        pause_s = DB_RETRY_FIRST_S
        while True:
            try:
                self._ingest(kafka, batch)
                return
            except (OperationalError, InterfaceError) as exc:
                if self.stopping.is_set():
                    raise
                log.warning(
                    "consumer %s: PostgreSQL unavailable, trying again in %.1f s: %s",
                    self.instance,
                    pause_s,
                    str(exc).splitlines()[0],
                )
                self.stopping.wait(pause_s)
                pause_s = min(pause_s * 2, DB_RETRY_MAX_S)

    def _ingest(self, kafka: KafkaConsumer, batch: list[Message]) -> None:
        messages = []
        for msg in batch:
            err = msg.error()
            if err is None:
                messages.append(msg)
            elif err.code() != KafkaError._PARTITION_EOF:
                if err.fatal():
                    raise KafkaException(err)
                log.warning("consumer %s: %s", self.instance, err)
        if not messages:
            return
        lanes_n = self.settings.lanes
        pairs = [(m, inbox_row(self.group, m, lanes_n)) for m in messages]
        # A retry aimed at another group is not ours: its offset is stored, it gets no row.
        pairs = [
            (m, r)
            for m, r in pairs
            if r.get("status") == "dead"
            or r["headers"].get(HEADER_TARGET_GROUP, self.group) == self.group
        ]
        try:
            lanes, targets = self._store([r for _, r in pairs])
        except (DBAPIError, ValueError) as exc:
            if isinstance(exc, (OperationalError, InterfaceError)):
                raise  # PostgreSQL is unreachable: nothing is wrong with the records
            # A record that passed inbox_row's checks and still cannot be stored: find it
            # (and any like it), keep it as a dead row, and store the rest.
            log.warning("consumer %s: a batch could not be stored (%s)", self.instance, exc)
            lanes, targets = self._store(self._storable(pairs))
        # Only now is the batch safe in PostgreSQL: let its offsets be committed.
        self._store_offsets(kafka, messages)
        self.received += len(messages)
        routed = {lane: worker for lane, worker in targets.items() if worker is not None}
        plain = (set(lanes) | set(targets)) - set(routed)
        try:
            if plain and self.on_recorded is not None:
                self.on_recorded(self.group, plain)
            for lane, worker in routed.items():
                if self.on_targeted is not None:
                    self.on_targeted(self.group, lane, worker)
                elif self.on_recorded is not None:
                    self.on_recorded(self.group, {lane})
        except Exception:
            log.exception("consumer %s: could not kick lanes; the sweep will", self.instance)
        log.debug("consumer %s: %d messages, %d new", self.instance, len(messages), len(lanes))

    def _store_offsets(self, kafka: KafkaConsumer, messages: list[Message]) -> None:
        """Store each partition's next offset. A partition revoked since the poll (a
        rebalance) is left alone: its next owner reads from the last commit, and the
        inbox absorbs what it reads again."""
        after: dict[tuple[str, int], int] = {}
        for msg in messages:
            place = (msg.topic() or "", msg.partition() or 0)
            after[place] = max(after.get(place, 0), (msg.offset() or 0) + 1)
        for (topic, partition), offset in after.items():
            try:
                kafka.store_offsets(offsets=[TopicPartition(topic, partition, offset)])
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError._STATE:
                    raise
                log.info(
                    "consumer %s: %s[%d] was revoked before its offset was stored",
                    self.instance,
                    topic,
                    partition,
                )

    def _store(self, rows: list[dict[str, Any]]) -> tuple[list[int], dict[int, str | None]]:
        """Record the rows and settle the targeted retries among them, in one transaction;
        return the lanes of new rows and the lanes that retries want run."""
        retries = [r for r in rows if HEADER_RETRY_ATTEMPT in r["headers"] and "status" not in r]
        targets: dict[int, str | None] = {}
        with self.sessions.begin() as session:
            lanes = record(session, rows)
            if retries:
                healthy = set(
                    session.scalars(
                        queries.HEALTHY_WORKERS, {"window": self.settings.agent_inactive_after}
                    )
                )
                targets = absorb_retries(session, self.group, retries, self.publisher, healthy)
        return lanes, targets

    def _storable(self, pairs: list[tuple[Message, dict[str, Any]]]) -> list[dict[str, Any]]:
        """The rows, each record that PostgreSQL refuses replaced by its dead raw row; tried
        one by one in savepoints of a transaction that is then rolled back."""
        rows = []
        with self.sessions() as session:  # closing it rolls everything back
            for msg, row in pairs:
                savepoint = session.begin_nested()
                try:
                    record(session, [row])
                    savepoint.rollback()
                    rows.append(row)
                except (DBAPIError, ValueError) as exc:
                    savepoint.rollback()
                    if isinstance(exc, (OperationalError, InterfaceError)):
                        raise
                    rows.append(poison_row(self.group, msg, self.settings.lanes, str(exc)))
        return rows

    def _heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_heartbeat < self.settings.heartbeat_interval_s:
            return
        self._last_heartbeat = now
        try:
            with self.sessions.begin() as session:
                upsert_agent(
                    session,
                    self.instance,
                    "consumer",
                    consumer_group=self.group,
                    health={"received": self.received},
                )
        except (OperationalError, InterfaceError) as exc:
            # Only a missed heartbeat: the next one comes at the next interval.
            log.warning("consumer %s: heartbeat not recorded: %s", self.instance, exc)

    def _on_assign(self, kafka: KafkaConsumer, partitions: list[TopicPartition]) -> None:
        log.info("consumer %s: assigned %s", self.instance, _names(partitions))

    def _on_revoke(self, kafka: KafkaConsumer, partitions: list[TopicPartition]) -> None:
        log.info("consumer %s: revoked %s", self.instance, _names(partitions))
        try:
            kafka.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("consumer %s: commit on revoke failed: %s", self.instance, exc)


def _names(partitions: list[TopicPartition]) -> str:
    return ",".join(f"{p.topic}[{p.partition}]" for p in partitions) or "-"
