"""Hot-path SQL, written once and called by name.

Every predicate that guards correctness carries a comment saying what it
guards. Arrays are passed whole and expanded with ``unnest`` so that a batch
costs one round trip whatever its size.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from sqlalchemy import TextClause, text


def _sql(statement: str) -> TextClause:
    return text(statement)


class Prepared(NamedTuple):
    """A statement's PREPARE and EXECUTE (see :data:`PREPARED`)."""

    name: str
    prepare: TextClause
    execute: TextClause


# The hot statements, each with its PREPARE and EXECUTE: run through
# :func:`outbox.db.execute`, each is prepared once per connection and then executed by
# name (OUTBOX_DB_PREPARE_STATEMENTS), so PostgreSQL plans it once rather than on every
# call (after its first five calls, when a generic plan costs no more than theirs).
# Planning the relay's and the lanes' statements cost more than running them (0.3-0.45 ms
# against 0.15-0.2 ms at 500 msg/s), on the path of every message. The looks bucket by
# bucket and lane by lane (RELAY_HAS_WORK, LANES_OPEN_WITH_WORK) stay unprepared: their
# plans must fit the statistics of the moment (tests check them), and they run seldom.
PREPARED: dict[TextClause, Prepared] = {}

# A named parameter, as SQLAlchemy's text() finds them (not a ::cast).
_BIND = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")


def _prepared(name: str, statement: str, types: dict[str, str] | None = None) -> TextClause:
    """``statement``, listed in :data:`PREPARED` under ``name``. Its parameters take the
    ``types`` given, the others whatever PostgreSQL infers from where they stand."""
    params = list(dict.fromkeys(_BIND.findall(statement)))
    body = _BIND.sub(lambda m: f"${params.index(m.group(1)) + 1}", statement)
    types = types or {}
    declared = f" ({', '.join(types.get(p, 'unknown') for p in params)})" if types else ""
    clause = text(statement)
    PREPARED[clause] = Prepared(
        name,
        text(f"PREPARE {name}{declared} AS {body}"),
        text(f"EXECUTE {name}" + (f" ({', '.join(f':{p}' for p in params)})" if params else "")),
    )
    return clause


# Publish: insert a batch in one statement from one JSON document (one parameter to
# quote, parsed by the server in C). A batch naming an unknown or inactive topic inserts
# nothing (one look at topics for the batch, rather than a join row by row), and rows whose
# idempotency key is taken are left out; the caller compares the row count with the batch
# and, when it is short, looks up which (MESSAGES_WRITTEN) and why.
# A row stores the caller's headers only; without any it stores {} (its message id and
# correlation id are read from the row: wire.message_headers).
_INSERT_BATCH = """
INSERT INTO outbox_messages
    (message_id, topic, key, payload, headers, idempotency_key, request_hash, bucket)
SELECT u.message_id, u.topic, u.key, u.payload, coalesce(u.headers, '{}'),
       u.idempotency_key, u.request_hash, u.bucket
FROM jsonb_to_recordset(CAST(:rows AS jsonb))
     AS u(n int, message_id uuid, topic text, key text, payload jsonb, headers jsonb,
          idempotency_key text, request_hash text, bucket smallint)
-- only registered, active topics take messages (:topics: the batch's, each once)
WHERE (SELECT count(*) FROM topics t WHERE t.name = ANY(CAST(:topics AS text[])) AND t.active)
      = cardinality(CAST(:topics AS text[]))
-- ids follow the batch's order, so its rows go out in that order
ORDER BY u.n
"""
# Fresh random ids cannot collide: a batch without idempotency keys needs no conflict
# handling (whose checks of every unique index cost more than the insert's own work).
INSERT_MESSAGES = _sql(_INSERT_BATCH)
INSERT_MESSAGES_ONCE = _sql(
    _INSERT_BATCH
    + "-- a taken idempotency key (a repeat, or a concurrent twin) inserts nothing\n"
    + "ON CONFLICT DO NOTHING\n"
)

# A large batch without idempotency keys goes in by COPY, once a look at its topics
# (TOPIC_STATES) found them all registered and active. COPY writes the table's rows a page
# at a time (one WAL record a page, where an INSERT writes one a row; index entries are
# still one a row) and the server parses no JSON document around them. Rows take their
# ids in the order they come: the batch's.
COPY_MESSAGES = "COPY outbox_messages (message_id, topic, key, payload, headers, bucket) FROM STDIN"

# Which of a batch's new ids the transaction wrote (a fresh id exists nowhere else).
MESSAGES_WRITTEN = _sql("""
SELECT message_id FROM outbox_messages WHERE message_id = ANY(CAST(:ids AS uuid[]))
""")

# The same for one message, with plain parameters: far cheaper to plan than a recordset.
_INSERT_ONE = """
INSERT INTO outbox_messages
    (message_id, topic, key, payload, headers, idempotency_key, request_hash, bucket)
SELECT CAST(:message_id AS uuid), t.name, :key, CAST(:payload AS jsonb),
       CAST(:headers AS jsonb), :idempotency_key, :request_hash, :bucket
FROM topics t
-- only a registered, active topic takes messages
WHERE t.name = :topic AND t.active
"""
# A fresh random message id cannot collide, so a message without an idempotency key
# needs no conflict handling.
_INSERT_MESSAGE = _INSERT_ONE + "RETURNING message_id"
_INSERT_MESSAGE_ONCE = (
    _INSERT_ONE
    + """-- a taken idempotency key (a repeat, or a concurrent twin) inserts nothing
ON CONFLICT DO NOTHING
RETURNING message_id"""
)

# The same two, prepared once per connection (see PREPARED): PostgreSQL then plans them
# once rather than on every publish, where planning the join with topics costs more than
# the insert itself. Their parameters stand in a select list, where PostgreSQL cannot
# infer their types: they are given.
_ONE_TYPES = {
    "message_id": "uuid",
    "topic": "text",
    "key": "text",
    "payload": "jsonb",
    "headers": "jsonb",
    "idempotency_key": "text",
    "request_hash": "text",
    "bucket": "smallint",
}
INSERT_MESSAGE = _prepared("outbox_insert_message", _INSERT_MESSAGE, _ONE_TYPES)
INSERT_MESSAGE_ONCE = _prepared("outbox_insert_message_once", _INSERT_MESSAGE_ONCE, _ONE_TYPES)

TOPIC_STATES = _sql("""
SELECT name, active FROM topics WHERE name = ANY(CAST(:names AS text[]))
""")

# A new name that differs from a registered one only in '.' against '_'.
TOPIC_NAME_CLASHES = _sql("""
SELECT n.name, t.name FROM unnest(CAST(:names AS text[])) AS n(name)
JOIN topics t ON translate(t.name, '.', '_') = translate(n.name, '.', '_') AND t.name <> n.name
LIMIT 1
""")

REGISTER_TOPICS = _sql("""
INSERT INTO topics (name) SELECT unnest(CAST(:names AS text[])) ON CONFLICT DO NOTHING
""")

MESSAGES_BY_IDEMPOTENCY_KEY = _sql("""
SELECT idempotency_key, message_id, request_hash FROM outbox_messages
WHERE idempotency_key = ANY(CAST(:keys AS text[]))
  -- retries carry the original's key but are not the original
  AND NOT is_retry
""")

ENSURE_LEASE_ROWS = _sql("""
INSERT INTO leases (scope, bucket, owner, expires_at)
SELECT :scope, b, NULL, now() FROM generate_series(0, :buckets - 1) AS b
ON CONFLICT DO NOTHING
""")

