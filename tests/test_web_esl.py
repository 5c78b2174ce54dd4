"""makeCall through real HTTP, the real ESL connection and the fake FreeSWITCH.

Proves the seam the service uses: ``WebDeps.originate`` is
``lambda command, job_uuid: esl.bgapi(command, job_uuid=job_uuid)`` and
``not_connected_errors`` are the ESL connection's own exceptions.
"""

from __future__ import annotations

import pytest
import requests
from gevent.pywsgi import WSGIServer

from fsbridge.esl import EslConnection, EslNotConnected, EslTimeout
from fsbridge.state import SettingsStore
from fsbridge.web import WebDeps, WebSettings, create_app
from fsbridge.fakes.freeswitch import wait_until
from tests.test_web import COMMAND, TOKEN, make_call


@pytest.fixture
def stack(fake, tmp_path):  # noqa: F811
    events: list[tuple] = []
    esl = EslConnection("127.0.0.1", fake.port, "ClueCon", ["CHANNEL_CREATE", "BACKGROUND_JOB"],
                        on_event=lambda headers, body: events.append((headers, body)),
                        connect_timeout=0.3, command_timeout=0.5, max_backoff=0.05, idle_timeout=30.0)
    deps = WebDeps(
        originate=lambda command, job_uuid: esl.bgapi(command, job_uuid=job_uuid),
        settings_store=SettingsStore(tmp_path / "planfix-settings.json"),
        health=lambda: {"freeswitch": esl.health()},
        not_connected_errors=(EslNotConnected, EslTimeout),
    )
    server = WSGIServer(("127.0.0.1", 0), create_app(WebSettings(pbx_token=TOKEN), deps), log=None)
    server.start()
    esl.start()
    try:
        assert esl.wait_connected(3)
        yield fake, esl, events, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.stop(timeout=1)
        esl.stop()


def test_make_call_reaches_freeswitch_as_bgapi_with_our_job_uuid(stack):
    fs, esl, events, url = stack
    r = requests.post(f"{url}/planfix", data=make_call(to="8 (910) 123-45-67"), timeout=5)
    assert r.status_code == 200
    sent = fs.wait_for_command("bgapi originate")
    command_line, job_header = sent.split("\n")
    match = COMMAND.fullmatch(command_line.removeprefix("bgapi "))
    assert match, command_line
    assert job_header == f"Job-UUID: {match['req']}"
    assert match["call"] == r.json()["callid"] and match["phone"] == "79101234567"  # the policy dials the normalised number
    # FreeSWITCH's answer comes back as BACKGROUND_JOB under our request id
    assert wait_until(lambda: any(h.get("Event-Name") == "BACKGROUND_JOB" for h, _ in events), 3)
    [(headers, body)] = [(h, b) for h, b in events if h.get("Event-Name") == "BACKGROUND_JOB"]
    assert headers.get("Job-UUID") == match["req"]
    assert body.decode().strip() == f"+OK {match['call']}"


def test_freeswitch_down_is_503_and_nothing_queued(stack):
    fs, esl, events, url = stack
    fs.stop()
    assert wait_until(lambda: not esl.connected, 3)
    r = requests.post(f"{url}/planfix", data=make_call(), timeout=5)
    assert r.status_code == 503 and r.json() == {"error": "FreeSWITCH is not connected"}
    assert not [c for c in fs.commands if c.startswith("bgapi")]
    health = requests.get(f"{url}/healthz", timeout=5).json()
    assert health["freeswitch"]["connected"] is False
