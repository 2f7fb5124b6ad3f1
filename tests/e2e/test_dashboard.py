"""The dashboard in headless Chromium (Debian's package, driven by Playwright), served by
gunicorn with two worker processes, over real worker, beat and consumer processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright
from sqlalchemy import text
from sqlalchemy.orm import Session

from outbox import Message, Publisher
from outbox.agents import upsert_agent
from tests.flow import AUTH, TOKEN, Flow
from tests.inbox import receive
from tests.processes import ROOT, ApiServer

ARTIFACTS = Path(os.environ.get("OUTBOX_TEST_ARTIFACTS", ROOT / "test-artifacts"))
# The flags this machine's closed network needs; no profile, sync or update traffic.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FAST_HEARTBEAT = {"heartbeat_interval_s": 1.0, "heartbeat_inspect_timeout_s": 0.3}


def chromium() -> str:
    path = os.environ.get("OUTBOX_TEST_CHROMIUM") or shutil.which("chromium")
    assert path, "Chromium is needed: apt-get install chromium (or set OUTBOX_TEST_CHROMIUM)"
    return path


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _park_a_key(flow: Flow) -> None:
    """A hold_key group on the flow's topic whose key "k-parked" has a dead letter and one
    message behind it."""
    group = {"topic": flow.topic, "on_dead": "hold_key"}
    response = flow.client.put("/v1/consumer-groups/parked", json=group, headers=AUTH)
    assert response.status_code == 200, response.get_json()
    with Session(flow.engine) as session:
        receive(
            session,
            "parked",
            flow.topic,
            [("k-parked", {"seq": 100})],
            status="dead",
            last_error="ValueError: cannot parse",
        )
        receive(session, "parked", flow.topic, [("k-parked", {"seq": 101})])


def _number(page: Page, selector: str) -> int:
    return int(page.locator(selector).inner_text())


@pytest.mark.parametrize("flow", [{"settings": FAST_HEARTBEAT}], indirect=True)
def test_an_operator_watches_publishes_and_requeues_from_the_dashboard(flow: Flow, tmp_path: Path):
    # A dead letter on the outbox side: published, and given up by the relay (the same
    # transaction marks it dead, so the running relay never sees it pending).
    with Session(flow.engine) as session:
        [dead_id] = Publisher(flow.settings).publish_batch(
            session, [Message(flow.topic, {"seq": 0})]
        )
        session.execute(
            text(
                "UPDATE outbox_messages SET status = 'dead', attempts = 10,"
                " last_error = 'broker refused it' WHERE message_id = :id"
            ),
            {"id": dead_id},
        )
        session.commit()
        # An agent that ran before and is gone: listed folded, not among the active ones.
        upsert_agent(session, "worker-gone@old-host:1", "worker", host="old-host", pid=1)
        session.execute(text("UPDATE agents SET active = false WHERE instance_id LIKE '%gone%'"))
        session.commit()
    api = ApiServer(flow.settings, tmp_path)
    try:
        api.wait_ready()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{api.url}/dashboard", timeout=10)
        assert refused.value.code == 401
        assert refused.value.headers["WWW-Authenticate"].startswith("Basic")

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
            context = browser.new_context(
                http_credentials={"username": "operator", "password": TOKEN},
                viewport={"width": 1400, "height": 1100},
            )
            page = context.new_page()
            page.goto(f"{api.url}/dashboard")
            expect(page.locator("h1")).to_have_text("outbox")
            expect(page.get_by_role("link", name="Flower")).to_have_attribute(
                "href", f"http://127.0.0.1:{flow.settings.flower_port}"
            )
            # the backlog number, from the latest snapshot (a heartbeat every second)
            expect(page.locator("#backlog")).to_have_text("0", timeout=20_000)
            expect(page.locator("#dead-total")).to_have_text("1", timeout=20_000)
            before = _number(page, "#published-total")

            published = _post(
                f"{api.url}/v1/messages",
                {"messages": [{"topic": flow.topic, "payload": {"seq": n}} for n in range(1, 21)]},
            )
            assert len(published["message_ids"]) == 20
            expect(page.locator("#published-total")).to_have_text(str(before + 20), timeout=5_000)
            topic_row = page.locator("#topics tbody tr", has_text=flow.topic)
            expect(topic_row.locator("td").nth(2)).to_have_text("20", timeout=5_000)  # sent
            expect(page.locator("#circuit")).to_have_text("closed")
            expect(page.locator("#agents tbody tr", has_text="worker1@")).to_have_count(1)
            expect(page.locator("#agents tbody tr", has_text="worker-gone@")).to_have_count(0)
            expect(page.locator("#inactive-count")).to_have_text("1 inactive")
            expect(
                page.locator("#inactive-agents tbody tr", has_text="worker-gone@")
            ).to_have_count(1)

            # the dead letter, its error shown; requeued with a click, it leaves the list
            dead_row = page.locator("#dead tbody tr", has_text="broker refused it")
            expect(dead_row).to_have_count(1)
            dead_row.get_by_role("button", name="requeue").click()
            expect(dead_row).to_have_count(0, timeout=5_000)
            expect(page.locator("#dead-total")).to_have_text("0", timeout=10_000)

            page.get_by_role("button", name="heartbeat").click()
            expect(page.locator("#run-result")).to_contain_text("outbox.heartbeat queued")
            expect(page.locator("#error")).to_be_hidden()

            # a key that a dead letter parks (a hold_key group) is listed with what waits
            _park_a_key(flow)
            held_row = page.locator("#held tbody tr", has_text="k-parked")
            expect(held_row.locator("td").nth(3)).to_have_text("1", timeout=10_000)
            expect(held_row).to_contain_text("cannot parse")

            # Opened at a URL that carries the credentials, the page loads its data too.
            bare = browser.new_context()
            host = api.url.removeprefix("http://")
            linked = bare.new_page()
            linked.goto(f"http://operator:{TOKEN}@{host}/dashboard")
            expect(linked.locator("#backlog")).to_have_text(re.compile(r"^\d+$"), timeout=20_000)
            expect(linked.locator("#agents tbody tr", has_text="worker1@")).to_have_count(1)
            expect(linked.locator("#error")).to_be_hidden()
            bare.close()

            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            browser.close()
    finally:
        api.stop()

    # every message, the requeued one too, reached its handler's effect exactly once
    ids = [*published["message_ids"], str(dead_id)]
    flow.wait(lambda: flow.scalar("SELECT count(*) FROM effects") == len(ids), 60, "all 21 effects")
    assert flow.scalar("SELECT count(DISTINCT message_id) FROM effects") == 21
    assert (
        flow.scalar(
            "SELECT count(*) FROM effects WHERE message_id = ANY(CAST(:ids AS uuid[]))", ids=ids
        )
        == 21
    )
