from __future__ import annotations

from outbox import queries
from outbox.cleanup import _retentions
from outbox.settings import Settings


def test_every_kind_of_finished_row_has_a_retention_and_dead_letters_may_be_kept():
    settings = Settings(
        retention_sent_s=10, retention_done_s=20, retention_dead_s=30, retention_dedup_s=40
    )
    assert _retentions(settings) == {
        "outbox_sent": 10,
        "outbox_dead": 30,
        "inbox_done": 20,
        "inbox_dedup": 40,
        "inbox_dead": 30,
        "health_snapshots": 86400.0,
        "agents": 86400.0,
    }
    assert set(_retentions(settings)) == set(queries.CLEANUP) == set(queries.CLEANUP_COUNT)
    kept = _retentions(settings.replace(retention_dead_s=0))
    assert "outbox_dead" not in kept and "inbox_dead" not in kept
