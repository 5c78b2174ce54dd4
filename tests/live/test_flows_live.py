"""Call flows beyond the spec's examples, over real SIP (captures 20-31 of tests/data/esl).

Transfers (REFER is in test_live.py), pickup, mod_callcenter queues of each
strategy and a group that ends in voicemail: each test asserts the exact PlanFix events
(event, ext, status) the real `fsbridge run` sent, and the talk durations
roughly.  The lab-only extensions and the queue are installed into the
private lab conf by tests/live/lab.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

from tests.live.lab import AGENT_RING, QUEUE_DID, STRATEGY_DIDS, USERS, VOICEMAIL_DID, free_udp_port
from tests.live.test_live import (CLIENT_NAME, brief, carrier_call, carrier_uas, events, moved_on, phone, phone_dials,
                                  wait, wait_calls_done)


VOICEMAIL_PCAP = "/usr/share/sip-tester/g711a.pcap"  # the carrier's speech (sipp/carrier-uac-voicemail.xml)


def leg_uuid(env, user: str, *, answered: bool = False, timeout: float = 10, prefix: str = "") -> str:
    """The Unique-ID of the one channel to phone `user` (or whose name starts with
    `prefix`), once it is up, or answered."""
    name = prefix or f"sofia/internal/{user}@"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = env.lab.cli("show channels as json")
        rows = json.loads(out).get("rows") or [] if out.strip().startswith("{") else []
        legs = [r for r in rows if r.get("name", "").startswith(name)
                and (not answered or r.get("callstate") == "ACTIVE")]
        if legs:
            (leg,) = legs
            return leg["uuid"]
        time.sleep(0.1)
    raise AssertionError(f"no {'answered ' if answered else ''}channel {name}: {env.lab.cli('show channels')}")


def completed(env) -> dict[str, dict[str, str]]:
    return {r["ext"]: r for r in events(env) if r["event"] == "COMPLETED"}


def did_call(env, did: str, scenario: str = "carrier-uac-inbound-long"):
    return env.lab.sipp(scenario, "-s", did, "-key", "caller", env.other, "-m", "1",
                        port=free_udp_port(), target="external")


def test_blind_transfer_by_api_uuid_transfer(live):
    """Capture 20: 101 answers, `uuid_transfer <101 leg> -bleg 102 XML default`, 102 talks."""
    live.planfix.contacts[live.client] = {"contact_name": CLIENT_NAME, "responsible": 101}
    phone(live, "101", "uas-answer-wait-bye")
    phone(live, "102", "uas-answer-send-bye", "-d", "1000")  # rings 1 s, talks 2 s, hangs up
    call = carrier_call(live, live.client, scenario="carrier-uac-inbound-long")
    first = leg_uuid(live, "101", answered=True)
    time.sleep(1.2)
    assert "+OK" in live.lab.cli(f"uuid_transfer {first} -bleg 102 XML default")
    assert wait(call, 40) == 0
    wait_calls_done(live, 2)
    assert brief(live) == [("INCOMING", "101", ""), ("ACCEPTED", "101", ""), ("COMPLETED", "101", "Success"),
                           ("INCOMING", "102", ""), ("ACCEPTED", "102", ""), ("COMPLETED", "102", "Success")]
    done = completed(live)
    assert 0 <= int(done["101"]["duration"]) <= 3 and 1 <= int(done["102"]["duration"]) <= 4
    assert len({r["callid"] for r in events(live)}) == 1


def test_blind_transfer_to_an_outside_number(live):
    """101 answers and transfers the caller to a mobile (`uuid_transfer <101 leg> -bleg
    <number> XML default`: the outbound route, the carrier answers): 101's part ends
    Success with his own talk time; the leg to the outside is nobody's and shows nothing."""
    live.planfix.contacts[live.client] = {"contact_name": CLIENT_NAME, "responsible": 101}
    phone(live, "101", "uas-answer-wait-bye")
    mobile = carrier_uas(live, "uas-answer-send-bye", "-d", "2000")  # the mobile talks 2 s, hangs up
    call = carrier_call(live, live.client, scenario="carrier-uac-inbound-long")
    first = leg_uuid(live, "101", answered=True)
    time.sleep(1.2)
    assert "+OK" in live.lab.cli(f"uuid_transfer {first} -bleg 79160000999 XML default")
    assert wait(mobile, 40) == 0
    assert wait(call, 40) == 0
    wait_calls_done(live, 1)
    time.sleep(1.0)  # nothing more may come for the outside leg
    assert brief(live) == [("INCOMING", "101", ""), ("ACCEPTED", "101", ""), ("COMPLETED", "101", "Success")]
    assert 0 <= int(completed(live)["101"]["duration"]) <= 3


