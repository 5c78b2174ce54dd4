"""A call that ENDS while fsbridge is down is finished from FreeSWITCH's CDR.

fsbridge is killed (SIGKILL) mid-call; the rest of the call, hangup
included, happens while it is down, so no event of it ever reaches the new
process.  The new process inherits the open call (opencalls.py), sees it gone
from ``show channels`` and keeps it open for ``[cdr] wait``; mod_json_cdr's
POST of the caller leg's CDR (a real lab CDR, tests/data/cdr/, carrying the
capture's own CHANNEL_HANGUP_COMPLETE variables: plain-event values are
url-encoded exactly as ``encode-values=true`` encodes them) then gives PlanFix
the same events as without the kill: real duration, statuses, recording
link; requests the killed process had delivered may come twice.
"""

from __future__ import annotations

import base64
import copy
import json
import time
from pathlib import Path
from urllib.parse import unquote

import requests

from fsbridge.fakes.freeswitch import events_of
from tests.faults.calls import expected_with_callid, fresh_call
from tests.faults.conftest import (
    assert_clean_log, delivered_for, duplicates, expected_fields, wait_all_delivered, wait_connected,
)
from tests.faults.test_restart_calls import b_leg_uuid, split_at_first_hangup

SECRET = "cdr-secret-0123456789"
FS_RECORDINGS = "/usr/local/freeswitch/recordings"


DATA = Path(__file__).resolve().parent.parent / "data" / "cdr"
# Real CDRs (a lab call to 101, tests/data/cdr/README.md): the shape mod_json_cdr posts.
REAL_A = json.loads((DATA / "lab-down-answered-a.json").read_text())
REAL_B = json.loads((DATA / "lab-down-answered-b101.json").read_text())


def headers_of(frame: bytes) -> dict[str, str]:
    block = events_of(frame)[0].body.partition(b"\n\n")[0].decode()
    return dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)


def _hangup(frames: list[bytes], uuid: str) -> dict[str, str]:
    for frame in frames:
        h = headers_of(frame)
        if h.get("Event-Name") == "CHANNEL_HANGUP_COMPLETE" and h.get("Unique-ID") == uuid:
            return h
    raise AssertionError(f"no hangup of {uuid} in the capture")


def _real_shaped(real: dict, h: dict[str, str], uuid: str) -> dict:
    """A real CDR document (``real``) carrying the capture's channel: its
    variables (the hangup's, url-encoded as encode-values=true encodes them),
    caller profile and times; the rest (core-uuid, channel_data, callStats,
    the callflow's shape) as FreeSWITCH wrote it."""
    doc = copy.deepcopy(real)
    doc["variables"] = {k[len("variable_"):]: v for k, v in h.items() if k.startswith("variable_")}
    doc["channel_data"]["direction"] = h["Call-Direction"]
    step = doc["callflow"][0]
    profile = step["caller_profile"]
    profile.update(uuid=uuid, caller_id_number=unquote(h.get("Caller-Caller-ID-Number", "")),
                   destination_number=unquote(h.get("Caller-Destination-Number", "")))
    for name in ("created", "answered", "bridged", "hangup"):
        step["times"][f"{name}_time"] = h.get(f"Caller-Channel-{name.capitalize()}-Time", "0")
    return doc


def cdr_of(frames: list[bytes], callid: str) -> bytes:
    """mod_json_cdr's body (encode=false) for the A leg's hangup in ``frames``."""
    doc = _real_shaped(REAL_A, _hangup(frames, callid), callid)
    # The dialplan of today (fsbridge-record.xml) names the file; the capture predates it.
    doc["variables"].setdefault("fsbridge_record_file", f"{FS_RECORDINGS}/{callid}.wav")
    return json.dumps(doc).encode()


def b_leg_cdr_of(frames: list[bytes], callid: str, b_uuid: str) -> bytes:
    """The rung leg's CDR (log-b-leg=true): its originator is the A leg."""
    doc = _real_shaped(REAL_B, _hangup(frames, b_uuid), b_uuid)
    doc["variables"]["originator"] = callid
    doc["callflow"][0]["caller_profile"]["originator"]["originator_caller_profiles"][0]["uuid"] = callid
    return json.dumps(doc).encode()


def post_cdr(svc, body: bytes, secret: str = SECRET) -> requests.Response:
    auth = base64.b64encode(f"fsbridge:{secret}".encode()).decode()
    return requests.post(f"{svc.dialplan_url}/cdr?uuid=x", data=body, timeout=5, headers={
        "Content-Type": "application/json", "Authorization": f"Basic {auth}",
    })


