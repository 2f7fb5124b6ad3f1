"""``/v1/topics`` and ``/v1/consumer-groups``: what may be published and who reads it."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify
from flask_openapi3 import Tag

from api.auth import v1_blueprint
from api.errors import error_response, publish_error_response
from api.schemas import (
    ErrorOut,
    GroupFields,
    GroupIn,
    GroupOut,
    GroupPath,
    TopicIn,
    TopicList,
    TopicOut,
)
from api.state import state
from outbox.errors import PublishError
from outbox.models import ConsumerGroup, Topic
from outbox.registry import GroupSpec, put_group, register_topic, topics_with_groups
from outbox.wire import INTERNAL_TOPICS

TAG = Tag(name="topics", description="Register topics and consumer groups")
topics = v1_blueprint("topics", __name__, TAG)


def _spec(name: str, topic: str, fields: GroupFields) -> GroupSpec:
    return GroupSpec(
        name=name,
        topic=topic,
        requires_ack=fields.requires_ack,
        ack_timeout_s=fields.ack_timeout_s,
        max_retries=fields.max_retries,
        ordered=fields.ordered,
        retry_base_s=fields.retry.base_s,
        retry_factor=fields.retry.factor,
        retry_cap_s=fields.retry.cap_s,
        max_attempts=fields.retry.max_attempts,
        handler_timeout_s=fields.handler_timeout_s,
        on_dead=fields.on_dead,
        active=fields.active,
    )


def group_view(g: ConsumerGroup) -> dict[str, Any]:
    return {
        "name": g.name,
        "topic": g.topic,
        "requires_ack": g.requires_ack,
        "ack_timeout_s": g.ack_timeout_s,
        "max_retries": g.max_retries,
        "ordered": g.ordered,
        "retry": {
            "base_s": g.retry_base_s,
            "factor": g.retry_factor,
            "cap_s": g.retry_cap_s,
            "max_attempts": g.max_attempts,
        },
        "handler_timeout_s": g.handler_timeout_s,
        "on_dead": g.on_dead,
        "active": g.active,
    }


def topic_view(t: Topic, groups: list[ConsumerGroup]) -> dict[str, Any]:
    return {
        "name": t.name,
        "description": t.description,
        "active": t.active,
        "consumer_groups": [group_view(g) for g in groups],
    }


@topics.post("/topics", responses={200: TopicOut, 201: TopicOut, 401: ErrorOut, 422: ErrorOut})
def create_topic(body: TopicIn) -> tuple[Response, int]:
    """Register a topic (201), or update it (200), with its consumer groups."""
    if body.name in INTERNAL_TOPICS:
        return error_response(
            422, "invalid_topic", f"topic {body.name!r} is the outbox's own", {"field": "name"}
        )
    try:
        with state().sessions.begin() as session:
            topic, created = register_topic(
                session, body.name, description=body.description, active=body.active
            )
            groups = [put_group(session, _spec(g.name, body.name, g)) for g in body.consumer_groups]
            view = topic_view(topic, groups)
    except PublishError as exc:
        return publish_error_response(exc, batch=False)
    return jsonify(view), 201 if created else 200


@topics.get("/topics", responses={200: TopicList, 401: ErrorOut})
def list_topics() -> tuple[Response, int]:
    """Every topic with its consumer groups."""
    with state().sessions() as session:
        items = [topic_view(t, g) for t, g in topics_with_groups(session)]
    return jsonify(items=items), 200


@topics.put("/consumer-groups/<name>", responses={200: GroupOut, 401: ErrorOut, 422: ErrorOut})
def put_consumer_group(path: GroupPath, body: GroupIn) -> tuple[Response, int]:
    """Create or replace consumer group ``name``'s settings for one topic."""
    try:
        with state().sessions.begin() as session:
            view = group_view(put_group(session, _spec(path.name, body.topic, body)))
    except PublishError as exc:
        return publish_error_response(exc, batch=False)
    return jsonify(view), 200
