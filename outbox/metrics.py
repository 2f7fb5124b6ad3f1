"""Counters that workers keep in Redis, for ``/metrics`` and the dashboard.

Workers on any host add to them after their transaction commits; every API
process reads the same values, so a scrape is right whichever gunicorn process
answers it, and a worker's restart loses nothing. A Redis restart resets them,
which Prometheus reads as a counter reset.

Keys (all under ``outbox:metrics:``):

- ``counters``, a hash: ``published|<topic>``, ``failed|<topic>``,
  ``retries|<group>``, ``producer_replaced|<error name>``, and the commit-to-ack
  histogram ``latency|<le>``, ``latency_count`` and ``latency_sum``;
- ``circuit``, a hash: each relay's circuit state and when it was seen;
- ``published:<t>``, messages published in the ``SERIES_STEP_S`` seconds from
  ``t``, for the dashboard's throughput chart; each expires after ``SERIES_KEEP_S``.

Labels are topic and group names only: never a key, a payload or a token.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import redis

from outbox.health import redis_client
from outbox.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "outbox:metrics:"
COUNTERS = PREFIX + "counters"
CIRCUIT = PREFIX + "circuit"
SERIES = PREFIX + "published:"
SERIES_STEP_S = 5
SERIES_KEEP_S = 15 * 60
# Commit-to-ack latency buckets, in seconds (upper bounds; +Inf is the count).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CIRCUIT_STATES = ("closed", "half_open", "open")
# A relay's unchanged circuit state is written again after this: readers take a state older
# than OUTBOX_AGENT_INACTIVE_AFTER_S for a relay that is gone.
CIRCUIT_REFRESH_S = 1.0
# After a Redis error, counts are dropped (not queued) for this long.
RETRY_AFTER_S = 5.0


class Sent(NamedTuple):
    """Rows of a topic marked sent whose commit-to-ack latency fell in one bucket: the
    first of :data:`LATENCY_BUCKETS` at or above it (its index; ``len(LATENCY_BUCKETS)``
    past the last), how many rows, and their latencies' sum in seconds."""

    topic: str
    bucket: int
    rows: int
    latency_s: float


