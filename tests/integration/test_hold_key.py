"""A group with ``on_dead: hold_key``: a dead letter parks its key (later messages wait,
listed as held) until it is requeued or discarded; other keys flow."""

from __future__ import annotations

import uuid

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

import consumer
from consumer.lanes import LaneProcessor
from outbox.cli import cli
from outbox.db import make_sessionmaker
from outbox.settings import Settings
from tests.api_helpers import AUTH, api_client
from tests.integration.test_lanes import GROUP, LANE, _register, _rows
from tests.integration.test_lanes import _receive as receive_in_lane

FIXED: set[str] = set()


@pytest.fixture
def effects(engine: Engine) -> Engine:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE effects (seq serial, message_id uuid, key text, n int)"))
    return engine


def _parked_key(settings: Settings, effects: Engine, session: Session):
    """An ordered hold_key group whose key "a" is parked by a dead letter with two
    messages behind it, while key "b" flowed."""
    topic = f"t.{uuid.uuid4().hex[:8]}"
    _register(session, topic, ordered=True, max_attempts=1, on_dead="hold_key")

    @consumer.handler(topic)
    def handle(message: consumer.Message, tx: Session) -> None:
        if message.payload.get("bad") and topic not in FIXED:
            raise ValueError("cannot parse the order")
        tx.execute(
            text("INSERT INTO effects (message_id, key, n) VALUES (:id, :key, :n)"),
            {"id": message.id, "key": message.key, "n": message.payload["n"]},
        )

    ids = receive_in_lane(
        session,
        topic,
        [("a", {"n": 1, "bad": True}), ("a", {"n": 2}), ("b", {"n": 1}), ("a", {"n": 3})],
    )
    processor = LaneProcessor(settings, make_sessionmaker(effects), "worker-a")
    processor.run(GROUP, LANE)
    processor.run(GROUP, LANE)  # a second task: the key stays parked
    return topic, ids, processor


def _effects(session: Session) -> list[tuple[str, int]]:
    session.rollback()
    return [tuple(r) for r in session.execute(text("SELECT key, n FROM effects ORDER BY seq"))]


def test_a_dead_letter_parks_its_key_until_requeued_then_the_key_runs_in_order(
    settings: Settings, effects: Engine, session: Session
):
    topic, (dead, second, _other, third), processor = _parked_key(settings, effects, session)
    # Then key "a" waits behind its dead letter, key "b" flowed
    rows = _rows(session)
    assert rows[dead].status == "dead"
    assert rows[second].status == rows[third].status == "received"
    assert _effects(session) == [("b", 1)]
    # And the held key is listed with what holds it, over HTTP and the CLI
    client = api_client(settings)
    held = client.get(f"/v1/held-keys?group={GROUP}", headers=AUTH).get_json()["items"]
    assert held == [
        {
            "group": GROUP,
            "topic": topic,
            "key": "a",
            "held": 2,
            "dead_letter": f"inbox:{rows[dead].id}",
            "error": "ValueError: cannot parse the order",
        }
    ]
    listed = CliRunner().invoke(cli, ["dlq", "held"], env=settings.as_env())
    assert listed.exit_code == 0 and f"key=a  held=2  by inbox:{rows[dead].id}" in listed.output
    # When the handler is fixed and the dead letter requeued
    FIXED.add(topic)
    response = client.post(f"/v1/dead-letters/inbox:{rows[dead].id}/requeue", headers=AUTH)
    assert response.status_code == 200
    processor.run(GROUP, LANE)
    # Then the dead one runs first, then the held ones, in order
    assert _effects(session) == [("b", 1), ("a", 1), ("a", 2), ("a", 3)]
    assert client.get("/v1/held-keys", headers=AUTH).get_json()["items"] == []


def test_discarding_the_dead_letter_lets_the_held_ones_run_without_it(
    settings: Settings, effects: Engine, session: Session
):
    _topic, (dead, *_), processor = _parked_key(settings, effects, session)
    dead_id = f"inbox:{_rows(session)[dead].id}"
    client = api_client(settings)
    # An outbox dead letter holds no key: it is not discarded
    refused = client.post("/v1/dead-letters/outbox:1/discard", headers=AUTH)
    assert refused.status_code == 422 and refused.get_json()["error"]["details"]["field"] == "id"
    # When the dead letter is discarded
    response = client.post(f"/v1/dead-letters/{dead_id}/discard", headers=AUTH)
    assert response.status_code == 200 and response.get_json() == {"discarded": dead_id}
    processor.run(GROUP, LANE)
    # Then the held ones run, in order, and the discarded one never ran
    assert _effects(session) == [("b", 1), ("a", 2), ("a", 3)]
    row = _rows(session)[dead]
    assert row.status == "done" and "discarded by an operator" in (row.last_error or "")
    # And it is no dead letter any more: a second discard finds nothing
    again = client.post(f"/v1/dead-letters/{dead_id}/discard", headers=AUTH)
    assert again.status_code == 404


def test_a_skip_group_lets_later_messages_of_a_dead_letters_key_run(
    settings: Settings, effects: Engine, session: Session
):
    topic = f"t.{uuid.uuid4().hex[:8]}"
    _register(session, topic, ordered=True, max_attempts=1)  # on_dead: skip, the default

    @consumer.handler(topic)
    def handle(message: consumer.Message, tx: Session) -> None:
        if message.payload.get("bad"):
            raise ValueError("cannot parse the order")
        tx.execute(
            text("INSERT INTO effects (message_id, key, n) VALUES (:id, :key, :n)"),
            {"id": message.id, "key": message.key, "n": message.payload["n"]},
        )

    receive_in_lane(session, topic, [("a", {"n": 1, "bad": True}), ("a", {"n": 2})])
    processor = LaneProcessor(settings, make_sessionmaker(effects), "worker-a")
    processor.run(GROUP, LANE)
    processor.run(GROUP, LANE)
    assert _effects(session) == [("a", 2)]
