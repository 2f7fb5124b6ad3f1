"""The API's relay kick on a real Redis broker: a burst of commits queues one task, and a
commit after the relay task started queues the next."""

from __future__ import annotations

import base64
import json
import time

import pytest
import redis

from api.kick import Kicker
from outbox.kick import FLAG, KickClaimer, kick_started
from outbox.settings import Settings

QUEUE = "celery"  # Celery's default queue: a list in the broker's Redis database


def _queued_tasks(client: redis.Redis) -> list[str]:
    return [json.loads(m)["headers"]["task"] for m in client.lrange(QUEUE, 0, -1)]


def _wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_a_burst_of_commits_queues_one_relay_task_and_a_later_commit_queues_another(
    settings: Settings,
):
    assert settings.redis_url is not None
    client = redis.Redis.from_url(settings.redis_url)
    kicker = Kicker(settings.replace(publish_interval_s=30.0))

    for _ in range(500):
        kicker.kick()
    assert _wait_for(lambda: len(_queued_tasks(client)) >= 1)
    time.sleep(0.2)  # every kick of the burst has been looked at by now
    assert _queued_tasks(client) == ["outbox.publish"]
    assert client.exists(FLAG)

    # The relay task starts (it clears the flag before claiming): the next commit kicks.
    client.lpop(QUEUE)
    kick_started(client)
    kicker.kick()
    assert _wait_for(lambda: _queued_tasks(client) == ["outbox.publish"])
    client.close()


