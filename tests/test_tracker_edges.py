"""Tracker edge cases the real captures do not show on their own.

Synthetic events are built as plain-event bytes and go through
``parse_event_plain`` + ``channel_event``, so events.py is exercised too.
"""

from __future__ import annotations

import collections
from pathlib import Path
from urllib.parse import quote

import pytest

from fsbridge.core import tracker as tracker_mod
from fsbridge.core.events import MAX_NUMBER_CHARS, ChannelEvent, channel_event, sanitize
from fsbridge.core.tracker import (
    CallTracker,
    PlanfixCommand,
    TrackerSettings,
    default_normalize_phone,
    live_uuids_from_show_json,
    outgoing_status,
)
from fsbridge.core.wire import parse_event_plain
from tests.traces import channel_events, frames_of, read_trace

T0 = 1_800_000_000_000_000   # µs


def event(name: str, uuid: str, **headers: str) -> ChannelEvent:
    """A plain event as FreeSWITCH would URL-encode it, reduced by channel_event."""
    lines = [f"Event-Name: {name}", f"Unique-ID: {uuid}"]
    for key, value in headers.items():
        lines.append(f"{key.replace('__', '-')}: {quote(str(value), safe='')}")
    parsed = channel_event(*parse_event_plain(("\n".join(lines) + "\n\n").encode()))
    assert parsed is not None
    return parsed


class Call:
    """Events of one synthetic call through our PBX (times in seconds from T0)."""

    def __init__(self, a: str, caller: str = "79101234567", did: str = "74950000000", user_name: str = "") -> None:
        self.a = a
        self.caller = caller
        self.did = did
        self.user_name = user_name

    def create(self, t: float = 0, **extra: str) -> ChannelEvent:
        headers = dict(Channel__Call__UUID=self.a, Call__Direction="inbound",
                       Caller__Caller__ID__Number=self.caller, Caller__Destination__Number=self.did,
                       Event__Date__Timestamp=str(T0 + int(t * 1e6)))
        if self.user_name:
            headers["variable_user_name"] = self.user_name
        headers.update(extra)
        return event("CHANNEL_CREATE", self.a, **headers)

    def leg(self, b: str, dialed: str, t: float = 0) -> ChannelEvent:
        return event("CHANNEL_CREATE", b, Channel__Call__UUID=self.a, Call__Direction="outbound",
                     Other__Leg__Unique__ID=self.a, Other__Type="originator",
                     Caller__Caller__ID__Number=self.caller, Caller__Destination__Number=dialed,
                     variable_dialed_user=dialed, Event__Date__Timestamp=str(T0 + int(t * 1e6)))

    def outside_leg(self, b: str, number: str, cid: str = "74950000000", t: float = 0) -> ChannelEvent:
        return event("CHANNEL_CREATE", b, Channel__Call__UUID=self.a, Call__Direction="outbound",
                     Other__Leg__Unique__ID=self.a, Other__Type="originator",
                     Caller__Caller__ID__Number=cid, Caller__Destination__Number=number,
                     Event__Date__Timestamp=str(T0 + int(t * 1e6)))

    def bridge(self, b: str, t: float, **extra: str) -> ChannelEvent:
        us = str(T0 + int(t * 1e6))
        return event("CHANNEL_BRIDGE", self.a, Channel__Call__UUID=self.a, Call__Direction="inbound",
                     Other__Leg__Unique__ID=b, Other__Type="originatee",
                     Bridge__A__Unique__ID=self.a, Bridge__B__Unique__ID=b,
                     Other__Leg__Channel__Answered__Time=us, Event__Date__Timestamp=us, **extra)

    def leg_end(self, b: str, t: float, cause: str = "NORMAL_CLEARING", billsec: int = 0,
                name: str = "CHANNEL_HANGUP_COMPLETE", **extra: str) -> ChannelEvent:
        us = str(T0 + int(t * 1e6))
        return event(name, b, Channel__Call__UUID=self.a, Other__Leg__Unique__ID=self.a,
                     Other__Type="originator", Hangup__Cause=cause, variable_billsec=str(billsec),
                     Event__Date__Timestamp=us, Caller__Channel__Hangup__Time=us, **extra)

    def record_stop(self, t: float, path: str, ms: int) -> ChannelEvent:
        return event("RECORD_STOP", self.a, Channel__Call__UUID=self.a, Record__File__Path=path,
                     variable_record_ms=str(ms), Event__Date__Timestamp=str(T0 + int(t * 1e6)))

    def end(self, t: float, cause: str = "NORMAL_CLEARING", name: str = "CHANNEL_HANGUP_COMPLETE",
            **extra: str) -> ChannelEvent:
        us = str(T0 + int(t * 1e6))
        return event(name, self.a, Channel__Call__UUID=self.a, Call__Direction="inbound",
                     Hangup__Cause=cause, Event__Date__Timestamp=us, Caller__Channel__Hangup__Time=us, **extra)

    def answered(self, b: str = "b1", ext: str = "101", talk: int = 5) -> list[ChannelEvent]:
        return [self.create(0), self.leg(b, ext, 0.1), self.bridge(b, 2),
                self.leg_end(b, 2 + talk, billsec=talk), self.end(2 + talk)]


