"""Calls in progress: GET /calls and `fsbridge calls` while the fake FreeSWITCH holds a ring-group call open."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import requests

from fsbridge.calls import SentLog
from fsbridge.fakes.freeswitch import CAPTURES, FakeFreeSwitch, trace_events
from fsbridge.fakes.planfix import FakePlanfix
from tests.conftest import REPO
from tests.service_proc import ServiceProcess

RING_GROUP = CAPTURES / "02-inbound-ring-group.plain.txt.gz"
CALLID = "fbb99a11"  # the capture's A leg starts so


def split_at_bridge(events):
    """The ring-group capture's events before its CHANNEL_BRIDGE (three phones ringing), and the rest."""
    cut = next(i for i, e in enumerate(events) if e.name == "CHANNEL_BRIDGE")
    return events[:cut], events[cut:]


def wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def run_cli(service: ServiceProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsbridge", "calls", "-c", str(service.config_path), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=30)


def test_ring_group_call_in_progress(tmp_path):
    ringing, rest = split_at_bridge(trace_events(RING_GROUP))
    with FakePlanfix() as planfix, FakeFreeSwitch() as fs:
        with ServiceProcess(tmp_path, fs_port=fs.port, planfix_url=planfix.url,
                            planfix_token=planfix.token) as service:
            service.wait_health(lambda h: h["freeswitch"]["state"] == "connected")
            assert requests.get(service.dialplan_url + "/calls", timeout=5).json() == {"calls": []}
            follow = subprocess.Popen(
                [sys.executable, "-m", "fsbridge", "calls", "-c", str(service.config_path), "--follow"],
                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                assert "following PlanFix events" in follow.stdout.readline()
                fs.replay(ringing).wait(10)
                planfix.wait_for(3, timeout=10)  # three INCOMING

                def call_with_sent_events():
                    calls = requests.get(service.dialplan_url + "/calls", timeout=5).json()["calls"]
                    return calls if calls and len(calls[0]["sent"]) == 3 else None

                (call,) = wait(call_with_sent_events)
                assert call["callid"].startswith(CALLID)
                assert call["direction"] == "in" and call["client"] == "79101234567"
                assert call["did"] == "74950000000"
                assert sorted(leg["ext"] for leg in call["legs"]) == ["101", "102", "103"]
                assert [leg["state"] for leg in call["legs"]] == ["ringing"] * 3
                assert [e["ext"] for e in call["extensions"]] == ["101", "102", "103"]
                assert [(f["event"], f["ext"]) for f in call["sent"]] == [
                    ("INCOMING", "101"), ("INCOMING", "102"), ("INCOMING", "103")]
                assert all("planfix_token" not in f for f in call["sent"])
                assert call["pending"] == []

                shown = run_cli(service)
                assert shown.returncode == 0, shown.stderr
                lines = shown.stdout.splitlines()
                assert lines[0].startswith(f"call {call['callid']}  in  client 79101234567  did 74950000000")
                assert sum(1 for line in lines if line.startswith("  leg ")) == 3
                assert any("ext 102  ringing" in line for line in lines)
                assert "  sent     INCOMING in phone=79101234567 ext=103 diversion=74950000000" in lines

                fs.replay(rest).wait(10)
                wait(lambda: requests.get(service.dialplan_url + "/calls", timeout=5).json() == {"calls": []})
                assert run_cli(service).stdout == "no calls in progress\n"
                planfix.wait_for(7, timeout=10)
                wait(lambda: service.health()["outbox"]["depth"] == 0)
                time.sleep(FOLLOW_SETTLE)
            finally:
                follow.terminate()
                followed, _ = follow.communicate(timeout=10)
    events = [line.split()[2:4] for line in followed.splitlines()]
    assert events.count(["INCOMING", "in"]) == 3
    assert events.count(["ACCEPTED", "in"]) == 1
    assert events.count(["COMPLETED", "in"]) == 3


FOLLOW_SETTLE = 1.5  # three --follow polls


def test_calls_cli_says_when_the_service_is_not_there(tmp_path):
    service = ServiceProcess(tmp_path, fs_port=1)
    shown = run_cli(service)
    assert shown.returncode == 1
    assert "cannot ask the service at http://127.0.0.1:" in shown.stderr


def test_the_sent_log_keeps_the_stored_json_and_hands_readers_fresh_dicts():
    log = SentLog(size=3)
    for n in range(5):
        log.add(f"call{n % 2}", json.dumps({"cmd": "event", "event": "INCOMING", "n": str(n)}))
    # A ring: only the newest three, numbered on.
    assert [item["seq"] for item in log.after(0)] == [3, 4, 5]
    assert [item["fields"]["n"] for item in log.after(3)] == ["3", "4"]
    assert [f["n"] for f in log.for_call("call0")] == ["2", "4"]
    # Each reader gets its own dict: changing one changes nothing kept.
    log.for_call("call0")[0]["n"] = "changed"
    assert log.for_call("call0")[0]["n"] == "2"
