"""One celery beat at a time: a second one stands by instead of doubling the schedule.

When beat starts it takes a PostgreSQL session advisory lock on a connection it
keeps for its whole life; a second beat, finding the lock taken, waits and tries
again every few seconds, then takes over as soon as the first one's connection
closes (it stopped, crashed or was killed). If the holder loses its connection,
and with it the lock, it exits at once rather than tick beside the beat that
takes over. (Every beat task is safe to run twice at once anyway: leases,
``SKIP LOCKED`` and unique constraints.) Behind PgBouncer, point beat at
PostgreSQL directly or through session pooling: the lock lives in a session.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.pool import NullPool

from outbox.db import database_url
from outbox.settings import Settings

log = logging.getLogger(__name__)

# Any 64-bit number that no one else uses as an advisory lock key: "outbox-beat".
LOCK_KEY = int.from_bytes(b"obx-beat", "big") & 0x7FFFFFFFFFFFFFFF
STANDBY_POLL_S = 2.0
WATCH_INTERVAL_S = 5.0


def hold_beat_lock(settings: Settings) -> Connection:
    """Return once this process holds the beat lock, standing by while another does."""
    conn = create_engine(database_url(settings), poolclass=NullPool).connect()
    waiting = False
    while not conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": LOCK_KEY}).scalar():
        conn.commit()
        if not waiting:
            log.warning("another celery beat holds the schedule: standing by until it stops")
            waiting = True
        time.sleep(STANDBY_POLL_S)
    conn.commit()  # the lock is the session's: it outlives this transaction
    log.info("this celery beat holds the schedule")
    threading.Thread(target=_watch, args=(conn,), name="beat-lock", daemon=True).start()
    return conn


def _watch(conn: Connection) -> None:
    while True:
        time.sleep(WATCH_INTERVAL_S)
        try:
            conn.execute(text("SELECT 1"))
            conn.commit()
        except Exception as exc:
            log.critical("lost the beat lock (%s): stopping so that one beat runs", exc)
            logging.shutdown()
            os._exit(1)
