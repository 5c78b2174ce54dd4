"""The outbox while its PlanFix is down: probed one call at a time, not every pending call on its own schedule
(the storm that let one tenant's outage take the core other tenants need; see fsbridge.outbox "Outage")."""

from __future__ import annotations

import gevent
import pytest

from fsbridge.outbox import OUTAGE_AFTER_FAILURES, Outbox
from fsbridge.planfix import DeliveryResult, Outcome
from tests.outbox_helpers import assert_each_once_in_call_order, many_calls
from tests.test_outbox import drained, wait_until


class Switch:
    """A PlanFix client stand-in that is down (connection refused) or up; notes every attempt."""

    def __init__(self) -> None:
        self.up = False
        self.attempts = 0
        self.in_flight = 0
        self.max_in_flight_down = 0
        self.delivered: list[dict[str, str]] = []

    def send(self, fields: dict[str, str]) -> DeliveryResult:
        self.attempts += 1
        self.in_flight += 1
        if not self.up:
            self.max_in_flight_down = max(self.max_in_flight_down, self.in_flight)
        gevent.sleep(0)  # a real request yields to the hub
        self.in_flight -= 1
        if self.up:
            self.delivered.append(fields)
            return DeliveryResult(Outcome.DELIVERED, 200, {})
        return DeliveryResult(Outcome.RETRY, error="cannot reach PlanFix: ConnectionRefusedError")


@pytest.fixture
def switch_outbox(tmp_path):
    made: list[Outbox] = []

    def make(switch: Switch, **kw) -> Outbox:
        kw = {"min_backoff_s": 0.02, "max_backoff_s": 0.1, "rescan_interval_s": 0.1} | kw
        box = Outbox(str(tmp_path / "outbox.sqlite3"), switch, **kw)
        made.append(box)
        return box

    yield make
    for box in made:
        box.stop(drain_timeout=1)


def test_a_down_planfix_gets_one_probe_at_a_time_not_a_retry_per_pending_call(switch_outbox):
    switch = Switch()
    box = switch_outbox(switch)
    cmds = many_calls(300, 2)
    box.put(cmds)
    box.start()
    gevent.sleep(0.5)
    # Retried per call, each of the 300 would have been tried at least once by now.
    assert OUTAGE_AFTER_FAILURES <= switch.attempts < 150
    gevent.sleep(0.3)
    assert box.stats()["depth"] == 600 and box.stats()["kept_aside"] == 0
    switch.up = True  # a probe notices; then every call goes, in its own order
    drained(box)
    assert_each_once_in_call_order(switch.delivered, cmds)


def test_while_probing_at_most_one_request_is_in_flight(switch_outbox):
    switch = Switch()
    box = switch_outbox(switch, concurrency=16)
    box.put(many_calls(100, 1))
    box.start()
    wait_until(lambda: switch.attempts >= OUTAGE_AFTER_FAILURES + 5, what="probes")
    switch.max_in_flight_down = 0
    gevent.sleep(0.3)
    assert switch.max_in_flight_down <= 1


def test_wake_ends_probing_at_once(switch_outbox):
    switch = Switch()
    # The next probe would come 2.5 s or more after the last failure: only wake() is quicker.
    box = switch_outbox(switch, min_backoff_s=5, max_backoff_s=5)
    cmds = many_calls(40, 1)
    box.put(cmds)
    box.start()
    wait_until(lambda: switch.attempts >= OUTAGE_AFTER_FAILURES, what="an outage")
    gevent.sleep(0.05)
    switch.up = True  # setup gave new credentials
    box.wake()
    drained(box, timeout=2)
    assert_each_once_in_call_order(switch.delivered, cmds)
