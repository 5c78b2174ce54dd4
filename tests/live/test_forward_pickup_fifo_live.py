"""Forwarding to a mobile, group pickup and mod_fifo over real SIP (captures 40-43 of tests/data/esl).

Each test asserts the exact PlanFix events the real `fsbridge run` sent for
the flow, as docs/event-mapping.md "Who takes part" says: the forwarding
extension is credited for the mobile's answer; a group picked up by a third
phone is Cancelled for the group and Success for the picker; an agent who
takes a caller out of a FIFO is the one who answered.  With
FSBRIDGE_LIVE_CAPTURE=<dir> each test also records its capture
(tests/live/recorder.py).
"""

from __future__ import annotations

import time

from tests.live.lab import (
    ESL_PASSWORD, FIFO_DID, FIFO_ENTERPRISE_DID, FIFO_MEMBERS_DID, FORWARD_MOBILE, FORWARD_USER, GROUP_PICKUP_CODE, GROUP_PICKUP_DID,
    LOOPBACK_FORWARD_DID, NOANSWER_FORWARD_DID, NOANSWER_MOBILE, PICKUP_CODE, PICKUP_GROUP_DID, messages,
)
from tests.live.recorder import recording
from tests.live.test_flows_live import completed, did_call, leg_uuid
from tests.live.lab import free_udp_port
from tests.live.test_live import CLIENT_NAME, brief, carrier_call, carrier_uas, events, phone, phone_dials, wait, wait_calls_done


def capture(env, name: str):
    return recording(env.lab.esl_port, ESL_PASSWORD, name)


def test_unconditional_forward_of_the_responsible_credits_him(live):
    """Capture 40: the client's responsible 104 forwards every call (his directory dial-string)
    to his mobile; the mobile answers after 1 s and hangs up 2 s later."""
    live.planfix.contacts[live.client] = {"contact_name": CLIENT_NAME, "responsible": int(FORWARD_USER)}
    with capture(live, "40-inbound-forward-unconditional-104-to-mobile"):
        mobile = carrier_uas(live, "uas-answer-send-bye", "-d", "1000")
        assert wait(carrier_call(live, live.client)) == 0
        wait_calls_done(live, 1)
    assert f"INVITE sip:{FORWARD_MOBILE}@" in messages(mobile)
    assert brief(live) == [("INCOMING", FORWARD_USER, ""), ("ACCEPTED", FORWARD_USER, ""),
                           ("COMPLETED", FORWARD_USER, "Success")]
    assert 1 <= int(completed(live)[FORWARD_USER]["duration"]) <= 3
    assert {r["phone"] for r in events(live)} == {live.client}


def test_forward_on_no_answer_to_a_mobile_credits_the_extension(live):
    """Capture 41: 101 rings 3 s unanswered; the dialplan forwards to 101's mobile with
    `Diversion: <sip:101@...>`; the mobile answers after 1 s and hangs up 2 s later."""
    phone(live, "101", "uas-noanswer")
    with capture(live, "41-inbound-forward-noanswer-101-to-mobile"):
        mobile = carrier_uas(live, "uas-answer-send-bye", "-d", "1000")
        assert wait(did_call(live, NOANSWER_FORWARD_DID, scenario="carrier-uac-inbound")) == 0
        wait_calls_done(live, 1)
    invite = messages(mobile)
    assert f"INVITE sip:{NOANSWER_MOBILE}@" in invite and "Diversion: <sip:101@127.0.0.1>;reason=no-answer" in invite
    # his desk phone, then his mobile: one part of 101's, not a new ring
    assert brief(live) == [("INCOMING", "101", ""), ("ACCEPTED", "101", ""), ("COMPLETED", "101", "Success")]
    assert 1 <= int(completed(live)["101"]["duration"]) <= 3


def test_forward_through_loopback_tagged_with_the_extension(live):
    """Capture 46: the DID forwards 101 with `{fsbridge_forwarded_from=101}loopback/<mobile>/default`
    (the phones' outbound route dials the gateway); the mobile answers after 1 s, hangs up 2 s later."""
    with capture(live, "46-inbound-forward-loopback-tagged-101-to-mobile"):
        mobile = carrier_uas(live, "uas-answer-send-bye", "-d", "1000")
        assert wait(did_call(live, LOOPBACK_FORWARD_DID, scenario="carrier-uac-inbound")) == 0
        wait_calls_done(live, 1)
    assert f"INVITE sip:{NOANSWER_MOBILE}@" in messages(mobile)
    assert brief(live) == [("INCOMING", "101", ""), ("ACCEPTED", "101", ""), ("COMPLETED", "101", "Success")]
    assert 1 <= int(completed(live)["101"]["duration"]) <= 3
    assert len({r["callid"] for r in events(live)}) == 1


def test_group_pickup_by_a_third_phone(live):
    """Capture 42: the group 101,102 rings; 1 s later phone 103 dials *80 (vanilla group
    intercept of the group "sales"), talks 3 s and hangs up."""
    picked_up_by_103(live, "42-inbound-group-pickup-103-intercepts-101-102", GROUP_PICKUP_DID, GROUP_PICKUP_CODE)


def picked_up_by_103(live, capture_name: str, did: str, code: str) -> None:
    """The group 101,102 rings for ``did``; 1 s later phone 103 dials ``code`` and takes the call."""
    phone(live, "101", "uas-noanswer")
    phone(live, "102", "uas-noanswer")
    with capture(live, capture_name):
        call = did_call(live, did)
        leg_uuid(live, "101")
        leg_uuid(live, "102")
        time.sleep(1.0)
        picker = phone_dials(live, "103", code)
        assert wait(picker, 30) == 0
        assert wait(call, 30) == 0
        wait_calls_done(live, 3)
    assert_picked_up_by_103(live)


def assert_picked_up_by_103(live) -> None:
    """The group's parts end Cancelled (before or right after 103's ACCEPTED, as FreeSWITCH ends
    their legs), 103 gets his own part; one callid."""
    seen = brief(live)
    assert sorted(seen[:2]) == [("INCOMING", "101", ""), ("INCOMING", "102", "")]
    assert sorted(seen[2:]) == [("ACCEPTED", "103", ""), ("COMPLETED", "101", "Cancelled"),
                                ("COMPLETED", "102", "Cancelled"), ("COMPLETED", "103", "Success"),
                                ("INCOMING", "103", "")]
    assert [e for e in seen if e[1] == "103"] == [("INCOMING", "103", ""), ("ACCEPTED", "103", ""),
                                                  ("COMPLETED", "103", "Success")]
    assert seen[-1] == ("COMPLETED", "103", "Success")
    assert 2 <= int(completed(live)["103"]["duration"]) <= 4
    assert len({r["callid"] for r in events(live)}) == 1


def test_group_pickup_with_the_pickup_application(live):
    """Capture 47: the group 101,102 and `pickup/sales@<domain>` rings; 1 s later phone 103 dials
    *81 (`pickup sales@<domain>`), talks 3 s and hangs up."""
    picked_up_by_103(live, "47-inbound-group-pickup-app-103-picks-101-102", PICKUP_GROUP_DID, PICKUP_CODE)


def test_fifo_caller_taken_by_an_agent_who_dials_in(live):
    """Capture 43: the caller waits in mod_fifo 5900 (answered, silence); 1 s later phone 101
    dials 5901 (`fifo 5900@... out nowait`), talks 3 s and hangs up."""
    with capture(live, "43-inbound-fifo-agent-101-dials-in"):
        call = did_call(live, FIFO_DID)
        leg_uuid(live, "", answered=True, prefix="sofia/external/")
        time.sleep(1.0)
        agent = phone_dials(live, "101", "5901")
        assert wait(agent, 30) == 0
        assert wait(call, 30) == 0
        wait_calls_done(live, 1)
    # nobody rang while the caller waited; the agent who took him answered
    assert brief(live) == [("INCOMING", "101", ""), ("ACCEPTED", "101", ""), ("COMPLETED", "101", "Success")]
    assert 2 <= int(completed(live)["101"]["duration"]) <= 4
    assert {(r["phone"], r["diversion"]) for r in events(live)} == {(live.other, FIFO_DID)}


def test_fifo_members_rung_for_the_caller_ringall(live):
    """Capture 44: the caller waits in agents@<domain> (ringall); mod_fifo rings its members
    102 and 103 for him (fifo_bridge_uuid); 102 answers after 1 s and hangs up 2 s later."""
    phone(live, "102", "uas-answer-send-bye", "-d", "1000")
    phone(live, "103", "uas-noanswer")
    with capture(live, "44-inbound-fifo-members-ringall-102-answers"):
        call = did_call(live, FIFO_MEMBERS_DID)
        assert wait(call, 40) == 0
        wait_calls_done(live, 2)
    seen = brief(live)
    assert sorted(seen[:2]) == [("INCOMING", "102", ""), ("INCOMING", "103", "")]
    assert seen[2] == ("ACCEPTED", "102", "")
    assert sorted(seen[3:]) == [("COMPLETED", "102", "Success"), ("COMPLETED", "103", "Cancelled")]
    assert 1 <= int(completed(live)["102"]["duration"]) <= 3


def test_fifo_members_rung_for_the_queue_enterprise(live):
    """Capture 45: the caller waits in agents_e@<domain> (enterprise): mod_fifo rings 102 and 103
    for the queue, no caller chosen yet; 102 answers after 1 s, gets the caller, hangs up 2 s later.
    Only the member who took the caller takes part in his call."""
    phone(live, "102", "uas-answer-send-bye", "-d", "1000")
    phone(live, "103", "uas-noanswer")
    with capture(live, "45-inbound-fifo-members-enterprise-102-answers"):
        call = did_call(live, FIFO_ENTERPRISE_DID)
        assert wait(call, 40) == 0
        wait_calls_done(live, 1)
    assert brief(live) == [("INCOMING", "102", ""), ("ACCEPTED", "102", ""), ("COMPLETED", "102", "Success")]
    assert 1 <= int(completed(live)["102"]["duration"]) <= 3


def test_forward_by_the_phone_with_302(live):
    """Capture 48: the client's responsible 101 forwards on his phone: it answers the INVITE with
    `302 Moved Temporarily` (Contact: his mobile); mod_sofia transfers the caller to that number,
    in `default` (fsbridge's force_transfer_context), whose outbound route dials the gateway."""
    live.planfix.contacts[live.client] = {"contact_name": CLIENT_NAME, "responsible": 101}
    phone(live, "101", "uas-redirect-302", "-key", "target", NOANSWER_MOBILE, "-key", "ext", "101")
    with capture(live, "48-inbound-forward-phone-302-101-to-mobile"):
        mobile = carrier_uas(live, "uas-answer-send-bye", "-d", "1000")
        assert wait(carrier_call(live, live.client)) == 0
        wait_calls_done(live, 1)
    assert f"INVITE sip:{NOANSWER_MOBILE}@" in messages(mobile)
    assert brief(live) == [("INCOMING", "101", ""), ("ACCEPTED", "101", ""), ("COMPLETED", "101", "Success")]
    assert 1 <= int(completed(live)["101"]["duration"]) <= 3
    assert len({r["callid"] for r in events(live)}) == 1


def test_fifo_consumer_off_hook_serves_two_callers(live):
    """Capture 49: phone 101 dials 5902 (`fifo 5900@... out wait`) and stays on the line; two
    callers come one after the other: the first talks 3 s with 101; the second waits out 101's
    wrap-up (mod_fifo's default, about 5 s) and hangs up 15 s after the FIFO answered him."""
    with capture(live, "49-inbound-fifo-consumer-101-waits-two-callers"):
        consumer = live.lab.sipp("phone-uac-consult", "-s", "5902", "-key", "ext", "101", "-au", "101",
                                 "-ap", "1234", "-m", "1", port=free_udp_port())
        agent = leg_uuid(live, "", answered=True, prefix="sofia/internal/101@")
        assert wait(did_call(live, FIFO_DID, scenario="carrier-uac-inbound"), 30) == 0
        assert wait(did_call(live, FIFO_DID, scenario="carrier-uac-inbound-long"), 40) == 0
        assert "+OK" in live.lab.cli(f"uuid_kill {agent}")
        assert wait(consumer, 20) == 0
        wait_calls_done(live, 2)
    seen = events(live)
    callids = list(dict.fromkeys(r["callid"] for r in seen))
    assert len(callids) == 2
    for callid in callids:
        mine = [(r["event"], r["ext"], r.get("status", "")) for r in seen if r["callid"] == callid]
        assert mine == [("INCOMING", "101", ""), ("ACCEPTED", "101", ""), ("COMPLETED", "101", "Success")]
    first, second = (int(r["duration"]) for r in seen if r["event"] == "COMPLETED")
    assert 2 <= first <= 4 and 5 <= second <= 15
