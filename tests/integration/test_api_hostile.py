"""Input a careless or hostile client sends: each gets a 4xx with the JSON error body
naming the field, never a 500, and changes nothing."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session

from outbox.settings import Settings
from tests.api_helpers import AUTH, JSON, api_client, counts

BIG = 2**31


@pytest.fixture
def client(settings: Settings):
    return api_client(settings)


# (what, method, path, raw JSON body or None, the field the error must name)
CASES: list[tuple[str, str, str, str | None, str]] = [
    (
        "lone surrogate in a payload",
        "POST",
        "/v1/messages",
        '{"topic": "orders", "payload": {"a": "\\ud800"}}',
        "payload.a",
    ),
    (
        "lone surrogate in a key",
        "POST",
        "/v1/messages",
        '{"topic": "orders", "payload": 1, "key": "\\udfff"}',
        "key",
    ),
    (
        "lone surrogate in a header",
        "POST",
        "/v1/messages",
        '{"topic": "orders", "payload": 1, "headers": {"h": "x\\ud800"}}',
        "headers.h",
    ),
    (
        "lone surrogate in an idempotency key",
        "POST",
        "/v1/messages",
        '{"topic": "orders", "payload": 1, "idempotency_key": "\\ud800"}',
        "idempotency_key",
    ),
    (
        "NUL in a payload",
        "POST",
        "/v1/messages",
        '{"topic": "orders", "payload": {"a": "x\\u0000"}}',
        "payload.a",
    ),
    (
        "NUL in a payload's name",
        "POST",
        "/v1/messages",
        '{"topic": "orders", "payload": {"a\\u0000": 1}}',
        "payload",
    ),
    (
        "NUL in a key",
        "POST",
        "/v1/messages",
        '{"topic": "orders", "payload": 1, "key": "\\u0000"}',
        "key",
    ),
    (
        "NUL in a header",
        "POST",
        "/v1/messages",
        '{"topic": "orders", "payload": 1, "headers": {"h": "\\u0000"}}',
        "headers.h",
    ),
    ("NUL in a topic", "POST", "/v1/messages", '{"topic": "ord\\u0000ers", "payload": 1}', "topic"),
    (
        "NUL in a batch",
        "POST",
        "/v1/messages",
        '{"messages": [{"topic": "orders", "payload": 1},'
        ' {"topic": "orders", "payload": "\\u0000"}]}',
        "messages[1].payload",
    ),
    (
        "JSON nested past the parser",
        "POST",
        "/v1/messages",
        '{"topic": "orders", "payload": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "body",
    ),
    (
        "NaN in a payload",
        "POST",
        "/v1/messages",
        '{"topic": "orders", "payload": [NaN]}',
        "payload[0]",
    ),
    (
        "a number past float in a payload",
        "POST",
        "/v1/messages",
        '{"topic": "orders", "payload": {"n": 1e999}}',
        "payload.n",
    ),
    ("NUL in the key filter", "GET", "/v1/messages?key=%00", None, "key"),
    ("NUL in the error filter", "GET", "/v1/dead-letters?error=a%00b", None, "error"),
    ("NUL in the topic filter", "GET", "/v1/dead-letters?topic=%00", None, "topic"),
    (
        "a dead-letter id that is no ASCII number",
        "POST",
        "/v1/dead-letters/outbox:%C2%B2/requeue",
        None,
        "id",
    ),
    (
        "a dead-letter id over a bigint",
        "POST",
        "/v1/dead-letters/outbox:" + "9" * 25 + "/requeue",
        None,
        "id",
    ),
    (
        "ack_timeout_s of 2**31",
        "PUT",
        "/v1/consumer-groups/billing",
        f'{{"topic": "orders", "ack_timeout_s": {BIG}}}',
        "ack_timeout_s",
    ),
    (
        "max_retries of 2**31",
        "PUT",
        "/v1/consumer-groups/billing",
        f'{{"topic": "orders", "max_retries": {BIG}}}',
        "max_retries",
    ),
    (
        "retry.max_attempts of 2**31",
        "PUT",
        "/v1/consumer-groups/billing",
        f'{{"topic": "orders", "retry": {{"max_attempts": {BIG}}}}}',
        "retry.max_attempts",
    ),
    (
        "an infinite retry.base_s",
        "PUT",
        "/v1/consumer-groups/billing",
        '{"topic": "orders", "retry": {"base_s": 1e999}}',
        "retry.base_s",
    ),
    (
        "a retry.cap_s past any interval",
        "PUT",
        "/v1/consumer-groups/billing",
        '{"topic": "orders", "retry": {"cap_s": 1e300}}',
        "retry.cap_s",
    ),
    (
        "a retry.factor past any backoff",
        "PUT",
        "/v1/consumer-groups/billing",
        '{"topic": "orders", "retry": {"factor": 1e308}}',
        "retry.factor",
    ),
    (
        "a topic description without end",
        "POST",
        "/v1/topics",
        '{"name": "long", "description": "' + "d" * 100_000 + '"}',
        "description",
    ),
    (
        "consumer groups without end",
        "POST",
        "/v1/topics",
        '{"name": "many", "consumer_groups": ['
        + ",".join(f'{{"name": "g{i}"}}' for i in range(1000))
        + "]}",
        "consumer_groups",
    ),
    (
        "NUL in a topic description",
        "POST",
        "/v1/topics",
        '{"name": "nul", "description": "\\u0000"}',
        "description",
    ),
    ("NUL in a group name", "PUT", "/v1/consumer-groups/a%00b", '{"topic": "orders"}', "name"),
]


@pytest.mark.parametrize(
    ("what", "method", "path", "body", "field"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_input_is_refused_naming_the_field_and_changes_nothing(
    client, session: Session, what: str, method: str, path: str, body: str | None, field: str
):
    before = counts(session)
    response = client.open(path, method=method, data=body, headers=JSON if body else AUTH)
    assert 400 <= response.status_code < 500, (response.status_code, response.get_data()[:500])
    error: dict[str, Any] = response.get_json()["error"]
    named = error["details"].get("field") or [f["field"] for f in error["details"]["fields"]]
    assert field in (named if isinstance(named, list) else [named]), error
    assert counts(session) == before
