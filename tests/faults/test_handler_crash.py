"""A handler that ends its worker process, or hangs, on one key: the other keys of its
lane finish, and that message is dead after its attempts instead of blocking the lane."""

from __future__ import annotations

import pytest

from tests.flow import Flow

OTHERS = 60


@pytest.mark.parametrize(
    "flow",
    [
        {
            # One lane: the crashing key shares it with every other key.
            "settings": {"lanes": 1, "lane_lease_s": 2.0},
            "retry": {"base_s": 0.2, "factor": 1.5, "max_attempts": 2},
            "handler_timeout_s": 1.0,
        }
    ],
    indirect=True,
)
def test_a_handler_that_ends_or_hangs_its_worker_is_dead_after_its_attempts_and_others_flow(
    flow: Flow,
):
    # Given a message whose handler ends its process, one whose handler hangs past the
    # group's handler timeout, and other keys before and after them in the same lane
    before = flow.publish([{"key": f"k{i}", "payload": {"seq": 0}} for i in range(OTHERS // 2)])
    crash, hang = flow.publish(
        [
            {"key": "crash", "payload": {"exit": True}},
            {"key": "hang", "payload": {"sleep_ms": 60_000}},
        ]
    )
    after = flow.publish(
        [{"key": f"k{i}", "payload": {"seq": 1}} for i in range(OTHERS // 2, OTHERS)]
    )

    # Then every other message has its effect once
    flow.wait(lambda: flow.scalar("SELECT count(*) FROM effects") == OTHERS, 120, "the other keys")
    effects = flow.scalar("SELECT array_agg(message_id::text) FROM effects")
    assert sorted(effects) == sorted(before + after)

    # And both bad messages end dead after their two attempts, saying what happened
    def dead(message_id: str) -> bool:
        status = flow.scalar(
            "SELECT status FROM inbox_messages WHERE message_id = CAST(:id AS uuid)",
            id=message_id,
        )
        return status == "dead"

    flow.wait(lambda: dead(crash) and dead(hang), 180, "both bad messages to be dead")
    rows = {
        message_id: (
            flow.scalar(
                "SELECT attempts FROM inbox_messages WHERE message_id = CAST(:id AS uuid)",
                id=message_id,
            ),
            flow.scalar(
                "SELECT last_error FROM inbox_messages WHERE message_id = CAST(:id AS uuid)",
                id=message_id,
            ),
        )
        for message_id in (crash, hang)
    }
    assert rows[crash][0] == 2 and "never finished" in rows[crash][1]
    assert rows[hang][0] == 2 and "HandlerTimeout" in rows[hang][1]
    assert flow.scalar("SELECT count(*) FROM inbox_messages WHERE status <> 'done'") == 2
