"""Later: work coalesced into one long-lived greenlet."""

from __future__ import annotations

import gevent

from fsbridge.later import Later


def test_requests_before_a_run_are_served_by_that_one_run_in_the_same_greenlet():
    runs = []
    later = Later(lambda: runs.append(gevent.getcurrent()))
    for _ in range(5):
        later.request()
    assert runs == []  # nothing runs before the caller yields
    gevent.sleep(0.01)
    later.request()
    gevent.sleep(0.01)
    assert len(runs) == 2 and runs[0] is runs[1]  # one greenlet for every run
    later.kill()


def test_a_delay_gathers_what_comes_meanwhile():
    batches, pending = [], []
    later = Later(lambda: (batches.append(list(pending)), pending.clear()), delay_s=0.05)
    for n in range(3):
        pending.append(n)
        later.request()
        gevent.sleep(0.01)
    gevent.sleep(0.1)
    assert batches == [[0, 1, 2]]
    later.kill()


def test_a_failing_run_is_logged_and_the_next_request_still_served(caplog):
    calls = []

    def work():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk full")

    later = Later(work)
    later.request()
    gevent.sleep(0.01)
    later.request()
    gevent.sleep(0.01)
    assert len(calls) == 2 and "disk full" in caplog.text
    later.kill()


def test_kill_drops_a_pending_run():
    runs = []
    later = Later(lambda: runs.append(1), delay_s=0.05)
    later.request()
    gevent.sleep(0.01)
    later.kill()
    gevent.sleep(0.1)
    assert runs == [] and not later.pending
