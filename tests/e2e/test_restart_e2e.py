"""A call in progress when the service is killed still gets its COMPLETED."""

from __future__ import annotations

import re
import sqlite3

from fsbridge.fakes.freeswitch import FakeFreeSwitch, active_call_bodies, trace_events
from fsbridge.fakes.planfix import FakePlanfix
from tests.service_proc import ServiceProcess
from tests.test_tracker_traces import A01, incoming

# The legs of the call capture 90's `show channels as json` lists.
LISTED_A = b"cf9e6d82-e4af-4a4a-adbb-4d63e4ae5566"
LISTED_B = b"0d4ec6ad-3849-475a-a21d-65d2ab06ffb0"


def single_answer(traces_dir):
    """Capture 01's events and where its CHANNEL_BRIDGE is."""
    events = trace_events(traces_dir / "01-inbound-single-answer.plain.txt")
    return events, next(i for i, e in enumerate(events) if e.name == "CHANNEL_BRIDGE")


def answer_then_kill(service, fs, planfix, events, bridge) -> None:
    """The call rings and is answered, both delivered and removed from the
    outbox (a kill between PlanFix's 200 and that removal may resend one
    request: see outbox.py); then the service dies mid-call."""
    service.wait_health(lambda h: h["freeswitch"]["state"] == "connected")
    fs.replay(events[: bridge + 1]).wait(5)
    planfix.wait_for(2, timeout=10, delivered=True)
    service.wait_health(lambda h: h["outbox"]["depth"] == 0)
    service.kill()


def test_call_open_at_sigkill_is_completed_after_restart(tmp_path, traces_dir):
    events, bridge = single_answer(traces_dir)
    with FakePlanfix() as planfix, FakeFreeSwitch() as fs:
        service = ServiceProcess(tmp_path, fs_port=fs.port, planfix_url=planfix.url,
                                 planfix_token=planfix.token).start()
        try:
            answer_then_kill(service, fs, planfix, events, bridge)  # the call ends meanwhile
            service.start()  # FreeSWITCH's channel list (idle) says the call is gone
            got = planfix.wait_for(3, timeout=10, delivered=True)
            assert [dict(r, planfix_token=None) for r in got] == [
                dict(incoming(A01, "101", "INCOMING"), planfix_token=None),
                dict(incoming(A01, "101", "ACCEPTED"), planfix_token=None),
                dict(incoming(A01, "101", "COMPLETED", duration="0", is_recorded="0", status="Success"),
                     planfix_token=None),
            ]
            assert any(c.startswith("api show channels as json") for c in fs.commands)
            service.wait_health(lambda h: h["open_calls_from_before_restart"] == 0)
            planfix.assert_no_violations()
        finally:
            service.stop()


def as_older_fsbridge_left_it(storage) -> None:
    """The storage of an fsbridge from before the registry joined the outbox:
    the open legs in open-calls.sqlite3 (tenant and node columns), an outbox of
    schema version 1 without them."""
    outbox = sqlite3.connect(storage / "outbox.sqlite3")
    legs = outbox.execute("SELECT call_id, ext, fields, accepted, tenant, node FROM open_legs").fetchall()
    outbox.execute("DROP TABLE open_legs")
    outbox.execute("PRAGMA user_version=1")
    outbox.commit()
    outbox.close()
    legacy = sqlite3.connect(storage / "open-calls.sqlite3")
    legacy.execute("CREATE TABLE open_legs (call_id TEXT NOT NULL, ext TEXT NOT NULL, fields TEXT NOT NULL,"
                   " accepted INTEGER NOT NULL DEFAULT 0, tenant TEXT NOT NULL DEFAULT '',"
                   " node TEXT NOT NULL DEFAULT '', PRIMARY KEY (call_id, ext))")
    legacy.executemany("INSERT INTO open_legs VALUES (?, ?, ?, ?, ?, ?)", legs)
    legacy.commit()
    legacy.close()
    assert legs  # the call killed mid-way is there to be moved


def test_an_upgrade_from_the_older_registry_file_still_completes_the_call_open_at_the_kill(tmp_path, traces_dir):
    events, bridge = single_answer(traces_dir)
    with FakePlanfix() as planfix, FakeFreeSwitch() as fs:
        service = ServiceProcess(tmp_path, fs_port=fs.port, planfix_url=planfix.url,
                                 planfix_token=planfix.token).start()
        try:
            answer_then_kill(service, fs, planfix, events, bridge)
            as_older_fsbridge_left_it(service.storage)
            service.start()  # the new version moves the file in, then sees the call gone
            got = planfix.wait_for(3, timeout=10, delivered=True)
            assert dict(got[2], planfix_token=None) == dict(
                incoming(A01, "101", "COMPLETED", duration="0", is_recorded="0", status="Success"), planfix_token=None)
            assert not (service.storage / "open-calls.sqlite3").exists()
            service.wait_health(lambda h: h["open_calls_from_before_restart"] == 0)
            planfix.assert_no_violations()
        finally:
            service.stop()


def test_call_still_up_at_restart_is_taken_up_and_ends_with_its_real_facts(tmp_path, traces_dir):
    """Killed mid-call, started again while the call goes on: FreeSWITCH's
    channel list (capture 90's, with 01's UUIDs) names it, the new process
    takes it up, and its real end arrives: Success with 101's billsec."""
    events, bridge = single_answer(traces_dir)
    b_leg = next(re.search(rb"\nUnique-ID: ([0-9a-f-]{36})\n", e.body).group(1) for e in events
                 if e.name == "CHANNEL_CREATE" and b"\nCall-Direction: outbound\n" in e.body)
    listing = active_call_bodies()["show channels as json"]
    listing = listing.replace(LISTED_A, A01.encode()).replace(LISTED_B, b_leg)
    with FakePlanfix() as planfix, FakeFreeSwitch() as fs:
        service = ServiceProcess(tmp_path, fs_port=fs.port, planfix_url=planfix.url,
                                 planfix_token=planfix.token).start()
        try:
            answer_then_kill(service, fs, planfix, events, bridge)
            fs.set_api("show channels as json", listing)
            service.start()
            service.wait_health(lambda h: h["freeswitch"]["state"] == "connected" and h["open_calls"] == 1)
            fs.replay(events[bridge + 1:]).wait(5)
            service.wait_health(lambda h: h["open_calls"] == 0 and h["outbox"]["depth"] == 0)
            got = [dict(r, planfix_token=None) for r in planfix.requests]
            # INCOMING/ACCEPTED come again from the new process (duplicates PlanFix tolerates)
            assert [r for i, r in enumerate(got) if r not in got[:i]] == [
                dict(incoming(A01, "101", "INCOMING"), planfix_token=None),
                dict(incoming(A01, "101", "ACCEPTED"), planfix_token=None),
                dict(incoming(A01, "101", "COMPLETED", duration="3", is_recorded="0", status="Success"),
                     planfix_token=None),
            ]
            assert service.wait_health(lambda h: True)["open_calls_from_before_restart"] == 0
            planfix.assert_no_violations()
        finally:
            service.stop()
