"""Every real call capture through events.py + tracker.py: the exact PlanFix commands.

Only the events in SUBSCRIBED_EVENTS are fed, as the fake FreeSWITCH (and a
real one subscribed with that list) delivers them.
"""

from __future__ import annotations

import collections
from urllib.parse import quote

import pytest

from fsbridge.core.events import SUBSCRIBED_EVENTS, WANT_CALL, WANT_LEG, WANT_NOTHING, ChannelEvent, channel_event
from fsbridge.core.tracker import CallTracker, PlanfixCommand, TrackerSettings
from fsbridge.core.wire import EventHeaders
from tests.traces import channel_events, encode_frame, event_frames, frames_of, read_trace, rewrite_click_to_call

CALLER = "79101234567"
DID = "74950000000"
RECORDINGS = "/usr/local/freeswitch/recordings/"

MANAGER_UUID = "0f3c5a8e-7d1b-4c2a-9e6f-1b2c3d4e5f60"
JOB_UUID = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
REQUEST_ID = "mc-42"


def cmd(type_: str, event: str, ext: str, callid: str, phone: str, diversion: str, **completed: str) -> dict:
    fields = {
        "cmd": "event", "type": type_, "event": event, "phone": phone,
        "diversion": diversion, "ext": ext, "callid": callid,
    }
    fields.update(completed)
    return fields


def completed(status: str, duration: int = 0, is_recorded: int = 0) -> dict:
    return {"duration": str(duration), "is_recorded": str(is_recorded), "status": status}


def incoming(callid: str, ext: str, event: str, **extra: str) -> dict:
    return cmd("in", event, ext, callid, CALLER, DID, **extra)


def outgoing(callid: str, event: str, diversion: str = DID, **extra: str) -> dict:
    return cmd("out", event, "101", callid, CALLER, diversion, **extra)


def replay(raw: bytes) -> tuple[list[PlanfixCommand], CallTracker]:
    tracker = CallTracker()
    commands: list[PlanfixCommand] = []
    for event in channel_events(raw):
        commands += tracker.feed(event)
    return commands, tracker


def click_to_call_capture(traces_dir, name: str) -> bytes:
    return rewrite_click_to_call(
        read_trace(traces_dir / f"{name}.plain.txt"),
        manager_uuid=MANAGER_UUID, job_uuid=JOB_UUID, request_id=REQUEST_ID, ext="101", phone=CALLER,
    )


def capture(traces_dir, name: str) -> bytes:
    """A call capture; click-to-call ones as our own originate would have produced them."""
    if name.startswith("06"):
        return click_to_call_capture(traces_dir, name)
    return read_trace(traces_dir / f"{name}.plain.txt")


A01 = "e84e4329-8051-40a2-9c6c-a3d6cf741ee9"
A02 = "fbb99a11-5242-4ac6-8ab4-c62a2873bdba"
A03 = "5f890f50-37df-4503-b627-73bd40e2dcfd"
A04A = "b6170806-2436-4e2e-a469-59b456b6a71e"
A04B = "9ac487dd-b83d-40e1-89e0-b8e874e63809"
A05A = "c85e65ca-d501-4082-99f0-bb3f26a04d64"
A05B = "ba703b56-4ce0-43d1-9549-15f98c104e23"
A05C = "5cc7d0c0-20d2-4e9e-9768-7f33cfb79fbe"
A05E = "0d7a8756-497a-40e5-9526-5faec52e20fa"
A05F = "352459e6-2a36-4f29-8a40-c1789aaf8e25"
M = MANAGER_UUID
A20 = "65fea2c9-2ef6-4bd6-89c8-1743322443a1"
A21 = "b1c544df-b3e9-4c64-8543-e978ae7e084d"
A22 = "0141140c-2718-4988-b42d-8faf7af49e95"
A23 = "c06ece27-6211-492b-ba97-3271169b2ef0"
A25 = "9b0f9a5f-4579-4317-9812-343545fe8c23"
A27 = "5264cb9b-0ab5-4590-b481-e9c69a228883"
A28 = "b527f2c2-75d9-4d73-8df6-4dd1b6a85696"
A29 = "987739d9-5dd8-43a2-b546-b313a57f50ce"
A30 = "d4893db2-6310-43a0-8981-b545346b14d9"
A31 = "46c09194-7930-4b31-ae04-99694bae1146"
# Captures 40-49: recorded by tests/live (FSBRIDGE_LIVE_CAPTURE) in its private
# lab, whose FreeSWITCH records into the lab's temp dir.
LAB_RECORDINGS = "/tmp/fsbridge-live-bzwszar6/fs/recordings/"
A40 = "9c1ae6ed-8ac5-4efe-95ac-441419f2835c"
A41 = "04729cb1-ca09-4df8-9ca0-c3d101f372b6"
A42 = "ebb2ba12-9a85-4798-8b04-8168ce8f7ab7"
A43 = "ee5ce434-94d1-47ce-bc96-33d5aa4a2554"
A44 = "d80cbd2c-b053-4d54-bb9b-8aa6ca6ead28"
A45 = "a2d007d8-03e9-4e4b-9cef-30f1304c3fbb"
A46 = "895daf65-f71c-451c-9c42-6438d4c0ceb8"
A47 = "472bca86-9c2f-443e-8abd-aab4f4963eda"
A48 = "d7b0506c-2799-4718-add2-95ebe277130b"
A49 = "727d2b99-c347-4e0e-a679-cc1118e15b68"  # the first caller; the second:
A49B = "db26e26c-3470-4618-a262-7c2afb2f6841"


