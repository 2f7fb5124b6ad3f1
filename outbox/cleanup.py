"""Deleting finished rows past their retention, in bounded batches.

Each batch is one short transaction deleting at most ``cleanup_batch_size``
rows of one kind, oldest first, with a pause between batches, so that the
relay and publishers never queue behind it. Rows another transaction holds
are skipped, never waited for; a row that is not finished is never chosen
(see ``queries.CLEANUP``). Running twice at once is safe: each run skips what
the other holds.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from sqlalchemy.orm import Session, sessionmaker

from outbox import queries
from outbox.settings import Settings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CleanupReport:
    """Rows deleted (or, in a dry run, that would be) per kind, and the largest batch."""

    deleted: dict[str, int] = dataclasses.field(default_factory=dict)
    batches: int = 0
    largest_batch: int = 0
    dry_run: bool = False

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _retentions(settings: Settings) -> dict[str, float]:
    """Each kind's retention in seconds; kinds kept for good (dead letters at 0) are left out."""
    kinds = {
        "outbox_sent": settings.retention_sent_s,
        "outbox_dead": settings.retention_dead_s,
        "inbox_done": settings.retention_done_s,
        "inbox_dedup": settings.retention_dedup_s,
        "inbox_dead": settings.retention_dead_s,
        "health_snapshots": settings.retention_health_s,
        "agents": settings.retention_health_s,
    }
    if settings.retention_dead_s == 0:
        del kinds["outbox_dead"], kinds["inbox_dead"]
    return kinds


def cleanup(
    settings: Settings, sessions: sessionmaker[Session], *, dry_run: bool = False
) -> CleanupReport:
    """Delete every finished row past its retention; in a dry run, count them instead."""
    report = CleanupReport(dry_run=dry_run)
    pause_s = settings.cleanup_pause_ms / 1000
    for kind, retention in _retentions(settings).items():
        params = {
            "retention": retention,
            "dead_retention": settings.retention_dead_s,
            "batch": settings.cleanup_batch_size,
        }
        if dry_run:
            with sessions() as session:
                report.deleted[kind] = int(
                    session.execute(queries.CLEANUP_COUNT[kind], params).scalar_one()
                )
            continue
        total = 0
        while True:
            with sessions.begin() as session:
                gone = int(session.execute(queries.CLEANUP[kind], params).scalar_one())
            report.batches += 1
            report.largest_batch = max(report.largest_batch, gone)
            total += gone
            if gone < settings.cleanup_batch_size:
                break
            time.sleep(pause_s)
        report.deleted[kind] = total
    if not dry_run and any(report.deleted.values()):
        log.info("cleanup deleted %s", report.deleted)
    return report
