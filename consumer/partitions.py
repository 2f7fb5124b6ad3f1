"""Which consumer of a group reads which Kafka partition: leases, not the group protocol.

Each partition of a topic is a lease bucket (scope ``consumer:<group>:<topic>``). A
consumer renews what it holds, gives back what is beyond its share (the partitions
divided by the group's live consumers, rounded up) and takes free ones up to it. A
consumer that dies or stalls stops renewing; its partitions are free once the lease
lapses, and the offsets it stored with its inbox rows say where the next holder reads
from. A stalled one that wakes up is fenced: its next offset write finds the lease
gone and its batch is rolled back (see ``queries.STORE_INBOX_OFFSETS``).

The Kafka group protocol is not used for assignment: a broker whose coordinator
stalls, or a member that stops answering mid-rebalance, cannot hold the group up.
"""

from __future__ import annotations

import dataclasses
import math
import random

from sqlalchemy.orm import Session

from outbox import leases, queries

SCOPE_PREFIX = "consumer:"


def scope_prefix(group: str) -> str:
    """The lease scope of a group's partitions, before the topic name."""
    return f"{SCOPE_PREFIX}{group}:"


def share(partitions: int, members: int) -> int:
    """How many partitions one of ``members`` live consumers reads at most."""
    return math.ceil(partitions / max(members, 1))


@dataclasses.dataclass
class Change:
    """What one look at the leases changed: partitions gained (with their fencing token
    and next offset, None where the group never stored one) and partitions lost."""

    gained: dict[tuple[str, int], tuple[int, int | None]]
    lost: set[tuple[str, int]]


@dataclasses.dataclass
class PartitionLeases:
    """The partitions one consumer holds, and their fencing tokens."""

    group: str
    owner: str
    lease_s: float
    held: dict[tuple[str, int], int] = dataclasses.field(default_factory=dict)
    # Lease rows made per topic, by partition count: made again only when it changes.
    _rows: dict[str, int] = dataclasses.field(default_factory=dict)

    def refresh(self, session: Session, partitions: dict[str, int]) -> Change:
        """Renew, give back beyond the share, take free ones up to it; the caller commits
        (and only then reads the gained partitions). ``partitions`` is each topic's count;
        the caller has recorded this consumer as alive in the same transaction."""
        prefix = scope_prefix(self.group)
        members = session.scalar(
            queries.LIVE_CONSUMERS, {"group": self.group, "lease_s": self.lease_s}
        )
        limit = share(sum(partitions.values()), int(members or 1))
        renewed: dict[tuple[str, int], int] = {}
        for topic, count in partitions.items():
            if self._rows.get(topic) != count:
                leases.ensure_rows(session, prefix + topic, count)
                self._rows[topic] = count
            mine = [p for (t, p) in self.held if t == topic]
            granted = leases.acquire(
                session, prefix + topic, self.owner, mine, limit=len(mine), lease_s=self.lease_s
            )
            renewed.update({(topic, p): token for p, token in granted.items()})
        # A lease that lapsed and came back has a new token: another consumer may have
        # read the partition meanwhile, so it is read again from the stored offset.
        renewed = {tp: token for tp, token in renewed.items() if self.held[tp] == token}
        lost = set(self.held) - set(renewed)
        # Beyond the share: give back the last ones, so that a newcomer finds them free.
        for topic, p in sorted(renewed)[limit:]:
            leases.release(session, prefix + topic, self.owner, [p])
            del renewed[(topic, p)]
            lost.add((topic, p))
        gained: dict[tuple[str, int], tuple[int, int | None]] = {}
        topics = list(partitions)
        random.shuffle(topics)  # newcomers do not all start at the same topic
        for topic in topics:
            room = limit - len(renewed) - len(gained)
            if room <= 0:
                break
            # Free, lapsed, or lapsed and still in our name (taken again, see above).
            free = [p for p in range(partitions[topic]) if (topic, p) not in renewed]
            granted = leases.acquire(
                session, prefix + topic, self.owner, free, limit=room, lease_s=self.lease_s
            )
            if granted:
                offsets = stored_offsets(session, self.group, topic)
                for p, token in granted.items():
                    gained[(topic, p)] = (token, offsets.get(p))
        self.held = {**renewed, **{tp: token for tp, (token, _) in gained.items()}}
        return Change(gained=gained, lost=lost)

    def give_back(self, session: Session) -> None:
        """Release every partition (a clean stop): the others take them at once."""
        prefix = scope_prefix(self.group)
        for topic in {t for t, _ in self.held}:
            held = [p for t, p in self.held if t == topic]
            leases.release(session, prefix + topic, self.owner, held)
        self.held = {}

    def tokens(self, places: list[tuple[str, int]]) -> list[int]:
        """The fencing token of each held partition in ``places`` (-1: not held)."""
        return [self.held.get(place, -1) for place in places]


def stored_offsets(session: Session, group: str, topic: str) -> dict[int, int]:
    """Where ``group`` reads each partition of ``topic`` from next (none stored: left out)."""
    rows = session.execute(queries.INBOX_OFFSETS, {"group": group, "topic": topic})
    return {partition: offset for partition, offset in rows}
