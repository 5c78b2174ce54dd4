"""PlanFix's commands (setup, makeCall) and the CLI against the running service."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from tests.conftest import REPO
from fsbridge.fakes.freeswitch import FakeFreeSwitch
from fsbridge.fakes.planfix import FakePlanfix
from tests.service_proc import ServiceProcess, self_signed_certificate

INVALID_PARAMETERS = {"error": "Invalid parameters"}
INVALID_TOKEN = {"error": "Invalid token"}


@pytest.fixture
def fs():
    with FakeFreeSwitch() as fake:
        yield fake


@pytest.fixture
def planfix():
    with FakePlanfix() as fake:
        yield fake


def connected(health):
    return health["freeswitch"]["state"] == "connected"


def test_setup_takes_effect_at_once_and_survives_restart(tmp_path, fs, planfix, traces_dir):
    # no PlanFix settings in the config: events wait in the outbox until setup
    service = ServiceProcess(tmp_path, fs_port=fs.port).start()
    try:
        service.wait_health(connected)
        assert service.health()["planfix_configured"] is False
        fs.replay(str(traces_dir / "05b-outbound-busy-486.plain.txt")).wait(5)
        service.wait_health(lambda h: h["outbox"]["depth"] == 2)
        bad = service.post(cmd="setup", token=service.token, planfix_token="t" * 16,
                           planfix_url="ftp://x.planfix.ru/tel/api")
        assert bad.status_code == 400 and bad.json()["error"] == "Invalid parameters"
        assert "planfix_url" in bad.json()["detail"]
        wrong = service.post(cmd="setup", token="nope", planfix_token=planfix.token, planfix_url=planfix.url)
        assert wrong.status_code == 401 and wrong.json() == INVALID_TOKEN
        ok = service.post(cmd="setup", token=service.token, planfix_token=planfix.token, planfix_url=planfix.url)
        assert ok.status_code == 200, ok.text
        got = planfix.wait_for(2, timeout=10, delivered=True)
        assert [r["event"] for r in got] == ["OUTGOING", "COMPLETED"]
        assert all(r["planfix_token"] == planfix.token for r in got)
        assert service.health()["planfix_configured"] is True
        service.kill()  # SIGKILL right after setup answered: the settings are on disk
        service.start()
        service.wait_health(connected)
        fs.replay(str(traces_dir / "05c-outbound-notfound-404.plain.txt")).wait(5)
        assert len(planfix.wait_for(4, timeout=10, delivered=True)) == 4
        planfix.assert_no_violations()
    finally:
        service.stop()


INJECTIONS = [" 101", "101 ", "1,01", "10|1", "{101}", "$101", "10'1", "101\n", "10&1", "101;", "abc", ""]


def test_make_call_validation_and_injection_never_reach_freeswitch(tmp_path, fs, planfix):
    # the client's name from PlanFix is what the manager's phone shows
    planfix.contacts["79101234567"] = {"contact_name": "Иванов Иван", "responsible": 103}
    with ServiceProcess(tmp_path, fs_port=fs.port, planfix_url=planfix.url,
                        planfix_token=planfix.token) as service:
        service.wait_health(connected)
        fs.clear_commands()
        for bad_from in INJECTIONS:
            answer = service.post(cmd="makeCall", token=service.token, **{"from": bad_from, "to": "79101234567"})
            assert (answer.status_code, answer.json()["error"]) == (400, "Invalid parameters"), bad_from
        for bad_to in ["7910 123,4567", "7910|1234567", "{x}79101234567", "$79101234567", "7910'1234567",
                       "79101234567\nexit", "7910&park", "791012345;67", "x", "", "7" * 40, "79101234567@evil"]:
            answer = service.post(cmd="makeCall", token=service.token, **{"from": "101", "to": bad_to})
            assert (answer.status_code, answer.json()["error"]) == (400, "Invalid parameters"), bad_to
        for token in ["", "wrong", service.token.upper(), service.token + "x"]:
            answer = service.post(cmd="makeCall", token=token, **{"from": "101", "to": "79101234567"})
            assert (answer.status_code, answer.json()) == (401, INVALID_TOKEN), token
        answer = requests.post(service.url + "/planfix", data={"cmd": "makeCall", "from": "101", "to": "1"})
        assert (answer.status_code, answer.json()) == (401, INVALID_TOKEN)
        for method in (requests.get, requests.put, requests.delete):
            answer = method(service.url + "/planfix", timeout=5)
            assert answer.status_code == 405 and "error" in answer.json()
        answer = requests.post(service.url + "/planfix", json={"cmd": "makeCall"}, timeout=5)
        assert answer.status_code == 400 and answer.json()["error"] == "Invalid parameters"
        answer = service.post(cmd="dropTable", token=service.token)
        assert (answer.status_code, answer.json()["error"]) == (400, "Invalid parameters")
        assert not [c for c in fs.commands if "originate" in c]
        # a valid one does reach it, once, as a strict originate line
        answer = service.post(cmd="makeCall", token=service.token, **{"from": "101", "to": "8 (910) 123-45-67"})
        assert answer.status_code == 200, answer.text
        command = fs.wait_for_command("bgapi originate")
        assert " user/101 79101234567 XML default" in command.replace("}user/", " user/")
        assert "origination_caller_id_name='Иванов Иван'," in command
        assert "origination_caller_id_number=79101234567," in command
        assert "Traceback" not in service.log()


def test_make_call_for_an_extension_freeswitch_cannot_ring_is_refused_before_dialling(tmp_path, fs):
    """Unknown (999) or not registered (104): 400 with a detail, no originate (capture 95)."""
    fs.registered = {"101"}
    with ServiceProcess(tmp_path, fs_port=fs.port) as service:
        service.wait_health(connected)
        fs.clear_commands()
        for ext in ("999", "104"):
            answer = service.post(cmd="makeCall", token=service.token, **{"from": ext, "to": "79101234567"})
            assert (answer.status_code, answer.json()["error"]) == (400, "Invalid parameters"), ext
            assert f"extension {ext} is unknown to FreeSWITCH or not registered" in answer.json()["detail"]
        assert [c for c in fs.commands if "sofia_contact" in c] == ["api sofia_contact 999", "api sofia_contact 104"]
        assert not [c for c in fs.commands if "originate" in c]
        answer = service.post(cmd="makeCall", token=service.token, **{"from": "101", "to": "79101234567"})
        assert answer.status_code == 200, answer.text
        fs.wait_for_command("bgapi originate")


def test_make_call_503_while_freeswitch_is_away_then_reconnects(tmp_path, fs):
    with ServiceProcess(tmp_path, fs_port=fs.port) as service:
        service.wait_health(connected)
        fs.stop()
        service.wait_health(lambda h: not connected(h))
        answer = service.post(cmd="makeCall", token=service.token, **{"from": "101", "to": "79101234567"})
        assert answer.status_code == 503 and "error" in answer.json()
        fs.start()  # FreeSWITCH is back (same port): the service reconnects by itself
        service.wait_health(connected, timeout=10)
        fs.drop()  # dropped TCP without a notice: reconnects again
        service.wait_health(lambda h: connected(h) and h["freeswitch"]["connections"] >= 3, timeout=10)
        answer = service.post(cmd="makeCall", token=service.token, **{"from": "101", "to": "79101234567"})
        assert answer.status_code == 200, answer.text
        log = service.log()
        assert "waiting for FreeSWITCH" in log or "reconnecting" in log


def test_healthz_reveals_no_secret(tmp_path, fs, planfix):
    with ServiceProcess(tmp_path, fs_port=fs.port, planfix_url=planfix.url,
                        planfix_token=planfix.token) as service:
        text = requests.get(service.url + "/healthz", timeout=5).text
        assert service.token not in text and planfix.token not in text and "ClueCon" not in text
        health = service.wait_health(connected)
        assert {"depth", "oldest_pending_age_s", "last_success_at", "kept_aside"} <= set(health["outbox"])
        assert health["version"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "fsbridge", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_ping_and_outbox_commands(tmp_path, fs, planfix, traces_dir):
    service = ServiceProcess(tmp_path, fs_port=fs.port, planfix_url=planfix.url, planfix_token=planfix.token)
    config = str(service.config_path)
    planfix.ping_reply = {"pbxToken": service.token, "pbxUrl": service.url + "/planfix"}
    service_url_only = {"pbxToken": service.token, "pbxUrl": service.url}
    result = cli("ping", "-c", config)
    assert result.returncode == 0 and "URL: match" in result.stdout, result.stdout + result.stderr
    planfix.ping_reply = service_url_only  # the bare public_url: PlanFix would POST to a 404
    assert cli("ping", "-c", config).returncode == 1
    planfix.ping_reply = {"pbxToken": "someone-else-0000", "pbxUrl": service.url}
    mismatch = cli("ping", "-c", config)
    assert mismatch.returncode == 1 and service.token not in mismatch.stdout
    # PlanFix refuses everything: requests are kept aside, listed, retried
    planfix.failure = 400
    with service:
        service.wait_health(connected)
        fs.replay(str(traces_dir / "05e-outbound-forbidden-403.plain.txt")).wait(5)
        service.wait_health(lambda h: h["outbox"]["kept_aside"] == 2)
    listing = cli("outbox", "-c", config)
    assert listing.returncode == 0 and "kept aside: 2" in listing.stdout
    planfix.failure = None
    assert cli("outbox", "-c", config, "--retry").returncode == 0
    with service:
        service.wait_health(lambda h: h["outbox"]["depth"] == 0 and h["outbox"]["kept_aside"] == 0)
    assert [r["event"] for r in planfix.delivered if r["cmd"] == "event"] == ["OUTGOING", "COMPLETED"]


def test_https_when_certfile_and_keyfile_are_set(tmp_path, fs):
    cert, key = self_signed_certificate(tmp_path)
    with ServiceProcess(tmp_path / "svc", fs_port=fs.port,
                        settings={"server": {"certfile": str(cert), "keyfile": str(key)}}) as service:
        assert service.url.startswith("https://")
        answer = service.post(cmd="makeCall", token="wrong", **{"from": "101", "to": "1"})
        assert (answer.status_code, answer.json()) == (401, INVALID_TOKEN)
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(service.url.replace("https://", "http://") + "/healthz", timeout=3)


@pytest.mark.parametrize("dial_string, query", [
    ("user/{ext}", "sofia_contact 101"),
    ("user/{ext}@pbx.example.com", "sofia_contact 101@pbx.example.com"),
    ("sofia/gateway/gw/{ext}", None),     # no registration to ask about
    ("loopback/{ext}/default", None),
])
def test_which_dial_strings_get_the_registration_check(dial_string, query):
    from fsbridge.service import registration_problem, sofia_contact_query

    assert sofia_contact_query(dial_string, "101") == query
    assert registration_problem("101", "sofia/internal/sip:101@127.0.0.1:5091") is None
    assert "not registered" in registration_problem("101", "error/user_not_registered\n")


def test_fake_sofia_contact_answers_as_the_real_one(traces_dir):
    """Capture 97 (real FreeSWITCH, 101 registered on port 5091) against the fake."""
    from fsbridge.fakes.freeswitch import trace_api_bodies

    real = trace_api_bodies(traces_dir / "97-api-sofia-contact.raw.txt")
    fake = FakeFreeSwitch()
    fake.registered = {"101"}
    assert [fake._api_body(c) for c in ("sofia_contact 101", "sofia_contact 999", "sofia_contact 101@127.0.0.1")] \
        == real
