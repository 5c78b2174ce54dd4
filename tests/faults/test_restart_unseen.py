"""Calls that begin AND end while fsbridge cannot see FreeSWITCH: reported from their CDRs.

The CDRs are real (tests/data/cdr/lab-down-*: three calls placed in the live
lab while fsbridge was killed, every leg posted by mod_json_cdr with
log-b-leg=true), given fresh channel UUIDs and moved in time into the gap
of the service under test.  The gap is the one a previous process leaves:
its node was last seen a minute before this process connects
(fsbridge/gaps.py, written here as that process would have).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path

import requests

from fsbridge.fakes.planfix import FakePlanfix
from fsbridge.gaps import Gaps
from tests.faults.conftest import assert_clean_log, delivered_for, wait_connected
from tests.service_proc import ServiceProcess

DATA = Path(__file__).resolve().parent.parent / "data" / "cdr"
SECRET = "cdr-secret-0123456789"
LAB_RECORDINGS = "/tmp/fsbridge-live-63x24fk9/fs/recordings"  # where the lab wrote them
FS_RECORDINGS = "/usr/local/freeswitch/recordings"
CALLS = {"answered": ["b101", "b103"], "missed": ["b101", "b103"], "outbound": ["b"]}


def real_call(call: str, start: float) -> tuple[str, list[bytes]]:
    """(callid, CDR bodies A leg first) of lab-down-<call>-*, with fresh UUIDs, starting at ``start``."""
    texts = [(DATA / f"lab-down-{call}-{leg}.json").read_text().replace(LAB_RECORDINGS, FS_RECORDINGS)
             for leg in ["a", *CALLS[call]]]
    for old in {json.loads(text)["variables"]["uuid"] for text in texts}:
        new = str(uuid.uuid4())
        texts = [text.replace(old, new) for text in texts]
    docs = [json.loads(text) for text in texts]
    shift_us = int(start * 1e6) - int(docs[0]["variables"]["start_uepoch"])

    def moved(value: str, scale: int) -> str:
        return str(int(value) + shift_us // scale) if value.isdigit() and value != "0" else value

    for doc in docs:
        variables = doc["variables"]
        for name, value in variables.items():
            if name.endswith("_uepoch"):
                variables[name] = moved(value, 1)
            elif name.endswith("_epoch"):
                variables[name] = moved(value, 1_000_000)
        for step in doc["callflow"]:
            step["times"] = {name: moved(value, 1) for name, value in step["times"].items()}
    return docs[0]["variables"]["uuid"], [json.dumps(doc).encode() for doc in docs]


def post_cdr(svc: ServiceProcess, body: bytes) -> requests.Response:
    auth = base64.b64encode(f"fsbridge:{SECRET}".encode()).decode()
    return requests.post(f"{svc.dialplan_url}/cdr", data=body, timeout=5, headers={
        "Content-Type": "application/json", "Authorization": f"Basic {auth}"})


def settings(tmp_path) -> dict[str, dict[str, str]]:
    rec = tmp_path / "rec"
    rec.mkdir(exist_ok=True)
    return {"cdr": {"secret": SECRET, "wait": "60"},
            "recordings": {"dir": str(rec), "freeswitch_dir": FS_RECORDINGS}}


def seen_a_minute_ago(workdir: Path) -> float:
    """What a process that died a minute ago left: its node last seen then."""
    (workdir / "state").mkdir(parents=True, exist_ok=True)
    gaps = Gaps(str(workdir / "state" / "esl-gaps.sqlite3"))
    now = time.time()
    gaps.alive("", now - 60)
    gaps.close()
    return now


def wait_events(pf: FakePlanfix, callid: str, count: int, timeout: float = 20) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while len(got := delivered_for(pf, callid)) < count:
        assert time.monotonic() < deadline, got
        time.sleep(0.05)
    time.sleep(0.3)  # nothing more may follow
    return delivered_for(pf, callid)


def brief(rows: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    return [(r["event"], r["ext"], r.get("status", "")) for r in rows]


def test_calls_inside_the_gap_are_reported_from_their_real_cdrs_once(service, fs, pf, tmp_path):
    now = seen_a_minute_ago(tmp_path / "svc")
    calls = {name: real_call(name, now - 50 + 10 * n) for n, name in enumerate(CALLS)}
    for name in ("answered", "outbound"):
        (tmp_path / "rec" / f"{calls[name][0]}.wav").parent.mkdir(exist_ok=True)
        (tmp_path / "rec" / f"{calls[name][0]}.wav").write_bytes(b"RIFF" + b"\0" * 4000)
    svc = service(settings=settings(tmp_path), workdir=tmp_path / "svc")
    wait_connected(svc, fs)
    # each leg on its own, in no particular order (each is retried on its own)
    for _, bodies in calls.values():
        for body in reversed(bodies):
            reply = post_cdr(svc, body)
            assert reply.status_code == 200 and reply.json()["result"].startswith("held"), reply.text
    answered = wait_events(pf, calls["answered"][0], 5)
    assert sorted(brief(answered[:2])) == [("INCOMING", "101", ""), ("INCOMING", "103", "")]
    assert brief(answered[2:]) == [("ACCEPTED", "101", ""), ("COMPLETED", "103", "Cancelled"),
                                   ("COMPLETED", "101", "Success")]
    talk = answered[-1]
    assert (talk["duration"], talk["is_recorded"], talk["data_line"]) == ("2", "1", "74950000000")
    assert requests.get(talk["record_link"], timeout=5).status_code == 200
    assert sorted(brief(wait_events(pf, calls["missed"][0], 4))) == [
        ("COMPLETED", "101", "Missed"), ("COMPLETED", "103", "Missed"), ("INCOMING", "101", ""), ("INCOMING", "103", "")]
    assert brief(wait_events(pf, calls["outbound"][0], 3)) == [
        ("OUTGOING", "102", ""), ("ACCEPTED", "102", ""), ("COMPLETED", "102", "Success")]
    # a spool replayed, or a post retried: nothing twice
    delivered = len(pf.delivered)
    assert post_cdr(svc, calls["answered"][1][0]).json() == {"result": "ignored: reported from its CDRs already"}
    time.sleep(0.5)
    assert len(pf.delivered) == delivered
    pf.assert_no_violations()
    assert_clean_log(svc)


def test_a_kill_while_cdrs_are_held_loses_no_call(service, fs, pf, tmp_path):
    """mod_json_cdr got its 200 for the A leg's CDR and never posts it again:
    killed while waiting for the legs' CDRs, fsbridge finds it on disk, and
    the legs posted to the next process complete the call, once."""
    now = seen_a_minute_ago(tmp_path / "svc")
    callid, bodies = real_call("answered", now - 50)
    (tmp_path / "rec" / f"{callid}.wav").parent.mkdir(exist_ok=True)
    (tmp_path / "rec" / f"{callid}.wav").write_bytes(b"RIFF" + b"\0" * 4000)
    svc = service(settings=settings(tmp_path), workdir=tmp_path / "svc")
    wait_connected(svc, fs)
    a_leg, *legs = bodies
    assert post_cdr(svc, a_leg).json()["result"].startswith("held")
    assert post_cdr(svc, legs[0]).json()["result"].startswith("held")
    svc.kill()
    again = service(settings=settings(tmp_path), workdir=tmp_path / "svc")
    wait_connected(again, fs, subscriptions=2)
    assert "2 CDRs of calls FreeSWITCH" in again.log()
    for body in legs[1:]:
        assert post_cdr(again, body).json()["result"].startswith("held")
    answered = wait_events(pf, callid, 5)
    assert sorted(brief(answered[:2])) == [("INCOMING", "101", ""), ("INCOMING", "103", "")]
    assert brief(answered[2:]) == [("ACCEPTED", "101", ""), ("COMPLETED", "103", "Cancelled"),
                                   ("COMPLETED", "101", "Success")]
    # reported: nothing held any more, so a third process reports nothing again
    again.stop()
    third = service(settings=settings(tmp_path), workdir=tmp_path / "svc")
    wait_connected(third, fs, subscriptions=3)
    time.sleep(1.5)
    assert third.log().count("are held again") == 1  # the second process's (one log file)
    assert len(delivered_for(pf, callid)) == 5
    pf.assert_no_violations()
    assert_clean_log(third)


def test_cdrs_of_calls_before_the_gap_or_after_it_are_ignored(service, fs, pf, tmp_path):
    """A call that began while the previous process could see FreeSWITCH, or that
    ended after this one connected, was seen live (or adopted): not reported again."""
    now = seen_a_minute_ago(tmp_path / "svc")
    svc = service(settings=settings(tmp_path), workdir=tmp_path / "svc")
    wait_connected(svc, fs)
    before = real_call("answered", now - 62)  # began before the node was last seen
    after = real_call("outbound", time.time() + 1)  # still up at the connect: it ends later
    for _, bodies in (before, after):
        for body in bodies:
            assert post_cdr(svc, body).json()["result"].startswith("ignored"), body[:200]
    time.sleep(1.5)  # past the settle of anything held
    assert delivered_for(pf, before[0]) == [] and delivered_for(pf, after[0]) == []
    assert_clean_log(svc)


def test_an_unseen_call_goes_to_the_tenant_owning_its_did(fs, pf, tmp_path):
    """Cloud PBX: the call's DID (and domain) names its tenant, as for a live call."""
    workdir = tmp_path / "svc"
    now = seen_a_minute_ago(workdir)
    callid, bodies = real_call("missed", now - 30)
    with FakePlanfix() as other:
        svc = ServiceProcess(workdir, fs_port=fs.port, settings=settings(tmp_path), tenants={
            "lab": {"token": "pbx-lab-0123456789abcdef", "domains": "127.0.0.1", "dids": "74950000000",
                    "planfix_url": pf.url, "planfix_token": pf.token},
            "other": {"token": "pbx-other-0123456789abcd", "domains": "other.pbx.example", "dids": "74990000009",
                      "planfix_url": other.url, "planfix_token": other.token},
        })
        try:
            svc.start()
            wait_connected(svc, fs)
            for body in bodies:
                assert post_cdr(svc, body).status_code == 200
            assert len(wait_events(pf, callid, 4)) == 4
            assert other.requests == []
            pf.assert_no_violations()
            assert_clean_log(svc)
        finally:
            svc.kill()
