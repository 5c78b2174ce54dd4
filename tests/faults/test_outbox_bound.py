"""Issue 14, point 6: the outbox bound while PlanFix is down.

With [outbox] max_depth = 100 and PlanFix failing, 40 calls (over 100
requests) are replayed: the service raises one ERROR, /healthz says
degraded/outbox_full, makeCall gets 503; no call record is lost: once
PlanFix answers again every call is delivered in order and makeCall works.
"""

from __future__ import annotations

from tests.faults.conftest import replay_calls, wait_all_delivered, wait_connected
from tests.faults.rawhttp import request


def test_outbox_at_its_bound_alerts_refuses_click_to_call_and_loses_nothing(service, fs, pf, traces_dir):
    svc = service(settings={"outbox": {"max_depth": "100", "min_backoff": "0.2", "max_backoff": "0.5"}})
    wait_connected(svc, fs)
    pf.fail_next(1_000_000, 503)
    wanted = replay_calls(fs, traces_dir, ["01-inbound-single-answer"] * 40)
    health = svc.wait_health(lambda h: h["outbox"]["depth"] >= 100)
    health = svc.health()
    assert health["outbox_full"] is True and health["status"] == "degraded"
    call = f"cmd=makeCall&token={svc.token}&from=101&to=79101234567".encode()
    refused = request(svc.port, "POST", "/planfix", call)
    assert refused.status == 503 and "full" in refused.json()["detail"]
    assert svc.log().count("[outbox] max_depth 100") == 1

    with pf._cond:  # PlanFix is back
        pf._script.clear()
    wait_all_delivered(svc, pf, wanted, timeout=30)
    svc.wait_health(lambda h: not h["outbox_full"])
    assert request(svc.port, "POST", "/planfix", call).status == 200
