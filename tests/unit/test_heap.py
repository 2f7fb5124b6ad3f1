from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator

import pytest
from celery.signals import worker_process_init, worker_ready
from celery.utils.dispatch import Signal

from outbox.heap import freeze_startup_objects
from tasks.factory import freeze_pool_process, freeze_worker


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


@pytest.mark.parametrize(
    ("signal", "receiver"),
    [(worker_process_init, freeze_pool_process), (worker_ready, freeze_worker)],
    ids=["pool process", "main process"],
)
def test_each_worker_process_freezes_what_it_built_once_it_is_set_up(
    unfrozen: None, signal: Signal, receiver: Callable[..., None]
) -> None:
    # Connected to the signal for every sender (sent here, it would run the receivers of
    # every app this test process made, heartbeats included)
    assert any(ref is receiver for _, ref in signal.receivers)
    assert gc.get_freeze_count() == 0
    receiver(signal=signal, sender="bench1@host")
    assert gc.get_freeze_count() > 0
