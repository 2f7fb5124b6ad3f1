"""The consumer process: poll Kafka, record each batch in the inbox with its offsets.

A batch's inbox rows and each partition's next offset are written in one
transaction (``inbox_offsets``): a crash before the commit re-reads the batch, a
crash after it reads on from the stored offset, and the inbox's unique keys
absorb anything read twice. Partitions are shared out among a group's consumers
by leases (``consumer.partitions``); the offsets are also committed to Kafka,
after the fact, for the tools that read a group's lag there.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from types import FrameType
from typing import Any

from confluent_kafka import OFFSET_STORED, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka import Consumer as KafkaConsumer
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from consumer.inbox import absorb_retries, inbox_row, poison_row, record
from consumer.lanes import lane_scope
from consumer.partitions import PartitionLeases, scope_prefix
from outbox import leases, queries
from outbox.agents import instance_id, upsert_agent
from outbox.db import execute, make_engine, make_sessionmaker
from outbox.errors import OutboxError
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
# A paused broker holds a metadata look this long at most; the leases are renewed anyway.
METADATA_TIMEOUT_S = 2.0
# The stored offsets go to Kafka (for the tools that read a group's lag there) at most this
# often under traffic, and at the first poll that finds nothing new.
KAFKA_COMMIT_INTERVAL_S = 1.0


class Fenced(OutboxError):
    """A partition of the batch passed to another consumer: the batch was not stored."""


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
        self.partitions = PartitionLeases(group, self.instance, settings.consumer_lease_s)
        self._partition_counts: dict[str, int] = {}
        self._next_refresh = 0.0
        self._next_metadata = 0.0
        # Offsets stored in the inbox and not yet committed to Kafka, by partition.
        self._uncommitted: dict[tuple[str, int], int] = {}
        self._committed_at = 0.0

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
        kafka = KafkaConsumer(consumer_config(self.settings, self.group, topics=self.topics))
        self._kafka = kafka
        self._refresh(kafka, force=True)
        self.ready.set()
        log.info(
            "consumer %s ready: group=%s topics=%s",
            self.instance,
            self.group,
            ",".join(self.topics),
        )
        try:
            while not self.stopping.is_set():
                if not self.partitions.held:
                    self.stopping.wait(POLL_TIMEOUT_S)
                    batch = []
                else:
                    # Wait for one message, then take what is already fetched without
                    # waiting: consume(n, timeout) would hold a batch back until n arrive.
                    batch = kafka.consume(1, POLL_TIMEOUT_S)
                    if batch:
                        batch += kafka.consume(POLL_BATCH - 1, 0)
                self._ingest_until_stored(kafka, batch)
                if not batch:
                    self._commit_to_kafka(kafka, now=True)
                self._refresh(kafka)
        finally:
            log.info("consumer %s: closing after %d messages", self.instance, self.received)
            self._commit_to_kafka(kafka, now=True)
            self._leave()
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
                # Fetched before its partition was given up: its next holder reads it.
                if (msg.topic(), msg.partition()) in self.partitions.held:
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
        offsets = _next_offsets(messages)
        try:
            lanes, targets = self._store_batch(pairs, offsets)
        except Fenced as exc:
            # Another consumer reads some of these partitions now (this one stalled past
            # its lease): nothing was stored. Every partition is read again from its
            # stored offset, as the leases allow.
            log.warning("consumer %s: %s; reading from the stored offsets", self.instance, exc)
            kafka.unassign()
            self.partitions.held = {}
            self._uncommitted = {}
            self._next_refresh = 0.0
            return
        self._uncommitted.update(offsets)
        self._commit_to_kafka(kafka)
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

    def _commit_to_kafka(self, kafka: KafkaConsumer, now: bool = False) -> None:
        """Tell Kafka the offsets stored since the last time, for tools that read a group's
        lag there: at most every :data:`KAFKA_COMMIT_INTERVAL_S`, or ``now``. Where the
        consumer reads from is the database's word, never this one, so a commit a second
        late costs nothing but a second of the lag's freshness; a commit per poll cost the
        broker a request per poll."""
        if not self._uncommitted:
            return
        moment = time.monotonic()
        if not now and moment - self._committed_at < KAFKA_COMMIT_INTERVAL_S:
            return
        offsets, self._uncommitted, self._committed_at = self._uncommitted, {}, moment
        try:
            kafka.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                asynchronous=True,
            )
        except KafkaException as exc:
            log.debug("consumer %s: offsets not committed to Kafka: %s", self.instance, exc)

    def _store_batch(
        self, pairs: list[tuple[Message, dict[str, Any]]], offsets: dict[tuple[str, int], int]
    ) -> tuple[list[int], dict[int, str | None]]:
        try:
            return self._store([r for _, r in pairs], offsets)
        except (DBAPIError, ValueError) as exc:
            if isinstance(exc, (OperationalError, InterfaceError)):
                raise  # PostgreSQL is unreachable: nothing is wrong with the records
            # A record that passed inbox_row's checks and still cannot be stored: find it
            # (and any like it), keep it as a dead row, and store the rest.
            log.warning("consumer %s: a batch could not be stored (%s)", self.instance, exc)
            return self._store(self._storable(pairs), offsets)

    def _store(
        self, rows: list[dict[str, Any]], offsets: dict[tuple[str, int], int]
    ) -> tuple[list[int], dict[int, str | None]]:
        """Record the rows, settle the targeted retries among them and store the next
        offset of each partition, in one transaction; return the lanes of new rows and
        the lanes that retries want run. Raises :class:`Fenced`, storing nothing, when a
        partition is no longer this consumer's."""
        retries = [r for r in rows if HEADER_RETRY_ATTEMPT in r["headers"] and "status" not in r]
        targets: dict[int, str | None] = {}
        places = list(offsets)
        prepare = self.settings.db_prepare_statements
        with self.sessions.begin() as session:
            stored = execute(
                session,
                queries.STORE_INBOX_OFFSETS,
                {
                    "group": self.group,
                    "owner": self.instance,
                    "scope_prefix": scope_prefix(self.group),
                    "topics": [t for t, _ in places],
                    "partitions": [p for _, p in places],
                    "offsets": [offsets[place] for place in places],
                    "tokens": self.partitions.tokens(places),
                },
                prepare=prepare,
            )
            gone = set(places) - {(topic, partition) for topic, partition in stored}
            if gone:
                raise Fenced(f"no longer holds {_names(gone)}")
            lanes = record(session, rows, prepare=prepare)
            if retries:
                healthy = set(
                    session.scalars(
                        queries.HEALTHY_WORKERS, {"window": self.settings.agent_inactive_after_s}
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
                    record(session, [row], prepare=self.settings.db_prepare_statements)
                    savepoint.rollback()
                    rows.append(row)
                except (DBAPIError, ValueError) as exc:
                    savepoint.rollback()
                    if isinstance(exc, (OperationalError, InterfaceError)):
                        raise
                    rows.append(poison_row(self.group, msg, self.settings.lanes, str(exc)))
        return rows

    def _refresh(self, kafka: KafkaConsumer, force: bool = False) -> None:
        """Every third of a lease (at most a second): say this consumer is alive, renew
        its partitions, give back and take some as its share changes, and read what it
        holds from there on."""
        now = time.monotonic()
        if not force and now < self._next_refresh:
            return
        self._next_refresh = now + min(1.0, self.settings.consumer_lease_s / 3)
        if now >= self._next_metadata:
            # Partition counts change rarely: a look per lease is soon enough.
            try:
                metadata = kafka.list_topics(timeout=METADATA_TIMEOUT_S).topics
                self._partition_counts = {
                    t: len(metadata[t].partitions) for t in self.topics if t in metadata
                }
                self._next_metadata = now + self.settings.consumer_lease_s
            except KafkaException as exc:
                # A paused broker: the leases are renewed all the same, with the last counts.
                log.debug("consumer %s: no metadata: %s", self.instance, exc)
        before = dict(self.partitions.held)
        try:
            with self.sessions.begin() as session:
                upsert_agent(
                    session,
                    self.instance,
                    "consumer",
                    consumer_group=self.group,
                    health={"received": self.received, "partitions": len(self.partitions.held)},
                )
                change = self.partitions.refresh(session, self._partition_counts)
        except (OperationalError, InterfaceError) as exc:
            # Only a missed renewal (rolled back): the leases outlast a few of them.
            self.partitions.held = before
            log.warning("consumer %s: partition leases not renewed: %s", self.instance, exc)
            return
        if change.lost:
            log.info("consumer %s: gave up %s", self.instance, _names(change.lost))
            # Their next holder commits them from now on.
            for place in change.lost:
                self._uncommitted.pop(place, None)
            kafka.incremental_unassign([TopicPartition(t, p) for t, p in change.lost])
        if change.gained:
            log.info("consumer %s: assigned %s", self.instance, _names(change.gained))
            kafka.incremental_assign(
                [
                    # No offset stored yet: the group's offset in Kafka, if it has one.
                    TopicPartition(t, p, OFFSET_STORED if offset is None else offset)
                    for (t, p), (_, offset) in change.gained.items()
                ]
            )

    def _leave(self) -> None:
        """A clean stop: give the partitions back and leave, so the others go on at once."""
        try:
            with self.sessions.begin() as session:
                self.partitions.give_back(session)
                session.execute(queries.AGENT_GONE, {"instance": self.instance})
        except (OperationalError, InterfaceError) as exc:
            log.warning("consumer %s: leaving when its leases lapse: %s", self.instance, exc)


def _next_offsets(messages: list[Message]) -> dict[tuple[str, int], int]:
    """Each partition's offset after the batch's last message of it."""
    after: dict[tuple[str, int], int] = {}
    for msg in messages:
        place = (msg.topic() or "", msg.partition() or 0)
        after[place] = max(after.get(place, 0), (msg.offset() or 0) + 1)
    return after


def _names(places: Iterable[tuple[str, int]]) -> str:
    return ",".join(f"{t}[{p}]" for t, p in sorted(places)) or "-"
