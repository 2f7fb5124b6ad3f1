from __future__ import annotations

import json
import uuid

import pytest

from consumer.acks import _ack_params, ack_bytes, success_ack
from consumer.handlers import Permanent

ID = uuid.UUID("0190a6f0-7c3e-7d4a-9b1e-2f3a4b5c6d7e")


@pytest.mark.parametrize(
    "ack",
    [
        success_ack(ID, "orders", "billing", "worker1@host:4242:ab12cd34", 1),
        # texts JSON escapes (quotes, backslashes, non-ASCII, a line separator)
        success_ack(ID, 'ord"ers', "bil\\ling", "wörker\u2028ü", 12_345),
        {**success_ack(ID, "orders", "billing", "w1", 2), "status": "failure", "error": "é" * 40},
        {**success_ack(ID, "orders", "billing", "w1", 2), "extra": [1, 2]},
        {**success_ack(ID, "orders", "billing", "w1", 2), "attempt": True},
        {**success_ack(ID, "orders", "billing", "w1", 2), "instance": None},
    ],
    ids=["plain", "escaped", "failure", "extra field", "odd attempt", "no instance"],
)
def test_an_acks_size_is_its_compact_escaped_json_and_a_comma(ack: dict[str, object]) -> None:
    # what write_acks fills a message with, up to the largest payload allowed
    assert ack_bytes(ack) == len(json.dumps(ack, separators=(",", ":"))) + 1


def test_an_ack_names_its_message_in_canonical_form_however_the_id_was_written() -> None:
    ack = success_ack(ID, "orders", "billing", "w1", 1)
    for written in (str(ID), str(ID).upper(), f"{{{ID}}}", ID.hex, f"urn:uuid:{ID}"):
        assert _ack_params({**ack, "message_id": written})["message_id"] == str(ID)


@pytest.mark.parametrize(
    "change",
    [
        {"message_id": "not-a-uuid"},
        {"message_id": 42},
        {"group": 7},
        {"topic": None},
        {"instance": ["w1"]},
        {"error": {"e": 1}},
    ],
)
def test_an_ack_with_a_field_of_the_wrong_kind_is_permanent(change: dict[str, object]) -> None:
    with pytest.raises(Permanent):
        _ack_params({**success_ack(ID, "orders", "billing", "w1", 1), **change})
