"""The workers' metrics recorder: what it writes to Redis, and that a Redis failure never
reaches the relay."""

from __future__ import annotations

import json
from typing import Any

import redis

from outbox.metrics import COUNTERS, LATENCY_BUCKETS, MetricsRecorder, Sent, circuit_summary
from outbox.settings import Settings


class FakePipeline:
    def __init__(self, calls: list[tuple[Any, ...]], fail: bool) -> None:
        self.calls, self.fail = calls, fail

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.calls.append((name, *args))

    def execute(self) -> None:
        if self.fail:
            raise redis.ConnectionError("Redis is down")


class FakeRedis:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.pipelines = 0
        self.fail = fail

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        assert transaction is False
        self.pipelines += 1
        return FakePipeline(self.calls, self.fail)


def _recorder(client: FakeRedis, **settings: Any) -> MetricsRecorder:
    recorder = MetricsRecorder(Settings(redis_url="redis://unused:6379/0", **settings))
    recorder._client = client  # type: ignore[assignment]
    return recorder


def test_a_relay_batch_is_one_round_trip_of_counts_and_histogram_buckets():
    client = FakeRedis()
    _recorder(client).relay_batch(
        [
            Sent("orders", 0, 1, 0.004),
            Sent("orders", 3, 4, 0.12),  # four rows between 25 and 50 ms
            Sent("billing", len(LATENCY_BUCKETS), 1, 120.0),
        ],
        ["orders"],
    )
    assert client.pipelines == 1
    increments = {c[2]: c[3] for c in client.calls if c[0] == "hincrby"}
    assert {c[1] for c in client.calls if c[0] == "hincrby"} == {COUNTERS}
    assert increments == {
        "published|orders": 5,
        "published|billing": 1,
        "failed|orders": 1,
        "latency|0.005": 1,
        "latency|0.05": 4,  # 120 s is above every bound: only in the count (+Inf)
        "latency_count": 6,
    }
    [(_, _, name, total)] = [c for c in client.calls if c[0] == "hincrbyfloat"]
    assert name == "latency_sum" and abs(total - 120.124) < 1e-9


def test_metrics_off_write_nothing():
    client = FakeRedis()
    recorder = _recorder(client, metrics=False)
    recorder.relay_batch([Sent("orders", 1, 1, 0.01)], [])
    recorder.retries(["billing"])
    recorder.circuit("relay@a", "open")
    assert client.pipelines == 0


def test_a_redis_failure_is_swallowed_and_not_retried_at_once():
    client = FakeRedis(fail=True)
    recorder = _recorder(client)
    recorder.relay_batch([Sent("orders", 1, 1, 0.01)], [])  # no exception reaches the relay
    recorder.relay_batch([Sent("orders", 1, 1, 0.01)], [])
    recorder.retries(["billing"])
    assert client.pipelines == 1  # the later counts were dropped without a round trip


def test_the_worst_circuit_state_wins():
    assert circuit_summary({}) == "closed"
    assert circuit_summary({"a": "closed", "b": "half_open"}) == "half_open"
    assert circuit_summary({"a": "open", "b": "half_open", "c": "closed"}) == "open"


def test_an_unchanged_circuit_state_is_written_again_only_after_the_refresh_interval(
    monkeypatch,
):
    from outbox import metrics

    clock = [500.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
    client = FakeRedis()
    recorder = _recorder(client)
    for _ in range(20):  # relay passes within a second
        recorder.circuit("relay@a", "closed")
    assert client.pipelines == 1
    recorder.circuit("relay@b", "closed")  # another relay's state is its own
    assert client.pipelines == 2
    recorder.circuit("relay@a", "open")  # a change is written at once
    assert client.pipelines == 3
    clock[0] += metrics.CIRCUIT_REFRESH_S
    recorder.circuit("relay@a", "open")  # and the same state again once the interval passed
    assert client.pipelines == 4
    states = [c[3] for c in client.calls if c[0] == "hset" and c[2] == "relay@a"]
    assert [json.loads(v)["state"] for v in states] == ["closed", "open", "open"]


def test_a_circuit_state_that_failed_to_be_written_is_tried_again():
    client = FakeRedis(fail=True)
    recorder = _recorder(client)
    recorder.circuit("relay@a", "closed")
    recorder._retry_at = 0.0  # Redis is back
    client.fail = False
    recorder.circuit("relay@a", "closed")
    assert client.pipelines == 2