LEASE_ROWS = _sql("SELECT count(*) FROM leases WHERE scope = :scope")

DROP_LEASE_ROWS = _sql("DELETE FROM leases WHERE scope = :scope AND bucket >= :buckets")

# Whether rows spread over the relay's buckets are unfinished (waiting to be sent).
RELAY_UNFINISHED = _sql("SELECT EXISTS (SELECT 1 FROM outbox_messages WHERE status = 'pending')")

# Whether rows spread over a group's lanes are unfinished (waiting to be processed).
LANES_UNFINISHED = _sql("""
SELECT EXISTS (
    SELECT 1 FROM inbox_messages
    WHERE consumer_group = :group AND status IN ('received', 'failed')
)
""")

# An outbox row ``m`` that per-key order lets go: no earlier row of its key waits after
# an error (to be retried, or for its topic).
_NOT_HELD_BACK = """NOT EXISTS (
    SELECT 1 FROM outbox_messages f
    WHERE f.status = 'pending' AND f.last_error IS NOT NULL
      AND f.bucket = m.bucket AND f.key = m.key AND f.id < m.id
)"""

# Whether bucket ``b`` holds a row to send now: due, and not held back behind a failed row
# of its key (see RELAY_HAS_WORK for why a scalar subquery). Newest first, for the reason
# RELAY_ANY_DUE gives.
_BUCKET_HAS_WORK_AFTER = f"""(
    SELECT true FROM outbox_messages m
    -- the bucket as a range, and the claim index's order: PostgreSQL takes the claim
    -- index then, in which a bucket with no waiting row costs one probe. Given an
    -- equality, it may walk the primary key from its end instead, through every waiting
    -- row of the other buckets (its statistics give a backlog in a few buckets as many
    -- rows in each).
    WHERE m.status = 'pending' AND m.bucket >= b AND m.bucket <= b
      AND m.available_at <= now()
      AND m.id > {{after}}
      AND {_NOT_HELD_BACK}
    ORDER BY m.bucket DESC, m.id DESC
    LIMIT 1
)"""  # noqa: S608 (composed of constants only)
_BUCKET_HAS_WORK = _BUCKET_HAS_WORK_AFTER.format(after="0")

# A lingering relay's first look, and most often its only one: whether any row could be
# sent now, wherever it is (a probe of the claim index, cheaper to plan and run than
# RELAY_HAS_WORK, which follows only when this finds one and the relay's last pass did
# not find rows in nearly empty buckets).
#
# It walks the index of waiting rows from its far end, newest first: under a backlog the
# newest rows wait, and are found at once. From the near end (or in a scan of the table)
# the look would first pass every row sent since the last vacuum, whose old versions keep
# their entries in that index while any transaction older than their mark is open: a
# few milliseconds a look in a busy system, many times a second. (Written as EXISTS,
# PostgreSQL drops the order and picks its own path. With statistics of a table that had
# few rows waiting, PostgreSQL 15 may read the index in a bitmap all the same: the relay
# takes RELAY_ANY_NEW between these looks.)
RELAY_ANY_DUE = _prepared(
    "outbox_relay_any_due",
    """
SELECT (
    SELECT 1 FROM outbox_messages m WHERE m.status = 'pending' AND m.available_at <= now()
    ORDER BY m.bucket DESC, m.id DESC LIMIT 1
) IS NOT NULL
""",
)

# The same look at rows newer than :after (the newest a relay claimed), from :after on
# (in the primary key, or in the claim index bucket by bucket): they are the rows
# committed since, which a sent row's leftover entries do not stand before, however many
# there are. A relay takes it between its looks at the whole index (RELAY_ANY_DUE), which
# find what this one cannot: a row that committed after a newer one (its id was taken
# first), and one whose backoff has ended.
RELAY_ANY_NEW = _prepared(
    "outbox_relay_any_new",
    """
SELECT (
    SELECT 1 FROM outbox_messages m
    WHERE m.id > :after AND m.status = 'pending' AND m.available_at <= now()
    ORDER BY m.id LIMIT 1
) IS NOT NULL
""",
)

# Whether a row is sendable now (due, and not held back behind a failed row of its key)
# in a bucket no other relay holds: what a lingering relay looks for (read only; rows of
# another relay's buckets are that relay's to send).
#
# The looks bucket by bucket (or lane by lane) here and below ask for each one's first
# row with a scalar subquery and LIMIT 1, which PostgreSQL runs once per bucket and
# ends at the first row it finds. Written as EXISTS, the probe may be planned as a hash
# semi join, which reads every waiting row of the table: the plan PostgreSQL picks when
# its statistics were taken with few rows waiting, and then each look costs a scan of
# the whole backlog (a test checks the plan).
#
# Only rows after :after are looked at (0: every row). The newest row's id comes with the
# answer, read in the same snapshot, and whether another relay holds a bucket: a look
# that finds nothing to send while no other relay holds one tells its relay that every
# due row up to that id waits behind a failed row of its key, so that its next looks
# need read only the rows after it (see outbox.relay.RECHECK_S).
RELAY_HAS_WORK = _sql(f"""
SELECT EXISTS (
    SELECT 1 FROM generate_series(0, :buckets - 1) AS b
    WHERE NOT EXISTS (
        SELECT 1 FROM leases l
        WHERE l.scope = :scope AND l.bucket = b AND l.owner <> :owner
          AND l.expires_at > now()
    )
    AND {_BUCKET_HAS_WORK_AFTER.format(after="CAST(:after AS bigint)")}
) AS has_work,
(SELECT max(id) FROM outbox_messages) AS newest,
EXISTS (
    SELECT 1 FROM leases l
    WHERE l.scope = :scope AND l.owner <> :owner AND l.expires_at > now()
) AS others_hold
""")  # noqa: S608 (composed of constants only)

# A process that stops cleanly leaves at once rather than when it goes silent.
AGENT_GONE = _sql("UPDATE agents SET active = false WHERE instance_id = :instance")

# Consumers of a group alive now: their partitions are shared out among them.
LIVE_CONSUMERS = _sql("""
SELECT count(*) FROM agents
WHERE role = 'consumer' AND active AND consumer_group = :group
  -- seen within a partition lease: one that stopped renewing has lost its share too
  AND last_seen_at > now() - make_interval(secs => :lease_s)
""")

# Where the group reads each partition of a topic from next.
INBOX_OFFSETS = _sql("""
SELECT partition, next_offset FROM inbox_offsets
WHERE consumer_group = :group AND topic = :topic
""")

# The group's next offset per partition, written in the transaction that stores the
# inbox rows below it. Returns the partitions written: one missing was not ours.
STORE_INBOX_OFFSETS = _prepared(
    "outbox_store_inbox_offsets",
    """
WITH batch AS (
    SELECT * FROM unnest(CAST(:topics AS text[]), CAST(:partitions AS int[]),
                         CAST(:offsets AS bigint[]), CAST(:tokens AS bigint[]))
        AS b(topic, partition, next_offset, token)
),
held AS (
    SELECT b.topic, b.partition, b.next_offset FROM batch b
    JOIN leases l ON l.scope = :scope_prefix || b.topic AND l.bucket = b.partition
    -- still this consumer's, by the database clock now: one that stalled past its lease
    -- (its partition read by another since) stores nothing
    WHERE l.owner = :owner AND l.fencing_token = b.token AND l.expires_at > clock_timestamp()
    -- the lease cannot pass to another until this transaction ends
    FOR SHARE OF l
)
INSERT INTO inbox_offsets AS o (consumer_group, topic, partition, next_offset, updated_at)
SELECT :group, topic, partition, next_offset, now() FROM held
ON CONFLICT (consumer_group, topic, partition)
DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = EXCLUDED.updated_at
RETURNING o.topic, o.partition
""",
)

