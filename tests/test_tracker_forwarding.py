"""Forwarding of an extension to a mobile, as variations captures 40 and 41 do not show.

A leg to elsewhere is the extension's when it names the extension it
forwards: our ``fsbridge_forwarded_from`` tag, else the ``Diversion``
header it sends (``sip_h_Diversion``).  It continues his part when his phone
rang out before it (one INCOMING ... one COMPLETED), unless he talked.
"""

from __future__ import annotations

import pytest

from fsbridge.core.phone import normalize_phone
from fsbridge.core.tracker import CallTracker, TrackerSettings
from tests.test_tracker_edges import T0, Call, event, feed_all, summary


def forward_leg(call: Call, b: str, mobile: str, t: float, **forward: str):
    """A leg the A leg originates to the outside, tagged as a forward."""
    return event("CHANNEL_CREATE", b, Channel__Call__UUID=call.a, Call__Direction="outbound",
                 Other__Leg__Unique__ID=call.a, Other__Type="originator",
                 Caller__Caller__ID__Number=call.caller, Caller__Destination__Number=mobile,
                 Event__Date__Timestamp=str(T0 + int(t * 1e6)), **forward)


def no_answer_then_mobile(call: Call, **forward: str) -> list:
    return [
        call.create(0), call.leg("b1", "101", 0.1), call.leg_end("b1", 15, cause="NO_ANSWER"),
        forward_leg(call, "m1", "79160000101", 15.1, **forward), call.bridge("m1", 18),
        call.leg_end("m1", 25, billsec=7), call.end(25),
    ]


@pytest.mark.parametrize("forward", [
    {"variable_sip_h_Diversion": "<sip:101@pbx.example>;reason=no-answer"},
    {"variable_fsbridge_forwarded_from": "101"},
], ids=["diversion", "tag"])
def test_forward_on_no_answer_is_one_part_of_the_extension(forward):
    commands = feed_all(CallTracker(), no_answer_then_mobile(Call("a1"), **forward))
    assert summary(commands) == [
        ("101", "INCOMING", "", ""), ("101", "ACCEPTED", "", ""), ("101", "COMPLETED", "Success", "7"),
    ]


@pytest.mark.parametrize("header,ext", [
    ("<sip:101@pbx.example>;reason=unconditional", "101"),
    ('"Manager 101" <sip:101@pbx.example;user=phone>;reason=user-busy', "101"),
    ("<tel:101>;reason=no-answer", "101"),
    ("sip:101@pbx.example", "101"),
    # several: the topmost is the latest diversion (RFC 5806)
    ("<sip:102@pbx.example>;reason=no-answer,<sip:101@pbx.example>;reason=unconditional", "102"),
    ("garbage", ""),
])
def test_diversion_header_names_the_forwarding_user(header, ext):
    leg = forward_leg(Call("a1"), "m1", "79160000101", 1, variable_sip_h_Diversion=header)
    assert leg.forwarded_from == ext


def test_our_tag_wins_over_the_diversion_header():
    leg = forward_leg(Call("a1"), "m1", "79160000101", 1, variable_fsbridge_forwarded_from="103",
                      variable_sip_h_Diversion="<sip:101@pbx.example>")
    assert leg.forwarded_from == "103"


def test_diversion_naming_no_extension_is_an_outside_leg():
    """A DID in the Diversion (the carrier's forward of our number) is nobody's extension."""
    call = Call("a1")
    commands = feed_all(CallTracker(), [
        call.create(0), forward_leg(call, "m1", "79160000101", 0.1,
                                    variable_sip_h_Diversion="<sip:74950000000@carrier>"),
        call.bridge("m1", 2), call.leg_end("m1", 5, billsec=3), call.end(5),
    ])
    assert commands == []


