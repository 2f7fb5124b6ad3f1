"""The bare Celery pipeline: the bare loops' work (:mod:`outbox.bench.bare`) with its relay
and processor passes run as Celery tasks, and the system's delivery guarantees (per-key
order, attempts counted before handlers run, bounded handler statements) kept in the
shortest way. It is a second reference beside the bare pipeline: what the same work
costs once it goes through Celery with those guarantees, measured in the same run.

* **relay task** (``bare.relay``): deletes its kick flag, then runs bare relay passes
  (claim, produce, flush, mark) until one finds no row.
* **processor task** (``bare.process``): deletes its kick flag, then runs processor passes
  until one finds no row: count the attempts of up to 1,000 received rows and commit (a
  handler that ends its process still spends its attempt, as the system's lane task
  commits its lane leases before its handlers); then, with the handlers' statements
  bounded (``statement_timeout``), one handler call per row under one savepoint, mark
  the rows done, commit.
* **one task of each kind at a time**: a task works only while it holds its kind's
  advisory lock (``pg_try_advisory_lock``, on a connection of its own), so rows are sent
  and processed in id order, and per-key order holds however many tasks run (the
  system's bucket and lane leases keep it). A task that finds the lock held ends; the
  holder lets the lock go, then looks once more for rows and goes on if it finds any.
* **kicks**: after each commit the publisher sets the relay's flag in Redis (``SET NX``)
  and sends the relay task only if it set it; the bare consumer loop, a process of its
  own, does the same for the processor after each inbox commit. So a row committed before
  a task deletes its flag is seen by that task (or by the lock's holder), and one
  committed after it kicks again. Both tasks are also kicked every second
  (:func:`ticking`), as the system's beat ticks its relay, for rows that no commit will
  kick for (such as rows a relay pass claimed but could not deliver).

The worker is a plain ``celery worker`` of this module's app with the system's Celery
settings (late acks, prefetch of one, JSON, no results) on a queue of its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import redis
from celery import Celery
from sqlalchemy import Engine, TextClause, text
from sqlalchemy.orm import Session

import celeryconfig
from outbox.bench import bare
from outbox.db import autocommit, make_engine
from outbox.health import redis_client
from outbox.settings import Settings

QUEUE = "bare-celery"
RELAY = "bare.relay"
PROCESS = "bare.process"
RELAY_FLAG = "bare-celery:relay:kick-pending"
PROCESS_FLAG = "bare-celery:process:kick-pending"
# A kick's flag outlives any wait in the queue: a task is never dropped, so the flag only
# guards against a task lost with its worker.
FLAG_TTL_MS = 10_000
# How often both tasks are kicked whatever was committed (the system's beat ticks its relay
# every second).
TICK_S = 1.0


def make_app(settings: Settings) -> Celery:
    """The bare Celery app: the system's Celery settings, its own queue, no schedule."""
    app = Celery("bare-celery")
    app.conf.update(celeryconfig.from_settings(settings))
    app.conf.update(task_default_queue=QUEUE, beat_schedule={}, worker_hijack_root_logger=True)
    return app


