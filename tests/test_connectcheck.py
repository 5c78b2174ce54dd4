"""`fsbridge check --connect`: logs in to the fake FreeSWITCH, pings the fake PlanFix, says what works."""

from __future__ import annotations

import subprocess
import sys

from fsbridge.connectcheck import check_freeswitch
from fsbridge.fakes.freeswitch import FakeFreeSwitch
from fsbridge.fakes.planfix import FakePlanfix
from tests.conftest import REPO
from tests.service_proc import ServiceProcess, free_port


def check_connect(service: ServiceProcess) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsbridge", "check", "--connect", "-c", str(service.config_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=30)


def test_both_work(tmp_path):
    with FakePlanfix() as planfix, FakeFreeSwitch() as fs:
        service = ServiceProcess(tmp_path, fs_port=fs.port, planfix_url=planfix.url, planfix_token=planfix.token)
        planfix.ping_reply = {"pbxToken": service.token, "pbxUrl": service.url + "/planfix"}
        done = check_connect(service)
        assert fs.commands[:2] == ["auth ClueCon", "api status"]
    assert "FreeSWITCH 127.0.0.1:%d: logged in; UP " % fs.port in done.stdout, done.stdout
    assert "FreeSWITCH works; PlanFix works" in done.stdout, done.stdout
    assert done.returncode == 0


def test_wrong_password_and_nothing_listening(tmp_path):
    with FakeFreeSwitch(password="other") as fs:
        ok, lines = check_freeswitch("127.0.0.1", fs.port, "ClueCon", 2, "/etc/f.ini")
    assert not ok and "refused the password (-ERR invalid)" in lines[0]
    assert "[freeswitch] password in /etc/f.ini" in lines[1]
    ok, lines = check_freeswitch("127.0.0.1", free_port(), "ClueCon", 2, "/etc/f.ini")
    assert not ok and "cannot connect" in lines[0]
    assert "mod_event_socket loaded? see [freeswitch] host/port in /etc/f.ini" in lines[1]
    service = ServiceProcess(tmp_path, fs_port=free_port())
    done = check_connect(service)
    assert done.returncode == 1
    assert "FreeSWITCH FAILS; PlanFix FAILS" in done.stdout
