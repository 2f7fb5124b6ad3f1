"""Fixtures of the fault tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from outbox.devstack.broker import EmbeddedKafka
from outbox.devstack.server import free_port


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[EmbeddedKafka]:
    """A broker of the test's own, to stop, restart or pause."""
    broker = EmbeddedKafka(tmp_path, free_port())
    broker.start()
    yield broker
    broker.stop()
