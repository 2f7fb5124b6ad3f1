"""Dead letters of both sides through the API and the CLI: filters, pages, requeue."""

from __future__ import annotations

import uuid

from click.testing import CliRunner
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api import create_app
from outbox import Message, Publisher
from outbox.cli import cli
from outbox.models import InboxMessage, OutboxMessage
from outbox.registry import register_topic
from outbox.settings import Settings
from tests.inbox import receive

TOKEN = "t"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _dead_outbox(settings: Settings, session: Session, topic: str, n: int) -> list[uuid.UUID]:
    register_topic(session, topic)
    ids = Publisher(settings).publish_batch(
        session,
        [Message(topic, {"n": i}, key=f"k{i}", headers={"tenant": "acme"}) for i in range(n)],
    )
    session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.message_id.in_(ids))
        .values(status="dead", attempts=10, last_error="MSG_SIZE_TOO_LARGE: broker refused")
    )
    session.commit()
    return ids


def _dead_inbox(session: Session, group: str, topic: str, n: int, error: str) -> list[uuid.UUID]:
    messages = [(f"k{i}", {"n": i}) for i in range(n)]
    return receive(session, group, topic, messages, status="dead", attempts=10, last_error=error)


def test_dead_letters_are_listed_by_side_and_filter_and_paged_without_repeats(
    settings: Settings, session: Session
):
    s = settings.replace(api_tokens=(TOKEN,))
    client = create_app(s).test_client()
    outbox_ids = _dead_outbox(s, session, "orders", 3)
    billing = _dead_inbox(session, "billing", "orders", 4, "KeyError: 'customer'")
    _dead_inbox(session, "shipping", "parcels", 2, "TimeoutError: carrier API")

    everything = client.get("/v1/dead-letters", headers=AUTH).get_json()
    assert len(everything["items"]) == 9 and everything["next_cursor"] is None

    by_group = client.get("/v1/dead-letters?group=billing", headers=AUTH).get_json()["items"]
    assert {i["message_id"] for i in by_group} == {str(m) for m in billing}
    assert all(i["side"] == "inbox" and i["id"].startswith("inbox:") for i in by_group)
    by_error = client.get("/v1/dead-letters?error=carrier", headers=AUTH).get_json()["items"]
    assert [i["group"] for i in by_error] == ["shipping", "shipping"]
    outbox_side = client.get("/v1/dead-letters?side=outbox", headers=AUTH).get_json()["items"]
    assert {i["message_id"] for i in outbox_side} == {str(m) for m in outbox_ids}
    assert all(i["headers"]["tenant"] == "acme" and i["group"] is None for i in outbox_side)
    future = client.get("/v1/dead-letters?after=2999-01-01T00:00:00Z", headers=AUTH)
    assert future.get_json()["items"] == []

    seen: list[str] = []
    cursor = None
    while True:
        url = "/v1/dead-letters?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=AUTH).get_json()
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 9

    bad = client.get("/v1/dead-letters?cursor=nonsense", headers=AUTH)
    assert bad.status_code == 422 and bad.get_json()["error"]["details"]["field"] == "cursor"
    assert client.get("/v1/dead-letters").status_code == 401


def test_requeue_keeps_the_message_and_gives_a_fresh_budget_one_or_many(
    settings: Settings, session: Session
):
    s = settings.replace(api_tokens=(TOKEN,))
    client = create_app(s).test_client()
    first, _ = _dead_outbox(s, session, "orders", 2)
    billing = _dead_inbox(session, "billing", "orders", 3, "KeyError: 'customer'")
    items = client.get("/v1/dead-letters?side=outbox", headers=AUTH).get_json()["items"]
    one = next(i["id"] for i in items if i["message_id"] == str(first))

    response = client.post(f"/v1/dead-letters/{one}/requeue", headers=AUTH)
    assert response.status_code == 200 and response.get_json() == {"requeued": {"outbox": 1}}
    row = session.scalars(select(OutboxMessage).where(OutboxMessage.message_id == first)).one()
    assert (row.status, row.attempts, row.headers["tenant"]) == ("pending", 0, "acme")
    again = client.post(f"/v1/dead-letters/{one}/requeue", headers=AUTH)
    assert again.status_code == 404  # no longer a dead letter
    assert client.post("/v1/dead-letters/inbox:999999/requeue", headers=AUTH).status_code == 404

    bulk = client.post(
        "/v1/dead-letters/requeue", json={"group": "billing", "error": "keyerror"}, headers=AUTH
    )
    assert bulk.get_json() == {"requeued": {"outbox": 0, "inbox": 3, "delivery": 0}}
    session.expire_all()
    rows = session.scalars(select(InboxMessage).where(InboxMessage.message_id.in_(billing))).all()
    assert {(r.status, r.attempts) for r in rows} == {("received", 0)}
    remaining = client.get("/v1/dead-letters", headers=AUTH).get_json()["items"]
    assert [i["side"] for i in remaining] == ["outbox"]
    wrong = client.post("/v1/dead-letters/requeue", json={"side": "both"}, headers=AUTH)
    assert wrong.status_code == 422


def test_the_cli_lists_and_requeues_dead_letters(settings: Settings, session: Session):
    _dead_inbox(session, "billing", "orders", 2, "KeyError: 'customer'")
    outbox_ids = _dead_outbox(settings, session, "orders", 1)
    runner = CliRunner()
    env = settings.as_env()

    listed = runner.invoke(cli, ["dlq", "list", "--side", "inbox"], env=env)
    assert listed.exit_code == 0, listed.output
    assert listed.output.count("inbox:") == 2 and "KeyError" in listed.output

    requeued = runner.invoke(cli, ["dlq", "requeue", "--all", "--group", "billing"], env=env)
    assert requeued.exit_code == 0, requeued.output
    assert "requeued 0 outbox, 2 inbox and 0 delivery" in requeued.output
    outbox_id = runner.invoke(cli, ["dlq", "list", "--json"], env=env).output.split('"id": "')[1]
    by_id = runner.invoke(cli, ["dlq", "requeue", outbox_id.split('"')[0], "inbox:424242"], env=env)
    assert by_id.exit_code == 1 and "no such dead letter: inbox:424242" in by_id.output
    session.expire_all()
    assert (
        session.scalars(
            select(OutboxMessage.status).where(OutboxMessage.message_id == outbox_ids[0])
        ).one()
        == "pending"
    )