def settings(tmp_path, wait: str = "60") -> dict[str, dict[str, str]]:
    rec = tmp_path / "rec"
    rec.mkdir(exist_ok=True)
    return {
        "cdr": {"secret": SECRET, "wait": wait},
        "recordings": {"dir": str(rec), "freeswitch_dir": FS_RECORDINGS},
    }


def with_recording(rows: list[dict[str, str]], delivered: list[dict[str, str]]) -> list[dict[str, str]]:
    """The expected rows, the last COMPLETED recorded with the link PlanFix got."""
    out = [dict(r) for r in rows]
    out[-1]["is_recorded"] = "1"
    out[-1]["record_link"] = delivered[-1].get("record_link", "(missing)")
    return out


def kill_then_restart(service, fs, pf, traces_dir, tmp_path, trace: str, delivered_before: int, wait: str = "60",
                      ringing: bool = False):
    svc = service(settings=settings(tmp_path, wait), workdir=tmp_path / "svc")
    wait_connected(svc, fs)
    callid, frames = fresh_call(traces_dir, trace)
    wanted = expected_with_callid(expected_fields(trace), callid)
    (tmp_path / "rec" / f"{callid}.wav").write_bytes(b"RIFF" + b"\0" * 4000)
    names = [events_of(f)[0].name for f in frames]
    if ringing:  # up to the bridge, without the answers: every INCOMING, nothing else
        before = [f for f in frames[:names.index("CHANNEL_BRIDGE")] if events_of(f)[0].name != "CHANNEL_ANSWER"]
    else:  # talking: up to the first hangup
        before = frames[:names.index("CHANNEL_HANGUP_COMPLETE")]
    assert fs.replay(before).wait(10)
    assert fs.wait_until(lambda: delivered_for(pf, callid) == wanted[:delivered_before], 10), svc.log()[-3000:]
    svc.kill()
    # The call ends while fsbridge is down; FreeSWITCH lists no channel (the fake's idle listing).
    again = service(settings=settings(tmp_path, wait), workdir=tmp_path / "svc")
    wait_connected(again, fs, subscriptions=2)
    again.wait_health(lambda h: h["open_calls_from_before_restart"] == 1)
    return again, callid, frames, wanted


def test_call_ends_while_down_then_its_cdr_gives_the_real_end(service, fs, pf, traces_dir, tmp_path):
    trace = "01-inbound-single-answer"
    again, callid, frames, wanted = kill_then_restart(service, fs, pf, traces_dir, tmp_path, trace, 2)
    time.sleep(1.0)  # the call waits for its CDR: no blind close meanwhile
    assert delivered_for(pf, callid) == wanted[:2]
    assert post_cdr(again, cdr_of(frames, callid), secret="wrong-secret-000000").status_code == 401
    # log-b-leg=true: the rung leg's CDR comes too, first here; the A leg's finishes the call
    b_leg = post_cdr(again, b_leg_cdr_of(frames, callid, b_leg_uuid(frames).decode()))
    assert b_leg.json() == {"result": "ignored: a leg of a call fsbridge follows"}
    reply = post_cdr(again, cdr_of(frames, callid))
    assert reply.status_code == 200 and reply.json() == {"result": "completed"}
    expected = with_recording(wanted, [f for f in pf_forms(pf, callid)] or [{}])
    wait_all_delivered(again, pf, {callid: expected})
    got = delivered_for(pf, callid)
    assert got[-1]["duration"] == "3" and got[-1]["status"] == "Success"  # the leg's real billsec
    assert got[-1]["record_link"].startswith(again.url)
    assert requests.get(got[-1]["record_link"], timeout=5).status_code == 200
    # mod_json_cdr retried (or the spool was replayed): nothing is sent twice.
    assert post_cdr(again, cdr_of(frames, callid)).json() == {"result": "ignored: no open call"}
    time.sleep(0.5)
    assert delivered_for(pf, callid) == expected
    assert duplicates(pf) <= 2
    again.wait_health(lambda h: h["open_calls_from_before_restart"] == 0)
    pf.assert_no_violations()
    assert_clean_log(again)


def test_killed_while_ringing_the_cdr_names_who_answered(service, fs, pf, traces_dir, tmp_path):
    """Ring group 02: fsbridge dies after the three INCOMINGs; 102 answers and
    hangs up while it is down.  The CDR's bridge gives ACCEPTED 102, 101 and
    103 Cancelled, 102 Success with his talk time, as the live events would."""
    trace = "02-inbound-ring-group"
    again, callid, frames, wanted = kill_then_restart(service, fs, pf, traces_dir, tmp_path, trace, 3, ringing=True)
    assert post_cdr(again, cdr_of(frames, callid)).json() == {"result": "completed"}
    expected = with_recording(wanted, pf_forms(pf, callid) or [{}])
    wait_all_delivered(again, pf, {callid: expected})
    pf.assert_no_violations()
    assert_clean_log(again)


