"""Every real call capture through the running service, end to end.

A fake FreeSWITCH replays the capture's exact bytes (only the events the
service subscribed to) to a real `fsbridge run` process; a fake PlanFix on
loopback receives what the service sends.  The expected PlanFix commands are
the same table the tracker's own tests use (tests/test_tracker_traces.py),
here checked as real HTTP requests, with the recordings stage in between:
a recorded call carries a signed link that downloads exactly the file.

Click-to-call captures start with a real makeCall: the service's own
`bgapi originate` is answered by replaying the capture rewritten the way
FreeSWITCH would have produced it for that command (our origination_uuid,
Job-UUID and fsbridge_* variables).
"""

from __future__ import annotations

import re
import time
import wave

import pytest
import requests

from fsbridge.fakes.freeswitch import FakeFreeSwitch
from fsbridge.fakes.planfix import FakePlanfix
from tests.service_proc import ServiceProcess
from tests.test_tracker_traces import CALLER, EXPECTED, LAB_RECORDINGS, MANAGER_UUID, RECORDINGS
from tests.traces import read_trace, rewrite_click_to_call

FS_RECORDINGS = RECORDINGS.rstrip("/")


def make_wav(path, seconds: float = 0.2) -> bytes:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(bytes(range(256)) * int(8000 * 4 * seconds / 256))
    return path.read_bytes()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    yield from _stack(tmp_path_factory, FS_RECORDINGS)


@pytest.fixture(scope="module")
def lab_stack(tmp_path_factory):
    """For the captures of tests/live's lab, whose FreeSWITCH recorded into its temp dir."""
    yield from _stack(tmp_path_factory, LAB_RECORDINGS.rstrip("/"))


def _stack(tmp_path_factory, fs_recordings: str):
    work = tmp_path_factory.mktemp("e2e")
    recordings = work / "recordings"
    recordings.mkdir()
    with FakePlanfix() as planfix, FakeFreeSwitch() as fs:
        service = ServiceProcess(
            work,
            fs_port=fs.port,
            planfix_url=planfix.url,
            planfix_token=planfix.token,
            settings={"recordings": {"dir": str(recordings), "freeswitch_dir": fs_recordings}},
        )
        with service:
            service.wait_health(lambda h: h["freeswitch"]["state"] == "connected")
            yield service, fs, planfix, recordings


def requests_for(planfix: FakePlanfix, callid: str) -> list[dict[str, str]]:
    return [r for r in planfix.requests if r.get("callid") == callid]


def wait_requests(planfix: FakePlanfix, callid: str, count: int, service: ServiceProcess) -> list[dict]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        got = requests_for(planfix, callid)
        if len(got) >= count:
            time.sleep(0.2)  # nothing more may follow
            return requests_for(planfix, callid)
        time.sleep(0.02)
    raise AssertionError(
        f"{callid}: got {requests_for(planfix, callid)}\n--- log ---\n{service.log()[-3000:]}"
    )


def check(service, planfix, recordings, callid, expected, files: dict[str, bytes]):
    got = wait_requests(planfix, callid, len(expected), service)
    assert len(got) == len(expected), got
    for request, (fields, recording_path) in zip(got, expected):
        request = dict(request)
        assert request.pop("planfix_token") == planfix.token
        link = request.pop("record_link", None)
        if recording_path is None:
            assert link is None
        else:
            # recorded and the file is there: a signed link to exactly it
            assert link and link.startswith(f"{service.url}/records/{callid}/"), link
            answer = requests.get(link, timeout=5)
            assert answer.status_code == 200
            assert answer.headers["Content-Type"].startswith("audio/")
            assert answer.content == files[recording_path]
            tampered = re.sub(r"/[0-9a-f]{6}", "/000000", link, count=1)
            assert requests.get(tampered, timeout=5).status_code in (403, 404)
        assert request == fields
    planfix.assert_no_violations()


def recorded_in_lab(name: str) -> bool:
    return any(path and path.startswith(LAB_RECORDINGS) for _, path in EXPECTED[name])


INBOUND_OUTBOUND = sorted(name for name in EXPECTED if not name.startswith("06") and not recorded_in_lab(name))
LAB_CAPTURES = sorted(name for name in EXPECTED if recorded_in_lab(name))
CLICK_TO_CALL = sorted(name for name in EXPECTED if name.startswith("06"))


@pytest.mark.parametrize("name", INBOUND_OUTBOUND)
def test_call_capture_through_the_service(stack, traces_dir, name):
    replay_and_check(stack, traces_dir, name)


@pytest.mark.parametrize("name", LAB_CAPTURES)
def test_lab_capture_through_the_service(lab_stack, traces_dir, name):
    replay_and_check(lab_stack, traces_dir, name)


def replay_and_check(stack, traces_dir, name: str) -> None:
    service, fs, planfix, recordings = stack
    expected = EXPECTED[name]
    files = {}
    for _, recording_path in expected:
        if recording_path:
            files[recording_path] = make_wav(recordings / recording_path.rsplit("/", 1)[1])
    fs.replay(str(traces_dir / f"{name}.plain.txt")).wait(10)
    for callid in dict.fromkeys(fields["callid"] for fields, _ in expected):  # a capture may hold several calls
        check(service, planfix, recordings, callid, [e for e in expected if e[0]["callid"] == callid], files)