# Received records into the inbox, from one JSON document in Kafka order (ids follow it,
# and a lane runs its rows in id order). Returns the lane of each new row.
INSERT_INBOX = _prepared(
    "outbox_insert_inbox",
    """
INSERT INTO inbox_messages
    (consumer_group, message_id, idempotency_key, topic, partition, "offset", key, lane,
     payload, headers, status, last_error)
SELECT u.consumer_group, u.message_id, u.idempotency_key, u.topic, u.partition, u."offset",
       u.key, u.lane, u.payload, u.headers, coalesce(u.status, 'received'), u.last_error
FROM jsonb_to_recordset(CAST(:rows AS jsonb))
     AS u(n int, consumer_group text, message_id uuid, idempotency_key text, topic text,
          partition int, "offset" bigint, key text, lane smallint, payload jsonb,
          headers jsonb, status text, last_error text)
ORDER BY u.n
-- a message the group holds already (by id, or by idempotency key) is not recorded again
ON CONFLICT DO NOTHING
RETURNING lane
""",
)

# Take or renew up to :limit buckets among {candidates}. A bucket is never held by two
# owners: rows are locked while chosen, and only free, expired or own leases qualify.
_ACQUIRE = """
chosen AS (
    SELECT l.bucket, l.owner AS previous, l.expires_at < now() AS lapsed FROM leases l
    WHERE l.scope = :scope
      AND l.bucket = ANY({candidates})
      -- free, expired (its owner is presumed dead), or ours already
      AND (l.owner IS NULL OR l.expires_at < now() OR l.owner = :owner)
    ORDER BY (l.owner IS NOT DISTINCT FROM :owner) DESC, random()
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
),
granted AS (
    UPDATE leases l
    SET owner = :owner,
        expires_at = now() + make_interval(secs => :lease_s),
        -- a new holder gets a new token, so anything the old holder still writes is fenced
        fencing_token = CASE WHEN l.owner = :owner AND l.expires_at >= now()
                             THEN l.fencing_token ELSE l.fencing_token + 1 END
    FROM chosen c
    WHERE l.scope = :scope AND l.bucket = c.bucket
    -- taken over: its last holder neither let it go nor renewed it (it died or stalled)
    RETURNING l.bucket, l.fencing_token,
              (c.previous IS NOT NULL AND c.previous <> :owner AND c.lapsed) AS taken_over
)
"""

# Take or renew up to :limit of :candidates; each granted bucket, its fencing token, and
# whether it was taken over.
ACQUIRE_LEASES = _sql(f"""
WITH {_ACQUIRE.format(candidates="CAST(:candidates AS int[])")}
SELECT bucket, fencing_token, taken_over FROM granted
""")  # noqa: S608 (composed of constants only)

# The relay's lease in one round trip: the buckets holding rows it could send now (a probe
# of the claim index per bucket; a row held back behind a failed row of its key is none),
# and up to :limit of them taken or renewed, its own first. Returns each granted bucket
# with its fencing token, and on every row (one at least) the buckets with work.
RELAY_LEASE = _prepared(
    "outbox_relay_lease",
    f"""
WITH with_work AS (
    SELECT b FROM generate_series(0, :buckets - 1) AS b
    WHERE {_BUCKET_HAS_WORK}
),
{_ACQUIRE.format(candidates="ARRAY(SELECT b FROM with_work)")}
SELECT g.bucket, g.fencing_token, w.with_work
FROM (SELECT ARRAY(SELECT b FROM with_work) AS with_work) AS w
LEFT JOIN granted g ON true
""",  # noqa: S608 (composed of constants only)
)

_RELEASE_LEASES = """
UPDATE leases SET owner = NULL, expires_at = now()
WHERE scope = :scope AND owner = :owner AND bucket = ANY(CAST(:buckets AS int[]))
"""
RELEASE_LEASES = _sql(_RELEASE_LEASES)

# Rows are taken per bucket in id order: a key lives in one bucket, so that is all
# per-key order needs, and each bucket is a short range scan of the claim index. The
# claim is recorded on the buckets' leases, not on the rows: the statement checks and
# renews each bucket's lease and stamps it with the claim's token until the lease's end.
# No relay claims in a bucket while a claim there is unsettled (a relay that stalled,
# died or let go), a claim never outlives its bucket's lease, and the marks change rows
# only while the leases still hold their claim's token (_CLAIM_STANDS). The rows are
# locked, not rewritten: a claim costs each row a lock, not a new version of it.
CLAIM_BATCH = _prepared(
    "outbox_claim_batch",
    f"""
WITH held AS (
    SELECT l.bucket FROM leases l
    WHERE l.scope = :scope AND l.bucket = ANY(CAST(:buckets AS int[]))
      -- only buckets this relay still holds, by the database clock: one sender per key
      AND l.owner = :owner AND l.expires_at > now()
      -- no earlier claim in the bucket is unsettled: a later row never overtakes it
      AND (l.claims_until IS NULL OR l.claims_until < now())
    -- lease rows are locked in bucket order here and by the marks: no deadlock between them
    ORDER BY l.bucket
    FOR UPDATE
),
claimed AS (
    SELECT c.*
    FROM held h
    CROSS JOIN LATERAL (
        -- the first rows of the bucket up to its share of the batch's bytes (at least
        -- one): a claim never holds more than about OUTBOX_RELAY_BATCH_BYTES of payloads
        SELECT w.id, w.message_id, w.topic, w.key, w.payload, w.headers, w.attempts,
               w.bucket, w.ahead + w.size >= :bytes_per_bucket AS full
        FROM (
            SELECT r.*, sum(r.size) OVER (ORDER BY r.id) - r.size AS ahead
            FROM (
                SELECT m.id, CAST(m.message_id AS text) AS message_id, m.topic, m.key,
                       CAST(m.payload AS text) AS payload, CAST(m.headers AS text) AS headers,
                       m.attempts, m.bucket,
                       pg_column_size(m.payload) + pg_column_size(m.headers) AS size
                FROM outbox_messages m
                WHERE m.status = 'pending'
                  AND m.bucket = h.bucket
                  -- backoff after a failed delivery has elapsed
                  AND m.available_at <= now()
                  -- per-key order: while an earlier row of the key waits after an error
                  -- (to be retried, or for its topic), later ones wait
                  AND {_NOT_HELD_BACK}
                ORDER BY m.id
                LIMIT :per_bucket
                -- a row that a relay's mark changed after this statement began is
                -- read again, and left out once it is no longer pending
                FOR UPDATE SKIP LOCKED
            ) AS r
        ) AS w
        -- a prefix in id order, so later rows of a key never go without earlier ones
        WHERE w.ahead < :bytes_per_bucket
    ) AS c
),
stamped AS (
    UPDATE leases l
    SET expires_at = now() + make_interval(secs => :lease_s), claim_token = :token,
        claims_until = now() + make_interval(secs => :lease_s)
    -- the buckets that gave rows, found once (not a scan of the claim per lease row)
    WHERE l.scope = :scope AND l.bucket = ANY(ARRAY(SELECT DISTINCT bucket FROM claimed))
)
-- in id order: the order they are produced in
SELECT * FROM claimed ORDER BY id
""",  # noqa: S608 (composed of constants only)
)

