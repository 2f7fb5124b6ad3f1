"""Every filter reaches SQL as a bound parameter: injection strings in each filter of
each list endpoint and CLI command match nothing and change nothing."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from click.testing import CliRunner
from sqlalchemy.orm import Session

from outbox.cli import cli
from outbox.settings import Settings
from tests.api_helpers import AUTH, JSON, api_client, counts
from tests.integration.test_dead_letters import _dead_inbox

INJECTIONS = [
    "'; DROP TABLE outbox_messages; --",
    "x' OR '1'='1",
    "%' OR 1=1 --",
    '"; DELETE FROM topics; --',
    "orders'); TRUNCATE inbox_messages CASCADE; --",
    "\\'; SELECT pg_sleep(5); --",
]
# Each list endpoint with its free-text filters.
FILTERS = {
    "/v1/messages": ["topic", "key"],
    "/v1/dead-letters": ["group", "topic", "error"],
    "/v1/agents": ["group"],
    "/v1/deliveries": ["group"],
}


@pytest.fixture
def client(settings: Settings):
    return api_client(settings)


@pytest.mark.parametrize("injection", INJECTIONS)
def test_injection_strings_in_every_api_filter_match_nothing_and_change_nothing(
    client, session: Session, injection: str
):
    _dead_inbox(session, "billing", "orders", 2, "KeyError: 'customer'")
    before = counts(session)
    for path, names in FILTERS.items():
        for name in names:
            response = client.get(f"{path}?{name}={quote(injection)}", headers=AUTH)
            assert response.status_code == 200, (path, name, response.get_json())
            assert response.get_json()["items"] == [], (path, name)
    for name in ("group", "topic", "error"):
        response = client.post("/v1/dead-letters/requeue", json={name: injection}, headers=JSON)
        assert response.status_code == 200, response.get_json()
        assert sum(response.get_json()["requeued"].values()) == 0
    assert counts(session) == before


@pytest.mark.parametrize("injection", INJECTIONS)
def test_injection_strings_in_every_cli_filter_match_nothing_and_change_nothing(
    settings: Settings, session: Session, injection: str
):
    _dead_inbox(session, "billing", "orders", 2, "KeyError: 'customer'")
    before = counts(session)
    runner = CliRunner()
    env = settings.as_env()
    commands = [
        *(["dlq", "list", f"--{name}", injection] for name in ("group", "topic", "error")),
        *(
            ["dlq", "requeue", "--all", f"--{name}", injection]
            for name in ("group", "topic", "error")
        ),
        ["agents", "--group", injection],
        ["deliveries", "--group", injection],
    ]
    for command in commands:
        result = runner.invoke(cli, command, env=env)
        assert result.exit_code == 0, (command, result.output)
        assert "inbox:" not in result.output, command
    assert counts(session) == before
