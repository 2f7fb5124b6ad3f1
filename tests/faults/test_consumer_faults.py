"""Killing a consumer mid-batch, or a worker mid-task: nothing is lost and no effect
happens twice. Every committed message must reach its handler's effect exactly once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from tests.flow import Flow
from tests.handlers import TOPIC_VARIABLE
from tests.processes import start_consumer, start_worker

TOTAL = 3_000
KEYS = 50


def _publish(flow: Flow, sleep_ms: int = 0, pause_s: float = 0.0) -> list[str]:
    """Publish TOTAL messages in batches of 100, pausing between batches."""
    ids: list[str] = []
    for start in range(0, TOTAL, 100):
        ids += flow.publish(
            [
                {"key": f"k{i % KEYS}", "payload": {"seq": i // KEYS, "sleep_ms": sleep_ms}}
                for i in range(start, start + 100)
            ]
        )
        time.sleep(pause_s)
    return ids


def _each_effect_once(flow: Flow, ids: list[str]) -> None:
    flow.wait(lambda: flow.scalar("SELECT count(*) FROM effects") >= TOTAL, 180, "every effect")
    time.sleep(2.0)  # a repeated effect, had there been one, would show by now
    assert flow.scalar("SELECT count(*) FROM effects") == TOTAL
    effect_ids = flow.scalar("SELECT array_agg(message_id::text) FROM effects")
    assert sorted(effect_ids) == sorted(ids)
    assert flow.scalar("SELECT count(*) FROM inbox_messages WHERE status <> 'done'") == 0


def test_a_consumer_killed_mid_batch_and_restarted_loses_nothing_and_repeats_nothing(
    flow: Flow, session: Session, tmp_path: Path
):
    # Given messages streaming in over about three seconds
    ids: list[str] = []
    publisher = threading.Thread(target=lambda: ids.extend(_publish(flow, pause_s=0.1)))
    publisher.start()
    flow.wait(lambda: flow.scalar("SELECT count(*) FROM inbox_messages") > 0, 60, "the first rows")

    # When the consumer is killed with SIGKILL while they arrive
    flow.processes["consumer"].kill()
    recorded = flow.scalar("SELECT count(*) FROM inbox_messages")
    publisher.join()
    assert 0 < recorded < TOTAL, "the kill came too late to cut the stream"
    # And a new consumer of the group takes over (re-reading what was not committed)
    restarted = start_consumer(
        flow.settings,
        "consumer-restarted",
        tmp_path,
        group=flow.group,
        topics=[flow.topic],
        env={TOPIC_VARIABLE: flow.topic},
    )
    try:
        restarted.wait_ready()
        # Then every message has its effect exactly once
        _each_effect_once(flow, ids)
    finally:
        restarted.stop()


@pytest.mark.parametrize("flow", [{"settings": {"lane_lease_s": 3.0}}], indirect=True)
def test_a_worker_killed_mid_task_loses_nothing_and_repeats_no_effect(
    flow: Flow, session: Session, tmp_path: Path
):
    # Given slow handlers (20 ms each) running on the worker
    ids = _publish(flow, sleep_ms=20)
    flow.wait(lambda: flow.scalar("SELECT count(*) FROM effects") > 100, 120, "handlers to run")

    # When the worker is killed with SIGKILL in the middle of its lane tasks
    flow.processes["worker1"].kill()
    done = flow.scalar("SELECT count(*) FROM effects")
    assert done < TOTAL, "the kill came too late to cut a task"
    # And another worker starts; the beat sweep hands it the lanes once their leases lapse
    survivor = start_worker(
        flow.settings, "survivor", tmp_path, concurrency=2, env={TOPIC_VARIABLE: flow.topic}
    )
    try:
        survivor.wait_ready()
        # Then every message has its effect exactly once
        _each_effect_once(flow, ids)
    finally:
        survivor.stop()
    assert flow.scalar("SELECT count(DISTINCT worker) FROM inbox_messages") == 2