# The buckets whose leases still hold the claim's token, locked (in bucket order, as the
# claim locks them) for the rest of the transaction: a relay whose claim lapsed and was
# taken over finds none, and changes nothing; while it marks, no claim takes them over.
_CLAIM_STANDS = """
SELECT bucket FROM leases
WHERE scope = :scope AND claim_token = :token
ORDER BY bucket
FOR UPDATE
"""

# A claim's rows are settled (marked, or left as they are): its buckets take claims
# again; the buckets in :release (the relay's, when it ends its pass) are given back with
# it. ``{claimed}`` picks out the claim's buckets.
_SETTLE = """
UPDATE leases
SET claim_token = CASE WHEN claim_token = :token THEN NULL ELSE claim_token END,
    claims_until = CASE WHEN claim_token = :token THEN NULL ELSE claims_until END,
    owner = CASE WHEN owner = :owner AND bucket = ANY(CAST(:release AS int[]))
                 THEN NULL ELSE owner END,
    expires_at = CASE WHEN owner = :owner AND bucket = ANY(CAST(:release AS int[]))
                      THEN now() ELSE expires_at END
WHERE scope = :scope
  AND ({claimed} OR (owner = :owner AND bucket = ANY(CAST(:release AS int[]))))
"""
SETTLE_CLAIM = _prepared("outbox_settle_claim", _SETTLE.format(claimed="claim_token = :token"))

# The latency bucket of {seconds}: the first of :latency_bounds (ascending) it does not
# exceed, numbered from 0; past the last, len(:latency_bounds) (as bisect_left numbers
# them). width_bucket counts the bounds at or below a value, so it is given the bounds
# negated and reversed, and counts those at or above the latency.
LATENCY_BUCKET_OF = """
cardinality(CAST(:latency_bounds AS float8[])) - width_bucket(
    -({seconds}),
    ARRAY(SELECT -b FROM unnest(CAST(:latency_bounds AS float8[])) AS b ORDER BY b DESC)
)"""

# Marking rows sent also opens their deliveries: one per active group of the topic that
# requires acks, awaiting its ack until the group's ack timeout (database clock), and
# settles the claim (as SETTLE_CLAIM), all in one round trip. It returns what the metrics
# count, summed per topic and latency bucket (LATENCY_BUCKET_OF) rather than a row per
# message: the seconds from each row's commit to now, after the broker's ack.
MARK_SENT = _prepared(
    "outbox_mark_sent",
    f"""
WITH stands AS ({_CLAIM_STANDS}),
marked AS (
    UPDATE outbox_messages m
    SET status = 'sent', sent_at = clock_timestamp(),
        kafka_partition = CAST(p.placed -> CAST(m.id AS text) ->> 0 AS int),
        kafka_offset = CAST(p.placed -> CAST(m.id AS text) ->> 1 AS bigint),
        last_error = NULL
    -- each row's partition and offset, looked up by its id: no join for the planner to
    -- misjudge (it takes a claim's rows for one, and a loop over both sides for cheap)
    FROM (SELECT CAST(:placed AS jsonb) AS placed) AS p
    WHERE m.id = ANY(CAST(:ids AS bigint[])) AND m.status = 'pending'
      -- fencing: a relay whose claim was taken over changes nothing (the buckets read
      -- once, as an array: a join with them cost more than the row lookups)
      AND m.bucket = ANY(ARRAY(SELECT bucket FROM stands))
    RETURNING m.message_id, m.topic, m.is_retry,
              CAST(EXTRACT(EPOCH FROM m.sent_at - m.created_at) AS float8) AS latency_s
), opened AS (
    INSERT INTO deliveries (message_id, consumer_group_id, status, next_retry_at)
    SELECT k.message_id, g.id, 'awaiting_ack', now() + make_interval(secs => g.ack_timeout_s)
    FROM marked k
    JOIN consumer_groups g ON g.topic = k.topic AND g.requires_ack AND g.active
    -- a retry re-sends a message whose deliveries exist already
    WHERE NOT k.is_retry
    ON CONFLICT (message_id, consumer_group_id) DO NOTHING
),
-- the claim's buckets as stands locked them: settled only where the claim still stands
settled AS ({_SETTLE.format(claimed="bucket IN (SELECT bucket FROM stands)")})
SELECT topic, {LATENCY_BUCKET_OF.format(seconds="latency_s")} AS bucket,
       CAST(count(*) AS int) AS sent, sum(latency_s) AS latency_s
FROM marked
GROUP BY 1, 2
""",  # noqa: S608 (composed of constants only)
)

# Rows that failed back off and end dead after the last attempt. A row whose topic or
# partition alone was unavailable (no leader, say; v.always false) spends its attempt
# only once it has waited past the grace. The claim is settled after this, by MARK_SENT
# or SETTLE_CLAIM in the same transaction.
_SPENT = """(CASE WHEN v.always OR m.created_at < now() - make_interval(secs => :grace_s)
       THEN 1 ELSE 0 END)"""
MARK_FAILED = _sql(f"""
WITH stands AS ({_CLAIM_STANDS})
UPDATE outbox_messages m
SET attempts = m.attempts + {_SPENT},
    status = CASE WHEN m.attempts + {_SPENT} >= :max_attempts THEN 'dead' ELSE 'pending' END,
    available_at = now() + make_interval(secs => v.delay_s),
    last_error = v.error
FROM unnest(CAST(:ids AS bigint[]), CAST(:delays AS float8[]), CAST(:errors AS text[]),
            CAST(:always AS boolean[])) AS v(id, delay_s, error, always)
WHERE m.id = v.id AND m.status = 'pending'
  -- fencing: a relay whose claim was taken over changes nothing
  AND m.bucket = ANY(ARRAY(SELECT bucket FROM stands))
""")  # noqa: S608 (composed of constants only)


# Consumer lanes. In an ordered topic a key's later rows wait while an earlier one waits
# for its retry (earlier rows that are due come first in the same batch anyway), and, in
# a hold_key group, while an earlier one is a dead letter.
def _lane_row_ready(lane: str) -> str:
    """The rows of the lane(s) that ``lane`` picks out which may run once due."""
    return f"""
m.consumer_group = :group AND m.lane {lane}
AND m.status IN ('received', 'failed')
AND (m.key IS NULL OR m.topic = ANY(CAST(:unordered_topics AS text[])) OR (
    NOT EXISTS (
        SELECT 1 FROM inbox_messages e
        WHERE e.consumer_group = m.consumer_group AND e.lane = m.lane
          AND e.status = 'failed' AND e.key = m.key AND e.id < m.id
    )
    -- on_dead = hold_key: a dead letter parks the later rows of its key
    AND NOT (m.topic = ANY(CAST(:holding_topics AS text[])) AND EXISTS (
        SELECT 1 FROM inbox_messages d
        WHERE d.consumer_group = m.consumer_group AND d.lane = m.lane
          AND d.status = 'dead' AND d.key = m.key AND d.id < m.id
    ))
))
"""  # noqa: S608 (composed of constants only)


# The columns of a claimed inbox row, and a lane's due rows (the lane that ``lane`` names),
# each lane in Kafka order (ids follow the poll order): up to :per_lane rows from each
# lane, so that a busy lane does not crowd the others out of a batch. Rows are locked for
# the processing transaction, so even two tasks on one lane (a lease lost to a stall)
# never run a row twice. Payloads and headers come as JSON text, which the lane task
# decodes a batch at a time (consumer.lanes).
_CLAIMED_COLUMNS = """m.id, m.message_id, m.topic, m.key, CAST(m.payload AS text) AS payload,
       CAST(m.headers AS text) AS headers, m.attempts, m.partition, m."offset", m.lane,
       m.retries"""