def test_forward_that_fails_leaves_the_extension_missed():
    call = Call("a1")
    commands = feed_all(CallTracker(), [
        call.create(0), call.leg("b1", "101", 0.1), call.leg_end("b1", 15, cause="NO_ANSWER"),
        forward_leg(call, "m1", "79160000101", 15.1, variable_fsbridge_forwarded_from="101"),
        call.leg_end("m1", 16, cause="USER_BUSY"), call.end(16, cause="USER_BUSY"),
    ])
    assert summary(commands) == [("101", "INCOMING", "", ""), ("101", "COMPLETED", "Missed", "0")]


def test_forward_after_a_group_rang_out_cancels_the_others():
    """Group 101,102 unanswered, then 101's mobile: 102's part ends when 101's goes on."""
    call = Call("a1")
    commands = feed_all(CallTracker(), [
        call.create(0), call.leg("b1", "101", 0.1), call.leg("b2", "102", 0.1),
        call.leg_end("b1", 15, cause="NO_ANSWER"), call.leg_end("b2", 15, cause="NO_ANSWER"),
        forward_leg(call, "m1", "79160000101", 15.1, variable_fsbridge_forwarded_from="101"),
        call.bridge("m1", 18), call.leg_end("m1", 20, billsec=2), call.end(20),
    ])
    assert summary(commands) == [
        ("101", "INCOMING", "", ""), ("102", "INCOMING", "", ""), ("102", "COMPLETED", "Cancelled", "0"),
        ("101", "ACCEPTED", "", ""), ("101", "COMPLETED", "Success", "2"),
    ]


def test_forward_to_his_mobile_after_he_talked_is_a_new_part():
    """101 answered, then sent the caller on to his mobile (a transfer with his Diversion)."""
    call = Call("a1")
    commands = feed_all(CallTracker(), [
        call.create(0), call.leg("b1", "101", 0.1), call.bridge("b1", 2), call.leg_end("b1", 5, billsec=3),
        forward_leg(call, "m1", "79160000101", 5.1, variable_fsbridge_forwarded_from="101"),
        call.bridge("m1", 8), call.leg_end("m1", 12, billsec=4), call.end(12),
    ])
    assert summary(commands) == [
        ("101", "INCOMING", "", ""), ("101", "ACCEPTED", "", ""), ("101", "COMPLETED", "Success", "3"),
        ("101", "INCOMING", "", ""), ("101", "ACCEPTED", "", ""), ("101", "COMPLETED", "Success", "4"),
    ]


def test_unconditional_forward_by_the_directory_needs_no_tag():
    """`user/104` whose dial-string is a gateway: the leg keeps dialed_user=104 (capture 40)."""
    call = Call("a1")
    leg = forward_leg(call, "m1", "79160000104", 0.1, variable_dialed_user="104")
    commands = feed_all(CallTracker(), [call.create(0), leg, call.bridge("m1", 2),
                                        call.leg_end("m1", 4, billsec=2), call.end(4)])
    assert summary(commands) == [
        ("104", "INCOMING", "", ""), ("104", "ACCEPTED", "", ""), ("104", "COMPLETED", "Success", "2"),
    ]


def test_an_extensions_own_outbound_call_with_his_diversion_stays_outgoing():
    """Some admins send the caller's extension as Diversion on every outbound call."""
    call = Call("a1", caller="101", did="79160000000", user_name="101")
    leg = forward_leg(call, "o1", "79160000000", 0.1, variable_sip_h_Diversion="<sip:101@pbx.example>")
    commands = feed_all(CallTracker(), [call.create(0), leg, call.bridge("o1", 2),
                                        call.leg_end("o1", 5, billsec=3), call.end(5)])
    assert [(c.fields["type"], *s) for c, s in zip(commands, summary(commands))] == [
        ("out", "101", "OUTGOING", "", ""), ("out", "101", "ACCEPTED", "", ""),
        ("out", "101", "COMPLETED", "Success", "3"),
    ]


