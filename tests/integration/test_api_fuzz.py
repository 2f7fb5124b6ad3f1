"""The API fuzzed from its own OpenAPI document, over HTTP, on real PostgreSQL, Redis
and Kafka: every response conforms to the document, none is a 5xx, and a refused
request changes no table."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.config import SchemathesisConfig
from sqlalchemy.orm import Session
from werkzeug.serving import make_server

from api import create_app
from outbox.settings import Settings
from tests.api_helpers import counts

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES_PER_OPERATION = 80
# A request the document allows can still be refused for what it says (a topic nobody
# registered, a cursor the API never gave out): 422, as the document declares.
ACCEPTED = ["2xx", "401", "404", "409", "413", "422"]
CONFIG = SchemathesisConfig.from_dict(
    {"checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED}}}
)
LEAST_REQUESTS = 1000


@pytest.fixture
def base_url(settings: Settings) -> Iterator[str]:
    app = create_app(settings.replace(api_tokens=(TOKEN,), max_batch=20))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    client = app.test_client()
    # Something to find: a topic with a group, a message on it.
    assert (
        client.post(
            "/v1/topics",
            json={"name": "orders", "consumer_groups": [{"name": "billing", "requires_ack": True}]},
            headers=AUTH,
        ).status_code
        == 201
    )
    assert (
        client.post(
            "/v1/messages", json={"topic": "orders", "payload": {"n": 1}, "key": "k"}, headers=AUTH
        ).status_code
        == 202
    )
    try:
        yield url
    finally:
        server.shutdown()
        thread.join(10)


def test_fuzzed_requests_get_no_5xx_conform_to_the_document_and_refusals_write_nothing(
    base_url: str, session: Session
):
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=CONFIG)
    sent: list[int] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15

    for operation in operations:

        @given(case=operation.as_strategy())
        @hypothesis_settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,  # the same requests on every run: CI is not a lottery
            suppress_health_check=list(HealthCheck),
        )
        def one(case: schemathesis.Case) -> None:
            before = counts(session)
            response = case.call(headers=AUTH, timeout=30)
            sent.append(response.status_code)
            case.validate_response(response)
            if response.status_code >= 400:
                assert counts(session) == before, (case.method, case.path, response.text[:300])

        one()

    print(f"{len(sent)} requests over {len(operations)} operations:", Counter(sent))
    assert len(sent) >= LEAST_REQUESTS
    assert not [s for s in sent if s >= 500]


def test_fuzzed_sequences_that_follow_the_documents_links_get_no_5xx(base_url: str, tmp_path: Path):
    """Schemathesis's own stateful runner: sequences of calls, each feeding the next its
    ids and names through the document's links, from a fixed seed."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        f"[checks.positive_data_acceptance]\nexpected-statuses = {json.dumps(ACCEPTED)}\n"
    )
    run = subprocess.run(
        [
            str(Path(sys.executable).with_name("st")),
            "--config-file",
            str(config),
            "run",
            f"{base_url}/openapi.json",
            "--phases",
            "stateful",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--seed",
            "20261204",
            "--max-examples",
            "150",
            "--request-timeout",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    print(output[-1500:])
    assert "✅ Stateful" in output and "No issues found" in output