def _due_rows(lane: str) -> str:
    return f"""
    SELECT * FROM inbox_messages m
    WHERE {_lane_row_ready(lane)}
      -- backoff after a failed attempt has elapsed
      AND m.next_attempt_at <= now()
    ORDER BY m.id
    LIMIT :per_lane
    FOR UPDATE SKIP LOCKED
"""  # noqa: S608 (composed of constants only)


# The due rows of the leased lanes.
CLAIM_LANE = _sql(f"""
SELECT {_CLAIMED_COLUMNS}
FROM unnest(CAST(:lanes AS int[])) AS l(lane)
CROSS JOIN LATERAL ({_due_rows("= l.lane")}) m
ORDER BY m.id
""")  # noqa: S608 (composed of constants only)

# A batch's first round trip (unless a lane was taken over from a holder that ended
# mid-batch, which goes the careful way): the leases of :lanes renewed (or taken, its own
# first), the batch's statements limited to :timeout_ms from here on, and the due rows of
# each granted lane locked, in id order. A granted lane comes with its rows, or once with
# no row (id NULL, last), so that every granted lane is known.
LEASE_CLAIM_LANE = _prepared(
    "outbox_lease_claim_lane",
    f"""
WITH {_ACQUIRE.format(candidates="CAST(:lanes AS int[])")},
limited AS (SELECT set_config('statement_timeout', :timeout_ms, true) AS ms)
SELECT g.bucket AS held, {_CLAIMED_COLUMNS}
FROM limited
LEFT JOIN granted g ON true
LEFT JOIN LATERAL ({_due_rows("= g.bucket")}) m ON true
ORDER BY m.id
""",  # noqa: S608 (composed of constants only)
)

# A lingering lane task's first look, and most often its only one: whether any of the
# group's rows is due, in whatever lane (a probe of its due rows' index, a fifth of the
# cost of LANES_OPEN_WITH_WORK, which follows only when this finds one, and the task does
# not hold every lane of its group with a last batch that found rows).
LANES_ANY_DUE = _prepared(
    "outbox_lanes_any_due",
    """
SELECT EXISTS (
    SELECT 1 FROM inbox_messages m
    WHERE m.consumer_group = :group AND m.status IN ('received', 'failed')
      AND m.next_attempt_at <= now()
)
""",
)

# The group's lanes with a row due for :waited_s seconds that no other task holds: what a
# lane task takes besides the lanes it was kicked for, what it looks for while it lingers,
# and (with a wait) the starved lanes a busy one takes on (read only, so looking often
# costs no commit).
LANES_OPEN_WITH_WORK = _sql(f"""
SELECT l.lane FROM generate_series(0, :lane_count - 1) AS l(lane)
WHERE NOT EXISTS (
    SELECT 1 FROM leases x
    WHERE x.scope = :scope AND x.bucket = l.lane AND x.owner IS DISTINCT FROM :owner
      AND x.expires_at > now()
)
AND (
    SELECT true FROM inbox_messages m
    WHERE {_lane_row_ready("= l.lane")}
      AND m.next_attempt_at <= now() - make_interval(secs => :waited_s)
    LIMIT 1
)
""")  # noqa: S608 (composed of constants only)

# The lanes of a group (:scope) that nobody holds: given back, or lapsed (read only).
LANES_FREE = _sql("""
SELECT bucket FROM leases WHERE scope = :scope AND (owner IS NULL OR expires_at < now())
""")

# A task gives its lanes (:buckets) back and learns, in the same round trip, per lane,
# the seconds until its next row is due (lanes where nothing waits are left out; rows held
# back by their key do not count, their blocker does). The release runs whatever the
# select finds.
LANE_FINISH = _sql(f"""
WITH released AS ({_RELEASE_LEASES})
SELECT m.lane, EXTRACT(EPOCH FROM min(m.next_attempt_at) - clock_timestamp())
FROM inbox_messages m
WHERE {_lane_row_ready("= ANY(CAST(:buckets AS int[]))")}
GROUP BY m.lane
""")  # noqa: S608 (composed of constants only)

# The attempt's worker appended to the row's list, which keeps the last 100 (a message
# retried forever must not grow its row forever).
_APPEND_WORKER = (
    "(array_append({m}attempt_workers, CAST(:worker AS text)))"
    "[greatest(cardinality({m}attempt_workers) - 98, 1):]"
)

# Marks add the attempt (:add = 1) and its worker, unless the attempt was counted before
# it ran (:add = 0, see COUNT_ATTEMPT).
MARK_INBOX_DONE = _prepared(
    "outbox_mark_inbox_done",
    f"""
UPDATE inbox_messages
SET status = 'done', attempts = attempts + :add, processed_at = now(), worker = :worker,
    attempt_workers = CASE WHEN :add = 1 THEN {_APPEND_WORKER.format(m="")}
                           ELSE attempt_workers END,
    last_error = NULL
WHERE id = ANY(CAST(:ids AS bigint[]))
""",  # noqa: S608 (composed of constants only)
    {"worker": "text"},
)

# The backoff counts from now, after the handlers ran, not from the batch transaction's
# start (now()): a handler late in a long batch would otherwise be retried early.
MARK_INBOX_FAILED = _sql(f"""
UPDATE inbox_messages m
SET status = v.status, attempts = m.attempts + :add, worker = :worker, last_error = v.error,
    attempt_workers = CASE WHEN :add = 1 THEN {_APPEND_WORKER.format(m="m.")}
                           ELSE m.attempt_workers END,
    next_attempt_at = clock_timestamp() + make_interval(secs => v.delay_s)
FROM unnest(CAST(:ids AS bigint[]), CAST(:statuses AS text[]), CAST(:delays AS float8[]),
            CAST(:errors AS text[])) AS v(id, status, delay_s, error)
WHERE m.id = v.id
""")  # noqa: S608 (composed of constants only)

# An attempt counted, and its row failed with a backoff, before the handler runs, in a
# transaction of its own: should the handler end or hang its process, the attempt stays
# counted and the row retries after the backoff, then goes dead like any failure. A
# handler that returns overwrites this with its own outcome.
COUNT_ATTEMPT = _sql(f"""
UPDATE inbox_messages
SET status = 'failed', attempts = attempts + 1, worker = :worker, last_error = :error,
    attempt_workers = {_APPEND_WORKER.format(m="")},
    next_attempt_at = now() + make_interval(secs => :delay_s)
WHERE id = :id
""")  # noqa: S608 (composed of constants only)

# The row of a counted attempt, locked for its run; none if it moved on meanwhile.
LOCK_COUNTED = _sql("""
SELECT id FROM inbox_messages WHERE id = :id AND status = 'failed' FOR UPDATE SKIP LOCKED
""")

# Lanes with due rows, for the beat sweep that recovers lost lane tasks.
LANES_WITH_DUE_ROWS = _sql("""
SELECT DISTINCT consumer_group, lane FROM inbox_messages
WHERE status IN ('received', 'failed') AND next_attempt_at <= now()
LIMIT :limit
""")

GROUP_POLICIES = _sql("""
SELECT topic, ordered, requires_ack, retry_base_s, retry_factor, retry_cap_s, max_attempts,
       handler_timeout_s, on_dead
FROM consumer_groups WHERE name = :group
""")