@pytest.mark.parametrize("report", [False, True])
def test_a_colleagues_call_forwarded_to_a_mobile_is_internal(report):
    """102 calls 101, whom the dialplan forwards to his mobile: an internal call (shown on request)."""
    call = Call("a1", caller="102", did="101", user_name="102")
    commands = feed_all(CallTracker(TrackerSettings(report_internal_calls=report)), no_answer_then_mobile(
        call, variable_fsbridge_forwarded_from="101"))
    if not report:
        assert commands == []
    else:
        assert summary(commands) == [
            ("101", "INCOMING", "", ""), ("101", "ACCEPTED", "", ""), ("101", "COMPLETED", "Success", "7"),
        ]
        assert {c.fields["phone"] for c in commands} == {"102"}


def redirected_leg_end(call: Call, b: str, t: float, target: str):
    """The phone answered 302 (its own forwarding): mod_sofia ends the leg so."""
    return call.leg_end(b, t, cause="REDIRECTION_TO_NEW_DESTINATION",
                        variable_sip_redirect_contact_user_0=target)


def test_phone_redirect_to_a_mobile_is_his_forward():
    """Matched as the service normalizes numbers: the phone's 8 916... is the route's 7 916..."""
    call = Call("a1")
    commands = feed_all(CallTracker(TrackerSettings(normalize_phone=normalize_phone)), [
        call.create(0), call.leg("b1", "101", 0.1), redirected_leg_end(call, "b1", 0.6, "89160000101"),
        # the caller's transfer to the number; the outbound route dials it as 7916...
        call.outside_leg("m1", "79160000101", t=0.7), call.bridge("m1", 3),
        call.leg_end("m1", 6, billsec=3), call.end(6),
    ])
    assert summary(commands) == [
        ("101", "INCOMING", "", ""), ("101", "ACCEPTED", "", ""), ("101", "COMPLETED", "Success", "3"),
    ]


def test_phone_redirect_known_only_after_the_new_leg_rang_is_taken_at_the_bridge():
    """The redirected leg's HANGUP_COMPLETE may come after the next leg's CHANNEL_CREATE."""
    call = Call("a1")
    commands = feed_all(CallTracker(), [
        call.create(0), call.leg("b1", "101", 0.1), call.outside_leg("m1", "79160000101", t=0.6),
        redirected_leg_end(call, "b1", 0.6, "79160000101"), call.bridge("m1", 3),
        call.leg_end("m1", 6, billsec=3), call.end(6),
    ])
    assert summary(commands) == [
        ("101", "INCOMING", "", ""), ("101", "ACCEPTED", "", ""), ("101", "COMPLETED", "Success", "3"),
    ]


def test_phone_redirect_to_a_colleague_is_his_call():
    call = Call("a1")
    commands = feed_all(CallTracker(), [
        call.create(0), call.leg("b1", "101", 0.1), redirected_leg_end(call, "b1", 0.6, "102"),
        call.leg("b2", "102", 0.7), call.bridge("b2", 3), call.leg_end("b2", 6, billsec=3), call.end(6),
    ])
    assert summary(commands) == [
        ("101", "INCOMING", "", ""), ("101", "COMPLETED", "Cancelled", "0"),
        ("102", "INCOMING", "", ""), ("102", "ACCEPTED", "", ""), ("102", "COMPLETED", "Success", "3"),
    ]


def test_an_outside_leg_to_another_number_after_a_redirect_is_nobodys():
    call = Call("a1")
    commands = feed_all(CallTracker(), [
        call.create(0), call.leg("b1", "101", 0.1), redirected_leg_end(call, "b1", 0.6, "79160000101"),
        call.outside_leg("m1", "79990000000", t=0.7), call.bridge("m1", 3),
        call.leg_end("m1", 6, billsec=3), call.end(6),
    ])
    assert summary(commands) == [("101", "INCOMING", "", ""), ("101", "COMPLETED", "Missed", "0")]
