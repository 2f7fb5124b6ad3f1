"""Partitions of a group shared out by leases: each consumer reads its share, no
partition is read by two, none is left unread for longer than a lease."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from consumer.partitions import PartitionLeases, scope_prefix
from outbox import queries
from outbox.agents import upsert_agent

GROUP = "billing"
COUNTS = {"orders": 5, "refunds": 3}


def _refresh(session: Session, member: PartitionLeases):
    upsert_agent(session, member.owner, "consumer", consumer_group=GROUP)
    change = member.refresh(session, COUNTS)
    session.commit()
    return change


def _all_read_once(*members: PartitionLeases) -> bool:
    held = [tp for m in members for tp in m.held]
    return len(held) == len(set(held)) == sum(COUNTS.values())


def test_a_newcomer_gets_its_share_and_a_leaver_hands_its_partitions_over(session: Session):
    first = PartitionLeases(GROUP, "consumer-a", lease_s=10)
    second = PartitionLeases(GROUP, "consumer-b", lease_s=10)
    # Given one consumer, which reads every partition from the start
    change = _refresh(session, first)
    assert len(first.held) == 8
    assert all(offset is None for _, offset in change.gained.values())
    # When a second joins, and each looks twice
    for _ in range(2):
        _refresh(session, second)
        _refresh(session, first)
    # Then each reads half, and no partition is read by both
    assert len(first.held) == len(second.held) == 4
    assert _all_read_once(first, second)
    # When the first leaves cleanly
    first.give_back(session)
    session.execute(queries.AGENT_GONE, {"instance": first.owner})
    session.commit()
    _refresh(session, second)
    # Then the second reads them all at once
    assert len(second.held) == 8


def test_a_stalled_consumers_partitions_move_when_its_lease_lapses_and_it_is_fenced(
    session: Session,
):
    stalled = PartitionLeases(GROUP, "consumer-a", lease_s=10)
    other = PartitionLeases(GROUP, "consumer-b", lease_s=10)
    _refresh(session, stalled)
    _refresh(session, other)
    tokens = dict(stalled.held)
    # Given the group stored where it reads orders[0] from
    session.execute(
        text(
            "INSERT INTO inbox_offsets (consumer_group, topic, partition, next_offset)"
            " VALUES (:group, 'orders', 0, 42)"
        ),
        {"group": GROUP},
    )
    # When the first stops renewing (stalled) past its lease, and drops out of sight
    session.execute(
        text(
            "UPDATE leases SET expires_at = now() - interval '1 s' WHERE scope LIKE :scope"
            " AND owner = :owner"
        ),
        {"scope": scope_prefix(GROUP) + "%", "owner": stalled.owner},
    )
    session.execute(
        text("UPDATE agents SET last_seen_at = now() - interval '1 hour' WHERE instance_id = :i"),
        {"i": stalled.owner},
    )
    session.commit()
    change = _refresh(session, other)
    # Then the other reads everything, orders[0] from the stored offset
    assert len(other.held) == 8
    assert change.gained[("orders", 0)][1] == 42
    # And every partition the stalled one held has a new fencing token
    assert all(other.held[tp] != token for tp, token in tokens.items())
    # And when the stalled one wakes up, it finds it holds nothing, until the other
    # gives back its share
    change = _refresh(session, stalled)
    assert change.lost == set(tokens) and stalled.held == {}
    _refresh(session, other)
    _refresh(session, stalled)
    assert len(stalled.held) == len(other.held) == 4
    assert _all_read_once(stalled, other)