@pytest.mark.parametrize("name", CLICK_TO_CALL)
def test_click_to_call_capture_through_the_service(stack, traces_dir, name):
    service, fs, planfix, recordings = stack
    raw = read_trace(traces_dir / f"{name}.plain.txt")
    seen: dict[str, str] = {}

    def answer_originate(command: str, headers: dict[str, str], job_uuid: str | None):
        variables = dict(re.findall(r"([a-z_]+)=([^,}]*)", command.split("}", 1)[0]))
        seen.update(variables, job_uuid=job_uuid or "")
        if name.startswith("06a"):
            seen["file"] = make_wav(recordings / f"{variables['origination_uuid']}.wav")
        return [rewrite_click_to_call(
            raw,
            manager_uuid=variables["origination_uuid"],
            job_uuid=job_uuid,
            request_id=variables["fsbridge_click_to_call"],
            ext=variables["fsbridge_ext"],
            phone=variables["fsbridge_phone"],
        )]

    fs.clear_hooks()
    fs.on_command("bgapi originate", answer_originate)
    answer = service.post(cmd="makeCall", token=service.token, **{"from": "101", "to": "+7 (910) 123-45-67"})
    assert answer.status_code == 200, answer.text
    callid = answer.json()["callid"]
    command = fs.wait_for_command("bgapi originate")
    assert fs.wait_until(lambda: "origination_uuid" in seen, timeout=5)
    # what reached FreeSWITCH: our uuid, the manager's user, the client's number
    assert seen["origination_uuid"] == callid
    assert seen["fsbridge_ext"] == "101" and seen["fsbridge_phone"] == CALLER
    assert re.fullmatch(
        r"bgapi originate \{[^\s]*\}user/101 79101234567 XML default\nJob-UUID: [0-9a-f-]{36}", command
    ), command
    expected = [
        ({k: (callid if v == MANAGER_UUID else v) for k, v in fields.items()},
         recording_path and recording_path.replace(MANAGER_UUID, callid))
        for fields, recording_path in EXPECTED[name]
    ]
    files = {p: seen["file"] for _, p in expected if p}
    check(service, planfix, recordings, callid, expected, files)
    fs.clear_commands()
    fs.clear_hooks()


def test_load_capture_every_call_reported(stack, traces_dir):
    """100 interleaved real calls: 300 requests, each call in order."""
    service, fs, planfix, recordings = stack
    fs.replay(str(traces_dir / "load-100-calls.plain.txt.gz")).wait(30)
    deadline = time.monotonic() + 30
    calls: dict[str, list[str]] = {}
    while time.monotonic() < deadline:
        calls = {}
        for r in planfix.requests:
            if re.fullmatch(r"791000\d{5}", r.get("phone", "")):  # the load capture's callers
                calls.setdefault(r["callid"], []).append(r["event"])
        if len(calls) == 100 and all(len(v) == 3 for v in calls.values()):
            break
        time.sleep(0.1)
    assert len(calls) == 100
    assert all(events == ["INCOMING", "ACCEPTED", "COMPLETED"] for events in calls.values()), calls
    health = service.wait_health(lambda h: h["outbox"]["depth"] == 0)
    assert health["open_calls"] == 0
    planfix.assert_no_violations()


def test_click_to_call_diversion_from_configuration(tmp_path, traces_dir):
    """[click_to_call] client_caller_id: the number the client sees is the
    diversion of every event, OUTGOING included (06b: the manager is busy,
    so no client leg ever names it)."""
    raw = read_trace(traces_dir / "06b-click-to-call-manager-busy.plain.txt")

    def answer_originate(command: str, headers: dict[str, str], job_uuid: str | None):
        variables = dict(re.findall(r"([a-z_]+)=([^,}]*)", command.split("}", 1)[0]))
        return [rewrite_click_to_call(
            raw, manager_uuid=variables["origination_uuid"], job_uuid=job_uuid,
            request_id=variables["fsbridge_click_to_call"], ext=variables["fsbridge_ext"],
            phone=variables["fsbridge_phone"],
        )]

    with FakePlanfix() as planfix, FakeFreeSwitch() as fs:
        with ServiceProcess(tmp_path, fs_port=fs.port, planfix_url=planfix.url, planfix_token=planfix.token,
                            settings={"click_to_call": {"client_caller_id": "+74950000000"}}) as service:
            service.wait_health(lambda h: h["freeswitch"]["state"] == "connected")
            fs.on_command("bgapi originate", answer_originate)
            answer = service.post(cmd="makeCall", token=service.token, **{"from": "101", "to": CALLER})
            assert answer.status_code == 200, answer.text
            callid = answer.json()["callid"]
            got = wait_requests(planfix, callid, 2, service)
            assert [(r["event"], r["diversion"]) for r in got] == [("OUTGOING", "74950000000"),
                                                                  ("COMPLETED", "74950000000")]
            planfix.assert_no_violations()
