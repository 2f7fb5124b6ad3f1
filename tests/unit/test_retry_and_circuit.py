from __future__ import annotations

import random

import pytest

from outbox.circuit import Circuit
from outbox.retry import RetryPolicy


def test_backoff_ceiling_doubles_then_caps():
    policy = RetryPolicy(base_s=1.0, factor=2.0, cap_s=10.0, max_attempts=5)
    assert [policy.ceiling(a) for a in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert policy.ceiling(10_000) == 10.0


def test_jitter_spreads_each_delay_over_its_band_and_the_bands_grow_until_the_cap():
    policy = RetryPolicy(base_s=1.0, factor=2.0, cap_s=10.0)
    rng = random.Random(7)
    bands = {a: [policy.delay(a, rng) for _ in range(1000)] for a in range(1, 7)}
    # Jitter spreads retries over the whole band rather than bunching them.
    assert 0.0 <= min(bands[1]) < 0.05 and 0.95 < max(bands[1]) <= 1.0
    assert 4.0 <= min(bands[4]) < 4.2 and 7.8 < max(bands[4]) <= 8.0
    # One message's waits grow: each band starts where the one before ends.
    for attempt in range(1, 4):
        assert max(bands[attempt]) <= min(bands[attempt + 1])
    # At the cap the waits stop growing but stay spread.
    assert min(bands[6]) >= 5.0 and max(bands[6]) <= 10.0 and max(bands[6]) - min(bands[6]) > 4


def test_attempts_count_from_one_and_the_budget_is_exhausted_at_max():
    policy = RetryPolicy(max_attempts=3)
    with pytest.raises(ValueError):
        policy.ceiling(0)
    assert not policy.exhausted(2)
    assert policy.exhausted(3)


def test_circuit_pauses_then_half_opens_and_backs_off_on_failed_probes():
    now = [0.0]
    circuit = Circuit(open_s=2.0, max_open_s=5.0, clock=lambda: now[0])
    assert circuit.allows() and circuit.state == "closed"
    circuit.open("broker down")
    assert not circuit.allows()
    now[0] = 2.0
    assert circuit.allows() and circuit.state == "half_open"
    circuit.open("still down")  # the probe failed: the pause doubles
    now[0] = 5.9
    assert not circuit.allows()
    now[0] = 6.0
    assert circuit.allows()
    circuit.open("still down")
    assert circuit.pause_s == 5.0  # capped
    circuit.close()
    assert circuit.allows() and circuit.state == "closed"