# The 2x captures ran fsbridge's dialplan, which sets planfix_data_line (the
# DID) on the A leg; it reaches the COMPLETED sent after the tracker saw it.
LINE = {"data_line": DID}


def queued(callid: str, ext: str, event: str, caller: str, did: str, **extra: str) -> dict:
    return cmd("in", event, ext, callid, caller, did, **extra)


def one_agent(callid: str, ext: str, caller: str, did: str, talk_s: int = 2) -> list:
    """A queue that offers the call to one agent, who answers and talks (2 s by his phone; billsec)."""
    return [
        (queued(callid, ext, "INCOMING", caller, did), None),
        (queued(callid, ext, "ACCEPTED", caller, did), None),
        (queued(callid, ext, "COMPLETED", caller, did, **completed("Success", talk_s, 1)), RECORDINGS + callid + ".wav"),
    ]


def lab_call(callid: str, caller: str, did: str, steps: list[tuple], data: dict | None = None) -> list:
    """An inbound call of a lab capture: (ext, event[, status, duration]) per command.

    Every COMPLETED carries the call's data_* fields; Success the recording."""
    out = []
    for ext, event, *end in steps:
        if not end:
            out.append((cmd("in", event, ext, callid, caller, did), None))
            continue
        status, duration = (end + [0])[:2]
        success = status == "Success"
        out.append((cmd("in", event, ext, callid, caller, did, **completed(status, duration, int(success)),
                        **(data or {})), LAB_RECORDINGS + callid + ".wav" if success else None))
    return out


def transferred(callid: str, first_s: int, second_s: int) -> list:
    """101 answers and hands the caller to 102: two parts, one callid.

    101's COMPLETED goes out when his part ends (before 102 rings); the
    recording covers the whole call and goes with the last talker."""
    return [
        (incoming(callid, "101", "INCOMING"), None),
        (incoming(callid, "101", "ACCEPTED"), None),
        (incoming(callid, "101", "COMPLETED", **completed("Success", first_s, 0), **LINE), None),
        (incoming(callid, "102", "INCOMING"), None),
        (incoming(callid, "102", "ACCEPTED"), None),
        (incoming(callid, "102", "COMPLETED", **completed("Success", second_s, 1), **LINE),
         RECORDINGS + callid + ".wav"),
    ]

