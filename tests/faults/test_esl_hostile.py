"""Hostile ESL content through the real service: it keeps running and the
other calls are reported exactly as the tracker's expectations say."""

from __future__ import annotations

import uuid

import pytest

from fsbridge.core.wire import MAX_HEADER_BYTES
from fsbridge.fakes.freeswitch import event_frame, events_of
from tests.faults.calls import caller_subs, expected_with_callid, fresh_call
from tests.faults.conftest import (
    assert_clean_log, delivered_for, expected_fields, wait_connected, without_token,
)

# Raw header values as they would appear on the wire (FreeSWITCH percent-encodes).
HOSTILE_VALUES = {
    "encoded newline": b"7910%0AEvent-Name%3A%20CHANNEL_HANGUP_COMPLETE%0AUnique-ID%3A%20x",
    "encoded CRLF and nul": b"79101234567%0D%0A%00%00evil",
    "raw nul": b"79101\x00234567",
    "invalid utf-8 (encoded)": b"7910%FF%FE%C3%28",
    "invalid utf-8 (raw)": b"7910\xff\xfe\xc3\x28123",
    "10 kB value": b"7" * 10240,
    "10 kB encoded junk": b"%0A%00%FF" * 3414,
    "percent at end": b"79101234567%",
    "broken escape": b"%G1%%%zz",
}


def run_calls(fs, pf, frames_by_call: list[list[bytes]]) -> None:
    for frames in frames_by_call:
        assert fs.replay(frames).wait(10)


def completed_once_per_leg(forms: list[dict[str, str]]) -> bool:
    started = {(f["ext"]) for f in forms if f["event"] in ("INCOMING", "OUTGOING")}
    done = [f["ext"] for f in forms if f["event"] == "COMPLETED"]
    return bool(started) and sorted(done) == sorted(started)


def test_hostile_caller_values_then_a_normal_call(service, fs, pf, traces_dir):
    svc = service()
    wait_connected(svc, fs)
    hostile = {name: fresh_call(traces_dir, "01-inbound-single-answer", caller_subs(value))
               for name, value in HOSTILE_VALUES.items()}
    run_calls(fs, pf, [frames for _, frames in hostile.values()])
    # Afterwards an ordinary call (with its own UUIDs) must come out exactly.
    callid, frames = fresh_call(traces_dir, "02-inbound-ring-group")
    run_calls(fs, pf, [frames])
    want = expected_with_callid(expected_fields("02-inbound-ring-group"), callid)
    fs.wait_until(lambda: delivered_for(pf, callid) == want, 10)
    assert delivered_for(pf, callid) == want

    # Every hostile call was still reported as a whole call (never half),
    # with values PlanFix accepts: the fake checks each request against the spec.
    for name, (hostile_callid, _) in hostile.items():
        assert fs.wait_until(lambda: completed_once_per_leg(delivered_for(pf, hostile_callid)), 5), (
            name, delivered_for(pf, hostile_callid))
        for form in delivered_for(pf, hostile_callid):
            assert "\n" not in form["phone"] and "\x00" not in form["phone"], (name, form)
            assert len(form["phone"]) <= 10240
    pf.assert_no_violations()
    health = svc.health()
    assert health["freeswitch"]["state"] == "connected" and health["open_calls"] == 0
    # Well-framed hostile values are data, not a protocol error: the same connection carried on.
    assert (fs.accepted, fs.subscribed) == (1, 1)
    assert_clean_log(svc)


def unknown_channel_events(traces_dir) -> list[bytes]:
    """Hang-ups, bridges and record stops of channels the service never saw created."""
    _, frames = fresh_call(traces_dir, "01-inbound-single-answer")

    return [f for f in frames for ev in events_of(f) if ev.name != "CHANNEL_CREATE"]


def test_events_for_unknown_channels_are_ignored(service, fs, pf, traces_dir):
    svc = service()
    wait_connected(svc, fs)
    run_calls(fs, pf, [unknown_channel_events(traces_dir)])
    run_calls(fs, pf, [fresh_call(traces_dir, "05b-outbound-busy-486")[1]])
    callid, frames = fresh_call(traces_dir, "05a-outbound-answer")
    run_calls(fs, pf, [frames])
    want = expected_with_callid(expected_fields("05a-outbound-answer"), callid)
    assert fs.wait_until(lambda: delivered_for(pf, callid) == want, 10), delivered_for(pf, callid)
    # Only the two real calls reached PlanFix: nothing for the unknown channels.
    assert len({without_token(f)["callid"] for f in pf.delivered}) == 2
    pf.assert_no_violations()
    assert svc.health()["open_calls"] == 0
    assert_clean_log(svc)


def header_block_without_end() -> bytes:
    return b"Content-Type: text/event-plain\nX: " + b"y" * (MAX_HEADER_BYTES + 1024)


@pytest.mark.parametrize("broken", [
    # A frame cut off in the middle, then the connection closes.
    pytest.param("truncated", id="truncated-frame"),
    # Content-Length says less than the body: the rest is read as a header block.
    pytest.param("short-length", id="content-length-too-short"),
    # Content-Length says more: the next frames are swallowed as its body.
    pytest.param("long-length", id="content-length-too-long"),
    pytest.param("bad-length", id="content-length-not-a-number"),
    pytest.param("no-end", id="header-block-without-end"),
])
def test_broken_frames_then_a_call_is_reported(service, fs, pf, traces_dir, broken):
    svc = service()
    wait_connected(svc, fs)
    body = event_frame({"Event-Name": "CHANNEL_CREATE", "Unique-ID": str(uuid.uuid4())})
    inner = body.split(b"\n\n", 1)[1]
    if broken == "truncated":
        fs.inject(body[: len(body) // 2])
        fs.drop()
    elif broken == "short-length":
        fs.inject(b"Content-Length: 10\nContent-Type: text/event-plain\n\n" + inner)
    elif broken == "long-length":
        fs.inject(b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % (len(inner) + 5000) + inner)
    elif broken == "bad-length":
        fs.inject(b"Content-Length: 12x\nContent-Type: text/event-plain\n\n" + inner)
    else:
        fs.inject(header_block_without_end())
    if broken in ("truncated", "bad-length", "no-end"):
        # The stream cannot be framed any more (or is gone): the service drops
        # it, says why, and logs in again.
        assert fs.wait_until(lambda: fs.subscribed >= 2, 10), svc.log()[-3000:]
    elif broken == "long-length":
        # The lying frame swallows what follows as its body; pad it out so the
        # stream is in step again (a frame the service cannot use is skipped).
        fs.inject(b"\n" * 5000)
    # short-length: the body's tail is read as a frame without a type: skipped.
    wait_connected(svc, fs, subscriptions=fs.subscribed)
    callid, frames = fresh_call(traces_dir, "03-inbound-hunt-sequential")
    run_calls(fs, pf, [frames])
    want = expected_with_callid(expected_fields("03-inbound-hunt-sequential"), callid)
    assert fs.wait_until(lambda: delivered_for(pf, callid) == want, 10), (delivered_for(pf, callid), svc.log()[-3000:])
    pf.assert_no_violations()
    assert svc.proc.poll() is None
    assert_clean_log(svc)
