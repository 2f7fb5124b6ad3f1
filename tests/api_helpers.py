"""An API client with a topic to use, and every table's row count: what a refused
request must leave as it was."""

from __future__ import annotations

from flask.testing import FlaskClient
from sqlalchemy import text
from sqlalchemy.orm import Session

from api import create_app
from outbox.settings import Settings

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {**AUTH, "Content-Type": "application/json"}
TABLES = (
    "topics",
    "consumer_groups",
    "outbox_messages",
    "deliveries",
    "inbox_messages",
    "inbox_dedup",
    "inbox_offsets",
    "leases",
    "health_snapshots",
)


def api_client(settings: Settings) -> FlaskClient:
    """A client of an app that takes ``TOKEN``, with topic ``orders`` and its group
    ``billing`` registered."""
    client = create_app(settings.replace(api_tokens=(TOKEN,))).test_client()
    response = client.post(
        "/v1/topics",
        json={"name": "orders", "consumer_groups": [{"name": "billing"}]},
        headers=AUTH,
    )
    assert response.status_code == 201, response.get_json()
    return client


def counts(session: Session) -> dict[str, int]:
    """Every table's row count (agents aside: the API registers itself)."""
    session.rollback()
    return {t: session.scalar(text(f"SELECT count(*) FROM {t}")) or 0 for t in TABLES}
