"""fsbridge.core.cdr: mod_json_cdr posts -> channel facts -> the events finishing a call.

The CDRs are real: tests/data/cdr/ (README there) holds the bytes a
FreeSWITCH 1.10.12 lab posted for a loopback call bridged to a second
loopback leg, with planfix_data_* and fsbridge_record_file set.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from flask import Flask

from fsbridge import cdr_endpoint, config
from fsbridge.core import cdr
from fsbridge.core.tracker import CallTracker, PlanfixCommand
from tests.test_tracker_edges import Call

DATA = Path(__file__).parent / "data" / "cdr"
A_LEG = "11111111-2222-4333-8444-555555555555"
B_LEG = "aafcf9b6-c0c8-4611-b1f7-589964652664"
SECRET = "cdr-secret-0123456789"


def real(name: str) -> bytes:
    return (DATA / name).read_bytes()


def test_real_json_cdr_gives_the_bridged_leg_facts():
    f = cdr.facts(cdr.parse_body(real("lab-loopback-bridge-5.json"), "application/json"))
    assert (f.uuid, f.call_uuid, f.direction) == (A_LEG, A_LEG, "outbound")
    assert f.is_b_leg is False
    assert (f.answer_us, f.bridge_us, f.end_us) == (1796164372101586, 1796164372121567, 1796164376161595)
    assert (f.hangup_cause, f.billsec, f.originate_disposition) == ("NORMAL_CLEARING", 4, "SUCCESS")
    assert f.last_bridge_to == B_LEG
    assert f.bridged_ext == "default"  # originated_legs "<uuid>;Outbound Call;default"
    assert f.recording_path == f"/usr/local/freeswitch/recordings/{A_LEG}.wav"
    # encode-values=true: "site%20form" in the JSON is "site form"
    assert f.planfix_data == (("deal", "42"), ("source", "site form"))
    assert f.destination == "9196"


def test_real_b_leg_cdr_is_marked_as_such():
    f = cdr.facts(cdr.parse_body(real("lab-loopback-bridge-7.json"), "application/json"))
    assert f.uuid == B_LEG and f.is_b_leg and f.last_bridge_to == A_LEG


def test_form_encoded_cdr_is_read_when_freeswitch_kept_it_valid():
    f = cdr.facts(cdr.parse_body(real("lab-form-encoded-2.body"), "application/x-www-form-urlencoded"))
    assert f.caller == "79101234567" and f.planfix_data == (("deal", "42"), ("source", "site form"))


def test_form_encoded_cdr_freeswitch_broke_is_refused_with_the_fix():
    # FreeSWITCH's encode=true leaves the %22 of a url-encoded value as is:
    # the quote comes back with the document's and the JSON is broken.
    with pytest.raises(cdr.CdrError, match="encode=false"):
        cdr.parse_body(real("lab-form-encoded-1.body"), "application/x-www-form-urlencoded")


def test_base64_cdr():
    body = b"cdr=" + base64.b64encode(real("lab-loopback-bridge-5.json"))
    assert cdr.facts(cdr.parse_body(body, "application/x-www-form-base64-encoded")).uuid == A_LEG


@pytest.mark.parametrize("body", [b"", b"[1]", b"{}", b'{"variables": []}', b"\xff\xfe", b"cdr=%ZZ",
                                  b'{"variables": {"billsec": "3"}}'])
def test_bad_bodies_are_refused(body):
    with pytest.raises(cdr.CdrError):
        cdr.facts(cdr.parse_body(body, "application/json"))


def test_held_facts_are_read_back_exactly():
    f = cdr.facts(cdr.parse_body(real("lab-loopback-bridge-5.json"), "application/json"))
    assert f.headers and f.planfix_data
    assert cdr.facts_from_json(cdr.facts_to_json(f)) == f


@pytest.mark.parametrize("text", ["", "[]", "{}", '{"uuid": "a"}', "not json"])
def test_a_damaged_held_cdr_is_refused(text):
    with pytest.raises(cdr.CdrError):
        cdr.facts_from_json(text)


def facts(**over) -> cdr.CdrFacts:
    base = dict(
        uuid="a", call_uuid="a", direction="inbound", caller="79101234567", destination="74950000000",
        answer_us=10_000_000, bridge_us=12_000_000, end_us=17_900_000, hangup_cause="NORMAL_CLEARING",
        billsec=7, originate_disposition="SUCCESS", sip_term_status="", last_bridge_to="b", bridged_ext="102",
        recording_path="/rec/a.wav", record_ms=5000, voicemail_path="", planfix_data=(("deal", "42"),),
        queue_member_uuid="", is_b_leg=False,
    )
    base.update(over)
    return cdr.CdrFacts(**base)


def start(ext: str, type_: str = "in") -> dict[str, str]:
    return {"cmd": "event", "type": type_, "event": "INCOMING" if type_ == "in" else "OUTGOING",
            "phone": "79101234567", "diversion": "74950000000", "ext": ext, "callid": "a"}


def summary(out):
    return [(f["event"], f["ext"], f.get("status"), f.get("duration"), f.get("data_deal"), path) for f, path in out]


def test_accepted_leg_gets_success_with_talk_time_recording_and_data():
    out = cdr.completions([(start("101"), True)], facts())
    assert summary(out) == [("COMPLETED", "101", "Success", "5", "42", "/rec/a.wav")]
    assert out[0][0]["is_recorded"] == "1"


def test_ring_group_answered_while_down():
    legs = [(start("101"), False), (start("102"), False), (start("103"), False)]
    assert summary(cdr.completions(legs, facts())) == [
        ("ACCEPTED", "102", None, None, None, None),
        ("COMPLETED", "101", "Cancelled", "0", "42", None),
        ("COMPLETED", "103", "Cancelled", "0", "42", None),
        ("COMPLETED", "102", "Success", "5", "42", "/rec/a.wav"),
    ]


def test_nobody_answered_is_missed_with_a_voicemail_message():
    legs = [(start("101"), False), (start("102"), False)]
    out = cdr.completions(legs, facts(bridge_us=0, last_bridge_to="", bridged_ext="", voicemail_path="/vm/m.wav"))
    assert summary(out) == [("COMPLETED", "101", "Missed", "0", "42", "/vm/m.wav"),
                            ("COMPLETED", "102", "Missed", "0", "42", "/vm/m.wav")]


def test_outgoing_busy():
    out = cdr.completions([(start("101", "out"), False)],
                          facts(bridge_us=0, answer_us=0, hangup_cause="USER_BUSY", originate_disposition="USER_BUSY"))
    assert summary(out) == [("COMPLETED", "101", "Busy", "0", "42", None)]


def test_unrecorded_call_has_no_recording():
    out = cdr.completions([(start("101"), True)], facts(record_ms=0))
    assert out[0][0]["is_recorded"] == "0" and out[0][1] is None


@pytest.mark.parametrize("header,ok", [
    ("Basic " + base64.b64encode(f"fsbridge:{SECRET}".encode()).decode(), True),
    ("Basic " + base64.b64encode(f"anyone:{SECRET}".encode()).decode(), True),
    ("Basic " + base64.b64encode(b"fsbridge:wrong").decode(), False),
    ("Basic " + base64.b64encode(SECRET.encode()).decode(), False),
    ("Bearer " + SECRET, False),
    ("Basic !!!", False),
    ("", False),
])
def test_basic_auth(header, ok):
    assert cdr_endpoint.authorized(header, SECRET) is ok


def test_route_limits_and_answers():
    app = Flask("t")
    seen = []
    cdr_endpoint.register_route(app, SECRET, 8192, lambda f: seen.append(f.uuid) or "completed")
    client = app.test_client()
    good = {"Authorization": "Basic " + base64.b64encode(f"u:{SECRET}".encode()).decode(),
            "Content-Type": "application/json"}
    body = real("lab-loopback-bridge-5.json")
    assert client.post("/cdr", data=body, headers={"Content-Type": "application/json"}).status_code == 401
    reply = client.post("/cdr?uuid=x", data=body, headers=good)
    assert reply.status_code == 200 and reply.json == {"result": "completed"} and seen == [A_LEG]
    assert client.post("/cdr", data=b"{" + b" " * 9000 + b"}", headers=good).status_code == 413
    bad = client.post("/cdr", data=b"nope", headers=good)
    assert bad.status_code == 400 and bad.json["error"] == "Invalid parameters"
    assert seen == [A_LEG]


def test_route_asks_for_a_retry():
    app = Flask("t")

    def later(_facts):
        raise cdr.CdrRetry("not now")

    cdr_endpoint.register_route(app, SECRET, 8192, later)
    good = {"Authorization": "Basic " + base64.b64encode(f"u:{SECRET}".encode()).decode(),
            "Content-Type": "application/json"}
    reply = app.test_client().post("/cdr", data=real("lab-loopback-bridge-5.json"), headers=good)
    assert reply.status_code == 503 and reply.json == {"error": "Service unavailable", "detail": "not now"}


def test_tracker_forgets_gone_calls_without_completing_them():
    tracker = CallTracker()
    call, other = Call("a1"), Call("a2")
    out = [c for ev in (call.create(0), call.leg("b1", "101", 0.1), other.create(0), other.leg("b2", "102", 0.1))
           for c in tracker.feed(ev)]
    assert [c.fields["event"] for c in out] == ["INCOMING", "INCOMING"]
    assert tracker.tracks("a1") and tracker.tracks("b1")
    assert tracker.forget_gone({"b2"}) == ["a1"]  # a2 lives on through its leg b2
    assert not tracker.tracks("a1") and not tracker.tracks("b1") and tracker.tracks("a2")
    # Its late events are foreign now: the CDR finishes it, not the tracker.
    assert tracker.feed(call.end(5)) == []


def test_config_cdr_section(tmp_path):
    base = f"[server]\ntoken = 0123456789abcdef0123\n[storage]\ndir = {tmp_path / 'state'}\n"
    path = tmp_path / "f.ini"
    path.write_text(base)
    cfg = config.load(str(path))
    assert (cfg.cdr.secret, cfg.cdr.wait, cfg.cdr.max_body_bytes) == ("", 600.0, 1048576)
    path.write_text(base + "[cdr]\nsecret = short\nwait = 0\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(str(path))
    text = str(err.value)
    assert "[cdr] secret: must be at least 16" in text and "[cdr] wait" in text and str(path) in text


# ---- calls fsbridge never saw: captured while fsbridge was down (lab-down-*) ----


def down(call: str, leg: str) -> cdr.CdrFacts:
    return cdr.facts(cdr.parse_body(real(f"lab-down-{call}-{leg}.json"), "application/json"))


def replayed(a: cdr.CdrFacts, legs: list[cdr.CdrFacts]) -> list[tuple[str, str, str, str]]:
    out = CallTracker().replay(cdr.call_events(a, legs))
    return [(c.fields["event"], c.fields["ext"], c.fields.get("status", ""), c.fields.get("duration", "")) for c in out]


def test_real_rung_leg_cdrs_name_their_caller_and_the_a_leg_names_them():
    a, b101, b103 = down("answered", "a"), down("answered", "b101"), down("answered", "b103")
    assert (a.parent_uuid, b101.parent_uuid, b103.parent_uuid) == ("", a.uuid, a.uuid)
    assert a.rung_legs == (b101.uuid, b103.uuid)  # originate_causes
    assert a.last_bridge_to == b101.uuid and a.created_us < b101.created_us
    assert down("outbound", "a").rung_legs == (down("outbound", "b").uuid,)  # one leg: no ARRAY:: prefix


def test_group_answered_unseen_is_reported_as_the_tracker_reports_it_live():
    a, legs = down("answered", "a"), [down("answered", "b103"), down("answered", "b101")]
    out = CallTracker().replay(cdr.call_events(a, legs))
    assert [(c.fields["event"], c.fields["ext"], c.fields.get("status", "")) for c in out] == [
        ("INCOMING", "101", ""), ("INCOMING", "103", ""), ("ACCEPTED", "101", ""),
        ("COMPLETED", "103", "Cancelled"), ("COMPLETED", "101", "Success")]
    talk = out[-1]
    assert talk.fields["duration"] == "2" and talk.fields["is_recorded"] == "1"  # billsec 2, record_ms 2020
    assert talk.recording_path == a.recording_path and talk.fields["data_line"] == "74950000000"
    assert {c.call_id for c in out} == {a.uuid}
    assert {(c.fields["phone"], c.fields["diversion"]) for c in out} == {(a.caller, "74950000000")}


def test_group_nobody_answered_unseen_is_missed_for_each():
    assert replayed(down("missed", "a"), [down("missed", "b101"), down("missed", "b103")]) == [
        ("INCOMING", "101", "", ""), ("INCOMING", "103", "", ""),
        ("COMPLETED", "101", "Missed", "0"), ("COMPLETED", "103", "Missed", "0")]


def test_outbound_unseen_is_reported():
    assert replayed(down("outbound", "a"), [down("outbound", "b")]) == [
        ("OUTGOING", "102", "", ""), ("ACCEPTED", "102", "", ""), ("COMPLETED", "102", "Success", "3")]


def test_without_rung_legs_cdrs_the_answered_extension_still_gets_his_call():
    """log-b-leg=false: only the A leg; its bridge names who answered (originated_legs)."""
    assert replayed(down("answered", "a"), []) == [
        ("INCOMING", "101", "", ""), ("ACCEPTED", "101", "", ""), ("COMPLETED", "101", "Success", "2")]
    assert replayed(down("missed", "a"), []) == []  # nobody is known to have rung


def test_unseen_calls_wait_for_the_legs_the_a_leg_names():
    a, b101, b103 = down("answered", "a"), down("answered", "b101"), down("answered", "b103")
    unseen = cdr.UnseenCalls(settle_s=10)
    unseen.add(b103, now=0)
    unseen.add(a, now=1)
    assert unseen.ready(now=2) == [] and len(unseen) == 2
    unseen.add(b101, now=3)
    assert unseen.ready(now=3) == [(a, [b103, b101])] and len(unseen) == 0  # in arrival order


def test_unseen_call_is_ready_after_the_settle_time_with_the_legs_it_has():
    a, b101 = down("answered", "a"), down("answered", "b101")
    unseen = cdr.UnseenCalls(settle_s=10, keep_s=60)
    unseen.add(a, now=0)
    unseen.add(b101, now=1)
    assert unseen.ready(now=9) == []
    assert unseen.ready(now=10) == [(a, [b101])]
    unseen.add(down("missed", "b101"), now=20)  # its A leg never comes
    assert unseen.ready(now=79) == [] and len(unseen) == 1
    assert unseen.ready(now=80) == [] and len(unseen) == 0


def test_unseen_calls_are_bounded():
    unseen = cdr.UnseenCalls(max_cdrs=2)
    for n, (call, leg) in enumerate([("answered", "b101"), ("missed", "b101"), ("outbound", "a")]):
        unseen.add(down(call, leg), now=n)
    assert len(unseen) == 2 and unseen.holds(down("outbound", "a").uuid)  # the oldest went
    assert [a.uuid for a, legs in unseen.ready(now=100)] == [down("outbound", "a").uuid]


def test_a_leg_rung_and_ended_before_the_call_was_adopted_gets_its_part():
    """The group call: fsbridge takes it up while 101 talks (the listing has no 103
    leg any more); 103's CDR then says it rang: INCOMING and Cancelled."""
    a, b101, b103 = down("answered", "a"), down("answered", "b101"), down("answered", "b103")
    tracker = CallTracker()
    events = cdr.call_events(a, [b101])
    talking = [ev for ev in events if ev.name in ("CHANNEL_CREATE", "CHANNEL_BRIDGE")]
    assert [(c.fields["event"], c.fields["ext"]) for ev in talking for c in tracker.feed(ev)] == [
        ("INCOMING", "101"), ("ACCEPTED", "101")]
    late = tracker.late_leg(*cdr.leg_events(b103))
    assert [(c.fields["event"], c.fields["ext"], c.fields.get("status", "")) for c in late] == [
        ("INCOMING", "103", ""), ("COMPLETED", "103", "Cancelled")]
    assert {c.call_id for c in late} == {a.uuid}
    assert tracker.late_leg(*cdr.leg_events(b103)) == []  # posted again
    assert tracker.late_leg(*cdr.leg_events(b101)) == []  # a leg it follows
    assert CallTracker().late_leg(*cdr.leg_events(b103)) == []  # no such call followed


def test_legs_held_for_a_call_then_adopted_are_handed_back():
    """Posted before the reconnect, the rung legs wait for an A leg; the call is
    adopted instead (still up): the node takes its legs back for late_leg."""
    a, b103 = down("answered", "a"), down("answered", "b103")
    unseen = cdr.UnseenCalls()
    unseen.add(b103, now=0)
    assert unseen.pop_legs(a.uuid) == [b103] and len(unseen) == 0
    assert unseen.pop_legs(a.uuid) == []
