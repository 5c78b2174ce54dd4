"""The adaptive in-flight limit (AIMD) on its own, with a fake clock."""

from __future__ import annotations

import pytest

from fsbridge.core.limiter import AdaptiveLimit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_grows_by_one_per_answer_only_while_every_slot_is_busy():
    limit = AdaptiveLimit(initial=4, ceiling=10)
    limit.success(in_flight=2)  # slots to spare: the limit held nothing back
    assert limit.limit == 4
    for _ in range(3):
        limit.success(in_flight=limit.limit)
    assert limit.limit == 7
    for _ in range(20):
        limit.success(in_flight=limit.limit)
    assert limit.limit == 10  # never above the ceiling


def test_overload_halves_once_per_cooldown_then_climbs_back():
    clock = Clock()
    limit = AdaptiveLimit(initial=4, ceiling=64, cooldown_s=1.0, clock=clock)
    for _ in range(60):
        limit.success(in_flight=limit.limit)
    assert limit.limit == 64
    for _ in range(16):  # the requests in flight when PlanFix stumbled: one sign
        limit.overload()
    assert limit.limit == 32
    clock.now += 1.5
    limit.overload()
    assert limit.limit == 16
    # At the new threshold (half of 32): about one more per round of answers.
    assert limit.threshold == 16
    for _ in range(16):
        limit.success(in_flight=limit.limit)
    assert limit.limit == 16  # 16 answers: not quite one round's worth more
    for _ in range(2):
        limit.success(in_flight=limit.limit)
    assert limit.limit == 17


def test_outage_floors_at_one_and_recovers_fast_to_the_initial_limit():
    clock = Clock()
    limit = AdaptiveLimit(initial=16, ceiling=256, cooldown_s=1.0, clock=clock)
    for _ in range(10):
        clock.now += 2
        limit.overload()
    assert limit.limit == 1
    for _ in range(15):
        limit.success(in_flight=limit.limit)
    assert limit.limit == 16


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        AdaptiveLimit(initial=0, ceiling=4)
    with pytest.raises(ValueError):
        AdaptiveLimit(initial=8, ceiling=4)