class MetricsRecorder:
    """Adds to the counters; one per process. A Redis error is logged, never raised, and
    what fails to be counted is dropped: metrics never hold up the relay."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.metrics and settings.redis_url is not None
        self._url = settings.redis_url
        self._client: redis.Redis | None = None
        self._failing = False
        self._retry_at = 0.0
        # Each relay's circuit state as last written, and when (monotonic); written again
        # well before readers take it for a relay that is gone.
        self._circuits: dict[str, tuple[str, float]] = {}
        self._circuit_refresh_s = min(CIRCUIT_REFRESH_S, settings.agent_inactive_after_s / 2)

    def relay_batch(self, sent: Iterable[Sent], failed: Iterable[str]) -> None:
        """Rows marked sent, counted per topic and latency bucket (:class:`Sent`), and
        topics of failed rows."""
        if not self.enabled:
            return
        fields: Counter[str] = Counter()
        count = 0
        latency_sum = 0.0
        for topic, bucket, n, seconds in sent:
            fields[f"published|{topic}"] += n
            if bucket < len(LATENCY_BUCKETS):
                fields[f"latency|{LATENCY_BUCKETS[bucket]}"] += n
            count += n
            latency_sum += seconds
        for topic in failed:
            fields[f"failed|{topic}"] += 1
        if not fields:
            return
        if count:
            fields["latency_count"] += count

        def write(pipe: Any) -> None:
            for name, n in fields.items():
                pipe.hincrby(COUNTERS, name, n)
            if count:
                pipe.hincrbyfloat(COUNTERS, "latency_sum", latency_sum)
                step = int(time.time()) // SERIES_STEP_S * SERIES_STEP_S
                pipe.incrby(f"{SERIES}{step}", count)
                pipe.expire(f"{SERIES}{step}", SERIES_KEEP_S)

        self._pipeline(write)

    def retries(self, groups: Iterable[str]) -> None:
        """Targeted retries published, one group name per retry."""
        self._count("retries", groups)

    def producer_replaced(self, reasons: Iterable[str]) -> None:
        """Relay producers replaced because they became unusable, one error name each."""
        self._count("producer_replaced", reasons)

    def _count(self, kind: str, labels: Iterable[str]) -> None:
        """Add one to ``<kind>|<label>`` per label."""
        if not self.enabled:
            return
        counts = Counter(labels)

        def write(pipe: Any) -> None:
            for label, n in counts.items():
                pipe.hincrby(COUNTERS, f"{kind}|{label}", n)

        if counts:
            self._pipeline(write)

    def circuit(self, owner: str, state: str) -> None:
        """A relay's circuit state now: written when it changes, else at most every
        :data:`CIRCUIT_REFRESH_S` (its time says that the relay is alive; sooner when
        ``OUTBOX_AGENT_INACTIVE_AFTER_S`` is shorter than twice that), so that a relay
        pass of a few rows does not cost a round trip for it."""
        if not self.enabled:
            return
        now = time.monotonic()
        last = self._circuits.get(owner)
        if last is not None and last[0] == state and now - last[1] < self._circuit_refresh_s:
            return
        value = json.dumps({"state": state, "at": time.time()})
        self._pipeline(lambda pipe: pipe.hset(CIRCUIT, owner, value))
        if self._failing:
            self._circuits.pop(owner, None)  # not written: the next call tries again
        else:
            self._circuits[owner] = (state, now)

    def _pipeline(self, write: Callable[[Any], object]) -> None:
        if self._failing and time.monotonic() < self._retry_at:
            return  # Redis failed a moment ago: the relay does not wait on it again yet
        try:
            if self._client is None:
                assert self._url is not None
                self._client = redis_client(self._url)
            pipe = self._client.pipeline(transaction=False)
            write(pipe)
            pipe.execute()
        except redis.RedisError as exc:
            (log.debug if self._failing else log.warning)("metrics not recorded: %s", exc)
            self._failing = True
            self._retry_at = time.monotonic() + RETRY_AFTER_S
        else:
            self._failing = False


def read_counters(client: redis.Redis, *, circuit_max_age_s: float) -> dict[str, Any]:
    """Every counter, the histogram and the live relays' circuit states, from one round trip.

    Circuit states older than ``circuit_max_age_s`` (a relay gone) are dropped."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(COUNTERS)
    pipe.hgetall(CIRCUIT)
    raw, circuits = pipe.execute()
    view: dict[str, Any] = {"published": {}, "failed": {}, "retries": {}, "producer_replaced": {}}
    buckets: dict[float, int] = {}
    for name, value in ((k.decode(), v.decode()) for k, v in raw.items()):
        kind, _, label = name.partition("|")
        if kind in view:
            view[kind][label] = int(value)
        elif kind == "latency":
            buckets[float(label)] = int(value)
    count = int(raw.get(b"latency_count", 0))
    cumulative, running = [], 0
    for bound in LATENCY_BUCKETS:
        running += buckets.get(bound, 0)
        cumulative.append((bound, running))
    view["latency"] = {
        "buckets": cumulative,
        "count": count,
        "sum": float(raw.get(b"latency_sum", 0)),
    }
    now = time.time()
    live, stale = {}, []
    for owner, value in circuits.items():
        seen = json.loads(value)
        if now - seen["at"] <= circuit_max_age_s:
            live[owner.decode()] = seen["state"]
        else:
            stale.append(owner)
    if stale:
        client.hdel(CIRCUIT, *stale)
    view["circuits"] = live
    return view


def published_series(client: redis.Redis, minutes: int) -> list[dict[str, float]]:
    """Messages published per second over the last ``minutes``, oldest first, one point per
    ``SERIES_STEP_S`` (the current, unfinished step left out)."""
    now = int(time.time()) // SERIES_STEP_S * SERIES_STEP_S
    steps = [now - SERIES_STEP_S * i for i in range(minutes * 60 // SERIES_STEP_S, 0, -1)]
    values = client.mget([f"{SERIES}{t}" for t in steps])
    return [
        {"t": float(t), "per_s": int(v or 0) / SERIES_STEP_S}
        for t, v in zip(steps, values, strict=True)
    ]


def circuit_summary(circuits: Mapping[str, str]) -> str:
    """The worst state among the relays: open beats half-open beats closed."""
    return max(circuits.values(), key=CIRCUIT_STATES.index, default="closed")