def test_attended_transfer_emulated_with_uuid_bridge(live):
    """Capture 21: 101 answers, consults 102 from a second line, then `uuid_bridge <caller> <102 leg>`
    (what mod_sofia does for a REFER with Replaces); 101 talked ~3 s, 102 ~12 s with the caller."""
    live.planfix.contacts[live.client] = {"contact_name": CLIENT_NAME, "responsible": 101}
    phone(live, "101", "uas-answer-wait-bye")
    phone(live, "102", "uas-answer-wait-bye")
    call = carrier_call(live, live.client, scenario="carrier-uac-inbound-long")  # hangs up 15 s after the answer
    leg_uuid(live, "101", answered=True)
    answered = time.monotonic()
    caller = leg_uuid(live, "", prefix="sofia/external/")
    consult = live.lab.sipp("phone-uac-consult", "-s", "102", "-key", "ext", "101", "-au", "101", "-ap", "1234",
                            "-m", "1", port=free_udp_port())
    target = leg_uuid(live, "102", answered=True)
    time.sleep(max(0.0, 3 - (time.monotonic() - answered)))
    assert "+OK" in live.lab.cli(f"uuid_bridge {caller} {target}")
    assert wait(consult, 20) == 0  # FreeSWITCH hung the consult line up
    assert wait(call, 40) == 0
    wait_calls_done(live, 2)
    assert brief(live) == [("INCOMING", "101", ""), ("ACCEPTED", "101", ""), ("COMPLETED", "101", "Success"),
                           ("INCOMING", "102", ""), ("ACCEPTED", "102", ""), ("COMPLETED", "102", "Success")]
    done = completed(live)
    assert 2 <= int(done["101"]["duration"]) <= 4 and 10 <= int(done["102"]["duration"]) <= 14
    assert {r["callid"] for r in events(live)} == {caller}


def test_pickup_of_a_ringing_phone_by_another(live):
    """Capture 22: responsible 101 rings; 102 dials **<101 leg> (intercept -bleg) and talks 3 s."""
    live.planfix.contacts[live.client] = {"contact_name": CLIENT_NAME, "responsible": 101}
    phone(live, "101", "uas-noanswer")
    call = carrier_call(live, live.client, scenario="carrier-uac-inbound-long")
    ringing = leg_uuid(live, "101")
    time.sleep(1.0)
    picker = phone_dials(live, "102", f"**{ringing}")  # answers, talks 3 s, hangs up
    assert wait(picker, 30) == 0
    assert wait(call, 30) == 0
    wait_calls_done(live, 2)
    assert brief(live) == [("INCOMING", "101", ""), ("COMPLETED", "101", "Cancelled"),
                           ("INCOMING", "102", ""), ("ACCEPTED", "102", ""), ("COMPLETED", "102", "Success")]
    assert 2 <= int(completed(live)["102"]["duration"]) <= 5
    assert len({r["callid"] for r in events(live)}) == 1


def test_callcenter_ring_all_queue(live):
    """Capture 23: answer, callcenter sales@default rings 101-103; 102 answers after 1 s, talks 2 s."""
    phone(live, "101", "uas-noanswer")
    phone(live, "102", "uas-answer-send-bye", "-d", "1000")
    phone(live, "103", "uas-noanswer")
    assert wait(did_call(live, QUEUE_DID), 40) == 0
    wait_calls_done(live, 3)
    seen = brief(live)
    assert sorted(seen[:3]) == [("INCOMING", "101", ""), ("INCOMING", "102", ""), ("INCOMING", "103", "")]
    assert seen[3] == ("ACCEPTED", "102", "")
    assert sorted(seen[4:]) == [("COMPLETED", "101", "Cancelled"), ("COMPLETED", "102", "Success"),
                                ("COMPLETED", "103", "Cancelled")]
    assert 1 <= int(completed(live)["102"]["duration"]) <= 4
    assert len({r["callid"] for r in events(live)}) == 1


def answered_by_one_agent(env, did: str) -> str:
    """A queue call with every phone answering: the one agent it was offered to
    gets INCOMING, ACCEPTED, COMPLETED Success; no one else anything.  His ext."""
    env.planfix.clear()
    assert wait(did_call(env, did), 40) == 0
    wait_calls_done(env, 1)
    seen = brief(env)
    ext = seen[0][1]
    assert seen == [("INCOMING", ext, ""), ("ACCEPTED", ext, ""), ("COMPLETED", ext, "Success")]
    assert 1 <= int(completed(env)[ext]["duration"]) <= 3
    assert len({r["callid"] for r in events(env)}) == 1
    # the queue frees the agent once his leg is gone: the next call must find him waiting
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "0 total" not in env.lab.cli("show calls count"):
        time.sleep(0.2)
    return ext


