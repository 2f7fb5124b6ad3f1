"""Pure decisions of the hot paths, each on its own: when a lane task comes back, which
worker a targeted retry goes to, what inbox row a Kafka record becomes, and what a
publish refuses."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Message as KafkaMessage

from consumer.inbox import inbox_row
from consumer.lanes import LaneReport
from outbox.errors import (
    InvalidHeaders,
    KeyTooLong,
    PayloadNotJSON,
    PayloadTooLarge,
    PublishError,
    UnknownTopic,
)
from outbox.publishing import Message, Publisher, new_message_ids
from outbox.settings import Settings
from outbox.storable import MAX_JSON_DEPTH
from outbox.targeted_retry import choose_target
from outbox.wire import bucket_for, foreign_message_id, message_headers
from tasks.lanes import BUSY_FIRST_S, IDLE_RETRY_S, busy_wait, rekick_countdown

# -- the lane task's re-kick ------------------------------------------------------------


def test_a_lane_task_with_nothing_waiting_does_not_come_back():
    assert rekick_countdown(LaneReport(done=5), longest_s=1800) is None


def test_a_lane_task_comes_back_when_its_first_waiting_row_is_due():
    report = LaneReport(done=3, failed=1, due_s={2: 8.5, 7: 2.5})
    assert rekick_countdown(report, longest_s=1800) == 2.5


def test_rows_due_now_that_a_run_could_not_have_are_looked_at_again_after_a_pause():
    # Nothing done: the due rows are locked elsewhere; no busy loop.
    assert rekick_countdown(LaneReport(due_s={1: 0.0}), longest_s=1800) == IDLE_RETRY_S
    # Something done (the budget ended with rows left): straight back.
    assert rekick_countdown(LaneReport(done=1, due_s={1: 0.0}), longest_s=1800) == 0.0


def test_a_long_backoff_is_waited_for_in_steps_below_the_visibility_timeout():
    assert rekick_countdown(LaneReport(failed=1, due_s={1: 86400.0}), longest_s=1800) == 1800


# -- the targeted retry's worker --------------------------------------------------------


def test_a_retry_avoids_the_worker_that_failed_while_another_is_healthy():
    healthy = ["w1@a", "w2@b", "w3@c"]
    for n in range(50):
        assert choose_target(uuid.UUID(int=n), "w2@b", healthy) in ("w1@a", "w3@c")


def test_a_message_keeps_its_worker_and_messages_spread_over_the_workers():
    healthy = ["w1@a", "w2@b", "w3@c"]
    message = uuid.uuid4()
    assert len({choose_target(message, None, healthy) for _ in range(5)}) == 1
    assert {choose_target(uuid.UUID(int=n), None, healthy) for n in range(60)} == set(healthy)


def test_the_worker_that_failed_is_chosen_when_it_is_the_only_one_and_none_without_any():
    assert choose_target(uuid.uuid4(), "w1@a", ["w1@a"]) == "w1@a"
    assert choose_target(uuid.uuid4(), "w1@a", []) is None


# -- the inbox row of a Kafka record ----------------------------------------------------


def _record(value: bytes | None, key: bytes | None = b"order-7", headers=None) -> KafkaMessage:
    return KafkaMessage(
        topic="orders", partition=2, offset=41, key=key, value=value, headers=headers or []
    )


def test_a_record_of_ours_keeps_its_id_key_headers_and_lane():
    message_id = uuid.uuid4()
    headers = [("message_id", str(message_id).encode()), ("idempotency_key", b"pay-1")]
    row = inbox_row("billing", _record(b'{"total": 5}', headers=headers), lanes=16)
    assert row["message_id"] == str(message_id)
    assert (row["consumer_group"], row["topic"], row["partition"], row["offset"]) == (
        "billing",
        "orders",
        2,
        41,
    )
    assert (row["key"], row["payload"], row["idempotency_key"]) == (
        "order-7",
        {"total": 5},
        "pay-1",
    )
    assert row["lane"] == bucket_for("order-7", message_id, 16)
    assert "status" not in row  # received: it will run


def test_a_foreign_record_gets_an_id_from_where_it_lies_so_a_redelivery_dedupes():
    row = inbox_row("billing", _record(b"[1, 2]"), lanes=16)
    assert row["message_id"] == str(foreign_message_id("orders", 2, 41))
    assert row["payload"] == {"value": [1, 2]}  # a value that is not an object, wrapped
    keyless = inbox_row("billing", _record(None, key=None), lanes=16)
    assert keyless["payload"] == {"value": None}
    # a keyless message's lane comes from its id
    assert keyless["lane"] == bucket_for(None, foreign_message_id("orders", 2, 41), 16)


@pytest.mark.parametrize(
    "written",
    [
        "0193A3C4-1111-7222-8333-444455556666",
        "{0193a3c4-1111-7222-8333-444455556666}",
        "0193a3c4111172228333444455556666",
        "urn:uuid:0193a3c4-1111-7222-8333-444455556666",
    ],
)
def test_a_message_id_header_in_another_form_of_the_uuid_is_kept_in_its_canonical_form(
    written: str,
):
    headers = [("message_id", written.encode())]
    row = inbox_row("billing", _record(b"{}", key=None, headers=headers), lanes=16)
    assert row["message_id"] == "0193a3c4-1111-7222-8333-444455556666"
    assert row["lane"] == bucket_for(None, uuid.UUID(row["message_id"]), 16)


def test_a_message_id_header_that_is_no_uuid_gives_the_record_an_id_from_where_it_lies():
    headers = [("message_id", b"0193a3c4-1111-7222-8333-44445555666g")]
    row = inbox_row("billing", _record(b"{}", headers=headers), lanes=16)
    assert row["message_id"] == str(foreign_message_id("orders", 2, 41))
    assert "status" not in row


def test_a_record_whose_text_only_looks_like_a_nul_escape_is_stored_as_it_is():
    row = inbox_row("billing", _record(b'{"path": "C:\\\\u0000"}'), lanes=16)
    assert "status" not in row
    assert row["payload"] == {"path": "C:\\u0000"}


@pytest.mark.parametrize(
    ("value", "key", "says"),
    [
        (b"not json", b"k", "JSON"),
        (b'{"a": "\\u0000"}', b"k", "NUL"),
        (b'{"a": NaN}', b"k", "NaN"),
        (b"{}", b"\xff\xfe", "UTF-8"),
    ],
)
def test_a_record_the_inbox_cannot_hold_is_dead_on_arrival_with_its_raw_bytes(
    value: bytes, key: bytes, says: str
):
    row = inbox_row("billing", _record(value, key=key), lanes=16)
    assert row["status"] == "dead"
    assert says.lower() in row["last_error"].lower()
    raw = row["payload"]["raw"]
    assert raw["value_base64"] is not None and raw["key_base64"] is not None
    assert row["idempotency_key"] is None  # a raw record is never matched by its key
    json.dumps(row["payload"])  # storable as it is


# -- what a publish refuses -------------------------------------------------------------

PUBLISHER = Publisher(Settings.from_env({"OUTBOX_MAX_PAYLOAD_BYTES": "100"}))


def test_a_publish_prepares_rows_with_ids_buckets_and_its_own_headers():
    rows = PUBLISHER.prepare(
        [
            Message("orders", {"b": 1, "a": 2}, key="k1", idempotency_key="i-1"),
            Message("orders", []),
        ]
    )
    first = rows[0]
    assert first.payload == '{"a":2,"b":1}'  # compact, keys sorted: one form per value
    # The row keeps the idempotency key among its headers; its id comes from the row.
    assert json.loads(first.headers) == {"idempotency_key": "i-1"}
    assert first.request_hash is not None
    assert first.bucket == bucket_for("k1", first.message_id, PUBLISHER.settings.buckets)
    assert rows[1].request_hash is None  # without a key a message cannot be repeated
    assert rows[0].message_id != rows[1].message_id


def test_message_ids_are_uuid7_in_clock_order_and_distinct():
    before = time.time_ns() // 1_000_000
    ids = new_message_ids(1000)
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 1000
    assert {u.version for u in ids} == {7} and {u.variant for u in ids} == {uuid.RFC_4122}
    # The first 48 bits are the millisecond clock: new rows land at the end of the index.
    assert all(before <= u.int >> 80 <= after for u in ids)
    rows = PUBLISHER.prepare([Message("orders", {}) for _ in range(3)])
    assert all(r.message_id.version == 7 and r.text_id == str(r.message_id) for r in rows)
    # No header of the caller's: the row stores none; its id and correlation id come
    # from the row when it is read or sent.
    assert rows[0].headers is None
    assert message_headers(rows[0].text_id, {}) == {
        "message_id": rows[0].text_id,
        "correlation_id": rows[0].text_id,
    }
    assert message_headers("m", {"correlation_id": "c", "x": "y"}) == {
        "message_id": "m",
        "correlation_id": "c",
        "x": "y",
    }


@pytest.mark.parametrize(
    ("message", "error", "field"),
    [
        (Message("", {}), UnknownTopic, "topic"),
        (Message("t" * 250, {}), UnknownTopic, "topic"),
        (Message("orders", {"x": float("nan")}), PayloadNotJSON, "payload"),
        (Message("orders", {"x": object()}), PayloadNotJSON, "payload"),
        (Message("orders", "x" * 200), PayloadTooLarge, "payload"),
        (Message("orders", {}, key="k" * 2000), KeyTooLong, "key"),
        (Message("orders", {}, idempotency_key=""), PublishError, "idempotency_key"),
        (Message("orders", {}, headers={"message_id": "x"}), InvalidHeaders, "headers.message_id"),
        (
            Message("orders", {}, headers={"traceparent": "nope"}),
            InvalidHeaders,
            "headers.traceparent",
        ),
        (Message("orders", {}, headers={"": "x"}), InvalidHeaders, "headers"),
    ],
)
def test_a_publish_refuses_a_bad_message_naming_its_field_and_position(
    message: Message, error: type[PublishError], field: str
):
    with pytest.raises(error) as caught:
        PUBLISHER.prepare([Message("orders", {}), message])
    assert (caught.value.field, caught.value.index) == (field, 1)


def test_a_circular_or_too_deep_payload_is_refused_as_not_json():
    circular: list[Any] = []
    circular.append(circular)
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    for payload in (circular, deep):
        with pytest.raises(PayloadNotJSON) as caught:
            PUBLISHER.prepare([Message("orders", payload)])
        assert caught.value.field == "payload"
    # and the same encoder writes an ordinary payload compact, keys sorted
    assert PUBLISHER.prepare([Message("orders", {"b": [1.5, None], "a": "é"})])[0].payload == (
        '{"a":"é","b":[1.5,null]}'
    )


def test_a_task_that_finds_its_lanes_held_looks_again_soon_then_less_often():
    waits = [busy_wait(None)]
    while waits[-1] < IDLE_RETRY_S:
        waits.append(busy_wait(waits[-1]))
    assert waits[0] == BUSY_FIRST_S <= 0.05
    assert waits == sorted(waits) and waits[-1] == IDLE_RETRY_S == busy_wait(IDLE_RETRY_S)
    assert all(b == min(2 * a, IDLE_RETRY_S) for a, b in itertools.pairwise(waits))


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ([("h", b"a\x00b")], "header 'h' holds a NUL character"),
        ([("h", b"\xc3\x28")], "header 'h' is not UTF-8 text"),
        ([("a\x00b", b"v")], "a header name holds a NUL character"),
    ],
)
def test_a_header_the_inbox_cannot_hold_is_named_in_the_dead_row_s_error(headers, says: str):
    row = inbox_row("billing", _record(b"{}", headers=headers), lanes=16)
    assert row["status"] == "dead"
    assert says in row["last_error"]


def test_a_payload_nesting_to_the_limit_is_stored_and_one_level_deeper_is_dead():
    assert MAX_JSON_DEPTH == 512
    # the outermost value and 512 levels inside it
    at_limit = inbox_row("billing", _record(b"[" * 512 + b"{}" + b"]" * 512), lanes=16)
    assert "status" not in at_limit
    deeper = inbox_row("billing", _record(b"[" * 513 + b"{}" + b"]" * 513), lanes=16)
    assert deeper["status"] == "dead" and "nests deeper than 512" in deeper["last_error"]
    # brackets in strings are not nesting, however many
    many = b'{"a": "' + b"[{" * 600 + b'", "b": [[1]]}'
    assert "status" not in inbox_row("billing", _record(many), lanes=16)