def test_a_claimer_whose_connection_broke_reconnects_on_the_next_claim(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.delete(FLAG)
    claimer = KickClaimer(redis_url, timeout_s=2.0)
    assert claimer.claim(60_000)
    assert not claimer.claim(60_000)  # pending: no second kick
    client.client_kill_filter(_type="normal", skipme=True)
    with pytest.raises(redis.ConnectionError):
        claimer.claim(60_000)
    assert not claimer.claim(60_000)
    kick_started(client)
    assert claimer.claim(60_000)


def test_beats_relay_tick_ends_at_once_while_a_pass_is_queued_or_on(settings: Settings):
    from tasks.factory import make_celery

    assert settings.redis_url is not None
    client = redis.Redis.from_url(settings.redis_url)
    publish = make_celery(settings).tasks["outbox.publish"]
    client.set(FLAG, b"1", px=5000)  # a kicked pass is queued (or a lingering one holds it)
    assert publish.run(tick=True) == {"skipped": "a relay pass is queued or running"}
    assert client.exists(FLAG)  # left to the pass that set it
    client.delete(FLAG)
    ran = publish.run(tick=True)  # nobody is on it: beat's tick relays
    assert "sent" in ran and ran["circuit"] == "closed"


def test_one_relay_task_lingers_at_a_time_and_a_kicked_one_ends_beside_it(settings: Settings):
    from tasks.factory import make_celery
    from tasks.relay import LINGERER, RelayLinger, another_lingers

    assert settings.redis_url is not None
    client = redis.Redis.from_url(settings.redis_url)
    client.delete(FLAG, LINGERER)
    lingering = settings.replace(relay_linger_ms=1000)
    app = make_celery(lingering)
    first, second = RelayLinger(app, lingering, None), RelayLinger(app, lingering, None)

    assert first.hold() and client.exists(FLAG)  # commits kick nothing meanwhile
    assert not second.hold()  # another lingers: this one sends its rows and ends
    assert not second.keep_waiting(0.0)
    second.let_go()
    assert client.exists(FLAG) and client.exists(LINGERER)  # still the first one's
    # A task kicked meanwhile ends at once: the lingering one sees its rows.
    assert app.tasks["outbox.publish"].run() == {"skipped": "another relay task is lingering"}
    assert first.keep_waiting(0.0)
    # Its claims find a backlog: commits kick tasks again, and they help it.
    first.backlog(True)
    assert not client.exists(FLAG) and another_lingers(client) is False
    assert client.get(LINGERER) == first._token.encode()  # it still lingers
    # Light again: it sees every commit alone.
    first.backlog(False)
    assert client.exists(FLAG) and another_lingers(client)
    first.backlog(True)
    first.let_go()
    assert not client.exists(FLAG) and not client.exists(LINGERER)  # commits kick again
    assert not another_lingers(client)


def test_a_lane_task_that_finds_its_lanes_held_queues_a_look_again_soon(settings: Settings):
    from sqlalchemy.orm import Session

    from consumer.lanes import lane_scope
    from outbox import leases, queries
    from outbox.db import make_engine
    from tasks.factory import make_celery

    assert settings.redis_url is not None
    client = redis.Redis.from_url(settings.redis_url)
    client.delete(QUEUE)
    app = make_celery(settings)
    engine = make_engine(settings)
    with Session(engine) as session:
        leases.fit_rows(
            session,
            lane_scope("g"),
            settings.lanes,
            unfinished=queries.LANES_UNFINISHED,
            params={"group": "g"},
            setting="OUTBOX_LANES",
        )
        leases.take(session, lane_scope("g"), "another-task", [3], limit=1, lease_s=60)
        session.commit()
    engine.dispose()

    report = app.tasks["consumer.process_lane"].run("g", [3])
    assert report["busy"] == [3]
    (queued,) = [json.loads(m) for m in client.lrange(QUEUE, 0, -1)]
    assert queued["headers"]["task"] == "consumer.process_lane"
    assert queued["headers"]["kwargsrepr"] == "{'busy_s': 0.05}"  # soon, not in a second
    assert queued["headers"]["eta"] is not None
    client.delete(QUEUE)


def test_a_lane_task_hands_lanes_off_with_one_task_of_their_own_only_when_none_is_queued(
    settings: Settings,
):
    from outbox.kick import lane_flag
    from tasks.factory import make_celery
    from tasks.lanes import LaneLinger

    assert settings.redis_url is not None
    client = redis.Redis.from_url(settings.redis_url)
    client.delete(QUEUE, *(lane_flag("g", n) for n in range(8)))
    lingering = settings.replace(lane_linger_ms=1000)
    app = make_celery(lingering)
    linger = LaneLinger(app, lingering, "w1@host")
    linger.hold("g", [0, 1, 2, 3])

    assert linger.may_hand_off()  # nothing queued: a pool process is likely free
    linger.hand_off("g", [2, 3])
    assert _wait_for(lambda: _queued_tasks(client) == ["consumer.process_lane"])
    queued = json.loads(client.lindex(QUEUE, 0))
    assert json.loads(base64.b64decode(queued["body"]))[0] == ["g", [2, 3]]
    # Their kicks now wait for that task; the handing task still holds its own.
    assert all(client.exists(lane_flag("g", n)) for n in range(4))
    # With a task queued, nothing more is handed off.
    assert not linger.may_hand_off()
    client.delete(QUEUE, *(lane_flag("g", n) for n in range(8)))
    client.close()


def test_a_worker_of_two_pool_processes_lets_one_of_its_tasks_linger_at_a_time(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
):
    from outbox.kick import lane_flag
    from tasks import linger as lingering
    from tasks.factory import make_celery
    from tasks.lanes import LaneLinger
    from tasks.relay import LINGERER, RelayLinger

    assert settings.redis_url is not None
    client = redis.Redis.from_url(settings.redis_url)
    monkeypatch.setattr(lingering, "_pool_size", 2)  # as its worker's main process learnt
    worker = f"w{time.monotonic_ns()}@host"
    client.delete(FLAG, LINGERER, *lingering.places(worker))
    s = settings.replace(relay_linger_ms=1000, lane_linger_ms=1000)
    app = make_celery(s)
    lane, relay = LaneLinger(app, s, worker), RelayLinger(app, s, worker)

    # Given a lane task lingering in the worker's one place (it gathers its group's lanes)
    lane.hold("g", [1])
    assert lane.keep_waiting(0.0) and lane.gathers()
    # Then a relay task of the same worker does not linger: it sends its rows and ends,
    # and commits kick relay tasks as before; the other pool process is left for them
    assert not relay.hold() and not relay.keep_waiting(0.0)
    assert not client.exists(FLAG) and not client.exists(LINGERER)
    # while a relay task of another worker lingers in a place of its own
    elsewhere = RelayLinger(app, s, f"other-{worker}")
    assert elsewhere.hold() and elsewhere.keep_waiting(0.0)
    elsewhere.let_go()

    # Once the lane task lets its lanes go, the place is free for the relay task
    lane.let_go("g", [1])
    assert not client.exists(lane_flag("g", 1))
    assert relay.hold() and relay.keep_waiting(0.0) and client.exists(LINGERER)
    assert not lane.keep_waiting(0.0)
    relay.let_go()
    assert not client.exists(LINGERER)
    client.close()


def test_a_worker_of_one_pool_process_lets_no_task_linger(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
):
    from tasks import linger as lingering
    from tasks.factory import make_celery
    from tasks.lanes import LaneLinger
    from tasks.relay import LINGERER, RelayLinger

    assert settings.redis_url is not None
    client = redis.Redis.from_url(settings.redis_url)
    client.delete(FLAG, LINGERER)
    monkeypatch.setattr(lingering, "_pool_size", 1)
    s = settings.replace(relay_linger_ms=1000, lane_linger_ms=1000)
    app = make_celery(s)

    # A lingering task would keep the only pool process from every other task.
    assert lingering.places("solo@host") == []
    assert not LaneLinger(app, s, "solo@host").keep_waiting(0.0)
    assert not RelayLinger(app, s, "solo@host").hold()
    assert not client.exists(LINGERER)
    client.close()


def test_a_lane_task_starting_leaves_the_kicks_that_a_lingering_task_holds(settings: Settings):
    from outbox.kick import claim_kicks, lane_flag
    from tasks.factory import make_celery
    from tasks.lanes import LaneLinger, lanes_started

    assert settings.redis_url is not None
    client = redis.Redis.from_url(settings.redis_url)
    flags = [lane_flag("g", n) for n in range(3)]
    client.delete(*flags)
    s = settings.replace(lane_linger_ms=1000)
    # Given a lingering task holding lane 0, and a commit in lanes 0, 1 and 2: it kicks a
    # task for lanes 1 and 2 only
    LaneLinger(make_celery(s), s, "w1@host").hold("g", [0])
    assert claim_kicks(client, 30_000, flags) == [False, True, True]

    # When a task kicked for all three (before the lingering one took lane 0) starts
    lanes_started(client, flags)

    # Then commits kick lanes 1 and 2 again, while lane 0's rows are still the lingering
    # task's to see: no kick is sent for it
    assert claim_kicks(client, 30_000, flags) == [False, True, True]
    client.delete(*flags)
    client.close()