def feed_all(tracker: CallTracker, events: list[ChannelEvent]) -> list[PlanfixCommand]:
    out: list[PlanfixCommand] = []
    for ev in events:
        out += tracker.feed(ev)
    return out


def summary(commands: list[PlanfixCommand]) -> list[tuple[str, ...]]:
    return [(c.fields["ext"], c.fields["event"], c.fields.get("status", ""), c.fields.get("duration", ""))
            for c in commands]


# -- interleaving -------------------------------------------------------------

def _per_call(commands: list[PlanfixCommand]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = collections.defaultdict(list)
    for command in commands:
        grouped[command.call_id].append(command.fields)
    return dict(grouped)


def test_real_calls_interleaved_never_mix(traces_dir):
    names = ["01-inbound-single-answer", "02-inbound-ring-group", "03-inbound-hunt-sequential",
             "04a-inbound-missed-caller-cancel", "05b-outbound-busy-486"]
    streams = [channel_events(read_trace(traces_dir / f"{n}.plain.txt")) for n in names]
    alone: dict[str, list[dict]] = {}
    for stream in streams:
        alone.update(_per_call(feed_all(CallTracker(), stream)))
    # Round-robin, one event of each call in turn: the worst interleaving.
    mixed: list[ChannelEvent] = []
    for position in range(max(map(len, streams))):
        mixed += [stream[position] for stream in streams if position < len(stream)]
    tracker = CallTracker()
    assert _per_call(feed_all(tracker, mixed)) == alone
    assert len(alone) == 5 and tracker.open_calls() == 0


def test_two_synthetic_calls_interleaved():
    one, two = Call("a1"), Call("a2", caller="79990000000")
    e1, e2 = one.answered("b1", "101", talk=4), two.answered("b2", "102", talk=7)
    tracker = CallTracker()
    commands = feed_all(tracker, [e for pair in zip(e1, e2) for e in pair])
    grouped = _per_call(commands)
    assert [(f["ext"], f["event"], f["phone"]) for f in grouped["a1"]] == [
        ("101", "INCOMING", "79101234567"), ("101", "ACCEPTED", "79101234567"), ("101", "COMPLETED", "79101234567")]
    assert [(f["ext"], f["event"], f["phone"]) for f in grouped["a2"]] == [
        ("102", "INCOMING", "79990000000"), ("102", "ACCEPTED", "79990000000"), ("102", "COMPLETED", "79990000000")]
    assert grouped["a1"][-1]["duration"] == "4" and grouped["a2"][-1]["duration"] == "7"


# -- unknown channels, duplicates ----------------------------------------------

def test_events_for_unknown_channels_are_ignored_and_leave_nothing():
    call = Call("a1")
    tracker = CallTracker()
    stray = [
        call.leg("b1", "101"),                  # its A leg was never seen (connected mid-call)
        call.bridge("b1", 1),
        call.record_stop(2, "/rec/x.wav", 1000),
        call.leg_end("b1", 3, billsec=2),
        call.end(3),
        event("CHANNEL_DESTROY", "zzz"),
    ]
    assert feed_all(tracker, stray) == []
    assert tracker.open_calls() == 0 and not tracker._owner


def test_outbound_originate_not_ours_is_ignored():
    # `originate user/101 &park` from fs_cli: an outbound channel with no originator and no tag.
    tracker = CallTracker()
    ev = event("CHANNEL_CREATE", "m1", Channel__Call__UUID="m1", Call__Direction="outbound",
               Caller__Caller__ID__Number="0000", Caller__Destination__Number="101")
    assert tracker.feed(ev) == [] and tracker.open_calls() == 0


def test_every_event_delivered_twice_changes_nothing(traces_dir):
    for name in ("02-inbound-ring-group", "03-inbound-hunt-sequential", "05f-outbound-noanswer-timeout"):
        events = channel_events(read_trace(traces_dir / f"{name}.plain.txt"))
        once = feed_all(CallTracker(), events)
        tracker = CallTracker()
        twice = feed_all(tracker, [e for e in events for _ in (0, 1)])
        assert [c.fields for c in twice] == [c.fields for c in once]
        assert tracker.open_calls() == 0


def test_whole_call_replayed_after_it_finished_is_not_reported_again():
    call = Call("a1")
    tracker = CallTracker()
    first = feed_all(tracker, call.answered())
    assert len(first) == 3
    assert feed_all(tracker, call.answered()) == []


# -- missing HANGUP_COMPLETE, reconnects ----------------------------------------

def _without(events: list[ChannelEvent], name: str, uuid: str) -> list[ChannelEvent]:
    return [e for e in events if not (e.name == name and e.uuid == uuid)]


def test_missing_a_leg_hangup_complete_destroy_closes(traces_dir):
    a = "e84e4329-8051-40a2-9c6c-a3d6cf741ee9"
    events = channel_events(read_trace(traces_dir / "01-inbound-single-answer.plain.txt"))
    expected = [c.fields for c in feed_all(CallTracker(), events)]
    tracker = CallTracker()
    got = feed_all(tracker, _without(events, "CHANNEL_HANGUP_COMPLETE", a))
    # DESTROY carries the same billsec and recording facts.
    assert [c.fields for c in got] == expected
    assert tracker.open_calls() == 0


def test_missing_b_leg_hangup_complete_destroy_ends_the_leg(traces_dir):
    b101 = "4e864041-3982-4bf9-9793-90ceb9a46a28"   # hunt: 101 passed over
    events = channel_events(read_trace(traces_dir / "03-inbound-hunt-sequential.plain.txt"))
    expected = [c.fields for c in feed_all(CallTracker(), events)]
    got = feed_all(CallTracker(), _without(events, "CHANNEL_HANGUP_COMPLETE", b101))
    assert [c.fields for c in got] == expected


def test_call_that_never_ends_is_closed_by_reconcile():
    call = Call("a1")
    tracker = CallTracker()
    started = feed_all(tracker, [call.create(0), call.leg("b1", "101", 0.1), call.bridge("b1", 2)])
    assert summary(started) == [("101", "INCOMING", "", ""), ("101", "ACCEPTED", "", "")]
    assert tracker.open_calls() == 1
    # FreeSWITCH still has the call: nothing to close.
    assert tracker.reconcile({"a1"}, now_us=T0 + 60_000_000) == []
    # Only the B leg is left up (A leg being torn down): still live.
    assert tracker.reconcile({"b1"}, now_us=T0 + 60_000_000) == []
    closed = tracker.reconcile(set(), now_us=T0 + 62_500_000)
    assert summary(closed) == [("101", "COMPLETED", "Success", "60")]
    assert tracker.open_calls() == 0
    # Late events of the closed call say nothing more.
    assert feed_all(tracker, [call.leg_end("b1", 70, billsec=68), call.end(70)]) == []


def test_reconnect_mid_call_on_a_real_trace(traces_dir):
    """The connection drops right after the bridge of 02 and comes back after the call ended."""
    events = channel_events(read_trace(traces_dir / "02-inbound-ring-group.plain.txt"))
    cut = next(i for i, e in enumerate(events) if e.name == "CHANNEL_BRIDGE") + 1
    tracker = CallTracker()
    before = feed_all(tracker, events[:cut])
    assert [c.fields["event"] for c in before] == ["INCOMING"] * 3 + ["ACCEPTED", "COMPLETED", "COMPLETED"]
    bridge = events[cut - 1]
    after = tracker.reconcile(live_uuids_from_show_json('{"row_count": 0}\n'), now_us=bridge.timestamp_us + 2_400_000)
    assert summary(after) == [("102", "COMPLETED", "Success", "2")]
    assert after[0].fields["is_recorded"] == "0" and after[0].recording_path is None
    assert tracker.open_calls() == 0


def test_unanswered_calls_closed_by_reconcile():
    inbound, outbound = Call("a1"), Call("a2", caller="101", did="79990000000", user_name="101")
    tracker = CallTracker()
    feed_all(tracker, [inbound.create(), inbound.leg("b1", "101"), inbound.leg("b2", "102"),
                       outbound.create(), outbound.outside_leg("c1", "79990000000")])
    closed = tracker.reconcile(set(), now_us=T0 + 10_000_000)
    assert summary(closed) == [("101", "COMPLETED", "Missed", "0"), ("102", "COMPLETED", "Missed", "0"),
                               ("101", "COMPLETED", "NoAnswer", "0")]


def test_live_uuids_from_real_show_replies(traces_dir):
    active = [f.body for f in frames_of(read_trace(traces_dir / "90-api-show-channels-calls-json-active.raw.txt"))
              if f.content_type == "api/response"]
    a, b = "cf9e6d82-e4af-4a4a-adbb-4d63e4ae5566", "0d4ec6ad-3849-475a-a21d-65d2ab06ffb0"
    assert live_uuids_from_show_json(active[0].decode()) == {a, b}     # show channels as json
    assert live_uuids_from_show_json(active[1].decode()) == {a, b}     # show calls as json (b_uuid)
    idle = [f.body for f in frames_of(read_trace(traces_dir / "91-api-show-channels-calls-json-idle.raw.txt"))
            if f.content_type == "api/response"]
    assert [live_uuids_from_show_json(body.decode()) for body in idle] == [set(), set()]
    with pytest.raises(ValueError):
        live_uuids_from_show_json(active[2].decode())   # `show channels` (CSV) is not JSON
    with pytest.raises(ValueError):
        live_uuids_from_show_json("-ERR no reply\n")


def test_open_calls_are_bounded():
    tracker = CallTracker(TrackerSettings(max_open_calls=2))
    calls = [Call(f"a{i}") for i in range(3)]
    out = []
    for i, call in enumerate(calls):
        out += feed_all(tracker, [call.create(i), call.leg(f"b{i}", "101", i)])
    assert tracker.open_calls() == 2
    # The oldest was closed to make room, with a COMPLETED for what it had sent.
    assert [(c.call_id, c.fields["event"], c.fields.get("status")) for c in out] == [
        ("a0", "INCOMING", None), ("a1", "INCOMING", None), ("a0", "COMPLETED", "Missed"), ("a2", "INCOMING", None)]


# -- call shapes ----------------------------------------------------------------

def test_planfix_data_fields_on_completed():
    call = Call("a1")
    tracker = CallTracker()
    data = {"variable_planfix_data_utm_source": "site.io", "variable_planfix_data_utm_medium": "banner\r\nX: y"}
    commands = feed_all(tracker, [
        call.create(0), call.leg("b1", "101", 0), call.leg("b2", "102", 0), call.bridge("b2", 1, **data),
        call.leg_end("b1", 1, cause="LOSE_RACE"), call.leg_end("b2", 4, billsec=3), call.end(4, **data),
    ])
    assert [c.fields for c in commands if c.fields["event"] == "COMPLETED"] == [
        {"cmd": "event", "type": "in", "event": "COMPLETED", "phone": "79101234567", "diversion": "74950000000",
         "ext": "101", "callid": "a1", "duration": "0", "is_recorded": "0", "status": "Cancelled",
         "data_utm_source": "site.io", "data_utm_medium": "bannerX: y"},
        {"cmd": "event", "type": "in", "event": "COMPLETED", "phone": "79101234567", "diversion": "74950000000",
         "ext": "102", "callid": "a1", "duration": "3", "is_recorded": "0", "status": "Success",
         "data_utm_source": "site.io", "data_utm_medium": "bannerX: y"},
    ]


def test_internal_call_not_reported_unless_configured():
    def internal() -> list[ChannelEvent]:
        call = Call("a1", caller="101", did="102", user_name="101")
        return [call.create(0), call.leg("b1", "102", 0), call.bridge("b1", 1),
                call.leg_end("b1", 5, billsec=4), call.end(5)]

    tracker = CallTracker()
    assert feed_all(tracker, internal()) == []
    assert tracker.open_calls() == 0
    reported = feed_all(CallTracker(TrackerSettings(report_internal_calls=True)), internal())
    assert [(c.fields["type"], c.fields["event"], c.fields["ext"], c.fields["phone"], c.fields.get("status"))
            for c in reported] == [("in", "INCOMING", "102", "101", None), ("in", "ACCEPTED", "102", "101", None),
                                   ("in", "COMPLETED", "102", "101", "Success")]


def test_two_devices_of_one_extension_make_one_popup():
    call = Call("a1")
    commands = feed_all(CallTracker(), [
        call.create(0), call.leg("b1", "101", 0), call.leg("b2", "101", 0), call.leg("b3", "102", 0),
        call.end(9, cause="ORIGINATOR_CANCEL"),
    ])
    assert summary(commands) == [("101", "INCOMING", "", ""), ("102", "INCOMING", "", ""),
                                 ("101", "COMPLETED", "Missed", "0"), ("102", "COMPLETED", "Missed", "0")]


def test_hunt_with_busy_first_then_answer():
    call = Call("a1")
    commands = feed_all(CallTracker(), [
        call.create(0), call.leg("b1", "101", 0),
        call.leg_end("b1", 0.5, cause="USER_BUSY", variable_sip_term_status="486"),
        call.leg("b2", "102", 0.6), call.bridge("b2", 3), call.leg_end("b2", 10, billsec=7), call.end(10),
    ])
    assert summary(commands) == [
        ("101", "INCOMING", "", ""), ("101", "COMPLETED", "Cancelled", "0"), ("102", "INCOMING", "", ""),
        ("102", "ACCEPTED", "", ""), ("102", "COMPLETED", "Success", "7")]


def test_winner_duration_when_a_leg_ends_first():
    """The winner's HANGUP_COMPLETE may come after the A leg's: talk time from the bridge's answer time."""
    call = Call("a1")
    commands = feed_all(CallTracker(), [call.create(0), call.leg("b1", "101", 0), call.bridge("b1", 2),
                                        call.end(9.7), call.leg_end("b1", 9.7, billsec=7)])
    assert summary(commands)[-1] == ("101", "COMPLETED", "Success", "7")


def test_recording_contract():
    call = Call("a1")
    tracker = CallTracker()
    commands = feed_all(tracker, [call.create(0), call.leg("b1", "101", 0), call.bridge("b1", 1),
                                  call.leg_end("b1", 4, billsec=3), call.record_stop(4, "/rec/a1.wav", 4000),
                                  call.end(4)])
    assert commands[-1].fields["is_recorded"] == "1" and commands[-1].recording_path == "/rec/a1.wav"
    empty = Call("a2")
    commands = feed_all(tracker, [empty.create(0), empty.leg("b2", "101", 0), empty.bridge("b2", 1),
                                  empty.record_stop(4, "/rec/a2.wav", 0), empty.end(4)])
    assert commands[-1].fields["is_recorded"] == "0" and commands[-1].recording_path is None
    unanswered = Call("a3")
    commands = feed_all(tracker, [unanswered.create(0), unanswered.leg("b3", "101", 0),
                                  unanswered.record_stop(8, "/rec/a3.wav", 8000), unanswered.end(8)])
    assert commands[-1].fields["is_recorded"] == "0" and commands[-1].recording_path is None


# -- hostile values ---------------------------------------------------------------

def test_hostile_caller_values_are_sanitized():
    evil = "7910\r\nUnique-ID: forged\x00\u202e" + "9" * 500
    call = Call("a1", caller=evil, did="7495\n0000000")
    identity = TrackerSettings(normalize_phone=lambda raw: raw)
    commands = feed_all(CallTracker(identity), [call.create(0), call.leg("b1", "101", 0), call.end(1)])
    phone = commands[0].fields["phone"]
    assert commands[0].call_id == "a1"
    assert all(ch.isprintable() for ch in phone) and "\u202e" not in phone
    assert len(phone) <= MAX_NUMBER_CHARS
    assert phone.startswith("7910Unique-ID: forged")
    assert commands[0].fields["diversion"] == "74950000000"
    # With the default normalisation only the digits remain.
    commands = feed_all(CallTracker(), [call.create(0), call.leg("b1", "101", 0), call.end(1)])
    assert commands[0].fields["phone"].isdigit()


def test_encoded_newline_cannot_forge_headers():
    # "%0A" inside a caller number stays inside its value (per-line decoding).
    raw = (b"Event-Name: CHANNEL_CREATE\nUnique-ID: a1\nCall-Direction: inbound\n"
           b"Caller-Caller-ID-Number: 123%0AUnique-ID%3A%20forged%0Avariable_user_name%3A%20101\n"
           b"Caller-Destination-Number: 74950000000\n\n")
    ev = channel_event(*parse_event_plain(raw))
    assert ev is not None and ev.uuid == "a1" and ev.user_name == ""
    assert ev.caller_number == "123Unique-ID: forgedvariable_user_name: 101"[:MAX_NUMBER_CHARS]


def test_hostile_extension_tag_and_data_field_names():
    tracker = CallTracker()
    bad_ext = event("CHANNEL_CREATE", "m1", Channel__Call__UUID="m1", Call__Direction="outbound",
                    variable_fsbridge_click_to_call="r1", variable_fsbridge_ext="101 XML evil",
                    variable_fsbridge_phone="79101234567")
    assert tracker.feed(bad_ext) == [] and tracker.open_calls() == 0
    ev = event("CHANNEL_HANGUP_COMPLETE", "a1", **{
        "variable_planfix_data_ok": "1", "variable_planfix_data_a=b&c": "x", "variable_planfix_data_": "y"})
    assert ev.planfix_data == (("ok", "1"),)


def test_channel_event_ignores_what_the_tracker_does_not_use():
    assert channel_event(*parse_event_plain(b"Event-Name: CHANNEL_STATE\nUnique-ID: a\n\n")) is None
    assert channel_event(*parse_event_plain(b"Event-Name: CHANNEL_CREATE\n\n")) is None
    job = channel_event(*parse_event_plain(
        b"Event-Name: BACKGROUND_JOB\nJob-UUID: j1\nContent-Length: 15\n\n-ERR USER_BUSY\n"))
    assert job is not None and (job.job_uuid, job.job_body) == ("j1", "-ERR USER_BUSY")
    assert CallTracker().feed(job) == []


# -- pure helpers ------------------------------------------------------------------

@pytest.mark.parametrize(("b_cause", "sip", "disposition", "a_cause", "status"), [
    ("USER_BUSY", "486", "", "", "Busy"),
    ("USER_BUSY", "600", "", "", "Busy"),
    ("NORMAL_UNSPECIFIED", "404", "", "", "NotAvailable"),
    ("NO_USER_RESPONSE", "480", "", "", "NotAvailable"),
    ("NORMAL_TEMPORARY_FAILURE", "503", "", "", "NotAvailable"),
    ("NETWORK_OUT_OF_ORDER", "", "", "", "NotAvailable"),
    ("CALL_REJECTED", "403", "", "", "NotAllowed"),
    ("OUTGOING_CALL_BARRED", "", "", "", "NotAllowed"),
    ("NO_ANSWER", "", "", "", "NoAnswer"),
    ("ORIGINATOR_CANCEL", "487", "", "", "NoAnswer"),
    ("", "", "NO_ANSWER", "NORMAL_CLEARING", "NoAnswer"),    # A leg hides it; disposition tells
    ("", "", "failure", "USER_BUSY", "Busy"),
    ("", "", "", "", "NoAnswer"),
])
def test_outgoing_status(b_cause, sip, disposition, a_cause, status):
    assert outgoing_status(b_cause, sip, disposition, a_cause) == status


def test_settings_are_validated():
    with pytest.raises(ValueError, match="extension_pattern"):
        TrackerSettings(extension_pattern="(")
    with pytest.raises(ValueError):
        TrackerSettings(max_open_calls=0)


def test_default_normalize_phone_and_sanitize():
    assert default_normalize_phone("+7 (910) 123-45-67") == "79101234567"
    assert default_normalize_phone("anonymous") == "anonymous"
    assert default_normalize_phone("٣٤٥") == "٣٤٥"      # non-ASCII digits are not ASCII digits: kept as presented
    assert sanitize("a\tb\u200bc\u2028d ", 10) == "abcd"


# -- click-to-call ---------------------------------------------------------------

def _manager(uuid: str = "m1", **extra: str) -> ChannelEvent:
    return event("CHANNEL_CREATE", uuid, Channel__Call__UUID=uuid, Call__Direction="outbound",
                 Caller__Caller__ID__Number="79101234567", Caller__Destination__Number="101",
                 variable_fsbridge_click_to_call="req-1", variable_fsbridge_ext="101",
                 variable_fsbridge_phone="+7 910 123-45-67", **extra)


@pytest.mark.parametrize("client_end_first", [True, False])
def test_click_to_call_client_busy(client_end_first):
    manager = Call("m1")
    client_end = manager.leg_end("c1", 3, cause="USER_BUSY", variable_sip_term_status="486")
    manager_end = manager.end(3, variable_originate_disposition="USER_BUSY")
    ends = [client_end, manager_end] if client_end_first else [manager_end, client_end]
    tracker = CallTracker()
    commands = feed_all(tracker, [_manager(), manager.outside_leg("c1", "79101234567", cid="74950000000", t=2), *ends])
    assert [(c.fields["type"], c.fields["event"], c.fields["ext"], c.fields["phone"], c.fields.get("status"))
            for c in commands] == [("out", "OUTGOING", "101", "79101234567", None),
                                   ("out", "COMPLETED", "101", "79101234567", "Busy")]
    assert tracker.open_calls() == 0


def test_click_to_call_manager_failure_closes_what_was_sent():
    manager = Call("m1")
    tracker = CallTracker()
    commands = feed_all(tracker, [_manager(), manager.end(8, cause="NO_ANSWER")])
    assert summary(commands) == [("101", "OUTGOING", "", ""), ("101", "COMPLETED", "NoAnswer", "0")]
    # Even a ringing client leg never makes it an INCOMING for the manager.
    assert all(c.fields["type"] == "out" for c in commands)


def test_hung_up_channels_still_listed_are_dropped_from_the_listing():
    """Real: a loopback call hung up while mod_json_cdr retries its CDR posts; all
    four channels are still listed as ACTIVE (uuid_exists answers false)."""
    text = (Path(__file__).parent / "data" / "cdr" / "lab-show-channels-hung-up-reporting.json").read_text()
    listed = tracker_mod.listed_channels(text)
    assert len(listed) == 4 and listed[0] == "11111111-2222-4333-8444-000000000001"
    assert tracker_mod.live_uuids_from_show_json(tracker_mod.without_channels(text, set(listed))) == set()
    kept = tracker_mod.without_channels(text, set(listed[1:]))
    assert tracker_mod.live_uuids_from_show_json(kept) == {listed[0]}
    assert tracker_mod.without_channels(text, set()) is text
