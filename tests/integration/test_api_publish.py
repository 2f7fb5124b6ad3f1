"""The publish API over HTTP semantics: what it accepts, what it refuses, and that a
refusal writes nothing."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from api import create_app
from outbox.models import OutboxMessage
from outbox.publishing import COPY_MIN_ROWS
from outbox.settings import Settings

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def app(settings: Settings):
    return create_app(
        settings.replace(
            api_tokens=(TOKEN,), max_batch=5, max_payload_bytes=2000, api_max_body_bytes=4096
        )
    )


@pytest.fixture
def client(app, session: Session):
    client = app.test_client()
    response = client.post(
        "/v1/topics",
        json={
            "name": "orders",
            "consumer_groups": [{"name": "billing", "requires_ack": True, "max_retries": -1}],
        },
        headers=AUTH,
    )
    assert response.status_code == 201, response.get_json()
    response = client.post("/v1/topics", json={"name": "retired", "active": False}, headers=AUTH)
    assert response.status_code == 201
    return client


def _rows(session: Session) -> int:
    session.rollback()
    return session.scalar(select(func.count()).select_from(OutboxMessage)) or 0


def _post(
    client,
    body: Any,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    content_type: str = "application/json",
):
    data = raw if raw is not None else json.dumps(body).encode()
    return client.post(
        "/v1/messages", data=data, content_type=content_type, headers={**AUTH, **(headers or {})}
    )


def test_one_message_is_accepted_with_202_and_its_id(client, session):
    response = _post(client, {"topic": "orders", "key": "o-1", "payload": {"total": 3}})
    assert response.status_code == 202
    message_id = uuid.UUID(response.get_json()["message_id"])
    assert _rows(session) == 1
    detail = client.get(f"/v1/messages/{message_id}", headers=AUTH).get_json()
    assert detail["status"] == "pending" and detail["attempts"] == 0
    assert detail["payload"] == {"total": 3} and detail["key"] == "o-1"
    assert detail["kafka_partition"] is None and detail["deliveries"] == []


def test_a_batch_is_accepted_whole(client, session):
    messages = [{"topic": "orders", "key": f"k{i}", "payload": {"n": i}} for i in range(5)]
    response = _post(client, {"messages": messages})
    assert response.status_code == 202
    assert len(response.get_json()["message_ids"]) == 5
    assert _rows(session) == 5


def test_a_batch_large_enough_for_copy_is_stored_as_sent_or_refused_whole(
    client, settings, session
):
    large = create_app(settings.replace(api_tokens=(TOKEN,), max_batch=2 * COPY_MIN_ROWS))
    big = large.test_client()
    messages = [
        {"topic": "orders", "key": f"k\t{i}\\", "payload": {"n": i, "s": "a\nb\\c"}}
        for i in range(2 * COPY_MIN_ROWS)
    ]
    response = _post(big, {"messages": messages})
    assert response.status_code == 202
    ids = response.get_json()["message_ids"]
    for message_id, sent in zip(ids, messages, strict=True):
        detail = big.get(f"/v1/messages/{message_id}", headers=AUTH).get_json()
        assert (detail["topic"], detail["key"], detail["payload"]) == (
            sent["topic"],
            sent["key"],
            sent["payload"],
        )
    refused = _post(big, {"messages": [*messages[1:], {"topic": "retired", "payload": {}}]})
    assert refused.status_code == 422
    error = refused.get_json()["error"]
    assert error["code"] == "inactive_topic"
    assert error["details"]["field"] == f"messages[{len(messages) - 1}].topic"
    assert _rows(session) == len(messages)


BIG = "x" * 5000
BAD_INPUTS = [
    # (name, body or raw bytes, extra headers, status, code, field)
    ("malformed json", b'{"topic": "orders",', {}, 400, "invalid_json", "body"),
    ("empty body", b"", {}, 400, "invalid_json", "body"),
    (
        "not json content type",
        b"topic=orders",
        {"Content-Type": "text/plain"},
        415,
        "unsupported_media_type",
        None,
    ),
    ("missing payload", {"topic": "orders"}, {}, 422, "validation_error", "payload"),
    ("topic not a string", {"topic": 5, "payload": {}}, {}, 422, "validation_error", "topic"),
    (
        "unknown field",
        {"topic": "orders", "payload": {}, "colour": "red"},
        {},
        422,
        "validation_error",
        "colour",
    ),
    (
        "headers not strings",
        {"topic": "orders", "payload": {}, "headers": {"a": 1}},
        {},
        422,
        "validation_error",
        "headers.a",
    ),
    ("unknown topic", {"topic": "nope", "payload": {}}, {}, 422, "unknown_topic", "topic"),
    ("inactive topic", {"topic": "retired", "payload": {}}, {}, 422, "inactive_topic", "topic"),
    (
        "payload too large",
        {"topic": "orders", "payload": "y" * 2500},
        {},
        422,
        "payload_too_large",
        "payload",
    ),
    (
        "reserved header",
        {"topic": "orders", "payload": {}, "headers": {"message_id": "x"}},
        {},
        422,
        "invalid_headers",
        "headers.message_id",
    ),
    *(
        (
            f"header {name} the consumers act on",
            {"topic": "orders", "payload": {}, "headers": {name: "x"}},
            {},
            422,
            "invalid_headers",
            f"headers.{name}",
        )
        for name in ("target_group", "target_instance", "retry_attempt")
    ),
    (
        "the acks topic",
        {"topic": "outbox.acks", "payload": {}},
        {},
        422,
        "invalid_topic",
        "topic",
    ),
    (
        "the acks topic in a batch",
        {"messages": [{"topic": "orders", "payload": {}}, {"topic": "outbox.acks", "payload": {}}]},
        {},
        422,
        "invalid_topic",
        "messages[1].topic",
    ),
    (
        "bad item in batch",
        {"messages": [{"topic": "orders", "payload": {}}, {"topic": "orders"}]},
        {},
        422,
        "validation_error",
        "messages[1].payload",
    ),
    (
        "unknown topic in batch",
        {
            "messages": [
                {"topic": "orders", "payload": {}},
                {"topic": "orders", "payload": {}},
                {"topic": "nope", "payload": {}},
            ]
        },
        {},
        422,
        "unknown_topic",
        "messages[2].topic",
    ),
    ("empty batch", {"messages": []}, {}, 422, "validation_error", "messages"),
    (
        "oversize batch",
        {"messages": [{"topic": "orders", "payload": {}}] * 6},
        {},
        413,
        "batch_too_large",
        "messages",
    ),
    ("oversize body", {"topic": "orders", "payload": BIG}, {}, 413, "body_too_large", None),
    (
        "header and body keys differ",
        {"topic": "orders", "payload": {}, "idempotency_key": "a"},
        {"Idempotency-Key": "b"},
        422,
        "validation_error",
        "idempotency_key",
    ),
    (
        "no token",
        {"topic": "orders", "payload": {}},
        {"Authorization": ""},
        401,
        "unauthorized",
        None,
    ),
    (
        "wrong token",
        {"topic": "orders", "payload": {}},
        {"Authorization": "Bearer nope"},
        401,
        "unauthorized",
        None,
    ),
]


@pytest.mark.parametrize(
    ("body", "headers", "status", "code", "field"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_gets_a_clear_error_and_writes_nothing(
    client, session, body, headers, status, code, field
):
    content_type = (
        headers.pop("Content-Type", "application/json") if headers else "application/json"
    )
    raw = body if isinstance(body, bytes) else None
    response = _post(client, body, headers=headers, raw=raw, content_type=content_type)
    assert response.status_code == status
    error = response.get_json()["error"]
    assert error["code"] == code
    assert error["message"]
    if field is not None:
        details = error["details"]
        named = [f["field"] for f in details.get("fields", [])] or [details.get("field")]
        assert field in named
    assert _rows(session) == 0


def test_an_idempotency_key_repeat_answers_as_the_first_and_a_changed_body_is_refused(
    client, session
):
    body = {"topic": "orders", "payload": {"a": 1}}
    first = _post(client, body, headers={"Idempotency-Key": "req-1"})
    again = _post(client, body, headers={"Idempotency-Key": "req-1"})
    assert first.status_code == again.status_code == 202
    assert first.get_json() == again.get_json()
    changed = _post(
        client, {"topic": "orders", "payload": {"a": 2}}, headers={"Idempotency-Key": "req-1"}
    )
    assert changed.status_code == 409
    assert changed.get_json()["error"]["code"] == "idempotency_conflict"
    assert _rows(session) == 1

    batch = {"messages": [{"topic": "orders", "payload": {"n": i}} for i in range(3)]}
    b1 = _post(client, batch, headers={"Idempotency-Key": "batch-1"})
    b2 = _post(client, batch, headers={"Idempotency-Key": "batch-1"})
    assert b1.get_json() == b2.get_json()
    assert _rows(session) == 4


def test_concurrent_idempotent_requests_leave_one_row(app, client, session):
    results: list[tuple[int, Any]] = []

    def send() -> None:
        response = _post(
            app.test_client(),
            {"topic": "orders", "payload": {"x": 1}},
            headers={"Idempotency-Key": "same"},
        )
        results.append((response.status_code, response.get_json()))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert {status for status, _ in results} == {202}
    assert len({body["message_id"] for _, body in results}) == 1
    assert _rows(session) == 1


def test_listing_filters_and_pages_with_a_cursor(client, session):
    for i in range(7):
        _post(client, {"topic": "orders", "key": "a" if i % 2 else "b", "payload": {"n": i}})
    session.execute(text("UPDATE outbox_messages SET status = 'sent' WHERE payload->>'n' = '3'"))
    session.commit()
    seen: list[int] = []
    cursor = None
    while True:
        query = "limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(f"/v1/messages?key=a&{query}", headers=AUTH).get_json()
        seen += [item["key"] == "a" for item in page["items"]].count(True) * [1]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 3
    sent = client.get("/v1/messages?status=sent", headers=AUTH).get_json()["items"]
    assert len(sent) == 1 and sent[0]["status"] == "sent"
    bad = client.get("/v1/messages?status=lost", headers=AUTH)
    assert (
        bad.status_code == 422
        and bad.get_json()["error"]["details"]["fields"][0]["field"] == "status"
    )
    bad = client.get("/v1/messages?cursor=%%%", headers=AUTH)
    assert bad.status_code == 422


def test_an_unknown_message_is_404(client):
    response = client.get(f"/v1/messages/{uuid.uuid4()}", headers=AUTH)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


def test_topics_and_consumer_groups_are_registered_and_listed(client):
    response = client.put(
        "/v1/consumer-groups/audit",
        json={
            "topic": "orders",
            "requires_ack": False,
            "ordered": False,
            "retry": {"base_s": 0.5, "factor": 3, "cap_s": 60, "max_attempts": 4},
        },
        headers=AUTH,
    )
    assert response.status_code == 200
    assert response.get_json()["retry"] == {
        "base_s": 0.5,
        "factor": 3.0,
        "cap_s": 60.0,
        "max_attempts": 4,
    }
    topics = client.get("/v1/topics", headers=AUTH).get_json()["items"]
    orders = next(t for t in topics if t["name"] == "orders")
    groups = {g["name"]: g for g in orders["consumer_groups"]}
    assert set(groups) == {"audit", "billing"}
    assert groups["billing"]["max_retries"] == -1 and groups["billing"]["requires_ack"]
    missing = client.put("/v1/consumer-groups/x", json={"topic": "nope"}, headers=AUTH)
    assert missing.status_code == 422
    assert missing.get_json()["error"]["details"]["field"] == "topic"
    bad = client.put(
        "/v1/consumer-groups/x", json={"topic": "orders", "max_retries": -2}, headers=AUTH
    )
    assert bad.status_code == 422
    assert bad.get_json()["error"]["details"]["fields"][0]["field"] == "max_retries"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        (".", "not one Kafka takes"),
        ("..", "not one Kafka takes"),
        ("orders_v1", "collides"),
        ("outbox.acks", "the outbox's own"),
    ],
)
def test_a_topic_name_kafka_cannot_take_is_refused_and_registers_nothing(
    client, session, name, why
):
    assert client.post("/v1/topics", json={"name": "orders.v1"}, headers=AUTH).status_code == 201
    before = session.execute(text("SELECT count(*) FROM topics")).scalar()
    response = client.post("/v1/topics", json={"name": name}, headers=AUTH)
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert (error["code"], error["details"]["field"]) == ("invalid_topic", "name")
    assert why in error["message"]
    assert session.execute(text("SELECT count(*) FROM topics")).scalar() == before


def test_the_openapi_document_and_docs_page_are_served(client):
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    assert {
        "/v1/messages",
        "/v1/messages/{message_id}",
        "/v1/topics",
        "/v1/consumer-groups/{name}",
    } <= set(doc["paths"])
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    page = client.get("/docs/swagger")
    assert page.status_code == 200 and b"swagger" in page.data.lower()


def test_a_publish_without_any_body_is_refused_as_invalid_and_writes_nothing(client, session):
    response = client.post("/v1/messages", headers=AUTH)
    assert response.status_code == 422
    assert response.get_json()["error"]["details"]["fields"][0]["field"] == "body"
    assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 0
