"""``outbox chaos``: the fault ledger.

It runs the whole system (two workers, two consumers of an ordered group, beat and
the API, as ``outbox dev --workers 2 --consumers 2`` does) on embedded services of
its own, publishes at a steady rate (:mod:`outbox.chaos.load`) while it injects a
fault every few seconds (:mod:`outbox.chaos.faults`) and restarts whatever dies,
then stops the faults, waits for the system to catch up, and judges every
acknowledged message against the handler's effects (:mod:`outbox.chaos.ledger`).
"""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, text

from consumer.partitions import stored_offsets
from outbox import migrate
from outbox.chaos.faults import Injector
from outbox.chaos.handlers import GROUP, SCHEMA, TOPIC
from outbox.chaos.ledger import Ledger, effected, judge, unfinished, write
from outbox.chaos.load import Publishers
from outbox.db import make_engine, make_sessionmaker
from outbox.devstack import processes
from outbox.devstack.dev import DEV_API_TOKEN, Child, Output, Supervisor, plan
from outbox.devstack.server import free_port
from outbox.devstack.services import EmbeddedServices
from outbox.registry import GroupSpec, put_group, register_topic
from outbox.settings import Settings

KEYS = 50
RESTART_POLL_S = 0.5
LEASE_S = 5.0


def _chaos_settings(settings: Settings, root: Path) -> Settings:
    """The system under test: short leases and timeouts, so that faults are felt and
    survived within seconds."""
    return settings.replace(
        dev_dir=str(root),
        database_url=None,
        redis_url=None,
        kafka_bootstrap=None,
        api_port=free_port(),
        flower_port=free_port(),
        api_tokens=settings.api_tokens or (DEV_API_TOKEN,),
        consumer_group=GROUP,
        consumer_topics=(TOPIC,),
        handler_modules=("outbox.chaos.handlers",),
        consumer_lease_s=LEASE_S,
        relay_lease_s=LEASE_S,
        relay_delivery_timeout_ms=3000,
        lane_lease_s=LEASE_S,
        log_level="INFO",  # readiness is read from the children's INFO lines
    )


def run(
    settings: Settings,
    *,
    duration_s: float,
    rate: float,
    seed: int,
    out_dir: Path,
    catch_up_s: float = 300.0,
    say: Callable[[str], None] = print,
) -> Ledger:
    """Run the ledger; return its figures (also written to ``out_dir``)."""
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="outbox-chaos-"))
    root.chmod(0o755)  # the postgres system user must reach its data directory
    s = _chaos_settings(settings, root)
    services = EmbeddedServices(s, root, durable=True)
    s = services.start()
    supervisor: Supervisor | None = None
    publishers: Publishers | None = None
    out_dir.mkdir(parents=True, exist_ok=True)
    log = (out_dir / "system.log").open("w")  # every process's output, for a failed run
    engine = make_engine(s, pool_size=2)
    try:
        migrate.upgrade(s)
        with make_sessionmaker(engine).begin() as session:
            session.execute(text(SCHEMA))
            register_topic(session, TOPIC)
            put_group(session, GroupSpec(name=GROUP, topic=TOPIC, ordered=True))
        children = [
            c
            for c in plan(s, root / "celerybeat-schedule", workers=2, consumers=2)
            if c.name != "flower"
        ]
        # Faults kill children on purpose: they are started again however often.
        supervisor = Supervisor(
            s, children, Output(log), on_start=services.watch_group, give_up_after=None
        )
        supervisor.start()
        not_ready = supervisor.wait_ready()
        if not_ready:
            raise RuntimeError(f"not ready: {', '.join(not_ready)} (see {log.name})")
        say(f"outbox chaos: seed {seed}; system up, publishing {rate:g} msg/s for {duration_s:g} s")

        done = threading.Event()
        restarted: list[str] = []
        threading.Thread(
            target=_keep_alive, args=(supervisor, done, restarted), daemon=True
        ).start()
        extra = iter(range(1, 10_000))

        def add_consumer() -> Child:
            name = f"consumer-extra{next(extra)}"
            assert supervisor is not None
            return supervisor.add(processes.consumer(s, name, group=GROUP, topics=[TOPIC]))

        injector = Injector(supervisor, services, rng, s.relay_lease_s, add_consumer)
        publishers = Publishers(s, engine, s.api_port, rate, KEYS)
        publishers.start()
        started = time.monotonic()
        while time.monotonic() - started < duration_s:
            time.sleep(injector.gap_s())
            injector.start_next()
            say(f"  {time.monotonic() - started:5.0f} s: {len(injector.faults)} faults over")
        injector.join()
        last_fault = time.monotonic()
        publishers.stop()
        say(f"outbox chaos: faults over; {len(publishers.acked)} acknowledged; catching up")
        acked_ids = {a.message_id for a in publishers.acked}
        caught_up = None
        while time.monotonic() - last_fault < catch_up_s:
            if unfinished(engine) == 0 and effected(engine) >= len(acked_ids):
                caught_up = time.monotonic() - last_fault
                break
            time.sleep(0.5)
        done.set()
        with engine.connect() as conn:
            effect_times = list(
                conn.execute(text("SELECT extract(epoch FROM at) FROM chaos_effects")).scalars()
            )
        ledger = judge(
            engine,
            publishers.acked,
            injector.faults,
            seed,
            extra={
                "catch-up after the last fault, s": round(
                    caught_up if caught_up is not None else catch_up_s, 1
                ),
                "caught up": caught_up is not None,
                "processes restarted": len(restarted),
                "publisher retries": publishers.retries,
                "acknowledged in COPY batches": publishers.copied,
            },
            committed=committed_offsets(engine, GROUP, TOPIC),
        )
        write(ledger, publishers.acked, [float(t) for t in effect_times], injector.faults, out_dir)
        return ledger
    finally:
        if publishers is not None:
            publishers.stop()
        if supervisor is not None:
            supervisor.stop()
        engine.dispose()
        services.stop()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def committed_offsets(engine: Engine, group: str, topic: str) -> dict[int, int]:
    """The offset per partition of ``topic`` up to which the group stored what it read."""
    with make_sessionmaker(engine)() as session:
        return stored_offsets(session, group, topic)


def _keep_alive(supervisor: Supervisor, done: threading.Event, restarted: list[str]) -> None:
    while not done.wait(RESTART_POLL_S):
        restarted += supervisor.keep_alive()