# trace -> [(fields, recording_path)], in the order they must leave.
EXPECTED = {
    "01-inbound-single-answer": [
        (incoming(A01, "101", "INCOMING"), None),
        (incoming(A01, "101", "ACCEPTED"), None),
        (incoming(A01, "101", "COMPLETED", **completed("Success", 3, 1)), RECORDINGS + A01 + ".wav"),
    ],
    "02-inbound-ring-group": [
        (incoming(A02, "101", "INCOMING"), None),
        (incoming(A02, "102", "INCOMING"), None),
        (incoming(A02, "103", "INCOMING"), None),
        (incoming(A02, "102", "ACCEPTED"), None),
        (incoming(A02, "101", "COMPLETED", **completed("Cancelled")), None),
        (incoming(A02, "103", "COMPLETED", **completed("Cancelled")), None),
        (incoming(A02, "102", "COMPLETED", **completed("Success", 2, 1)), RECORDINGS + A02 + ".wav"),
    ],
    "03-inbound-hunt-sequential": [
        (incoming(A03, "101", "INCOMING"), None),
        (incoming(A03, "101", "COMPLETED", **completed("Cancelled")), None),
        (incoming(A03, "102", "INCOMING"), None),
        (incoming(A03, "102", "COMPLETED", **completed("Cancelled")), None),
        (incoming(A03, "103", "INCOMING"), None),
        (incoming(A03, "103", "ACCEPTED"), None),
        (incoming(A03, "103", "COMPLETED", **completed("Success", 3, 1)), RECORDINGS + A03 + ".wav"),
    ],
    "04a-inbound-missed-caller-cancel": [
        (incoming(A04A, "101", "INCOMING"), None),
        (incoming(A04A, "102", "INCOMING"), None),
        (incoming(A04A, "103", "INCOMING"), None),
        (incoming(A04A, "101", "COMPLETED", **completed("Missed")), None),
        (incoming(A04A, "102", "COMPLETED", **completed("Missed")), None),
        (incoming(A04A, "103", "COMPLETED", **completed("Missed")), None),
    ],
    # FreeSWITCH created the legs 101, 103, 102 (CHANNEL_CREATE order).
    "04b-inbound-missed-timeout": [
        (incoming(A04B, "101", "INCOMING"), None),
        (incoming(A04B, "103", "INCOMING"), None),
        (incoming(A04B, "102", "INCOMING"), None),
        (incoming(A04B, "101", "COMPLETED", **completed("Missed")), None),
        (incoming(A04B, "103", "COMPLETED", **completed("Missed")), None),
        (incoming(A04B, "102", "COMPLETED", **completed("Missed")), None),
    ],
    "05a-outbound-answer": [
        (outgoing(A05A, "OUTGOING"), None),
        (outgoing(A05A, "ACCEPTED"), None),
        (outgoing(A05A, "COMPLETED", **completed("Success", 3, 1)), RECORDINGS + A05A + ".wav"),
    ],
    "05b-outbound-busy-486": [
        (outgoing(A05B, "OUTGOING"), None),
        (outgoing(A05B, "COMPLETED", **completed("Busy")), None),
    ],
    "05c-outbound-notfound-404": [
        (outgoing(A05C, "OUTGOING"), None),
        (outgoing(A05C, "COMPLETED", **completed("NotAvailable")), None),
    ],
    "05e-outbound-forbidden-403": [
        (outgoing(A05E, "OUTGOING"), None),
        (outgoing(A05E, "COMPLETED", **completed("NotAllowed")), None),
    ],
    "05f-outbound-noanswer-timeout": [
        (outgoing(A05F, "OUTGOING"), None),
        (outgoing(A05F, "COMPLETED", **completed("NoAnswer")), None),
    ],
    # Blind transfer by API: the A leg's second CHANNEL_BRIDGE names 102.
    "20-inbound-blind-transfer-uuid_transfer-101-to-102": transferred(A20, 1, 2),
    # Attended: 102's leg belongs to the consult call until the caller is
    # bridged to it; 102's talk time counts from that bridge (12 s of 13).
    "21-inbound-attended-transfer-101-consults-102": transferred(A21, 3, 12),
    # Pickup: the bridge is on 102's own channel, Bridge-B the caller's leg.
    "22-inbound-pickup-102-intercepts-101": [
        (incoming(A22, "101", "INCOMING"), None),
        (incoming(A22, "101", "COMPLETED", **completed("Cancelled")), None),
        (incoming(A22, "102", "INCOMING"), None),
        (incoming(A22, "102", "ACCEPTED"), None),
        (incoming(A22, "102", "COMPLETED", **completed("Success", 3, 1), **LINE), RECORDINGS + A22 + ".wav"),
    ],
    # mod_callcenter ring-all: agent legs linked by cc_member_session_uuid
    # (INCOMING in the order FreeSWITCH created them).
    "23-inbound-callcenter-queue-ring-all": [
        (queued(A23, "101", "INCOMING", "79160000023", "74950000001"), None),
        (queued(A23, "103", "INCOMING", "79160000023", "74950000001"), None),
        (queued(A23, "102", "INCOMING", "79160000023", "74950000001"), None),
        (queued(A23, "102", "ACCEPTED", "79160000023", "74950000001"), None),
        (queued(A23, "101", "COMPLETED", "79160000023", "74950000001", **completed("Cancelled")), None),
        (queued(A23, "103", "COMPLETED", "79160000023", "74950000001", **completed("Cancelled")), None),
        (queued(A23, "102", "COMPLETED", "79160000023", "74950000001", **completed("Success", 2, 1)),
         RECORDINGS + A23 + ".wav"),
    ],
    # The other mod_callcenter strategies offer the call to one agent at a time
    # (lab queues of tests/live/lab.py, agents 101-103 at tier positions 1-3).
    # longest-idle-agent: 101 had just talked, so 102 is offered.
    "28-inbound-callcenter-longest-idle-agent": one_agent(A28, "102", "79160000028", "74950000004"),
    # round-robin: the queue's last offer was 102 (capture 28), so 103.
    "29-inbound-callcenter-round-robin": one_agent(A29, "103", "79160000029", "74950000005"),
    "30-inbound-callcenter-top-down": one_agent(A30, "101", "79160000030", "74950000006", talk_s=1),
    # top-down, 101 rings 5 s unanswered (NO_ANSWER), the queue moves on to 102:
    # 101 was passed over (Cancelled, as a hunt list's timed-out leg in 03).
    "31-inbound-callcenter-top-down-agent-noanswer-next-answers": [
        (queued(A31, "101", "INCOMING", "79160000031", "74950000006"), None),
        (queued(A31, "101", "COMPLETED", "79160000031", "74950000006", **completed("Cancelled")), None),
        *one_agent(A31, "102", "79160000031", "74950000006"),
    ],
    # Voicemail answered the A leg: nobody talked, all Missed (no message left).
    "25-inbound-group-noanswer-then-voicemail": [
        *[(queued(A25, ext, "INCOMING", "79160000025", "74950000003"), None) for ext in ("101", "102", "103")],
        *[(queued(A25, ext, "COMPLETED", "79160000025", "74950000003", **completed("Missed")), None)
          for ext in ("101", "102", "103")],
    ],
    # Blind transfer by the phone's REFER: the same facts as 20.
    "27-inbound-blind-transfer-sip-refer-with-force_transfer_context": transferred(A27, 1, 2),
    # Unconditional forwarding (user 104's dial-string is his mobile): the
    # gateway leg still carries dialed_user=104, so 104 is credited.
    "40-inbound-forward-unconditional-104-to-mobile": lab_call(A40, "79104468642", DID, [
        ("104", "INCOMING"), ("104", "ACCEPTED"), ("104", "COMPLETED", "Success", 2)], LINE),
    # Forward on no answer: 101's phone rang out (NO_ANSWER), the leg to his
    # mobile names him in its Diversion header: the same part of 101's.
    "41-inbound-forward-noanswer-101-to-mobile": lab_call(A41, "74954468643", "74950000041", [
        ("101", "INCOMING"), ("101", "ACCEPTED"), ("101", "COMPLETED", "Success", 2)]),
    # Forward through loopback/, tagged fsbridge_forwarded_from=101 (the
    # loopback's far half is a call of its own, from outside to outside).
    "46-inbound-forward-loopback-tagged-101-to-mobile": lab_call(A46, "74954468644", "74950000046", [
        ("101", "INCOMING"), ("101", "ACCEPTED"), ("101", "COMPLETED", "Success", 2)]),
    # The phone's own forwarding: 101 answered 302 to his mobile; his leg ends
    # REDIRECTION_TO_NEW_DESTINATION (sip_redirect_contact_user_0), the caller
    # is transferred to that number and rings it: his forward.
    "48-inbound-forward-phone-302-101-to-mobile": lab_call(A48, "79104468650", DID, [
        ("101", "INCOMING"), ("101", "ACCEPTED"), ("101", "COMPLETED", "Success", 2)], LINE),
    # Group pickup: 103's `intercept <caller>` (the rung legs end PICKED_OFF /
    # ORIGINATOR_CANCEL); the bridge is on 103's own channel, as in 22.
    "42-inbound-group-pickup-103-intercepts-101-102": lab_call(A42, "74954468645", "74950000042", [
        ("101", "INCOMING"), ("102", "INCOMING"), ("101", "COMPLETED", "Cancelled"), ("102", "COMPLETED", "Cancelled"),
        ("103", "INCOMING"), ("103", "ACCEPTED"), ("103", "COMPLETED", "Success", 3)]),
    # Group pickup by mod_dptools `pickup`: the caller's bridge names 103's own
    # channel (swapped in for pickup/sales); 102 had ended LOSE_RACE by then.
    "47-inbound-group-pickup-app-103-picks-101-102": lab_call(A47, "74954468646", "74950000047", [
        ("101", "INCOMING"), ("102", "INCOMING"), ("101", "COMPLETED", "Cancelled"), ("103", "INCOMING"),
        ("103", "ACCEPTED"), ("102", "COMPLETED", "Cancelled"), ("103", "COMPLETED", "Success", 3)]),
    # mod_fifo, agent dials in: nobody rings while the caller waits (fifo
    # answered him); 101's `fifo ... out` bridges his own channel to the caller.
    "43-inbound-fifo-agent-101-dials-in": lab_call(A43, "74954468647", "74950000043", [
        ("101", "INCOMING"), ("101", "ACCEPTED"), ("101", "COMPLETED", "Success", 3)]),
    # mod_fifo consumer off-hook (`out wait`): the first caller's bridge
    # dissolves 101's call into his; the second caller gets 101's channel
    # bridged to him (no leg of ours any more): 101 joins that call too.
    "49-inbound-fifo-consumer-101-waits-two-callers": [
        *lab_call(A49, "74954468651", "74950000043", [
            ("101", "INCOMING"), ("101", "ACCEPTED"), ("101", "COMPLETED", "Success", 3)]),
        *lab_call(A49B, "74954468651", "74950000043", [
            ("101", "INCOMING"), ("101", "ACCEPTED"), ("101", "COMPLETED", "Success", 11)]),
    ],
    # mod_fifo ringall: members rung for this caller (fifo_bridge_uuid), in
    # CHANNEL_CREATE order; 102's bridge is on his own leg; 103 LOSE_RACE.
    "44-inbound-fifo-members-ringall-102-answers": lab_call(A44, "74954468648", "74950000044", [
        ("102", "INCOMING"), ("103", "INCOMING"), ("102", "ACCEPTED"), ("103", "COMPLETED", "Cancelled"),
        ("102", "COMPLETED", "Success", 2)]),
    # mod_fifo enterprise: members rung for the queue, no caller named; 102
    # takes part from his bridge to the caller, 103 (rung, cancelled) never.
    "45-inbound-fifo-members-enterprise-102-answers": lab_call(A45, "74954468649", "74950000045", [
        ("102", "INCOMING"), ("102", "ACCEPTED"), ("102", "COMPLETED", "Success", 2)]),
    # Click-to-call: the caller ID shown to the client (diversion) is known
    # only once the client leg exists, after the manager answered.
    "06a-click-to-call-answer": [
        (outgoing(M, "OUTGOING", diversion=""), None),
        (outgoing(M, "ACCEPTED"), None),
        (outgoing(M, "COMPLETED", **completed("Success", 2, 1)), RECORDINGS + M + ".wav"),
    ],
    "06b-click-to-call-manager-busy": [
        (outgoing(M, "OUTGOING", diversion=""), None),
        (outgoing(M, "COMPLETED", diversion="", **completed("NoAnswer")), None),
    ],
    "06d-click-to-call-manager-noanswer": [
        (outgoing(M, "OUTGOING", diversion=""), None),
        (outgoing(M, "COMPLETED", diversion="", **completed("NoAnswer")), None),
    ],
    # Inline &bridge: no dialplan ran, so no recording.
    "06e-click-to-call-inline-bridge": [
        (outgoing(M, "OUTGOING", diversion=""), None),
        (outgoing(M, "ACCEPTED"), None),
        (outgoing(M, "COMPLETED", **completed("Success", 2, 0)), None),
    ],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_call_trace_gives_exact_commands(traces_dir, name):
    raw = capture(traces_dir, name)
    commands, tracker = replay(raw)
    assert [(c.fields, c.recording_path) for c in commands] == EXPECTED[name]
    assert all(c.call_id == c.fields["callid"] for c in commands)
    assert tracker.open_calls() == 0


@pytest.mark.parametrize("name", sorted(EXPECTED) + ["load-100-calls"])
def test_reading_only_what_the_tracker_wants_gives_the_same_commands(traces_dir, name):
    """The reader asks CallTracker.wants how much of an event to decode (nothing
    of a closed call's end events, part of an open call's): every capture gives
    the same commands, in the same order, as decoding every event whole; an
    event it drops gives no command and changes no call when fed whole."""
    raw = read_trace(traces_dir / f"{name}.plain.txt.gz") if name.startswith("load") else capture(traces_dir, name)
    whole, asked = CallTracker(), CallTracker()
    got_whole, got_asked, dropped, in_part = [], [], 0, 0
    for headers, body in event_frames(raw):
        full = channel_event(headers, body)
        if full is None:
            continue
        want = asked.wants(full.name, full.uuid)
        assert want == whole.wants(full.name, full.uuid)
        got_whole += whole.feed(full)
        event = channel_event(headers, body, wants=asked.wants)
        if event is None:
            assert want == WANT_NOTHING
            dropped += 1
            assert got_whole == got_asked, f"{full.name} of {full.uuid} was dropped but gave commands"
        else:
            in_part += event != full
            got_asked += asked.feed(event)
        assert whole.open_calls() == asked.open_calls()
    assert [(c.fields, c.recording_path) for c in got_asked] == [(c.fields, c.recording_path) for c in got_whole]
    # Every capture's calls end with end events nobody needs (their CHANNEL_DESTROYs);
    # answered calls have legs' ends read in part.
    assert dropped
    assert in_part or not name.startswith(("01", "load"))


@pytest.mark.parametrize("want, read, not_read", [
    (WANT_CALL, {"hangup_cause", "record_ms", "originate_disposition"}, {"billsec", "sip_term_status"}),
    (WANT_LEG, {"hangup_cause", "billsec", "sip_term_status"}, {"record_ms", "originate_disposition"}),
])
def test_an_open_calls_leg_end_is_read_in_part(traces_dir, want, read, not_read):
    headers, body = next(
        (h, b) for h, b in event_frames(capture(traces_dir, "01-inbound-single-answer"))
        if h.get("Event-Name") == "CHANNEL_HANGUP_COMPLETE" and h.get("variable_record_ms"))
    whole = channel_event(headers, body)
    event = channel_event(headers, body, wants=lambda name, uuid: want)
    default = ChannelEvent(name="", uuid="")
    for field in read:
        assert getattr(event, field) == getattr(whole, field)
    for field in not_read:
        assert getattr(whole, field) != getattr(default, field)  # the capture has it
        assert getattr(event, field) == getattr(default, field)


def test_channel_event_reads_nothing_more_of_an_event_nobody_wants(traces_dir):
    headers, body = next(
        (h, b) for h, b in event_frames(capture(traces_dir, "01-inbound-single-answer"))
        if h.get("Event-Name") == "CHANNEL_DESTROY")
    asked = []

    def wants(name, uuid):
        asked.append((name, uuid))
        return WANT_NOTHING

    assert channel_event(headers, body, wants=wants) is None
    assert asked == [("CHANNEL_DESTROY", headers.get("Unique-ID"))]


@pytest.mark.parametrize("name", ["02-inbound-ring-group", "06a-click-to-call-answer"])
def test_subscribing_to_all_events_changes_nothing(traces_dir, name):
    """Events outside SUBSCRIBED_EVENTS (an `event plain ALL` listener) are ignored."""
    raw = capture(traces_dir, name)
    tracker = CallTracker()
    commands = []
    for headers, body in event_frames(raw, names=None):
        event = channel_event(headers, body)
        if event is not None:
            commands += tracker.feed(event)
    assert [(c.fields, c.recording_path) for c in commands] == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_start_gets_exactly_one_completed(traces_dir, name):
    """The invariant behind the lists above, checked independently of them."""
    raw = capture(traces_dir, name)
    commands, _ = replay(raw)
    open_slots: collections.Counter = collections.Counter()
    for command in commands:
        key = (command.fields["callid"], command.fields["ext"])
        event = command.fields["event"]
        if event in ("INCOMING", "OUTGOING"):
            assert open_slots[key] == 0, f"second start for {key} before its COMPLETED"
            open_slots[key] += 1
        elif event == "ACCEPTED":
            assert open_slots[key] == 1
        else:
            assert open_slots[key] == 1, f"COMPLETED without a start for {key}"
            open_slots[key] -= 1
    assert not +open_slots


@pytest.mark.parametrize("name", ["06a-click-to-call-answer", "06b-click-to-call-manager-busy"])
def test_untagged_click_to_call_is_not_reported(traces_dir, name):
    """An originate that is not ours (fs_cli, another tool): the manager's
    phone rings with the client's number, yet it is no INCOMING."""
    commands, tracker = replay(read_trace(traces_dir / f"{name}.plain.txt"))
    assert commands == []
    assert tracker.open_calls() == 0


def test_load_capture_100_interleaved_calls(traces_dir):
    commands, tracker = replay(read_trace(traces_dir / "load-100-calls.plain.txt.gz"))
    per_call: dict[str, list[dict]] = collections.defaultdict(list)
    for command in commands:
        per_call[command.call_id].append(command.fields)
    assert len(per_call) == 100
    callers = set()
    for callid, fields in per_call.items():
        caller = fields[0]["phone"]
        callers.add(caller)
        assert fields == [
            cmd("in", "INCOMING", "101", callid, caller, DID),
            cmd("in", "ACCEPTED", "101", callid, caller, DID),
            cmd("in", "COMPLETED", "101", callid, caller, DID, **completed("Success", 2, 1)),
        ]
    assert callers == {f"791{n:08d}" for n in range(1, 101)}
    assert tracker.open_calls() == 0
    # Nothing is left behind: no leg index, only the bounded finished memory.
    assert not tracker._owner


def test_subscription_is_exactly_what_channel_event_reads():
    from fsbridge.core.events import _READERS

    assert sorted(SUBSCRIBED_EVENTS) == sorted([*_READERS, "BACKGROUND_JOB", "HEARTBEAT"])


# -- rewrite_click_to_call ---------------------------------------------------

def test_rewrite_click_to_call_is_valid_esl(traces_dir):
    original = read_trace(traces_dir / "06a-click-to-call-answer.plain.txt")
    old_manager = "987741d5-a8ae-4322-a9eb-1a87a1af80df"
    old_job = "3271e4ac-8b88-4d7f-acc7-443876e3a71d"
    hostile_request = "r 1&x=%0A"
    rewritten = rewrite_click_to_call(
        original, manager_uuid=MANAGER_UUID, job_uuid=JOB_UUID, request_id=hostile_request,
        ext="101", phone=CALLER, command_arg=f"originate {{origination_uuid={MANAGER_UUID}}}user/101 {CALLER} XML default",
    )
    assert old_manager.encode() not in rewritten and old_job.encode() not in rewritten
    original_frames = frames_of(original)
    frames = frames_of(rewritten)   # raises if any Content-Length were wrong
    assert len(frames) == len(original_frames)
    for frame in frames:
        if "Content-Length" in frame.headers:
            assert int(frame.headers["Content-Length"]) == len(frame.body)

    tagged = untagged = 0
    for headers, body in event_frames(rewritten, names=None):
        if headers.get("Event-Name") == "BACKGROUND_JOB":
            assert headers.get("Job-UUID") == JOB_UUID
            assert body == f"+OK {MANAGER_UUID}\n".encode()
            assert headers.get("Job-Command-Arg").startswith("originate {origination_uuid=" + MANAGER_UUID)
            continue
        if headers.get("Unique-ID") != MANAGER_UUID:
            assert headers.get("variable_fsbridge_click_to_call") is None
            continue
        if headers.get("variable_uuid") is None:  # CHANNEL_OUTGOING, CHANNEL_STATE: no variables
            assert headers.get("variable_fsbridge_click_to_call") is None
            untagged += 1
            continue
        assert headers.get("variable_fsbridge_click_to_call") == hostile_request
        assert headers.get("variable_fsbridge_ext") == "101"
        assert headers.get("variable_fsbridge_phone") == CALLER
        assert headers.get("variable_origination_uuid") == MANAGER_UUID
        assert headers.get("variable_uuid") == MANAGER_UUID
        tagged += 1
    assert tagged > 5 and untagged > 0
    # The client leg now names the new manager UUID as its originator.
    client_creates = [
        h for h, _ in event_frames(rewritten, names=("CHANNEL_CREATE",)) if h.get("Unique-ID") != MANAGER_UUID
    ]
    assert [h.get("Other-Leg-Unique-ID") for h in client_creates] == [MANAGER_UUID]
    # The encoded value is what FreeSWITCH would send: one line, no raw '&' or LF.
    assert ("variable_fsbridge_click_to_call: " + quote(hostile_request, safe="")).encode() in rewritten


def test_rewrite_changes_nothing_else(traces_dir):
    """Frame by frame, the rewrite only adds our lines and swaps the Job-UUID."""
    original = read_trace(traces_dir / "06b-click-to-call-manager-busy.plain.txt")
    old_manager = "c5bbb1ea-1d87-4242-a1c0-279fb54a9fd5"
    rewritten = rewrite_click_to_call(
        original, manager_uuid=old_manager, job_uuid=JOB_UUID, request_id="x", ext="101", phone=CALLER,
    )
    old_job = next(h.get("Job-UUID") for h, _ in event_frames(original, names=("BACKGROUND_JOB",)))
    ours = (b"variable_fsbridge_", b"variable_origination_uuid: ")
    pairs = list(zip(frames_of(original), frames_of(rewritten), strict=True))
    added = 0
    for before, after in pairs:
        lines = after.body.split(b"\n")
        kept = [line for line in lines if not line.startswith(ours)]
        added += len(lines) - len(kept)
        assert b"\n".join(kept).replace(JOB_UUID.encode(), old_job.encode()) == before.body
    assert added == 4 * sum(
        1 for h, _ in event_frames(original, names=None)
        if h.get("Unique-ID") == old_manager and h.get("variable_uuid") is not None
    )


@pytest.mark.parametrize("name", ["06a-click-to-call-answer", "06b-click-to-call-manager-busy"])
def test_click_to_call_diversion_from_configuration(traces_dir, name):
    """With the client's caller ID configured, every event carries it, OUTGOING too."""
    tracker = CallTracker(TrackerSettings(click_to_call_diversion="+7 495 000-00-00"))
    commands = []
    for event in channel_events(capture(traces_dir, name)):
        commands += tracker.feed(event)
    assert [c.fields["event"] for c in commands] == [f["event"] for f, _ in EXPECTED[name]]
    assert {c.fields["diversion"] for c in commands} == {DID}


VOICEMAIL_FILE = "/usr/local/freeswitch/recordings/voicemail/default/127.0.0.1/101/msg_5d1c7e2a-8f3b-4c6d-9e0a-1b2c3d4e5f60.wav"


def with_voicemail_message(raw: bytes, a_leg: str, message_len: str) -> bytes:
    """Capture 25 as if the caller had left a message: the variables
    mod_voicemail sets on the caller's channel after saving one
    (voicemail_leave_main: voicemail_file_path, voicemail_message_len)
    added to the A leg's CHANNEL_HANGUP_COMPLETE.  Content-Lengths fixed."""
    out = bytearray()
    for frame in frames_of(raw):
        body = frame.body
        if (b"Event-Name: CHANNEL_HANGUP_COMPLETE\n" in body and b"\nUnique-ID: " + a_leg.encode() + b"\n" in body):
            extra = (f"variable_voicemail_file_path: {quote(VOICEMAIL_FILE, safe='')}\n"
                     f"variable_voicemail_message_len: {quote(message_len, safe='')}\n").encode()
            body = body.replace(b"\nvariable_", b"\n" + extra + b"variable_", 1)
        headers = dict(frame.headers)
        out += encode_frame(headers, body)
    return bytes(out)


@pytest.mark.parametrize("message_len, recorded", [("00:00:07", True), ("00:00:00", False)])
def test_voicemail_message_is_the_missed_calls_recording(traces_dir, message_len, recorded):
    raw = with_voicemail_message(
        read_trace(traces_dir / "25-inbound-group-noanswer-then-voicemail.plain.txt"), A25, message_len)
    commands, tracker = replay(raw)
    expected = EXPECTED["25-inbound-group-noanswer-then-voicemail"]
    assert [c.fields for c in commands[:3]] == [f for f, _ in expected[:3]]
    for command, (fields, _) in zip(commands[3:], expected[3:], strict=True):
        assert command.fields == {**fields, "is_recorded": "1" if recorded else "0"}
        assert command.recording_path == (VOICEMAIL_FILE if recorded else None)
    assert tracker.open_calls() == 0


@pytest.mark.parametrize("name", ["20-inbound-blind-transfer-uuid_transfer-101-to-102",
                                  "27-inbound-blind-transfer-sip-refer-with-force_transfer_context"])
def test_blind_transfer_when_the_talkers_hangup_comes_after_the_next_leg(traces_dir, name):
    """With mod_json_cdr loaded, a leg's CHANNEL_HANGUP_COMPLETE waits for its CDR
    post (reporting state): the live suite saw 102's CHANNEL_CREATE first.  The
    caller's leg ringing 102 ends 101's part all the same, before 102 rings."""
    events = channel_events(capture(traces_dir, name))
    creates = [n for n, ev in enumerate(events) if ev.name == "CHANNEL_CREATE" and ev.direction == "outbound"]
    first, second = events[creates[0]].uuid, events[creates[1]].uuid
    ends = [n for n, ev in enumerate(events) if ev.uuid == first and ev.name in ("CHANNEL_HANGUP_COMPLETE", "CHANNEL_DESTROY")]
    assert ends and ends[0] < creates[1]  # as recorded: 101 gone before 102 rings
    late = [events[n] for n in ends]
    reordered = [ev for n, ev in enumerate(events) if n not in ends]
    at = next(n for n, ev in enumerate(reordered) if ev.uuid == second) + 1
    reordered[at:at] = late
    tracker = CallTracker()
    got = [c for ev in reordered for c in tracker.feed(ev)]
    wanted = [fields for fields, _ in EXPECTED[name]]
    assert [(c.fields["event"], c.fields["ext"], c.fields.get("status")) for c in got] == [
        (f["event"], f["ext"], f.get("status")) for f in wanted]
    assert abs(int(got[2].fields["duration"]) - int(wanted[2]["duration"])) <= 1
    assert got[-1].fields == wanted[-1]


@pytest.mark.parametrize("name", ["03-inbound-hunt-sequential",
                                  "31-inbound-callcenter-top-down-agent-noanswer-next-answers"])
def test_a_passed_over_leg_whose_end_comes_after_the_next_ring_is_cancelled_at_its_end(traces_dir, name):
    """The live suite saw the next extension's CHANNEL_CREATE before the
    previous leg's CHANNEL_HANGUP_COMPLETE (mod_json_cdr holds it for the
    CDR post).  The same commands go out, the passed-over COMPLETED right
    after the next INCOMING instead of right before it."""
    events = channel_events(capture(traces_dir, name))
    creates = [n for n, ev in enumerate(events) if ev.name == "CHANNEL_CREATE" and ev.direction == "outbound"]
    first, second = events[creates[0]].uuid, events[creates[1]].uuid
    ends = [n for n, ev in enumerate(events) if ev.uuid == first and ev.name in ("CHANNEL_HANGUP_COMPLETE", "CHANNEL_DESTROY")]
    assert ends and ends[0] < creates[1]  # as recorded: the first leg gone before the next rings
    late = [events[n] for n in ends]
    reordered = [ev for n, ev in enumerate(events) if n not in ends]
    at = next(n for n, ev in enumerate(reordered) if ev.uuid == second) + 1
    reordered[at:at] = late
    tracker = CallTracker()
    got = [(c.fields, c.recording_path) for ev in reordered for c in tracker.feed(ev)]
    wanted = EXPECTED[name]
    assert got == [wanted[0], wanted[2], wanted[1], *wanted[3:]]


@pytest.mark.parametrize("name", sorted(EXPECTED) + ["load-100-calls"])
def test_an_event_name_the_caller_read_gives_the_same_event(traces_dir, name):
    """The node reads Event-Name once and hands it to channel_event (``name=``):
    every event of every capture reduces to the same ChannelEvent as when
    channel_event looks the name up itself."""
    raw = read_trace(traces_dir / f"{name}.plain.txt.gz") if name.startswith("load") else capture(traces_dir, name)
    seen = collections.Counter()
    for headers, body in event_frames(raw):
        given = headers.get("Event-Name") or ""
        assert channel_event(headers, body, name=given) == channel_event(headers, body)
        seen[given] += 1
    assert seen["CHANNEL_HANGUP_COMPLETE"] and seen["CHANNEL_DESTROY"]


def test_a_channel_destroy_is_not_read_as_a_hangup_complete():
    """Only CHANNEL_HANGUP_COMPLETE reads the recording and voicemail of an A
    leg's end (the reader knows which from its key, without a second lookup)."""
    block = (b"Event-Name: %s\nUnique-ID: u-1\nHangup-Cause: NORMAL_CLEARING\n"
             b"variable_record_ms: 5000\nvariable_voicemail_file_path: /vm/1.wav\n"
             b"variable_voicemail_message_len: 00:00:07\n")
    complete = channel_event(EventHeaders(block % b"CHANNEL_HANGUP_COMPLETE"), b"")
    destroy = channel_event(EventHeaders(block % b"CHANNEL_DESTROY"), b"")
    assert (complete.record_ms, complete.voicemail_path, complete.voicemail_seconds) == (5000, "/vm/1.wav", 7)
    assert (destroy.record_ms, destroy.voicemail_path, destroy.voicemail_seconds) == (-1, "", -1)
    assert destroy.hangup_cause == complete.hangup_cause == "NORMAL_CLEARING"
