from __future__ import annotations

import socket
from pathlib import Path

import pytest

from outbox.devstack.server import pick_port
from outbox.devstack.services import EmbeddedServices
from outbox.errors import SettingsError
from outbox.settings import Settings


def test_configured_services_are_used_and_nothing_is_started(tmp_path: Path):
    settings = Settings.from_env(
        {
            "OUTBOX_DATABASE_URL": "postgresql://u@db.example:5432/app",
            "OUTBOX_REDIS_URL": "redis://cache.example:6379/0",
            "OUTBOX_KAFKA_BOOTSTRAP": "kafka.example:9092",
        }
    )
    services = EmbeddedServices(settings, tmp_path)
    assert services.start() == settings
    assert services.started == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("variable", "port"),
    [
        ("OUTBOX_DEV_PG_PORT", 5432),
        ("OUTBOX_DEV_REDIS_PORT", 6379),
        ("OUTBOX_DEV_KAFKA_PORT", 9092),
    ],
)
def test_an_embedded_service_never_takes_its_standard_port(tmp_path: Path, variable, port):
    settings = Settings.from_env({variable: str(port)})
    with pytest.raises(SettingsError, match=variable):
        EmbeddedServices(settings, tmp_path).start()


def test_an_embedded_service_takes_its_configured_port_or_else_one_nobody_holds():
    assert pick_port("redis", 16379, "dev_redis_port") == 16379
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        held = taken.getsockname()[1]
        chosen = {pick_port("redis", 0, "dev_redis_port") for _ in range(20)}
        assert held not in chosen
    for port in chosen:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))  # free: binding it works
