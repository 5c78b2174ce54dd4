"""FreeSWITCH faults against the real service: the ESL connection dropped
mid-call (with and without a disconnect notice), FreeSWITCH restarted with a
new Core-UUID, a FreeSWITCH that accepts but never answers.  The service
reconnects, asks `show channels as json` (the fake answers trace 91's idle
reply), and every call that was open gets its COMPLETED."""

from __future__ import annotations

import collections
import time

import pytest

from fsbridge.fakes.freeswitch import events_of
from tests.faults.calls import expected_with_callid, fresh_call
from tests.faults.conftest import assert_clean_log, delivered_for, expected_fields, wait_connected, without_token

# Cut each call before its first hang-up: the legs are up (ringing or talking).
MID_CALL = ["01-inbound-single-answer", "02-inbound-ring-group", "05a-outbound-answer"]


def first_half(frames: list[bytes]) -> list[bytes]:
    names = [events_of(f)[0].name for f in frames]
    return frames[: names.index("CHANNEL_HANGUP_COMPLETE")]


def open_calls(svc, fs, pf, traces_dir) -> dict[str, list[dict[str, str]]]:
    """Start the MID_CALL calls, wait until PlanFix has what was said so far; callid -> forms."""
    calls = {}
    for trace in MID_CALL:
        callid, frames = fresh_call(traces_dir, trace)
        assert fs.replay(first_half(frames)).wait(10)
        calls[callid] = trace
    svc.wait_health(lambda h: h["open_calls"] == len(MID_CALL))
    for callid, trace in calls.items():
        first = expected_with_callid(expected_fields(trace), callid)[0]
        assert fs.wait_until(lambda: first in delivered_for(pf, callid), 10)
    return calls


def assert_every_leg_completed(pf, calls: dict[str, str], timeout: float = 10.0) -> None:
    """Each (call, ext) that was started got exactly one COMPLETED, after its start and ACCEPTED."""

    def settled() -> bool:
        for callid in calls:
            forms = delivered_for(pf, callid)
            started = collections.Counter(f["ext"] for f in forms if f["event"] in ("INCOMING", "OUTGOING"))
            done = collections.Counter(f["ext"] for f in forms if f["event"] == "COMPLETED")
            if not started or started != done:
                return False
        return True

    deadline = time.monotonic() + timeout
    while not settled():
        assert time.monotonic() < deadline, {c: delivered_for(pf, c) for c in calls}
        time.sleep(0.02)
    for callid in calls:
        forms = delivered_for(pf, callid)
        for ext in {f["ext"] for f in forms}:
            events = [f["event"] for f in forms if f["ext"] == ext]
            assert events[-1] == "COMPLETED" and events.count("COMPLETED") == 1, (callid, ext, events)
    pf.assert_no_violations()


def check_recovered(svc, fs, pf, traces_dir) -> None:
    """After the fault, a new call is reported exactly."""
    callid, frames = fresh_call(traces_dir, "05b-outbound-busy-486")
    assert fs.replay(frames).wait(10)
    want = expected_with_callid(expected_fields("05b-outbound-busy-486"), callid)
    assert fs.wait_until(lambda: delivered_for(pf, callid) == want, 10), delivered_for(pf, callid)
    health = svc.health()
    assert health["open_calls"] == 0 and health["freeswitch"]["state"] == "connected"
    assert_clean_log(svc)


@pytest.mark.parametrize("fault", ["drop", "reset", "disconnect-notice", "restart-new-core-uuid"])
def test_connection_lost_mid_call(service, fs, pf, traces_dir, fault):
    svc = service()
    wait_connected(svc, fs)
    calls = open_calls(svc, fs, pf, traces_dir)
    old_core = fs.core_uuid
    if fault == "drop":
        fs.drop()
    elif fault == "reset":
        fs.drop(reset=True)
    elif fault == "disconnect-notice":
        fs.disconnect()
    else:
        fs.restart(down_for=0.5)
        assert fs.core_uuid != old_core
    assert fs.wait_until(lambda: fs.subscribed >= 2, 10), svc.log()[-3000:]
    assert_every_leg_completed(pf, calls)
    assert fs.wait_until(lambda: "api show channels as json" in fs.commands, 5)
    health = svc.wait_health(lambda h: h["freeswitch"].get("core_uuid") == fs.core_uuid)
    assert health["open_calls"] == 0
    assert "reconcile: 3 calls ended while" in svc.log()
    check_recovered(svc, fs, pf, traces_dir)


def test_silent_freeswitch(service, fs, pf, traces_dir):
    """Accepts the TCP connection, then never says a word: not on the open
    connection (idle timeout), not even a greeting on new ones."""
    svc = service({"freeswitch": {"idle_timeout": "1", "connect_timeout": "0.3", "command_timeout": "0.5",
                                  "max_backoff": "0.2"}})
    wait_connected(svc, fs)
    calls = open_calls(svc, fs, pf, traces_dir)
    fs.silent = True
    accepted = fs.accepted
    # The service gives up on the silent connection and tries new ones, which stay silent too.
    assert fs.wait_until(lambda: fs.accepted >= accepted + 2, 15), svc.log()[-3000:]
    health = svc.wait_health(lambda h: h["freeswitch"]["state"] != "connected")
    assert health["status"] == "degraded"
    assert health["open_calls"] == len(MID_CALL)  # not closed on a guess while FreeSWITCH is unreachable
    fs.silent = False
    fs.drop()  # the silent connections are closed; the next one gets the greeting
    assert_every_leg_completed(pf, calls, timeout=15)
    check_recovered(svc, fs, pf, traces_dir)


def test_reconcile_keeps_calls_that_are_still_up(service, fs, pf, traces_dir):
    """A reconnect while FreeSWITCH still carries the call: no premature COMPLETED."""
    svc = service()
    wait_connected(svc, fs)
    callid, frames = fresh_call(traces_dir, "01-inbound-single-answer")
    names = [events_of(f)[0].name for f in frames]
    cut = names.index("CHANNEL_HANGUP_COMPLETE")
    assert fs.replay(frames[:cut]).wait(10)
    svc.wait_health(lambda h: h["open_calls"] == 1)
    legs = sorted({line.split(b": ")[1].decode() for f in frames[:cut]
                   for line in f.split(b"\n") if line.startswith(b"Unique-ID: ")})
    fs.set_api("show channels as json", '{"row_count":%d,"rows":[%s]}' % (
        len(legs), ",".join('{"uuid":"%s","call_uuid":"%s"}' % (leg, callid) for leg in legs)))
    fs.drop()
    assert fs.wait_until(lambda: fs.subscribed >= 2, 10)
    assert fs.wait_until(lambda: "api show channels as json" in fs.commands, 5)
    time.sleep(0.3)
    assert svc.health()["open_calls"] == 1
    assert not [f for f in delivered_for(pf, callid) if f["event"] == "COMPLETED"]
    # The rest of the call arrives on the new connection and completes it normally.
    assert fs.replay(frames[cut:]).wait(10)
    want = expected_with_callid(expected_fields("01-inbound-single-answer"), callid)
    assert fs.wait_until(lambda: delivered_for(pf, callid) == want, 10), delivered_for(pf, callid)
    assert not [f for f in pf.delivered if without_token(f)["callid"] != callid]
    assert_clean_log(svc)
