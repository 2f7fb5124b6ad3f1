from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from celery.signals import worker_process_init, worker_ready

from outbox.heap import freeze_startup_objects
from outbox.settings import Settings
from tasks.factory import make_celery

SETTINGS = Settings.from_env({"OUTBOX_REDIS_URL": "redis://127.0.0.1:1/0"})


class _Node:
    """An object that can sit in a reference cycle."""

    def __init__(self) -> None:
        self.other: object = None


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_a_set_up_process_leaves_its_live_objects_out_of_collections_and_keeps_no_garbage(
    unfrozen: None,
) -> None:
    kept = _Node()
    cycle = _Node()
    cycle.other = cycle
    gone = weakref.ref(cycle)
    del cycle

    freeze_startup_objects()

    assert gone() is None  # collected first, not kept for good
    # The collector's generations no longer hold it: no later pass walks it.
    assert gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects())
    made_after = _Node()
    assert any(o is made_after for o in gc.get_objects())


@pytest.mark.parametrize("signal", [worker_process_init, worker_ready], ids=lambda s: s.name)
def test_each_worker_process_freezes_what_it_built_once_it_is_set_up(
    unfrozen: None, signal: object
) -> None:
    make_celery(SETTINGS)
    assert gc.get_freeze_count() == 0
    signal.send(sender="bench1@host")  # type: ignore[attr-defined]
    assert gc.get_freeze_count() > 0