def answering_phones(env) -> None:
    for user in USERS:
        phone(env, user, "uas-answer-send-bye", "-d", "1000")  # rings 1 s, talks 2 s, hangs up


def test_callcenter_longest_idle_agent_offers_one_agent_and_then_another(live):
    """Capture 28: one agent is offered the call; having just talked, he is not the longest idle next."""
    answering_phones(live)
    first = answered_by_one_agent(live, STRATEGY_DIDS["longest-idle-agent"])
    second = answered_by_one_agent(live, STRATEGY_DIDS["longest-idle-agent"])
    assert second != first


def test_callcenter_round_robin_offers_the_next_agent(live):
    """Capture 29: agents 101-103 at positions 1-3; each call goes to the one after the last offered."""
    answering_phones(live)
    first = answered_by_one_agent(live, STRATEGY_DIDS["round-robin"])
    second = answered_by_one_agent(live, STRATEGY_DIDS["round-robin"])
    assert second == USERS[(USERS.index(first) + 1) % len(USERS)]


def test_callcenter_top_down_offers_the_first_agent(live):
    """Capture 30: top-down starts at position 1 for every call."""
    answering_phones(live)
    assert answered_by_one_agent(live, STRATEGY_DIDS["top-down"]) == "101"


def test_callcenter_agent_not_answering_is_passed_over_for_the_next(live):
    """Capture 31: top-down, 101 rings AGENT_RING s unanswered, the queue moves on to 102, who talks."""
    phone(live, "101", "uas-noanswer")
    phone(live, "102", "uas-answer-send-bye", "-d", "1000")
    phone(live, "103", "uas-answer-send-bye", "-d", "1000")
    assert wait(did_call(live, STRATEGY_DIDS["top-down"]), 40 + AGENT_RING) == 0
    wait_calls_done(live, 2)
    assert brief(live) in moved_on("101", "102", [("ACCEPTED", "102", ""), ("COMPLETED", "102", "Success")])
    assert 1 <= int(completed(live)["102"]["duration"]) <= 3
    assert len({r["callid"] for r in events(live)}) == 1


def test_group_no_answer_then_voicemail_is_missed_for_each(live):
    """Capture 25: the group rings GROUP_TIMEOUT s, nobody answers, voicemail answers the caller."""
    for user in ("101", "102", "103"):
        phone(live, user, "uas-noanswer")
    assert wait(did_call(live, VOICEMAIL_DID, scenario="carrier-uac-inbound"), 40) == 0
    wait_calls_done(live, 3)
    seen = brief(live)
    assert sorted(seen[:3]) == [("INCOMING", "101", ""), ("INCOMING", "102", ""), ("INCOMING", "103", "")]
    assert sorted(seen[3:]) == [("COMPLETED", "101", "Missed"), ("COMPLETED", "102", "Missed"),
                                ("COMPLETED", "103", "Missed")]


@pytest.mark.skipif(not Path(VOICEMAIL_PCAP).is_file(), reason=f"no {VOICEMAIL_PCAP} (sip-tester)")
def test_voicemail_message_left_is_the_recording_of_the_missed_call(live):
    """As capture 25, and the caller speaks 7 s after the beep: the Missed COMPLETEDs carry the message."""
    for user in ("101", "102", "103"):
        phone(live, user, "uas-noanswer")
    assert wait(did_call(live, VOICEMAIL_DID, scenario="carrier-uac-voicemail"), 40) == 0
    wait_calls_done(live, 3)
    assert sorted(e for e in brief(live) if e[0] == "COMPLETED") == [
        ("COMPLETED", "101", "Missed"), ("COMPLETED", "102", "Missed"), ("COMPLETED", "103", "Missed")]
    (message,) = (live.lab.dirs["recordings"] / "voicemail").rglob("msg_*.wav")
    assert message.stat().st_size > 3 * 16000  # more than min-record-len 3 s of 8 kHz 16-bit
    done = completed(live)
    assert {r["is_recorded"] for r in done.values()} == {"1"}
    for r in done.values():  # every link downloads the message itself, not the session recording
        got = requests.get(r["record_link"], timeout=10)
        assert got.status_code == 200 and got.content == message.read_bytes()