# What a failure ack's backoff is drawn from (outbox.retry.RetryPolicy): the group's
# policy and the retries its delivery has had so far (none when it does not exist yet).
ACK_BACKOFF = _sql("""
SELECT g.retry_base_s, g.retry_factor, g.retry_cap_s, COALESCE(d.attempts, 0) AS attempts
FROM consumer_groups g
LEFT JOIN deliveries d
  ON d.consumer_group_id = g.id AND d.message_id = CAST(:message_id AS uuid)
WHERE g.name = :group AND g.topic = :topic
""")

# A failed delivery is due for its targeted retry after that backoff (:delay_s).
_ACK_RETRY_AT = "now() + make_interval(secs => :delay_s)"

# An ack moves a delivery forward only: a success ack wins over anything but dead; a
# failure ack counts only while the delivery still waits, so a late or repeated failure
# after a success changes nothing.
APPLY_ACK = _sql(f"""
UPDATE deliveries d
SET status = CASE WHEN :ok THEN 'acked' ELSE 'failed' END,
    error = CASE WHEN :ok THEN NULL ELSE :error END,
    instance_id = :instance, updated_at = now(),
    next_retry_at = CASE WHEN :ok THEN NULL ELSE {_ACK_RETRY_AT} END
FROM consumer_groups g
WHERE d.consumer_group_id = g.id AND g.name = :group AND g.topic = :topic
  AND d.message_id = CAST(:message_id AS uuid)
  AND d.status IN ('awaiting_ack', 'failed')
  AND (:ok OR d.status = 'awaiting_ack')
RETURNING d.id
""")  # noqa: S608 (composed of constants only)

# An ack that comes before its delivery exists (the consumer was faster than the relay's
# mark): the delivery starts in the ack's state, and the mark's own insert then changes
# nothing. Only for a message of ours, to a group that requires acks.
OPEN_DELIVERY_BY_ACK = _sql(f"""
INSERT INTO deliveries (message_id, consumer_group_id, status, error, instance_id,
                        next_retry_at)
SELECT CAST(:message_id AS uuid), g.id, CASE WHEN :ok THEN 'acked' ELSE 'failed' END,
       CASE WHEN :ok THEN NULL ELSE :error END, :instance,
       CASE WHEN :ok THEN NULL ELSE {_ACK_RETRY_AT} END
FROM consumer_groups g
WHERE g.name = :group AND g.topic = :topic AND g.requires_ack
  AND EXISTS (
      SELECT 1 FROM outbox_messages m
      WHERE m.message_id = CAST(:message_id AS uuid) AND NOT m.is_retry
  )
ON CONFLICT (message_id, consumer_group_id) DO NOTHING
RETURNING id
""")  # noqa: S608 (composed of constants only)

# Success acks of many deliveries at once (a JSON array of acks, one per delivery, each
# with message_id, group, topic and instance), as APPLY_ACK and OPEN_DELIVERY_BY_ACK
# would apply them one by one; returns the acks it applied. The rest either have nothing
# to move, or their delivery was opened by the relay's mark meanwhile: the second
# statement applies those, as APPLY_ACK run again would.
_SUCCESS_ACKS = """
WITH acks AS (
    SELECT a.message_id, a.instance, g.id AS group_id, g.name, g.topic, g.requires_ack
    FROM json_to_recordset(CAST(:acks AS json))
         AS a(message_id uuid, "group" text, topic text, instance text)
    JOIN consumer_groups g ON g.name = a."group" AND g.topic = a.topic
)"""
# The deliveries that the acks move, each looked up by its (message, group) index (the
# LIMIT keeps it a lookup per ack), then updated by primary key; the status is checked on
# the row itself (it may have moved since the statement began), written so that the
# partial index of waiting deliveries cannot serve it. With statistics from a quiet
# moment the planner took the waiting deliveries for a handful and scanned them once per
# ack, or the acks once per waiting delivery: seconds for a burst's acks while 20,000
# deliveries waited.
_ACKED = """
    SET status = 'acked', error = NULL, instance_id = t.instance, updated_at = now(),
        next_retry_at = NULL
    FROM (
        SELECT x.id, a.instance
        FROM acks a
        CROSS JOIN LATERAL (
            SELECT x.id FROM deliveries x
            WHERE x.consumer_group_id = a.group_id AND x.message_id = a.message_id
            LIMIT 1
        ) x
    ) t
    WHERE d.id = t.id AND d.status NOT IN ('acked', 'dead')"""
APPLY_SUCCESS_ACKS = _sql(f"""{_SUCCESS_ACKS},
applied AS (
    UPDATE deliveries d {_ACKED}
    RETURNING d.message_id, d.consumer_group_id
),
opened AS (
    -- no delivery yet (in the statement's snapshot, which the update does not change):
    -- one that the relay's mark commits meanwhile makes the insert do nothing
    INSERT INTO deliveries (message_id, consumer_group_id, status, instance_id)
    SELECT a.message_id, a.group_id, 'acked', a.instance
    FROM acks a
    WHERE a.requires_ack
      AND NOT EXISTS (
          SELECT 1 FROM deliveries x
          WHERE x.message_id = a.message_id AND x.consumer_group_id = a.group_id
      )
      AND EXISTS (
          SELECT 1 FROM outbox_messages m WHERE m.message_id = a.message_id AND NOT m.is_retry
      )
    ON CONFLICT (message_id, consumer_group_id) DO NOTHING
    RETURNING message_id, consumer_group_id
)
-- Every step finds its rows by index, none by scanning another step's rows (the planner
-- takes a JSON document for one row, and a scan of the applied rows per ack was
-- quadratic: 0.2 s for 2,000 acks).
SELECT g.name AS "group", g.topic, CAST(done.message_id AS text) AS message_id
FROM (SELECT * FROM applied UNION ALL SELECT * FROM opened) done
JOIN consumer_groups g ON g.id = done.consumer_group_id
""")  # noqa: S608 (composed of constants only)
APPLY_SUCCESS_ACKS_AGAIN = _sql(f"""{_SUCCESS_ACKS}
UPDATE deliveries d {_ACKED}
""")

# Dead letters of both sides, filtered; each side walks its own partial index.
_DEAD_LETTERS = """
SELECT * FROM (
    SELECT 'outbox' AS side, o.id, o.message_id, NULL AS consumer_group, o.topic, o.key,
           o.attempts, o.last_error, o.headers, o.payload, o.created_at AS at
    FROM outbox_messages o
    WHERE o.status = 'dead' AND CAST(:group AS text) IS NULL
    UNION ALL
    SELECT 'inbox', i.id, i.message_id, i.consumer_group, i.topic, i.key,
           i.attempts, i.last_error, i.headers, i.payload, i.received_at
    FROM inbox_messages i
    WHERE i.status = 'dead'
      AND (CAST(:group AS text) IS NULL OR i.consumer_group = CAST(:group AS text))
    UNION ALL
    -- a group that never acknowledged a message, after all its retries
    SELECT 'delivery', v.id, v.message_id, g.name, g.topic, o.key,
           v.attempts, v.error, o.headers, o.payload, v.updated_at
    FROM deliveries v
    JOIN consumer_groups g ON g.id = v.consumer_group_id
    JOIN outbox_messages o ON o.message_id = v.message_id AND NOT o.is_retry
    WHERE v.status = 'dead'
      AND (CAST(:group AS text) IS NULL OR g.name = CAST(:group AS text))
) d
WHERE (CAST(:side AS text) IS NULL OR d.side = CAST(:side AS text))
  AND (CAST(:topic AS text) IS NULL OR d.topic = CAST(:topic AS text))
  AND (CAST(:error AS text) IS NULL OR d.last_error ILIKE CAST(:error AS text))
  AND (CAST(:after AS timestamptz) IS NULL OR d.at >= CAST(:after AS timestamptz))
  AND (CAST(:before AS timestamptz) IS NULL OR d.at < CAST(:before AS timestamptz))
"""

