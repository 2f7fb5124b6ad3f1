"""Settings: one frozen object built from ``OUTBOX_*`` environment variables.

Every setting is a field of :class:`Settings`; its environment variable is
``OUTBOX_`` plus the field name in upper case, and its help text lives in the
field's metadata so that ``outbox settings`` and the README table are made from
the same source. This is the only module that reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import os
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

from outbox.errors import SettingsError

ENV_PREFIX = "OUTBOX_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _setting(
    default: Any, doc: str, *, minimum: float | None = None, formerly: str | None = None
) -> Any:
    """A field of :class:`Settings`; ``formerly`` is the field's old name, whose variable
    is still read (with a warning) for one release."""
    return field(default=default, metadata={"doc": doc, "minimum": minimum, "formerly": formerly})


@dataclass(frozen=True)
class Settings:
    """All configuration of every process, validated once at start."""

    database_url: str | None = _setting(
        None, "PostgreSQL URL (SQLAlchemy form). Unset: an embedded PostgreSQL is started."
    )
    redis_url: str | None = _setting(
        None, "Redis URL for the Celery broker. Unset: an embedded Redis is started."
    )
    kafka_bootstrap: str | None = _setting(
        None, "Kafka bootstrap servers (host:port,...). Unset: an embedded broker is started."
    )
    db_pool_size: int = _setting(5, "SQLAlchemy connection pool size per process.", minimum=1)
    db_ping_after_idle_s: float = _setting(
        1.0,
        "A pooled connection idle this long is pinged (SELECT 1) before use, and replaced if "
        "the server has gone; one used more recently is not (0: ping on every checkout). A "
        "restart then fails the next statement of a busy connection once, as it fails the "
        "statements in flight, and the pool reconnects.",
        minimum=0.0,
    )
    db_prepare_statements: bool = _setting(
        True,
        "Prepare the hot statements (the single-message insert, the relay's, the consumer's "
        "and the lanes') once per connection; off behind PgBouncer in transaction mode.",
    )

    api_host: str = _setting("127.0.0.1", "Address the API listens on under `outbox dev`.")
    api_port: int = _setting(8000, "API port under `outbox dev` (0: a free port).", minimum=0)
    api_tokens: tuple[str, ...] = _setting((), "Comma-separated bearer tokens the API accepts.")

    flower_port: int = _setting(5555, "Flower port under `outbox dev` (0: a free port).", minimum=0)
    flower_user: str = _setting("admin", "Flower basic-auth user.")
    flower_password: str = _setting(
        "",
        "Flower basic-auth password; Flower does not start without one (`outbox dev` makes "
        "one per data folder).",
    )
    flower_url: str = _setting(
        "", "Flower's address as the dashboard links to it (unset: the API's host, `flower_port`)."
    )
    metrics: bool = _setting(
        True,
        "Workers count relayed messages, failures, retries and commit-to-ack latency in Redis "
        "for `/metrics` and the dashboard.",
    )
    task_events: bool = _setting(
        True, "Workers send Celery task events (Flower's task list and its `/metrics`)."
    )

    handler_modules: tuple[str, ...] = _setting(
        (), "Comma-separated modules imported by consumers and workers to register handlers."
    )
    buckets: int = _setting(
        64, "Key buckets: a key maps to one; one relay at a time holds a bucket.", minimum=1
    )

    max_payload_bytes: int = _setting(1048576, "Largest payload, as compact UTF-8 JSON.", minimum=1)
    max_key_bytes: int = _setting(1024, "Longest message key, in UTF-8 bytes.", minimum=1)
    max_headers_bytes: int = _setting(
        16384, "Largest set of caller headers, as compact UTF-8 JSON.", minimum=2
    )
    max_batch: int = _setting(1000, "Most messages in one publish request.", minimum=1)
    api_max_body_bytes: int = _setting(
        16777216, "Largest request body the API reads; larger gets 413 unread.", minimum=1024
    )
    auto_register_topics: bool = _setting(
        False, "Publishing to an unknown topic registers it instead of failing."
    )

    relay_batch_size: int = _setting(5000, "Most rows one relay claim takes.", minimum=1)
    relay_batch_bytes: int = _setting(
        33554432,
        "Most payload and header bytes one relay claim takes (as stored; a row over it "
        "goes alone).",
        minimum=1,
    )
    relay_lease_s: float = _setting(
        20.0, "Bucket and row lease: a dead relay's rows move after this.", minimum=0.5
    )
    relay_buckets_per_task: int = _setting(
        16,
        "Most buckets one relay task leases at once (concurrent tasks share the rest).",
        minimum=1,
    )
    relay_max_attempts: int = _setting(
        10, "Delivery attempts before an outbox row is dead.", minimum=1
    )
    relay_retry_base_s: float = _setting(
        1.0, "First backoff after a failed delivery (doubles, jittered).", minimum=0.0
    )
    relay_retry_cap_s: float = _setting(300.0, "Longest backoff between deliveries.", minimum=0.0)
    relay_topic_error_grace_s: float = _setting(
        600.0,
        "How long a row may wait on its topic or partition (no leader, unknown partition) "
        "before each such error spends one of its attempts.",
        minimum=0.0,
    )
    relay_delivery_timeout_ms: int = _setting(
        10000, "Producer message timeout: an unacknowledged send fails after it.", minimum=1000
    )
    relay_linger_ms: int = _setting(
        1000,
        "How long a relay task that emptied the outbox waits for new rows before it ends "
        "(0: it ends at once); only in one of its worker's lingering places, one fewer than "
        "its pool processes.",
        minimum=0,
    )
    relay_poll_ms: int = _setting(
        5, "How often a waiting relay task looks for new rows.", minimum=1
    )
    relay_drain_s: float = _setting(
        10.0, "Longest one relay task keeps claiming before it yields its worker.", minimum=0.1
    )
    lanes: int = _setting(
        16,
        "Lanes per consumer group: keys hash to lanes, one task at a time works a lane.",
        minimum=1,
    )
    lane_batch_size: int = _setting(
        1000,
        "Inbox rows one lane transaction takes, shared among its lanes (it starts no "
        "handler after a second; the rest go in the next).",
        minimum=1,
    )
    lane_linger_ms: int = _setting(
        1000,
        "How long a lane task whose lanes ran dry waits for new rows before it gives them "
        "back (0: it ends at once); only in one of its worker's lingering places, one fewer "
        "than its pool processes, where it takes every lane of its group nobody holds.",
        minimum=0,
    )
    lane_poll_ms: int = _setting(5, "How often a waiting lane task looks for new rows.", minimum=1)
    lane_lease_s: float = _setting(
        60.0, "Lane lease: a dead worker's lane moves to another after this.", minimum=1.0
    )
    lane_budget_s: float = _setting(
        10.0, "Longest one lane task keeps processing before it yields its worker.", minimum=0.1
    )
    lane_time_limit_s: float = _setting(
        300.0,
        "Hard time limit of one lane task: a worker process stuck past it (a handler hung "
        "where no timeout reaches) is ended, and the message's attempt counts.",
        minimum=1.0,
    )
    lane_sweep_interval_s: float = _setting(
        5.0, "Beat: how often lanes with due rows are kicked (recovers lost tasks).", minimum=0.5
    )
    relay_circuit_open_s: float = _setting(
        2.0, "Pause after the broker stops answering, before probing it again.", minimum=0.1
    )
    kick_debounce_ms: int = _setting(
        5,
        "Least time between two looks at the kick flag: bounds the Redis calls of a busy API "
        "process (0: none).",
        minimum=0,
    )

    publish_interval_s: float = _setting(1.0, "Beat interval of `outbox.publish`.", minimum=0.05)
    retry_interval_s: float = _setting(
        10.0, "Beat interval of `outbox.retry_targeted`.", minimum=0.05
    )
    retry_batch_size: int = _setting(
        500, "Most deliveries one transaction of `outbox.retry_targeted` retries.", minimum=1
    )
    heartbeat_interval_s: float = _setting(
        10.0,
        "Beat interval of `outbox.heartbeat`, which takes the health snapshot that `/metrics` "
        "reports.",
        minimum=0.05,
    )
    cleanup_interval_s: float = _setting(3600.0, "Beat interval of `outbox.cleanup`.", minimum=0.05)
    agent_inactive_after_s: float = _setting(
        300.0,
        "Seconds of silence after which an agent is inactive and never a retry target.",
        minimum=1,
        formerly="agent_inactive_after",
    )
    heartbeat_inspect_timeout_s: float = _setting(
        1.0, "How long `outbox.heartbeat` waits for workers to answer.", minimum=0.1
    )
    retention_sent_s: float = _setting(
        7 * 86400.0,
        "Seconds a sent outbox row stays once every group that needs acks acked it.",
        minimum=0,
        formerly="retention_sent",
    )
    retention_done_s: float = _setting(
        7 * 86400.0,
        "Seconds a processed (done) inbox row stays.",
        minimum=0,
        formerly="retention_done",
    )
    retention_dedup_s: float = _setting(
        90 * 86400.0,
        "Seconds a processed message's id (and idempotency key) is remembered by its group "
        "after its inbox row is gone: the dedup window. Targeted retries stop before it ends.",
        minimum=0,
    )
    retention_dead_s: float = _setting(
        30 * 86400.0,
        "Seconds a dead letter (either side) stays; 0 keeps them.",
        minimum=0,
        formerly="retention_dead",
    )
    retention_health_s: float = _setting(
        86400.0,
        "Seconds health snapshots and inactive agents stay.",
        minimum=0,
        formerly="retention_health",
    )
    cleanup_batch_size: int = _setting(
        5000, "Most rows one DELETE of `outbox.cleanup` removes.", minimum=1
    )
    cleanup_pause_ms: int = _setting(
        50, "Pause between two DELETE batches of `outbox.cleanup`.", minimum=0
    )

    consumer_lease_s: float = _setting(
        10.0,
        "Partition lease of a consumer: a dead or stalled consumer's partitions move after it.",
        minimum=3.0,
    )
    kafka_fetch_wait_max_ms: int = _setting(
        10, "Longest time the broker may hold a fetch waiting for data.", minimum=0
    )
    kafka_ack_fetch_wait_max_ms: int = _setting(
        100,
        "The same for a consumer of acks only: an ack is not in a hurry, and each fetch "
        "that finds nothing costs the broker and the consumer CPU.",
        minimum=0,
    )
    kafka_topic_partitions: int = _setting(
        8, "Partitions of Kafka topics the project creates.", minimum=1
    )

    consumer_group: str = _setting(
        "outbox-acks", "Consumer group of the consumer started by `outbox dev`."
    )
    consumer_topics: tuple[str, ...] = _setting(
        ("outbox.acks",), "Comma-separated topics of the consumer started by `outbox dev`."
    )

    celery_visibility_timeout_s: int = _setting(
        3600, "Redis visibility timeout; countdowns are kept below it.", minimum=60
    )
    worker_concurrency: int = _setting(
        0,
        "Processes per Celery worker (0: one per CPU, and one more while tasks linger, at "
        "least three then).",
        minimum=0,
    )

    dev_dir: str = _setting(".outbox-dev", "Directory for the embedded services' data and logs.")
    dev_pg_port: int = _setting(0, "Embedded PostgreSQL port (0: a free port).", minimum=0)
    dev_redis_port: int = _setting(0, "Embedded Redis port (0: a free port).", minimum=0)
    dev_kafka_port: int = _setting(0, "Embedded broker port (0: a free port).", minimum=0)

    log_level: str = _setting("INFO", "Log level of every process.")
    log_format: str = _setting(
        "text", "Log lines of every process: `text`, or `json` (one object per line)."
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``), then ``overrides``.

        An empty variable counts as unset. A value that does not parse, or is
        below its minimum, raises :class:`SettingsError` naming the variable.
        """
        env = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = env_name(f.name)
            raw = env.get(name, "")
            formerly = f.metadata["formerly"]
            if formerly is not None and env.get(env_name(formerly), "").strip():
                old = env_name(formerly)
                if raw.strip():
                    _deprecated(f"{old} is ignored: {name} is set (and {old} is deprecated)")
                else:
                    _deprecated(f"{old} is deprecated: name it {name}")
                    name, raw = old, env[old]
            if raw.strip() == "":
                continue
            values[f.name] = _parse(name, raw.strip(), hints[f.name], f.metadata["minimum"])
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check values that no single parser can; raise :class:`SettingsError`."""
        level = self.log_level.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise SettingsError(f"{env_name('log_level')}={self.log_level!r}: not a log level")
        if self.log_format not in ("text", "json"):
            raise SettingsError(f"{env_name('log_format')}={self.log_format!r}: not text or json")
        if self.database_url is not None and not self.database_url.startswith("postgresql"):
            raise SettingsError(
                f"{env_name('database_url')}={self.database_url!r}: must be a postgresql:// URL"
            )
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://")):
            raise SettingsError(
                f"{env_name('redis_url')}={self.redis_url!r}: must be a redis:// URL"
            )
        if self.api_max_body_bytes <= self.max_payload_bytes:
            raise SettingsError(
                f"{env_name('api_max_body_bytes')}={self.api_max_body_bytes}: must exceed "
                f"{env_name('max_payload_bytes')}={self.max_payload_bytes}"
            )
        if self.relay_lease_s * 1000 <= self.relay_delivery_timeout_ms:
            # A claim must outlive its slowest delivery, or a second relay could send too.
            raise SettingsError(
                f"{env_name('relay_lease_s')}={self.relay_lease_s:g}: must exceed "
                f"{env_name('relay_delivery_timeout_ms')}={self.relay_delivery_timeout_ms} ms"
            )
        if self.retention_dedup_s < self.retention_done_s:
            raise SettingsError(
                f"{env_name('retention_dedup_s')}={self.retention_dedup_s:g}: must be at "
                f"least {env_name('retention_done_s')}={self.retention_done_s:g}"
            )
        if self.lane_time_limit_s <= self.lane_budget_s:
            raise SettingsError(
                f"{env_name('lane_time_limit_s')}={self.lane_time_limit_s:g}: must exceed "
                f"{env_name('lane_budget_s')}={self.lane_budget_s:g}"
            )
        if not self.consumer_topics:
            raise SettingsError(f"{env_name('consumer_topics')}: needs at least one topic")

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied and validated."""
        settings = dataclasses.replace(self, **changes)
        settings.validate()
        return settings

    def as_env(self) -> dict[str, str]:
        """The ``OUTBOX_*`` variables that rebuild these settings in a child process."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            out[env_name(f.name)] = str(value)
        return out


def _deprecated(message: str) -> None:
    # FutureWarning, not DeprecationWarning: it is for the people who run the system,
    # and Python shows it by default.
    warnings.warn(message, FutureWarning, stacklevel=3)


def env_name(field_name: str) -> str:
    """The environment variable of a settings field."""
    return ENV_PREFIX + field_name.upper()


def describe() -> list[tuple[str, str, str]]:
    """Rows of (variable, default, meaning) for every setting, in declaration order."""
    rows = []
    for f in dataclasses.fields(Settings):
        default = f.default
        if default is None:
            shown = "(embedded)" if f.name.endswith(("_url", "_bootstrap")) else "(unset)"
        elif isinstance(default, tuple):
            shown = ",".join(default) or "(empty)"
        else:
            shown = str(default) or "(empty)"
        doc = f.metadata["doc"]
        if f.metadata["formerly"] is not None:
            doc += f" Formerly `{env_name(f.metadata['formerly'])}`, still read (deprecated)."
        rows.append((env_name(f.name), shown, doc))
    return rows


def _parse(name: str, raw: str, hint: Any, minimum: float | None) -> Any:
    base = _strip_optional(hint)
    try:
        if base is bool:
            lowered = raw.lower()
            if lowered not in _TRUE | _FALSE:
                raise ValueError("expected true or false")
            return lowered in _TRUE
        if base is int:
            value: Any = int(raw)
        elif base is float:
            value = float(raw)
        elif get_origin(base) is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        else:
            return raw
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r}: {exc}") from exc
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}={raw!r}: must be at least {minimum:g}")
    return value


def _strip_optional(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint
