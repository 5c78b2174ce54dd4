"""Call flows beyond a plain ring, as variations the captures (20-27) do not
show on their own: one-at-a-time queue strategies, a transfer back to the
first extension, a transfer outside, a talker replaced while still up, and
adopting live calls from ``show channels as json``.

Events are synthetic plain-event bytes (see test_tracker_edges), with the
headers FreeSWITCH sends in the captures for the same facts.
"""

from __future__ import annotations

import json

from fsbridge.fakes.freeswitch import active_call_bodies
from fsbridge.core.tracker import CallTracker, adoption_events, answered_legs, answered_us_from_dump
from tests.test_tracker_edges import T0, Call, event, feed_all, summary

A_LISTED = "cf9e6d82-e4af-4a4a-adbb-4d63e4ae5566"   # capture 90's call
B_LISTED = "0d4ec6ad-3849-475a-a21d-65d2ab06ffb0"


def agent_leg(call: Call, b: str, ext: str, t: float):
    """A mod_callcenter agent leg: no originator, only the member session UUID."""
    return event("CHANNEL_CREATE", b, Channel__Call__UUID=b, Call__Direction="outbound",
                 Caller__Caller__ID__Number=call.caller, Caller__Destination__Number=ext,
                 variable_dialed_user=ext, variable_cc_member_session_uuid=call.a,
                 Event__Date__Timestamp=str(T0 + int(t * 1e6)))


def test_queue_ringing_one_agent_at_a_time_moves_on_with_cancelled():
    """longest-idle / round-robin / top-down, agent no-answer: each agent
    passed over is Cancelled before the next one rings."""
    call = Call("a1")
    commands = feed_all(CallTracker(), [
        call.create(0),
        agent_leg(call, "q1", "101", 1), call.leg_end("q1", 16, cause="NO_ANSWER"),
        agent_leg(call, "q2", "102", 17), call.leg_end("q2", 32, cause="NO_ANSWER"),
        agent_leg(call, "q3", "103", 33), call.bridge("q3", 35),
        call.leg_end("q3", 40, billsec=5), call.end(40),
    ])
    assert summary(commands) == [
        ("101", "INCOMING", "", ""), ("101", "COMPLETED", "Cancelled", "0"),
        ("102", "INCOMING", "", ""), ("102", "COMPLETED", "Cancelled", "0"),
        ("103", "INCOMING", "", ""), ("103", "ACCEPTED", "", ""), ("103", "COMPLETED", "Success", "5"),
    ]
    assert {c.call_id for c in commands} == {"a1"}


def test_queue_nobody_answers_is_missed_for_the_last_agent():
    call = Call("a1")
    commands = feed_all(CallTracker(), [
        call.create(0), agent_leg(call, "q1", "101", 1), call.leg_end("q1", 16, cause="NO_ANSWER"),
        agent_leg(call, "q2", "102", 17), call.end(20, cause="ORIGINATOR_CANCEL"),
    ])
    assert summary(commands) == [
        ("101", "INCOMING", "", ""), ("101", "COMPLETED", "Cancelled", "0"),
        ("102", "INCOMING", "", ""), ("102", "COMPLETED", "Missed", "0"),
    ]


def test_an_agent_whose_end_arrives_after_the_next_ring_is_still_passed_over_at_its_end():
    """The live lab's race (mod_json_cdr holds a channel's HANGUP_COMPLETE
    until its CDR is posted): 101 hung up at 16 s, 102 rang at 17 s, 101's
    end arrived after.  101 is Cancelled when its end arrives, not left
    ringing until 102 answers, and nobody answering keeps it Cancelled, as
    in the order of the times."""
    call = Call("a1")
    commands = feed_all(CallTracker(), [
        call.create(0), agent_leg(call, "q1", "101", 1),
        agent_leg(call, "q2", "102", 17), call.leg_end("q1", 16, cause="NO_ANSWER"),
        call.bridge("q2", 19), call.leg_end("q2", 25, billsec=6), call.end(25),
    ])
    assert summary(commands) == [
        ("101", "INCOMING", "", ""), ("102", "INCOMING", "", ""), ("101", "COMPLETED", "Cancelled", "0"),
        ("102", "ACCEPTED", "", ""), ("102", "COMPLETED", "Success", "6"),
    ]
    in_order = feed_all(CallTracker(), [
        call.create(0), agent_leg(call, "q1", "101", 1), call.leg_end("q1", 16, cause="NO_ANSWER"),
        agent_leg(call, "q2", "102", 17), call.end(20, cause="ORIGINATOR_CANCEL"),
    ])
    late = feed_all(CallTracker(), [
        call.create(0), agent_leg(call, "q1", "101", 1), agent_leg(call, "q2", "102", 17),
        call.leg_end("q1", 16, cause="NO_ANSWER"), call.end(20, cause="ORIGINATOR_CANCEL"),
    ])
    assert sorted(summary(late)) == sorted(summary(in_order)) == sorted([
        ("101", "INCOMING", "", ""), ("101", "COMPLETED", "Cancelled", "0"),
        ("102", "INCOMING", "", ""), ("102", "COMPLETED", "Missed", "0"),
    ])


def test_a_group_leg_declining_in_the_tick_its_siblings_rang_is_missed_with_them():
    """A group rings 101 and 102 together; 101 declines at once (the same
    ~20 ms tick of FreeSWITCH's clock as 102's CHANNEL_CREATE) and its end
    arrives after that create: it rang with 102, it was not passed over."""
    call = Call("a1")
    commands = feed_all(CallTracker(), [
        call.create(0), call.leg("b1", "101", 1), call.leg("b2", "102", 1),
        call.leg_end("b1", 1, cause="USER_BUSY"), call.end(30, cause="ORIGINATOR_CANCEL"),
    ])
    assert summary(commands) == [
        ("101", "INCOMING", "", ""), ("102", "INCOMING", "", ""),
        ("101", "COMPLETED", "Missed", "0"), ("102", "COMPLETED", "Missed", "0"),
    ]


def test_transfer_back_to_the_first_extension_is_a_second_part():
    """Each time an extension rings it gets its own INCOMING ... COMPLETED."""
    call = Call("a1")
    commands = feed_all(CallTracker(), [
        call.create(0), call.leg("b1", "101", 0.1), call.bridge("b1", 1),
        call.leg_end("b1", 4, billsec=3),
        call.leg("b2", "102", 4), call.leg_end("b2", 10, cause="NO_ANSWER"),
        call.leg("b3", "101", 10), call.bridge("b3", 11), call.leg_end("b3", 18, billsec=7),
        call.end(18),
    ])
    assert summary(commands) == [
        ("101", "INCOMING", "", ""), ("101", "ACCEPTED", "", ""), ("101", "COMPLETED", "Success", "3"),
        ("102", "INCOMING", "", ""), ("102", "COMPLETED", "Cancelled", "0"),
        ("101", "INCOMING", "", ""), ("101", "ACCEPTED", "", ""), ("101", "COMPLETED", "Success", "7"),
    ]


def test_transfer_to_an_outside_number_ends_the_talkers_part():
    call = Call("a1")
    commands = feed_all(CallTracker(), [
        call.create(0), call.leg("b1", "101", 0.1), call.bridge("b1", 1),
        call.leg_end("b1", 4, billsec=3),
        call.outside_leg("b2", "79990001122", t=4), call.bridge("b2", 6), call.leg_end("b2", 20, billsec=14),
        call.end(20),
    ])
    assert summary(commands) == [
        ("101", "INCOMING", "", ""), ("101", "ACCEPTED", "", ""), ("101", "COMPLETED", "Success", "3"),
    ]


def test_talker_replaced_while_still_up_counts_until_the_new_bridge():
    """uuid_bridge of the caller elsewhere before the old leg's end arrives."""
    call = Call("a1")
    commands = feed_all(CallTracker(), [
        call.create(0), call.leg("b1", "101", 0.1), call.leg("b2", "102", 0.1),
        call.bridge("b1", 1), call.bridge("b2", 9),
        call.leg_end("b1", 9), call.leg_end("b2", 15, billsec=6), call.end(15),
    ])
    assert summary(commands) == [
        ("101", "INCOMING", "", ""), ("102", "INCOMING", "", ""),
        ("101", "ACCEPTED", "", ""), ("102", "COMPLETED", "Cancelled", "0"),
        # 102's still-ringing leg was Cancelled when 101 won; bridged now, he rings anew
        ("101", "COMPLETED", "Success", "8"),
        ("102", "INCOMING", "", ""), ("102", "ACCEPTED", "", ""), ("102", "COMPLETED", "Success", "6"),
    ]


def test_a_repeated_bridge_changes_nothing():
    call = Call("a1")
    commands = feed_all(CallTracker(), [
        call.create(0), call.leg("b1", "101", 0.1), call.bridge("b1", 1), call.bridge("b1", 1),
        call.leg_end("b1", 4, billsec=3), call.end(4),
    ])
    assert summary(commands) == [
        ("101", "INCOMING", "", ""), ("101", "ACCEPTED", "", ""), ("101", "COMPLETED", "Success", "3"),
    ]


# -- adoption -------------------------------------------------------------------

def listing() -> str:
    return active_call_bodies()["show channels as json"].decode()


def test_adoption_events_of_capture_90():
    events = adoption_events(listing(), T0)
    assert [(e.name, e.uuid, e.direction, e.destination_number) for e in events] == [
        ("CHANNEL_CREATE", A_LISTED, "inbound", "74950000000"),
        ("CHANNEL_CREATE", B_LISTED, "outbound", "101"),
        ("CHANNEL_BRIDGE", A_LISTED, "", ""),
    ]
    assert events[0].timestamp_us == 1795856524 * 1_000_000
    assert events[2].bridge_b_uuid == B_LISTED


def test_adopted_call_ends_with_its_real_facts():
    tracker = CallTracker()
    adopted = tracker.adopt(listing(), T0)
    assert [(c.fields["event"], c.fields["ext"], c.fields["phone"], c.fields["diversion"]) for c in adopted] == [
        ("INCOMING", "101", "79101234567", "74950000000"), ("ACCEPTED", "101", "79101234567", "74950000000"),
    ]
    call = Call(A_LISTED)
    ended = feed_all(tracker, [call.leg_end(B_LISTED, 30, billsec=27), call.end(30)])
    assert summary(ended) == [("101", "COMPLETED", "Success", "27")]
    assert tracker.open_calls() == 0


def test_an_adopted_call_the_caller_ends_counts_the_talk_from_the_answer():
    """The caller hangs up first: the talker's own end (its billsec) comes
    after the caller's, so the talk is counted from the leg's answer, which
    the listing lacks; uuid_dump gives it (answered_us), else it is now."""
    answered = T0 - 4_000_000  # 4 s before the reconnect
    call = Call(A_LISTED)
    for times, talk in (({B_LISTED: answered}, 10), (None, 6)):
        tracker = CallTracker()
        tracker.adopt(listing(), T0, times)
        ended = feed_all(tracker, [call.end(6), call.leg_end(B_LISTED, 6, billsec=10)])
        assert summary(ended) == [("101", "COMPLETED", "Success", str(talk))]


def test_answered_legs_are_the_adopted_bridges():
    assert answered_legs(listing()) == [(B_LISTED, A_LISTED)]
    reply = json.loads(listing())
    reply["rows"][1]["callstate"] = "RINGING"
    assert answered_legs(json.dumps(reply)) == []


def test_answer_time_from_uuid_dump_json():
    assert answered_us_from_dump('{"Caller-Channel-Answered-Time": "1795856530123456", "Unique-ID": "x"}') \
        == 1795856530123456
    for reply in ('{"Caller-Channel-Answered-Time": "0"}', '{"Caller-Channel-Answered-Time": "12a"}',
                  '{"Caller-Channel-Answered-Time": 5}', '[]', "-ERR No such channel!", "",
                  '{"Caller-Channel-Answered-Time": "' + "9" * 40 + '"}'):
        assert answered_us_from_dump(reply) == 0


def test_adopting_a_call_already_tracked_sends_nothing_again():
    tracker = CallTracker()
    call = Call(A_LISTED)
    feed_all(tracker, [call.create(0), call.leg(B_LISTED, "101", 0.1), call.bridge(B_LISTED, 1)])
    assert tracker.adopt(listing(), T0) == []


def test_a_ringing_leg_is_adopted_without_accepted():
    reply = json.loads(listing())
    reply["rows"][1]["callstate"] = "RINGING"
    adopted = CallTracker().adopt(json.dumps(reply), T0)
    assert [c.fields["event"] for c in adopted] == ["INCOMING"]


def test_adoption_skips_legs_it_cannot_place():
    reply = json.loads(listing())
    reply["rows"][1]["call_uuid"] = reply["rows"][1]["uuid"]   # e.g. a queue agent leg: no link in the listing
    assert CallTracker().adopt(json.dumps(reply), T0) == []
    assert adoption_events('{"row_count":0}', T0) == []


def fifo_member_leg(call: Call | None, b: str, ext: str, t: float):
    """A mod_fifo member leg: no originator; ringall names the caller in fifo_bridge_uuid."""
    linked = {"variable_fifo_bridge_uuid": call.a} if call is not None else {}
    return event("CHANNEL_CREATE", b, Channel__Call__UUID=b, Call__Direction="outbound",
                 Caller__Destination__Number=ext, variable_dialed_user=ext,
                 Event__Date__Timestamp=str(T0 + int(t * 1e6)), **linked)


def member_bridge(call: Call, b: str, ext: str, t: float, answered: float):
    """mod_fifo's bridge: on the member's own channel, Bridge-B the caller."""
    return event("CHANNEL_BRIDGE", b, Channel__Call__UUID=b, Call__Direction="outbound",
                 Other__Leg__Unique__ID=call.a, Other__Type="originatee",
                 Bridge__A__Unique__ID=b, Bridge__B__Unique__ID=call.a, variable_dialed_user=ext,
                 Caller__Channel__Answered__Time=str(T0 + int(answered * 1e6)),
                 Event__Date__Timestamp=str(T0 + int(t * 1e6)))


def test_fifo_member_answer_time_is_his_own_when_his_end_comes_late():
    """The caller's leg ends first: 102's talk time runs from his answer, not the caller's."""
    call = Call("a1")
    commands = feed_all(CallTracker(), [
        call.create(0), fifo_member_leg(call, "m1", "102", 1), member_bridge(call, "m1", "102", 3.1, answered=3),
        call.end(8), call.leg_end("m1", 8, billsec=5),
    ])
    assert summary(commands) == [("102", "INCOMING", "", ""), ("102", "ACCEPTED", "", ""),
                                 ("102", "COMPLETED", "Success", "5")]


def test_fifo_member_bridge_delivered_twice_changes_nothing():
    call = Call("a1")
    tracker = CallTracker()
    feed_all(tracker, [call.create(0), fifo_member_leg(None, "m1", "102", 1)])
    first = tracker.feed(member_bridge(call, "m1", "102", 3, answered=3))
    assert summary(first) == [("102", "INCOMING", "", ""), ("102", "ACCEPTED", "", "")]
    assert tracker.feed(member_bridge(call, "m1", "102", 3, answered=3)) == []


def test_a_channel_naming_no_extension_bridged_to_the_caller_is_nobody():
    """E.g. a leg `originate`d to an outside number and bridged in by the FIFO: no slot, no events."""
    call = Call("a1")
    commands = feed_all(CallTracker(), [
        call.create(0), member_bridge(call, "x1", "79160000000", 2, answered=2), call.end(6),
    ])
    assert commands == []
