"""Calls across a restart of fsbridge and across a reconnect to FreeSWITCH.

On every connect the service reads ``show channels as json`` and takes up
the live calls it does not track (tracker.adopt): a call that was talking
when fsbridge was killed, or one that began while the ESL connection was
down.  From then on FreeSWITCH's own events carry the call to its end, so
PlanFix gets exactly the events it would have got without the gap (an
INCOMING/ACCEPTED already delivered by the killed process may come twice;
``delivered_for`` drops such duplicates, and ``duplicates`` bounds them).

The listing the fake answers is capture 90's (one answered inbound call to
101) with its two channel UUIDs swapped for the replayed call's.
"""

from __future__ import annotations

import json
import re

from fsbridge.fakes.freeswitch import active_call_bodies, events_of
from tests.faults.calls import expected_with_callid, fresh_call
from tests.faults.conftest import (
    assert_clean_log, delivered_for, duplicates, expected_fields, wait_all_delivered, wait_connected,
)

TRACE = "01-inbound-single-answer"
# The legs of the call capture 90 lists.
LISTED_A = b"cf9e6d82-e4af-4a4a-adbb-4d63e4ae5566"
LISTED_B = b"0d4ec6ad-3849-475a-a21d-65d2ab06ffb0"


def split_at_first_hangup(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    names = [events_of(f)[0].name for f in frames]
    cut = names.index("CHANNEL_HANGUP_COMPLETE")
    return frames[:cut], frames[cut:]


def b_leg_uuid(frames: list[bytes]) -> bytes:
    for frame in frames:
        body = events_of(frame)[0].body
        if b"Event-Name: CHANNEL_CREATE\n" in body and b"\nCall-Direction: outbound\n" in body:
            return re.search(rb"\nUnique-ID: ([0-9a-f-]{36})\n", body).group(1)
    raise AssertionError("no B leg in the capture")


def listing_for(callid: str, frames: list[bytes]) -> bytes:
    """`show channels as json` while the call talks: capture 90 with our UUIDs."""
    body = active_call_bodies()["show channels as json"]
    return body.replace(LISTED_A, callid.encode()).replace(LISTED_B, b_leg_uuid(frames))


def test_sigkill_mid_call_then_the_call_ends_after_the_restart(service, fs, pf, traces_dir, tmp_path):
    svc = service(workdir=tmp_path / "svc")
    wait_connected(svc, fs)
    callid, frames = fresh_call(traces_dir, TRACE)
    talking, ending = split_at_first_hangup(frames)
    wanted = expected_with_callid(expected_fields(TRACE), callid)
    assert fs.replay(talking).wait(10)
    assert fs.wait_until(lambda: delivered_for(pf, callid) == wanted[:2], 10)  # INCOMING, ACCEPTED
    # Delivered rows are deleted in batches (50 ms): a kill inside that window
    # re-sends them, which is the outbox's own at-least-once, not this test's.
    svc.wait_health(lambda h: h["outbox"]["depth"] == 0)
    svc.kill()

    fs.set_api("show channels as json", listing_for(callid, frames))
    again = service(workdir=tmp_path / "svc")  # same storage: it inherits the open call
    wait_connected(again, fs, subscriptions=2)
    again.wait_health(lambda h: h["open_calls"] == 1)
    assert fs.replay(ending).wait(10)
    # The real end: Success with the leg's billsec, not a blind close with duration 0.
    wait_all_delivered(again, pf, {callid: wanted})
    assert duplicates(pf) <= 2
    again.wait_health(lambda h: h["open_calls"] == 0 and h["open_calls_from_before_restart"] == 0)
    pf.assert_no_violations()
    assert_clean_log(again)


def test_a_call_that_starts_while_disconnected_is_reported(service, fs, pf, traces_dir, tmp_path):
    svc = service(workdir=tmp_path / "svc")
    wait_connected(svc, fs)
    callid, frames = fresh_call(traces_dir, TRACE)
    _, ending = split_at_first_hangup(frames)
    fs.stop()
    svc.wait_health(lambda h: h["freeswitch"]["state"] != "connected")
    # Meanwhile the call rang and 101 answered: only the listing knows.
    fs.set_api("show channels as json", listing_for(callid, frames))
    fs.start()
    wait_connected(svc, fs, subscriptions=2)
    wanted = expected_with_callid(expected_fields(TRACE), callid)
    assert fs.wait_until(lambda: delivered_for(pf, callid) == wanted[:2], 10), svc.log()[-3000:]
    assert fs.replay(ending).wait(10)
    wait_all_delivered(svc, pf, {callid: wanted})
    assert duplicates(pf) == 0
    pf.assert_no_violations()
    assert_clean_log(svc)


def header_of(frame: bytes, name: bytes) -> bytes:
    return re.search(rb"\n" + name + rb": ([^\n]*)\n", b"\n" + events_of(frame)[0].body).group(1)


def test_an_adopted_call_the_caller_ends_first_counts_the_talk_from_the_answer(service, fs, pf, traces_dir, tmp_path):
    """The listing has no answer time: the service asks uuid_dump for it, so a
    call taken up mid-talk whose caller hangs up before the talker's own end
    (its billsec) arrives is still reported with its real talk time."""
    svc = service(workdir=tmp_path / "svc")
    wait_connected(svc, fs)
    callid, frames = fresh_call(traces_dir, TRACE)
    _, ending = split_at_first_hangup(frames)
    b_leg = b_leg_uuid(frames)
    b_end = next(f for f in ending if header_of(f, b"Unique-ID") == b_leg
                 and header_of(f, b"Event-Name") == b"CHANNEL_HANGUP_COMPLETE")
    answered = int(header_of(b_end, b"Caller-Channel-Answered-Time"))
    a_ends = [f for f in ending if header_of(f, b"Unique-ID") == callid.encode()]
    a_hangup = int(header_of(a_ends[0], b"Caller-Channel-Hangup-Time"))
    caller_first = a_ends + [f for f in ending if f not in a_ends]
    fs.stop()
    svc.wait_health(lambda h: h["freeswitch"]["state"] != "connected")
    fs.set_api("show channels as json", listing_for(callid, frames))
    fs.set_api(f"uuid_dump {b_leg.decode()} json",
               json.dumps({"Unique-ID": b_leg.decode(), "Caller-Channel-Answered-Time": str(answered)}))
    fs.start()
    wait_connected(svc, fs, subscriptions=2)
    wanted = expected_with_callid(expected_fields(TRACE), callid)
    assert fs.wait_until(lambda: delivered_for(pf, callid) == wanted[:2], 10), svc.log()[-3000:]
    assert f"api uuid_dump {b_leg.decode()} json" in fs.commands
    assert fs.replay(caller_first).wait(10)
    assert fs.wait_until(lambda: len(delivered_for(pf, callid)) == 3, 10)
    completed = delivered_for(pf, callid)[2]
    assert completed["event"] == "COMPLETED" and completed["status"] == wanted[2]["status"]
    assert int(completed["duration"]) == (a_hangup - answered) // 1_000_000
    assert abs(int(completed["duration"]) - int(wanted[2]["duration"])) <= 1
    pf.assert_no_violations()
    assert_clean_log(svc)
