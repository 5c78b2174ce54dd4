"""How many requests may be in flight to one PlanFix account: an adaptive limit.

AIMD, as TCP does it: while PlanFix answers and every slot is in use, the
limit grows (by one per answer up to `threshold`, "slow start", then by
about one per round of answers); on an overload sign (429, 5xx, timeout,
connection error) it halves, at most once per `cooldown_s` so that the
requests already in flight when PlanFix stumbled count as one sign.  It
never leaves [1, ceiling].  A slow PlanFix that answers 200 is not
overloaded: the limit grows to what its latency needs (a PlanFix taking
150 ms for 450 requests/s needs ~70 in flight).

One instance per PlanFix account: nothing here is global, so several
accounts can each have their own limit and backoff.
"""

from __future__ import annotations

import time
from typing import Callable


class AdaptiveLimit:
    def __init__(self, initial: int = 16, ceiling: int = 256, cooldown_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 1 <= initial <= ceiling:
            raise ValueError("need 1 <= initial <= ceiling")
        self.initial = initial
        self.ceiling = ceiling
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._limit = float(initial)
        self.threshold = float(ceiling)  # slow start up to here, then additive
        self._next_decrease = 0.0

    @property
    def limit(self) -> int:
        return int(self._limit)

    def success(self, in_flight: int) -> None:
        """PlanFix answered (any answer that is not an overload sign).

        ``in_flight``: requests in flight when it came, this one included.
        The limit grows only when it was what held requests back.
        """
        if in_flight < self.limit:
            return
        step = 1.0 if self._limit < self.threshold else 1.0 / self._limit
        self._limit = min(float(self.ceiling), self._limit + step)

    def overload(self) -> None:
        """429/5xx, a timeout or a connection error: halve, once per cooldown."""
        now = self._clock()
        if now < self._next_decrease:
            return
        self._next_decrease = now + self.cooldown_s
        # Back to slow start up to at least the initial limit: after an
        # outage the limit climbs back quickly to where it was safe.
        self.threshold = max(float(self.initial), self._limit / 2)
        self._limit = max(1.0, self._limit / 2)