DEAD_LETTERS = _sql(
    _DEAD_LETTERS
    + """
  -- keyset pagination: strictly after the previous page's last row
  AND (CAST(:cursor_at AS timestamptz) IS NULL
       OR (d.at, d.side, d.id) < (CAST(:cursor_at AS timestamptz), CAST(:cursor_side AS text),
                                  CAST(:cursor_id AS bigint)))
ORDER BY d.at DESC, d.side DESC, d.id DESC
LIMIT :limit
"""
)

DEAD_LETTERS_TO_REQUEUE = _sql(
    "SELECT side, id FROM (" + _DEAD_LETTERS + ") m ORDER BY at, side, id LIMIT :limit"  # noqa: S608 (constants only)
)

# A requeued message keeps its id, payload and headers, with a fresh attempt budget.
REQUEUE_OUTBOX = _sql("""
UPDATE outbox_messages
SET status = 'pending', attempts = 0, available_at = now()
WHERE id = ANY(CAST(:ids AS bigint[]))
  -- only dead rows: requeueing never disturbs a message in flight
  AND status = 'dead'
""")

# A dead delivery gets a fresh retry budget; outbox.retry_targeted sends it now.
REQUEUE_DELIVERY = _sql("""
UPDATE deliveries
SET status = 'failed', attempts = 0, next_retry_at = now(), updated_at = now()
WHERE id = ANY(CAST(:ids AS bigint[])) AND status = 'dead'
""")

REQUEUE_INBOX = _sql("""
UPDATE inbox_messages
SET status = 'received', attempts = 0, next_attempt_at = now()
WHERE id = ANY(CAST(:ids AS bigint[]))
  -- only dead rows: requeueing never disturbs a message in flight
  AND status = 'dead'
""")


# A dead inbox row let go without running: finished, so that its key moves on (a
# hold_key group) and a redelivery of it is not run either.
DISCARD_INBOX = _sql("""
UPDATE inbox_messages
SET status = 'done', processed_at = now(),
    last_error = left('discarded by an operator; its last error: ' || coalesce(last_error, '-'),
                      :max_error)
WHERE id = :id
  -- only dead rows: discarding never disturbs a message in flight
  AND status = 'dead'
""")

# Keys parked by a dead letter (hold_key groups): the first dead letter of each, and how
# many later rows of the key it holds.
HELD_KEYS = _sql("""
SELECT d.consumer_group, d.topic, d.key, d.id, d.last_error,
       (SELECT count(*) FROM inbox_messages m
        WHERE m.consumer_group = d.consumer_group AND m.lane = d.lane AND m.key = d.key
          AND m.id > d.id AND m.status IN ('received', 'failed')) AS held
FROM inbox_messages d
JOIN consumer_groups g ON g.name = d.consumer_group AND g.topic = d.topic
WHERE d.status = 'dead' AND d.key IS NOT NULL AND g.ordered AND g.on_dead = 'hold_key'
  AND (CAST(:group AS text) IS NULL OR d.consumer_group = :group)
  -- the key's first dead letter is the one that holds it
  AND NOT EXISTS (
      SELECT 1 FROM inbox_messages e
      WHERE e.consumer_group = d.consumer_group AND e.lane = d.lane AND e.key = d.key
        AND e.status = 'dead' AND e.id < d.id
  )
ORDER BY d.consumer_group, d.topic, d.key
LIMIT :limit
""")

# Cleanup. Each kind of finished row, past its retention, oldest first. None of these
# can pick a pending, claimed, awaiting-ack, failed or retrying row: each names the
# finished status it takes.
_FINISHED = {
    # Sent, and every group that needs acks acked it (or its delivery is dead past the
    # dead letters' retention).
    "outbox_sent": (
        "outbox_messages",
        "sent_at",
        """
m.status = 'sent' AND m.sent_at < now() - make_interval(secs => :retention)
AND NOT EXISTS (
    SELECT 1 FROM deliveries d
    WHERE d.message_id = m.message_id AND d.status <> 'acked'
      AND NOT (d.status = 'dead' AND :dead_retention > 0
               AND d.updated_at < now() - make_interval(secs => :dead_retention))
)""",
    ),
    "outbox_dead": (
        "outbox_messages",
        "created_at",
        """
m.status = 'dead' AND m.created_at < now() - make_interval(secs => :retention)""",
    ),
    "inbox_done": (
        "inbox_messages",
        "processed_at",
        """
m.status = 'done' AND m.processed_at < now() - make_interval(secs => :retention)""",
    ),
    # What a group remembers of a processed message past its inbox row (the dedup
    # window), and nothing longer.
    "inbox_dedup": (
        "inbox_dedup",
        "processed_at",
        """
m.processed_at < now() - make_interval(secs => :retention)""",
    ),
    "inbox_dead": (
        "inbox_messages",
        "received_at",
        """
m.status = 'dead' AND m.received_at < now() - make_interval(secs => :retention)""",
    ),
    "health_snapshots": (
        "health_snapshots",
        "taken_at",
        """
m.taken_at < now() - make_interval(secs => :retention)""",
    ),
    "agents": (
        "agents",
        "last_seen_at",
        """
NOT m.active AND m.last_seen_at < now() - make_interval(secs => :retention)""",
    ),
}


def _cleanup_batch(table: str, age: str, where: str) -> str:
    """Delete at most :batch rows, skipping rows another transaction holds (a late ack,
    a requeue) instead of waiting for them; return how many went. A sent outbox row
    takes its finished deliveries along (a retry row has a message id of its own, and
    no deliveries)."""
    deliveries = (
        """,
deliveries_gone AS (
    DELETE FROM deliveries d USING gone
    WHERE d.message_id = gone.message_id AND d.status IN ('acked', 'dead')
)"""
        if table == "outbox_messages"
        else ""
    )
    if table == "inbox_messages":
        # A processed message's id outlives its row, for the dedup window.
        deliveries = """,
remembered AS (
    INSERT INTO inbox_dedup (consumer_group, message_id, idempotency_key, topic, processed_at)
    SELECT consumer_group, message_id, idempotency_key, topic, processed_at FROM gone
    WHERE status = 'done'
    ON CONFLICT DO NOTHING
)"""
    returning = {
        "outbox_messages": "m.id, m.message_id",
        "inbox_messages": "m.id, m.consumer_group, m.message_id, m.idempotency_key, m.topic, "
        "m.processed_at, m.status",
    }.get(table, "m.id")
    return f"""
WITH doomed AS (
    SELECT {returning} FROM {table} m WHERE {where}
    ORDER BY m.{age} LIMIT :batch FOR UPDATE OF m SKIP LOCKED
),
gone AS (
    DELETE FROM {table} m USING doomed WHERE m.id = doomed.id RETURNING {returning}
){deliveries}
SELECT count(*) FROM gone
"""  # noqa: S608 (composed of constants only)


CLEANUP = {name: _sql(_cleanup_batch(*spec)) for name, spec in _FINISHED.items()}
CLEANUP_COUNT = {
    name: _sql(f"SELECT count(*) FROM {table} m WHERE {where}")  # noqa: S608 (constants)
    for name, (table, _, where) in _FINISHED.items()
}

