from __future__ import annotations

import pytest

from api import create_app
from outbox.devstack.server import free_port
from outbox.settings import Settings


@pytest.fixture
def client(settings: Settings):
    app = create_app(settings)
    return app.test_client()


def test_healthz_answers_without_credentials(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_checks_each_service(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {
        "status": "ready",
        "checks": {"postgresql": "ok", "redis": "ok", "kafka": "ok"},
    }


def test_readyz_names_the_service_that_does_not_answer_and_nothing_more(settings: Settings):
    dead = f"127.0.0.1:{free_port()}"
    database = f"postgresql+psycopg2://secret_user:secret_pw@{dead}/secret_db"
    client = create_app(
        settings.replace(kafka_bootstrap=dead, redis_url=f"redis://{dead}/0")
    ).test_client()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json() == {
        "status": "unavailable",
        "checks": {"postgresql": "ok", "redis": "unavailable", "kafka": "unavailable"},
    }
    # Not even the address or the database's user and name, whatever is down
    client = create_app(settings.replace(database_url=database)).test_client()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["checks"]["postgresql"] == "unavailable"
    for secret in (dead, "secret_user", "secret_pw", "secret_db"):
        assert secret not in response.get_data(as_text=True)


def test_an_unknown_path_gets_the_json_error_envelope(client):
    response = client.get("/nothing-here")
    assert response.status_code == 404
    error = response.get_json()["error"]
    assert error["code"] == "not_found"
    assert error["message"]
    assert error["details"] == {}
