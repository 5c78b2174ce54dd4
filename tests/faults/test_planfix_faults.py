"""PlanFix faults against the real service: unreachable, 500, dropped
connections, garbage answers, hanging and slow answers.  Timeouts and
backoffs are shortened in the config (read_timeout 0.5 s, backoff
0.05..0.3 s), so a couple of seconds of outage means dozens of failed
attempts.  Afterwards: everything delivered, per-call order kept, nothing
invalid sent, nothing lost."""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import assert_clean_log, replay_calls, wait_all_delivered, wait_connected
from tests.service_proc import free_port

CALLS = ["01-inbound-single-answer", "02-inbound-ring-group", "04a-inbound-missed-caller-cancel",
         "05a-outbound-answer", "06a-click-to-call-answer"]
FAST = {"planfix": {"connect_timeout": "0.5", "read_timeout": "0.5"},
        "outbox": {"min_backoff": "0.05", "max_backoff": "0.3"}}
OUTAGE_S = 0.6


def assert_all_delivered(svc, pf, wanted, timeout: float = 15.0) -> None:
    wait_all_delivered(svc, pf, wanted, timeout)
    svc.wait_health(lambda h: h["outbox"]["depth"] == 0)
    pf.assert_no_violations()
    assert_clean_log(svc)


@pytest.mark.parametrize("failure", [500, "close", "garbage", "hang"])
def test_planfix_failing_then_recovering(service, fs, pf, traces_dir, failure):
    pf.failure = failure
    svc = service(FAST)
    wait_connected(svc, fs)
    wanted = replay_calls(fs, traces_dir, CALLS)
    total = sum(len(forms) for forms in wanted.values())
    time.sleep(OUTAGE_S)
    health = svc.health()
    assert health["outbox"]["depth"] == total, health  # all stored, none given up
    assert health["outbox"]["last_error"], health
    assert not pf.delivered
    attempts = len(pf.requests)
    assert attempts >= len(wanted)  # retried (one call's head at a time: order is kept)
    pf.failure = None
    assert_all_delivered(svc, pf, wanted)
    # Only heads of calls were tried while PlanFix failed: a later event of a
    # call never overtook an earlier one that had not been answered 200.
    for callid, forms in wanted.items():
        tried = [f for f in pf.requests if f.get("callid") == callid]
        firsts = []
        for form in tried:
            form = {k: v for k, v in form.items() if k != "planfix_token"}
            if form not in firsts:
                firsts.append(form)
        assert firsts == forms, callid


def test_planfix_slow(service, fs, pf, traces_dir):
    """Answers take 0.1 s (read timeout 2 s): slow, not failing; nothing is repeated."""
    pf.delay = 0.1
    svc = service({"planfix": {"read_timeout": "2"}})
    wait_connected(svc, fs)
    wanted = replay_calls(fs, traces_dir, CALLS)
    assert_all_delivered(svc, pf, wanted)
    assert len(pf.requests) == sum(len(forms) for forms in wanted.values())
    assert pf.max_in_flight > 1  # different calls were delivered side by side


def test_planfix_unreachable_until_setup(service, fs, pf, traces_dir):
    """Connection refused (nothing listens on the configured address) until
    PlanFix's `setup` points the service at the working one."""
    dead = f"http://127.0.0.1:{free_port()}/tel/api"
    svc = service({**FAST, "planfix": {**FAST["planfix"], "url": dead}})
    wait_connected(svc, fs)
    wanted = replay_calls(fs, traces_dir, CALLS)
    time.sleep(OUTAGE_S)
    health = svc.health()
    assert health["outbox"]["depth"] == sum(len(forms) for forms in wanted.values())
    assert health["outbox"]["last_error"], health
    response = svc.post(cmd="setup", token=svc.token, planfix_url=pf.url, planfix_token=pf.token)
    assert response.status_code == 200, response.text
    assert_all_delivered(svc, pf, wanted)


def test_planfix_flapping(service, fs, pf, traces_dir):
    """Every other request fails, each time in another way."""
    modes = iter([500, None, "close", None, "garbage", None] * 1000)
    pf.decide = lambda form: next(modes) or "ok"
    svc = service(FAST)
    wait_connected(svc, fs)
    wanted = replay_calls(fs, traces_dir, CALLS)
    assert_all_delivered(svc, pf, wanted, timeout=20)
