"""What the fault ledger finds: every acknowledged message against the effects.

- lost: acknowledged, no effect, not a dead letter, and nowhere it could still come
  from: no outbox row, or a row sent to Kafka below the group's committed offset
  with no inbox row (the consumer moved past it);
- duplicate effects: effect rows beyond one per message;
- order violations: per key, a message whose first effect committed after the first
  effect of a later message of its key (by the effects' commit order);
- stuck: unfinished (pending in the outbox, received or failed in the inbox, or in
  Kafka above the group's committed offset) and not dead, once the system was given
  time to catch up.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from outbox.chaos.faults import Fault
from outbox.chaos.handlers import GROUP, TOPIC
from outbox.chaos.load import Acked

MUST_BE_ZERO = ("lost", "duplicate effects", "order violations", "stuck")


@dataclasses.dataclass
class Ledger:
    """The run's figures; ``ok`` when every must-be-zero figure is zero."""

    figures: dict[str, float]
    faults: Counter[str]
    seed: int

    @property
    def ok(self) -> bool:
        return all(self.figures[name] == 0 for name in MUST_BE_ZERO)

    def table(self) -> str:
        rows = [(name, f"{value:g}") for name, value in self.figures.items()]
        rows += [(f"fault: {kind}", str(n)) for kind, n in sorted(self.faults.items())]
        width = max(len(name) for name, _ in rows)
        lines = [f"outbox chaos, seed {self.seed}", "-" * (width + 12)]
        for name, value in rows:
            flag = "  (must be 0)" if name in MUST_BE_ZERO else ""
            lines.append(f"{name:<{width}}  {value:>8}{flag}")
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def unfinished(engine: Engine) -> int:
    """Chaos messages not finished nor dead on either side."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM outbox_messages"
                    "        WHERE topic = :topic AND status = 'pending')"
                    " + (SELECT count(*) FROM inbox_messages"
                    "    WHERE consumer_group = :group AND status IN ('received', 'failed'))"
                ),
                {"topic": TOPIC, "group": GROUP},
            ).scalar_one()
        )


def effected(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(text("SELECT count(DISTINCT message_id) FROM chaos_effects")).scalar_one()
        )


def judge(
    engine: Engine,
    acked: Sequence[Acked],
    faults: Sequence[Fault],
    seed: int,
    extra: dict[str, float],
    committed: dict[int, int],
) -> Ledger:
    """Compare the acknowledged messages with the effects and the tables; ``committed``
    is the group's committed offset per partition."""
    with engine.connect() as conn:
        where = {
            message_id: (partition, offset, inboxed)
            for message_id, partition, offset, inboxed in conn.execute(
                text(
                    "SELECT o.message_id::text, o.kafka_partition, o.kafka_offset,"
                    " EXISTS (SELECT 1 FROM inbox_messages i WHERE i.consumer_group = :group"
                    "         AND i.message_id = o.message_id)"
                    " FROM outbox_messages o WHERE o.topic = :topic AND NOT o.is_retry"
                ),
                {"topic": TOPIC, "group": GROUP},
            )
        }
        effects = conn.execute(
            text("SELECT message_id::text, key, seq FROM chaos_effects ORDER BY id")
        ).all()
        dead = set(
            conn.execute(
                text(
                    "SELECT message_id::text FROM outbox_messages"
                    " WHERE topic = :topic AND status = 'dead'"
                    " UNION SELECT message_id::text FROM inbox_messages"
                    " WHERE consumer_group = :group AND status = 'dead'"
                ),
                {"topic": TOPIC, "group": GROUP},
            ).scalars()
        )
    acked_ids = {a.message_id for a in acked}
    counts = Counter(message_id for message_id, _, _ in effects)
    missing = acked_ids - set(counts) - dead
    # Messages still in Kafka, above the offset the group committed: late, not lost.
    in_kafka = {
        m
        for m in missing
        if m in where
        and where[m][0] is not None
        and not where[m][2]
        and where[m][1] >= committed.get(where[m][0], 0)
    }
    # Rows still unsent, or received and not processed: counted as stuck below.
    unfinished_rows = {m for m in missing if m in where and (where[m][0] is None or where[m][2])}
    first_seen: dict[str, list[int]] = defaultdict(list)
    seen: set[str] = set()
    for message_id, key, seq in effects:
        if message_id not in seen:
            seen.add(message_id)
            first_seen[key].append(seq)
    violations = sum(
        1 for seqs in first_seen.values() for a, b in itertools.pairwise(seqs) if b < a
    )
    figures: dict[str, float] = {
        "acknowledged": len(acked_ids),
        "delivered (an effect)": len(acked_ids & set(counts)),
        "lost": len(missing - in_kafka - unfinished_rows),
        "duplicate effects": sum(n - 1 for n in counts.values()),
        "order violations": violations,
        "stuck": unfinished(engine) + len(in_kafka),
        "of them in Kafka, not yet consumed": len(in_kafka),
        "dead letters": len(dead),
        "effects of unacknowledged messages": len(set(counts) - acked_ids),
        "faults injected": len(faults),
        **extra,
    }
    return Ledger(figures, Counter(f.kind for f in faults), seed)


def write(
    ledger: Ledger,
    acked: Sequence[Acked],
    effect_times: Sequence[float],
    faults: Sequence[Fault],
    out_dir: Path,
) -> tuple[Path, Path]:
    """The ledger as JSON, and a PNG of published and effected per second with the faults
    marked on the time axis."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "seed": ledger.seed,
        "ok": ledger.ok,
        "figures": ledger.figures,
        "faults": [dataclasses.asdict(f) for f in faults],
    }
    json_path = out_dir / "chaos.json"
    json_path.write_text(json.dumps(data, indent=2))
    png_path = out_dir / "chaos.png"
    _plot(acked, effect_times, faults, png_path)
    return json_path, png_path


def _plot(
    acked: Sequence[Acked], effect_times: Sequence[float], faults: Sequence[Fault], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = min([a.at for a in acked] + list(effect_times) + [f.at for f in faults] or [0.0])

    def per_second(times: Sequence[float]) -> tuple[list[int], list[int]]:
        seconds = Counter(int(t - start) for t in times)
        xs = list(range(max(seconds, default=0) + 1))
        return xs, [seconds.get(x, 0) for x in xs]

    fig, ax = plt.subplots(figsize=(12, 5))
    ax.plot(*per_second([a.at for a in acked]), label="published (acknowledged) / s")
    ax.plot(*per_second(effect_times), label="effected / s")
    for fault in faults:
        ax.axvspan(fault.at - start, fault.at - start + max(fault.lasted_s, 0.3), alpha=0.15)
        ax.text(
            fault.at - start, ax.get_ylim()[1] * 0.98, fault.kind, rotation=90, fontsize=6, va="top"
        )
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("messages per second")
    ax.legend(loc="upper right")
    ax.set_title("outbox chaos: throughput under faults (shaded: a fault)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
