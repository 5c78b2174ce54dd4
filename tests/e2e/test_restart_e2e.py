"""A call in progress when the service is killed still gets its COMPLETED."""

from __future__ import annotations

from fsbridge.opencalls import OpenCalls
from fsbridge.tracker import PlanfixCommand
from fsbridge.fakes.freeswitch import FakeFreeSwitch, trace_events
from fsbridge.fakes.planfix import FakePlanfix
from tests.service_proc import ServiceProcess
from tests.test_tracker_traces import A01, incoming


def test_call_open_at_sigkill_is_completed_after_restart(tmp_path, traces_dir):
    events = trace_events(traces_dir / "01-inbound-single-answer.plain.txt")
    bridge = next(i for i, e in enumerate(events) if e.name == "CHANNEL_BRIDGE")
    with FakePlanfix() as planfix, FakeFreeSwitch() as fs:
        service = ServiceProcess(tmp_path, fs_port=fs.port, planfix_url=planfix.url,
                                 planfix_token=planfix.token).start()
        try:
            service.wait_health(lambda h: h["freeswitch"]["state"] == "connected")
            fs.replay(events[: bridge + 1]).wait(5)  # ringing, then answered ...
            planfix.wait_for(2, timeout=10, delivered=True)
            # both answered and removed from the outbox (a kill between PlanFix's
            # 200 and that removal may resend one request: see outbox.py)
            service.wait_health(lambda h: h["outbox"]["depth"] == 0)
            service.kill()  # ... and the service dies mid-call; the call ends meanwhile
            service.start()  # FreeSWITCH's channel list (idle) says the call is gone
            got = planfix.wait_for(3, timeout=10, delivered=True)
            assert [dict(r, planfix_token=None) for r in got] == [
                dict(incoming(A01, "101", "INCOMING"), planfix_token=None),
                dict(incoming(A01, "101", "ACCEPTED"), planfix_token=None),
                dict(incoming(A01, "101", "COMPLETED", duration="0", is_recorded="0", status="Success"),
                     planfix_token=None),
            ]
            assert any(c.startswith("api show channels as json") for c in fs.commands)
            service.wait_health(lambda h: h["open_calls_from_before_restart"] == 0)
            planfix.assert_no_violations()
        finally:
            service.stop()


def test_open_calls_registry(tmp_path):
    path = str(tmp_path / "open.sqlite3")
    registry = OpenCalls(path)
    start = {"cmd": "event", "type": "in", "event": "INCOMING", "phone": "7", "diversion": "", "ext": "101",
             "callid": "a"}
    registry.record([PlanfixCommand("a", start), PlanfixCommand("a", dict(start, ext="102")),
                     PlanfixCommand("b", dict(start, callid="b", type="out", event="OUTGOING")),
                     PlanfixCommand("a", dict(start, event="ACCEPTED"))])
    registry.record([PlanfixCommand("a", dict(start, ext="102", event="COMPLETED"))])
    registry.close()
    again = OpenCalls(path)
    assert set(again.inherited) == {"a", "b"}
    assert again.close_inherited({"a"}) == [
        ("b", {"cmd": "event", "type": "out", "phone": "7", "diversion": "", "ext": "101", "callid": "b",
               "event": "COMPLETED", "duration": "0", "is_recorded": "0", "status": "NoAnswer"})]
    closed = again.close_inherited(set())
    assert [(c, f["ext"], f["status"]) for c, f in closed] == [("a", "101", "Success")]
    assert again.inherited == {}
