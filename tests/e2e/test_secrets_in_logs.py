"""Tokens and payloads never reach a log line or a metric label, whatever happens to
the messages that carry them."""

from __future__ import annotations

import logging
import uuid

import pytest

from api import create_app
from tests.flow import Flow

pytestmark = pytest.mark.e2e


def test_secret_payloads_and_tokens_stay_out_of_every_log_and_metric(
    flow: Flow, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)  # the API's own lines, in this process
    secret = f"sEcReT-{uuid.uuid4().hex}"
    token = f"tOkEn-{uuid.uuid4().hex}"
    client = create_app(flow.settings.replace(api_tokens=(token,))).test_client()
    auth = {"Authorization": f"Bearer {token}"}
    # Given messages whose payloads, keys and headers hold a secret: some go through,
    # some fail until they are dead, some are refused at the door
    good = {"topic": flow.topic, "payload": {"card": secret}, "key": f"k-{secret}"}
    poison = {"topic": flow.topic, "payload": {"card": secret, "poison": True}}
    response = client.post(
        "/v1/messages",
        json={"messages": [good, poison, {**good, "headers": {"note": secret}}]},
        headers=auth,
    )
    assert response.status_code == 202, response.get_json()
    refused = [
        {"topic": "no-such-topic", "payload": {"card": secret}},
        {"topic": flow.topic, "payload": {"card": secret, "bad": "\u0000"}},
        {"topic": flow.topic, "payload": {"card": secret}, "headers": {"target_group": secret}},
    ]
    for body in refused:
        assert 400 <= client.post("/v1/messages", json=body, headers=auth).status_code < 500
    assert (
        client.get("/v1/messages", headers={"Authorization": f"Bearer {token}x"}).status_code == 401
    )
    # When the good ones have their effects and the poison one is dead
    flow.wait(lambda: flow.scalar("SELECT count(*) FROM effects") == 2, 60, "the effects")
    flow.wait(
        lambda: flow.scalar("SELECT count(*) FROM inbox_messages WHERE status = 'dead'") == 1,
        90,
        "the poison message to be dead",
    )
    metrics = client.get("/metrics", headers=auth).get_data(as_text=True)
    # Then no process wrote the secret or the token, and no metric label holds them
    logs = {name: process.text() for name, process in flow.processes.items()}
    logs["api"] = caplog.text
    assert any(logs.values()) and "relay" in logs["worker1"]
    for name, text in logs.items():
        assert secret not in text, name
        assert token not in text, name
    assert "outbox_" in metrics and secret not in metrics and token not in metrics
