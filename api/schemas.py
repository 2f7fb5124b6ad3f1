"""Request and response schemas; pydantic validates them and they make the OpenAPI document."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    RootModel,
    Tag,
    field_validator,
)

from outbox.deadletters import DeadLetterFilter
from outbox.models import INT_MAX, MAX_BACKOFF_S, MAX_HANDLER_TIMEOUT_S, MAX_RETRY_FACTOR
from outbox.tasknames import BEAT_TASKS
from outbox.wire import MAX_TOPIC

MAX_DESCRIPTION = 2000
# Consumer groups registered with a topic in one request.
MAX_GROUPS = 100


def _in_utc(value: datetime) -> datetime:
    """Any offset the ISO format allows, as PostgreSQL takes it (its offsets stop at 16 h)."""
    try:
        return value.astimezone(UTC) if value.tzinfo is not None else value
    except OverflowError as exc:
        raise ValueError("out of the range of timestamps") from exc


# A point in time in a filter: converted to UTC before it reaches SQL.
Timestamp = Annotated[datetime, AfterValidator(_in_utc)]


def _links(**targets: tuple[str, dict[str, str]]) -> ConfigDict:
    """OpenAPI links from a response to the operations its values feed (by operation id):
    clients and stateful fuzzers follow them."""
    links = {
        name: {"operationId": operation, "parameters": parameters}
        for name, (operation, parameters) in targets.items()
    }
    # flask-openapi3 reads "openapi_extra", a key pydantic's ConfigDict does not declare.
    return cast(ConfigDict, {"openapi_extra": {"links": links}})


class Strict(BaseModel):
    """Unknown fields are refused, never ignored."""

    model_config = ConfigDict(extra="forbid")


class MessageIn(Strict):
    topic: str = Field(
        min_length=1, max_length=MAX_TOPIC, description="A registered, active topic."
    )
    payload: JsonValue = Field(description="Any JSON value; limited by OUTBOX_MAX_PAYLOAD_BYTES.")
    key: str | None = Field(None, description="Kafka key: per-key order is kept.")
    headers: dict[str, str] | None = Field(
        None, description="Extra headers, e.g. correlation_id, causation_id, traceparent."
    )
    idempotency_key: str | None = Field(None, min_length=1, max_length=255)


class BatchIn(Strict):
    messages: list[MessageIn] = Field(
        min_length=1, description="All or none are written; at most OUTBOX_MAX_BATCH."
    )


def _publish_kind(value: Any) -> str:
    return "batch" if isinstance(value, dict) and "messages" in value else "message"


class PublishRequest(
    RootModel[
        Annotated[
            Annotated[MessageIn, Tag("message")] | Annotated[BatchIn, Tag("batch")],
            Discriminator(_publish_kind),
        ]
    ]
):
    """One message, or ``{"messages": [...]}``."""


class PublishedOne(BaseModel):
    message_id: uuid.UUID


class PublishedBatch(BaseModel):
    message_ids: list[uuid.UUID]


class MessagePath(Strict):
    message_id: uuid.UUID


class DeliveryOut(BaseModel):
    group: str
    status: str
    attempts: int
    next_retry_at: datetime | None
    error: str | None


class MessageOut(BaseModel):
    message_id: uuid.UUID
    topic: str
    key: str | None
    status: Literal["pending", "sent", "dead"]
    attempts: int
    last_error: str | None
    kafka_partition: int | None
    kafka_offset: int | None
    idempotency_key: str | None
    headers: dict[str, str]
    created_at: datetime
    sent_at: datetime | None
    available_at: datetime


class MessageDetail(MessageOut):
    model_config = _links(
        Deliveries=(
            "operations_deliveries_deliveries_get",
            {"message_id": "$response.body#/message_id"},
        ),
    )

    payload: JsonValue
    deliveries: list[DeliveryOut]


class MessageQuery(Strict):
    status: Literal["pending", "sent", "dead"] | None = None
    topic: str | None = None
    key: str | None = None
    created_after: Timestamp | None = None
    created_before: Timestamp | None = None
    cursor: str | None = Field(None, description="next_cursor of the previous page.")
    limit: int = Field(100, ge=1, le=1000)


class MessagePage(BaseModel):
    items: list[MessageOut]
    next_cursor: str | None


class RetryIn(Strict):
    base_s: float = Field(1.0, gt=0, le=MAX_BACKOFF_S, allow_inf_nan=False)
    factor: float = Field(2.0, ge=1, le=MAX_RETRY_FACTOR, allow_inf_nan=False)
    cap_s: float = Field(600.0, gt=0, le=MAX_BACKOFF_S, allow_inf_nan=False)
    max_attempts: int = Field(10, ge=1, le=INT_MAX)


class GroupFields(Strict):
    requires_ack: bool = False
    ack_timeout_s: int = Field(300, gt=0, le=INT_MAX)
    max_retries: int = Field(10, ge=-1, le=INT_MAX, description="-1 retries forever.")
    ordered: bool = True
    retry: RetryIn = Field(default_factory=RetryIn)
    handler_timeout_s: float = Field(
        30.0,
        gt=0,
        le=MAX_HANDLER_TIMEOUT_S,
        allow_inf_nan=False,
        description="Longest one handler call may take; then it fails.",
    )
    on_dead: Literal["skip", "hold_key"] = Field(
        "skip",
        description="In an ordered group, what a dead letter does to later messages of its "
        "key: skip lets them run; hold_key parks them until it is requeued or discarded.",
    )
    active: bool = True


class GroupIn(GroupFields):
    topic: str = Field(min_length=1, max_length=MAX_TOPIC)


class NamedGroupIn(GroupFields):
    name: str = Field(min_length=1, max_length=255)


class GroupPath(Strict):
    name: str = Field(min_length=1, max_length=255)


class GroupOut(BaseModel):
    model_config = _links(
        HeldKeys=("dead_letters_list_held_keys_held_keys_get", {"group": "$response.body#/name"}),
        Deliveries=("operations_deliveries_deliveries_get", {"group": "$response.body#/name"}),
        DeadLetters=("dead_letters_list_all_dead_letters_get", {"group": "$response.body#/name"}),
    )

    name: str
    topic: str
    requires_ack: bool
    ack_timeout_s: int
    max_retries: int
    ordered: bool
    retry: RetryIn
    handler_timeout_s: float
    on_dead: Literal["skip", "hold_key"]
    active: bool


class TopicIn(Strict):
    name: str = Field(min_length=1, max_length=MAX_TOPIC, pattern=r"^[A-Za-z0-9._-]+$")
    description: str = Field("", max_length=MAX_DESCRIPTION)
    active: bool = True
    consumer_groups: list[NamedGroupIn] = Field(default_factory=list, max_length=MAX_GROUPS)


class TopicOut(BaseModel):
    model_config = _links(
        Messages=("messages_list_all_messages_get", {"topic": "$response.body#/name"}),
        DeadLetters=("dead_letters_list_all_dead_letters_get", {"topic": "$response.body#/name"}),
    )

    name: str
    description: str
    active: bool
    consumer_groups: list[GroupOut]


class TopicList(BaseModel):
    items: list[TopicOut]


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any]


class ErrorOut(BaseModel):
    error: ErrorBody


class Published(RootModel[PublishedOne | PublishedBatch]):
    """``{"message_id"}`` for one message, ``{"message_ids"}`` for a batch."""


class DeadLetterFilterIn(Strict):
    """The filters of :class:`outbox.deadletters.DeadLetterFilter`, by the same names."""

    side: Literal["outbox", "inbox", "delivery"] | None = None
    group: str | None = Field(None, description="Inbox and delivery sides only.")
    topic: str | None = None
    error: str | None = Field(None, description="Part of the last error, case-insensitive.")
    after: Timestamp | None = Field(None, description="Created (outbox) or received (inbox).")
    before: Timestamp | None = None

    def where(self) -> DeadLetterFilter:
        return DeadLetterFilter.of(self.model_dump())


class DeadLetterQuery(DeadLetterFilterIn):
    cursor: str | None = Field(None, description="next_cursor of the previous page.")
    limit: int = Field(100, ge=1, le=1000)


class DeadLetterOut(BaseModel):
    id: str = Field(description="outbox:<row>, inbox:<row> or delivery:<row>")
    side: Literal["outbox", "inbox", "delivery"]
    message_id: str
    group: str | None
    topic: str
    key: str | None
    attempts: int
    error: str | None
    headers: dict[str, Any]
    payload: Any
    at: datetime


class DeadLetterPage(BaseModel):
    items: list[DeadLetterOut]
    next_cursor: str | None


class DeadLetterPath(Strict):
    id: str = Field(min_length=1, max_length=40)


class RequeueFilterIn(DeadLetterFilterIn):
    limit: int = Field(1000, ge=1, le=10000, description="Most dead letters to requeue.")


class RequeuedOut(BaseModel):
    requeued: dict[str, int]


class DiscardedOut(BaseModel):
    discarded: str = Field(description="The inbox dead letter let go: inbox:<row>")


class HeldKeyQuery(Strict):
    group: str | None = Field(None, description="Only this consumer group.")
    limit: int = Field(100, ge=1, le=1000)


class HeldKeyOut(BaseModel):
    group: str
    topic: str
    key: str
    held: int = Field(description="Later messages of the key that wait.")
    dead_letter: str = Field(description="The dead letter that holds the key: inbox:<row>")
    error: str | None


class HeldKeyList(BaseModel):
    items: list[HeldKeyOut]


class AgentQuery(Strict):
    role: Literal["api", "worker", "beat", "consumer"] | None = None
    group: str | None = Field(None, description="Consumer agents of this group.")
    active: bool | None = None


class AgentOut(BaseModel):
    instance_id: str
    role: str
    consumer_group: str | None
    host: str
    pid: int
    active: bool
    started_at: datetime
    last_seen_at: datetime
    health: dict[str, Any]


class AgentList(BaseModel):
    items: list[AgentOut]


class HealthSummaryOut(BaseModel):
    id: int
    taken_at: datetime
    age_s: float = Field(description="Seconds since the snapshot, by the database clock.")
    backlog: dict[str, int]
    oldest_claimable_age_s: float | None
    dead_letters: int
    consumer_lag: dict[str, Any] = Field(description="group -> topic -> partition -> lag")
    agents: dict[str, int] = Field(description="Active agents by role.")
    counts: dict[str, dict[str, dict[str, int]]] = Field(
        description='Rows by status: {"outbox": {topic: ...}, "inbox": {group: ...}, '
        '"deliveries": {group: ...}} (deliveries: unfinished and dead only).'
    )


class StatsQuery(Strict):
    minutes: int = Field(5, ge=1, le=15, description="How far back the throughput series goes.")


class RatePoint(BaseModel):
    t: float = Field(description="Start of the step, Unix seconds.")
    per_s: float


class LatencyHistogram(BaseModel):
    buckets: list[tuple[float, int]] = Field(description="[upper bound s, cumulative count]")
    count: int
    sum: float


class StatsOut(BaseModel):
    published: dict[str, int] = Field(description="Messages relayed to Kafka, by topic.")
    failed: dict[str, int] = Field(description="Failed relay attempts, by topic.")
    retries: dict[str, int] = Field(description="Targeted retries published, by group.")
    latency: LatencyHistogram = Field(description="Commit to broker ack, seconds.")
    circuits: dict[str, str] = Field(description="Each live relay's broker circuit.")
    circuit: Literal["closed", "half_open", "open"] = Field(description="The worst of them.")
    published_per_s: list[RatePoint]


class TaskPath(Strict):
    name: str = Field(json_schema_extra={"enum": list(BEAT_TASKS)}, description="A beat task.")

    @field_validator("name")
    @classmethod
    def _beat_task(cls, name: str) -> str:
        if name not in BEAT_TASKS:
            raise ValueError(f"not a beat task; one of {', '.join(BEAT_TASKS)}")
        return name


class TaskRunOut(BaseModel):
    task: str
    task_id: str


class DeliveryQuery(Strict):
    group: str | None = None
    status: Literal["awaiting_ack", "acked", "failed", "dead"] | None = None
    message_id: uuid.UUID | None = None
    limit: int = Field(100, ge=1, le=1000)


class DeliveryRow(BaseModel):
    message_id: uuid.UUID
    group: str
    status: str
    attempts: int
    next_retry_at: datetime | None
    error: str | None
    instance_id: str | None
    created_at: datetime
    updated_at: datetime


class DeliveryList(BaseModel):
    items: list[DeliveryRow]


class DeliveryPath(Strict):
    message_id: uuid.UUID
    group: str = Field(min_length=1, max_length=255)


class RetryForcedOut(BaseModel):
    message_id: uuid.UUID
    group: str
    status: str = Field(description="The delivery's status; the retry task runs now.")
