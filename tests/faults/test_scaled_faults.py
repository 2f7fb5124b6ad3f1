"""Three workers and two consumers, as ``--scale worker=3 --scale consumer=2`` runs them:
one worker is killed with SIGKILL and one consumer stopped with SIGTERM mid-run, and
every committed message still reaches its handler's effect exactly once."""

from __future__ import annotations

import threading
import time

import pytest

from tests.flow import Flow

TOTAL = 3_000
KEYS = 60


@pytest.mark.parametrize(
    "flow", [{"workers": 3, "consumers": 2, "settings": {"lane_lease_s": 3.0}}], indirect=True
)
def test_scaled_out_workers_and_consumers_lose_one_of_each_and_nothing_else(flow: Flow):
    # Given messages streaming in over about three seconds, handled in 10 ms each
    ids: list[str] = []

    def publish() -> None:
        for start in range(0, TOTAL, 100):
            ids.extend(
                flow.publish(
                    [
                        {"key": f"k{i % KEYS}", "payload": {"seq": i // KEYS, "sleep_ms": 10}}
                        for i in range(start, start + 100)
                    ]
                )
            )
            time.sleep(0.1)

    publisher = threading.Thread(target=publish)
    publisher.start()
    # running in all three workers (each has finished rows of its own)
    flow.wait(
        lambda: (
            flow.scalar("SELECT count(*) FROM effects") > 200
            and flow.scalar("SELECT count(DISTINCT worker) FROM inbox_messages") == 3
        ),
        120,
        "handlers to run in all three workers",
    )

    # When one worker dies with SIGKILL mid-task and one consumer stops with SIGTERM
    flow.processes["worker2"].kill()
    flow.processes["consumer2"].stop()
    cut_at = flow.scalar("SELECT count(*) FROM effects")
    publisher.join()
    assert cut_at < TOTAL, "the faults came too late to cut the run"
    assert flow.processes["consumer2"].proc.returncode == 0, "SIGTERM is a clean stop"

    # Then every committed message has its effect exactly once
    flow.wait(lambda: flow.scalar("SELECT count(*) FROM effects") >= TOTAL, 180, "every effect")
    time.sleep(2.0)  # a repeated effect, had there been one, would show by now
    assert flow.scalar("SELECT count(*) FROM effects") == TOTAL
    assert sorted(flow.scalar("SELECT array_agg(message_id::text) FROM effects")) == sorted(ids)
    assert flow.scalar("SELECT count(*) FROM inbox_messages WHERE status <> 'done'") == 0
    assert flow.scalar("SELECT count(*) FROM outbox_messages WHERE status <> 'sent'") == 0
    # And both consumers had partitions assigned
    consumers = flow.processes["consumer"].text(), flow.processes["consumer2"].text()
    assert all("assigned" in log for log in consumers)
    # and per-key order held through the faults: seq grows with the effects' times
    out_of_order = flow.scalar(
        "SELECT count(*) FROM (SELECT seq < lag(seq) OVER (PARTITION BY key ORDER BY at) AS back"
        " FROM effects) t WHERE back"
    )
    assert out_of_order == 0