class Kicks:
    """Set a flag, send its task if it was not set: for any thread."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        assert settings.redis_url is not None
        self.app = app
        self.flags: redis.Redis = redis_client(settings.redis_url)

    def kick(self, flag: str, task: str) -> None:
        if self.flags.set(flag, b"1", nx=True, px=FLAG_TTL_MS):
            self.app.send_task(task, queue=QUEUE)


@contextlib.contextmanager
def ticking(kicks: Kicks, interval_s: float = TICK_S) -> Iterator[None]:
    """Kick both tasks every ``interval_s`` while the pipeline runs, as the system's beat
    ticks its relay: the safety net for rows that no kick will come for, such as rows a
    relay pass claimed but could not deliver (they are claimable again once the claim's
    lease lapses)."""
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(interval_s):
            with contextlib.suppress(Exception):  # the next tick tries again
                kicks.kick(RELAY_FLAG, RELAY)
                kicks.kick(PROCESS_FLAG, PROCESS)

    thread = threading.Thread(target=tick, name="bare-celery-ticks", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


_state: dict[str, Any] = {}


def _per_process(settings: Settings) -> dict[str, Any]:
    """An engine, a bare relay and a Redis client per pool process, made after the fork."""
    if _state.get("pid") != os.getpid():
        engine = make_engine(settings, pool_size=2)
        assert settings.redis_url is not None
        _state.update(
            pid=os.getpid(),
            engine=engine,
            relay=bare.BareRelay(settings, engine),
            flags=redis_client(settings.redis_url),
        )
    return _state


# One task of each kind works at a time (a session-level advisory lock on a connection of
# its own): rows are sent, and processed, in id order, so per-key order holds however many
# tasks run, as the system's bucket and lane leases keep it.
RELAY_LOCK = 0x0BA4E1
PROCESS_LOCK = 0x0BA4E2
TRY_LOCK = text("SELECT pg_try_advisory_lock(:lock)")
UNLOCK = text("SELECT pg_advisory_unlock(:lock)")
UNSENT = text("""
SELECT EXISTS (
    SELECT 1 FROM bare_outbox
    WHERE sent_at IS NULL AND (lease_until IS NULL OR lease_until < now())
)
""")
RECEIVED = text("SELECT EXISTS (SELECT 1 FROM bare_inbox WHERE NOT done)")
# The processor counts each row's attempt and commits before its handler runs, so that a
# handler that ends its process still spends an attempt (the system's lane task commits
# its lane leases before its handlers for the same reason).
COUNT = text(f"""
UPDATE bare_inbox SET attempts = attempts + 1
WHERE id IN (
    SELECT id FROM bare_inbox WHERE NOT done
    ORDER BY id LIMIT {bare.PROCESS_BATCH} FOR UPDATE SKIP LOCKED
)
RETURNING id, message_id
""")  # noqa: S608 (a constant)
# Handlers' statements are bounded, as the system's are.
STATEMENT_TIMEOUT = text("SELECT set_config('statement_timeout', '30000', true)")


def exclusively(engine: Engine, lock: int, work: Callable[[], int], more: TextClause) -> int:
    """Run ``work`` until it finds nothing, holding ``lock``; let the lock go, then look
    once more (``more``): a task that found the lock held ended, and left its rows to this
    look. Returns what ``work`` did; 0 when another task holds the lock."""
    done = 0
    with autocommit(engine) as conn:
        while conn.execute(TRY_LOCK, {"lock": lock}).scalar_one():
            try:
                while found := work():
                    done += found
            finally:
                conn.execute(UNLOCK, {"lock": lock})
            if not conn.execute(more).scalar_one():
                break
    return done


def process_counted(engine: Engine) -> int:
    """Count the attempts of up to 1,000 received rows and commit; then run their handlers
    under one savepoint and mark them done, and commit. Returns how many."""
    with engine.begin() as conn:
        rows = sorted(conn.execute(COUNT).all())
    if rows:
        with Session(engine) as session, session.begin():
            session.execute(STATEMENT_TIMEOUT)
            with session.begin_nested():
                for row in rows:
                    bare.handle(row.message_id, session)
            session.execute(bare.MARK_DONE, {"ids": [row.id for row in rows]})
    return len(rows)


def register(app: Celery, settings: Settings) -> None:
    """The relay and processor tasks on ``app``."""

    @app.task(name=RELAY, shared=False)
    def relay() -> int:
        state = _per_process(settings)
        state["flags"].delete(RELAY_FLAG)  # before the claim: later commits kick again
        return exclusively(state["engine"], RELAY_LOCK, state["relay"].pass_once, UNSENT)

    @app.task(name=PROCESS, shared=False)
    def process() -> int:
        state = _per_process(settings)
        state["flags"].delete(PROCESS_FLAG)
        engine = state["engine"]
        return exclusively(engine, PROCESS_LOCK, lambda: process_counted(engine), RECEIVED)


def consume(settings: Settings, engine: Engine, topic: str, stop: threading.Event) -> None:
    """The bare consumer loop, kicking the processor task after each inbox commit."""
    kicks = Kicks(make_app(settings), settings)
    bare.consume_forever(
        settings, engine, topic, stop, after_store=lambda: kicks.kick(PROCESS_FLAG, PROCESS)
    )


def __getattr__(name: str) -> Any:
    # ``celery -A outbox.bench.bare_celery worker`` finds ``app``, built on first access
    # from the OUTBOX_* variables, so importing the module needs no configuration.
    if name == "app":
        settings = Settings.from_env()
        app = make_app(settings)
        register(app, settings)
        globals()["app"] = app
        return app
    raise AttributeError(name)


def main(argv: list[str]) -> None:
    """``python -m outbox.bench.bare_celery consume TOPIC``: the consumer loop until
    SIGTERM."""
    if argv[1:2] != ["consume"]:
        raise SystemExit("usage: python -m outbox.bench.bare_celery consume TOPIC")
    settings = Settings.from_env()
    engine = make_engine(settings, pool_size=1)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("bare celery consume ready", flush=True)
    consume(settings, engine, argv[2], stop)


if __name__ == "__main__":
    main(sys.argv)