def test_without_a_cdr_the_call_is_closed_blind_after_the_wait(service, fs, pf, traces_dir, tmp_path):
    trace = "01-inbound-single-answer"
    again, callid, frames, wanted = kill_then_restart(service, fs, pf, traces_dir, tmp_path, trace, 2, wait="1")
    blind = dict(wanted[-1], duration="0", is_recorded="0")
    wait_all_delivered(again, pf, {callid: wanted[:2] + [blind]})
    assert "no CDR within" in again.log()
    # A CDR arriving after the blind close changes nothing.
    assert post_cdr(again, cdr_of(frames, callid)).json() == {"result": "ignored: no open call"}
    assert delivered_for(pf, callid) == wanted[:2] + [blind]
    assert_clean_log(again)


def test_a_cdr_for_a_call_followed_live_or_unknown_is_ignored(service, fs, pf, traces_dir, tmp_path):
    svc = service(settings=settings(tmp_path))
    wait_connected(svc, fs)
    callid, frames = fresh_call(traces_dir, "01-inbound-single-answer")
    talking, ending = split_at_first_hangup(frames)
    wanted = expected_with_callid(expected_fields("01-inbound-single-answer"), callid)
    assert fs.replay(talking).wait(10)
    assert fs.wait_until(lambda: delivered_for(pf, callid) == wanted[:2], 10)
    assert post_cdr(svc, cdr_of(frames, callid)).json() == {"result": "ignored: the call is followed live"}
    other, other_frames = fresh_call(traces_dir, "01-inbound-single-answer")
    assert post_cdr(svc, cdr_of(other_frames, other)).json() == {"result": "ignored: no open call"}
    assert fs.replay(ending).wait(10)
    wait_all_delivered(svc, pf, {callid: wanted})
    assert delivered_for(pf, other) == []
    big = b"{" + b" " * (1024 * 1024) + b"}"
    assert post_cdr(svc, big).status_code == 413
    assert post_cdr(svc, b"cdr=%7Bnot json").status_code == 400
    assert_clean_log(svc)


def pf_forms(pf, callid: str) -> list[dict[str, str]]:
    """What PlanFix has for the call so far, waiting briefly for the COMPLETED."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        got = delivered_for(pf, callid)
        if got and got[-1].get("event") == "COMPLETED":
            return got
        time.sleep(0.05)
    return []


def test_call_ends_during_an_esl_gap_then_its_cdr_gives_the_real_end(service, fs, pf, traces_dir, tmp_path):
    """Not a restart: FreeSWITCH's Event Socket goes away mid-call and the
    call ends before it is back.  The tracker's call is handed to the
    registry on reconnect instead of closed blind, and its CDR finishes it."""
    svc = service(settings=settings(tmp_path))
    wait_connected(svc, fs)
    callid, frames = fresh_call(traces_dir, "01-inbound-single-answer")
    talking, _ending = split_at_first_hangup(frames)
    wanted = expected_with_callid(expected_fields("01-inbound-single-answer"), callid)
    (tmp_path / "rec" / f"{callid}.wav").write_bytes(b"RIFF" + b"\0" * 4000)
    assert fs.replay(talking).wait(10)
    assert fs.wait_until(lambda: delivered_for(pf, callid) == wanted[:2], 10)
    fs.stop()
    svc.wait_health(lambda h: h["freeswitch"]["state"] != "connected")
    # The call ends; mod_json_cdr posts at once, before the Event Socket is back.
    retry = post_cdr(svc, cdr_of(frames, callid))
    assert retry.status_code == 503 and retry.json()["error"] == "Service unavailable"
    fs.start()  # the idle listing: the call is gone
    wait_connected(svc, fs, subscriptions=2)
    svc.wait_health(lambda h: h["open_calls"] == 0 and h["open_calls_from_before_restart"] == 1)
    assert delivered_for(pf, callid) == wanted[:2]  # no blind close
    assert post_cdr(svc, cdr_of(frames, callid)).json() == {"result": "completed"}
    wait_all_delivered(svc, pf, {callid: with_recording(wanted, pf_forms(pf, callid) or [{}])})
    assert duplicates(pf) == 0
    pf.assert_no_violations()
    assert_clean_log(svc)
