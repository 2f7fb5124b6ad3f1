from __future__ import annotations

from pathlib import Path

import pytest

from outbox.devstack.server import STANDARD_PORTS, free_port
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


def test_free_ports_are_not_standard_ones():
    assert not {free_port() for _ in range(20)} & set(STANDARD_PORTS.values())