# Heartbeat. Agents silent past the window are inactive (never chosen as retry targets).
MARK_AGENTS_INACTIVE = _sql("""
UPDATE agents SET active = false
WHERE active AND last_seen_at < now() - make_interval(secs => :after)
RETURNING instance_id
""")

# What is left to do and what failed for good; every count walks a partial index.
# Health snapshot counts. Full scans, run by outbox.heartbeat (never by a scrape): about
# 0.2 s for 1,000,000 outbox rows. Deliveries: the unfinished and dead ones only, by index.
OUTBOX_COUNTS = _sql("""
SELECT topic, status, count(*) FROM outbox_messages GROUP BY topic, status
""")

INBOX_COUNTS = _sql("""
SELECT consumer_group, status, count(*) FROM inbox_messages GROUP BY consumer_group, status
""")

DELIVERY_COUNTS = _sql("""
SELECT g.name, d.status, count(*)
FROM deliveries d JOIN consumer_groups g ON g.id = d.consumer_group_id
WHERE d.status IN ('awaiting_ack', 'failed', 'dead')
GROUP BY g.name, d.status
""")

OLDEST_CLAIMABLE_AGE = _sql("""
SELECT EXTRACT(EPOCH FROM now() - min(available_at)) FROM outbox_messages
WHERE status = 'pending' AND available_at <= now()
""")

ACTIVE_AGENTS_BY_ROLE = _sql("""
SELECT role, count(*) FROM agents WHERE active GROUP BY role
""")

ACTIVE_GROUP_TOPICS = _sql("""
SELECT name, topic FROM consumer_groups WHERE active ORDER BY name, topic
""")

INSERT_SNAPSHOT = _sql("""
INSERT INTO health_snapshots
    (backlog, oldest_claimable_age_s, dead_letters, consumer_lag, agents, counts)
VALUES (CAST(:backlog AS jsonb), :oldest, :dead_letters, CAST(:lag AS jsonb),
        CAST(:agents AS jsonb), CAST(:counts AS jsonb))
RETURNING id
""")

LATEST_SNAPSHOT = _sql("""
SELECT id, taken_at, EXTRACT(EPOCH FROM now() - taken_at) AS age_s, backlog,
       oldest_claimable_age_s, dead_letters, consumer_lag, agents, counts
FROM health_snapshots ORDER BY taken_at DESC, id DESC LIMIT 1
""")


# Targeted retry. Deliveries that failed, or waited for an ack past their group's
# timeout, and whose retry is due; locked so that two retry tasks never take the same
# one. The original row (never a retry) gives what to send again.
DUE_DELIVERIES = _sql("""
SELECT d.id, d.message_id, d.attempts, d.instance_id, g.name AS group_name, g.max_retries,
       g.ack_timeout_s, g.retry_base_s, g.retry_factor, g.retry_cap_s,
       m.topic, m.key, m.payload, m.headers, m.idempotency_key,
       CAST(EXTRACT(EPOCH FROM now() - m.created_at) AS float8) AS age_s
FROM deliveries d
JOIN consumer_groups g ON g.id = d.consumer_group_id
JOIN outbox_messages m ON m.message_id = d.message_id
WHERE d.status IN ('awaiting_ack', 'failed') AND d.next_retry_at <= now()
ORDER BY d.next_retry_at
LIMIT :limit
FOR UPDATE OF d SKIP LOCKED
""")

# Workers that heartbeat within the window: the candidates for a targeted retry.
HEALTHY_WORKERS = _sql("""
SELECT instance_id FROM agents
WHERE role = 'worker' AND active AND last_seen_at > now() - make_interval(secs => :window)
ORDER BY instance_id
""")

INSERT_RETRIES = _sql("""
INSERT INTO outbox_messages
    (message_id, topic, key, payload, headers, idempotency_key, bucket, is_retry,
     original_message_id, target_group, target_instance)
SELECT u.message_id, u.topic, u.key, u.payload, u.headers, u.idempotency_key, u.bucket, true,
       u.original_message_id, u.target_group, u.target_instance
FROM jsonb_to_recordset(CAST(:rows AS jsonb))
     AS u(message_id uuid, topic text, key text, payload jsonb, headers jsonb,
          idempotency_key text, bucket smallint, original_message_id uuid,
          target_group text, target_instance text)
""")

# A retry went out: wait for its ack (or the next retry) until the given time.
MARK_DELIVERIES_RETRIED = _sql("""
UPDATE deliveries d
SET status = 'awaiting_ack', attempts = d.attempts + 1, updated_at = now(),
    next_retry_at = now() + make_interval(secs => v.wait_s)
FROM unnest(CAST(:ids AS bigint[]), CAST(:waits AS float8[])) AS v(id, wait_s)
WHERE d.id = v.id
""")

MARK_DELIVERIES_DEAD = _sql("""
UPDATE deliveries
SET status = 'dead', next_retry_at = NULL, updated_at = now(),
    error = COALESCE(CAST(:why AS text), error, 'no ack after the last retry')
WHERE id = ANY(CAST(:ids AS bigint[]))
""")

# Force one delivery's retry now (a dead one gets a fresh budget); acked ones stay.
FORCE_RETRY = _sql("""
UPDATE deliveries d
SET status = CASE WHEN d.status = 'dead' THEN 'failed' ELSE d.status END,
    attempts = CASE WHEN d.status = 'dead' THEN 0 ELSE d.attempts END,
    next_retry_at = now(), updated_at = now()
FROM consumer_groups g
WHERE d.consumer_group_id = g.id AND g.name = :group
  AND d.message_id = CAST(:message_id AS uuid) AND d.status <> 'acked'
RETURNING d.status
""")

DELIVERY_STATUS = _sql("""
SELECT d.status FROM deliveries d JOIN consumer_groups g ON g.id = d.consumer_group_id
WHERE g.name = :group AND d.message_id = CAST(:message_id AS uuid)
""")

# A retry of a message this group holds already. One it processed: its ack goes again.
INBOX_DONE_OF = _sql("""
SELECT message_id, topic, worker, attempts FROM inbox_messages
WHERE consumer_group = :group AND message_id = ANY(CAST(:ids AS uuid[])) AND status = 'done'
""")

# The same for one whose inbox row was cleaned up: its id is still remembered.
DEDUP_DONE_OF = _sql("""
SELECT message_id, topic FROM inbox_dedup
WHERE consumer_group = :group AND message_id = ANY(CAST(:ids AS uuid[]))
""")

# Received messages that the group processed already and whose rows were cleaned up.
DEDUP_SEEN = _sql("""
SELECT message_id, idempotency_key FROM inbox_dedup
WHERE consumer_group = :group
  AND (message_id = ANY(CAST(:ids AS uuid[])) OR idempotency_key = ANY(CAST(:keys AS text[])))
""")

# One it failed (or gave up on): it runs again now, with a fresh attempt budget.
INBOX_RETRY_AGAIN = _sql("""
UPDATE inbox_messages
SET status = 'received', attempts = 0, retries = retries + 1, next_attempt_at = now()
WHERE consumer_group = :group AND message_id = ANY(CAST(:ids AS uuid[]))
  AND status IN ('failed', 'dead')
RETURNING message_id, lane
""")

INBOX_LANES_OF = _sql("""
SELECT message_id, lane FROM inbox_messages
WHERE consumer_group = :group AND message_id = ANY(CAST(:ids AS uuid[]))
  AND status = 'received'
""")
