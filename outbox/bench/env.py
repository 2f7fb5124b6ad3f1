"""Where a benchmark runs: the embedded services (durable, as `outbox dev` runs them) or the
configured ones, and a database of its own that is dropped afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from outbox import migrate
from outbox.bench.report import progress
from outbox.devstack.services import EmbeddedServices
from outbox.settings import Settings

# The embedded services of each bench environment that started its own broker, by the
# broker's address.
_embedded_brokers: dict[str, EmbeddedServices] = {}


def fresh_broker(settings: Settings) -> bool:
    """Restart the embedded broker of ``settings``, so that the next phase starts on an empty
    one; False (nothing done) for a configured broker.

    The embedded broker keeps every message, offset commit and producer of the run in
    memory, and costs more CPU per request as they pile up (docs/BENCHMARKS-HISTORY.md, "The
    broker's part"): without a restart a benchmark's later phases would measure the phases
    before them. Topics and consumer groups go with it: the caller makes the topics again.
    """
    services = _embedded_brokers.get(settings.kafka_bootstrap or "")
    if services is None:
        return False
    services.restart("kafka")
    return True


@contextlib.contextmanager
def bench_environment(settings: Settings) -> Iterator[Settings]:
    """Settings pointing at running services and a new, migrated database."""
    root = Path(tempfile.mkdtemp(prefix="outbox-bench-"))
    root.chmod(0o755)
    services = EmbeddedServices(settings, root, durable=True)
    broker = ""  # the address of the broker this environment started, if it started one
    try:
        live = services.start()
        if settings.kafka_bootstrap is None and live.kafka_bootstrap is not None:
            broker = live.kafka_bootstrap
            _embedded_brokers[broker] = services
        assert live.database_url is not None
        name = f"outbox_bench_{os.getpid()}"
        admin = create_engine(
            make_url(live.database_url).set(database="postgres"), isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = make_url(live.database_url).set(database=name)
        # Files of its processes (beat's schedule) go to the same temporary folder.
        live = live.replace(
            database_url=url.render_as_string(hide_password=False), dev_dir=str(root)
        )
        migrate.upgrade(live)
        progress(f"services ready (database {name})")
        try:
            yield live
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    finally:
        _embedded_brokers.pop(broker, None)
        services.stop()
        shutil.rmtree(root, ignore_errors=True)
