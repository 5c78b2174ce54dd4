"""SIGHUP re-reads the config: [log] applies at once, other changes are named as needing a restart."""

from __future__ import annotations

import signal
import time

from fsbridge import config
from fsbridge.fakes.freeswitch import FakeFreeSwitch
from fsbridge.reload import Reloader
from tests.service_proc import ServiceProcess


def wait_log(service: ServiceProcess, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = service.log()
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the log:\n{service.log()[-3000:]}")


def test_sighup_applies_log_settings_and_names_what_needs_a_restart(tmp_path):
    with FakeFreeSwitch() as fs:
        with ServiceProcess(tmp_path, fs_port=fs.port) as service:
            service.wait_health(lambda h: h["freeswitch"]["state"] == "connected")
            text = service.config_path.read_text()
            text = text.replace("level = DEBUG", "level = INFO\nlevels = fsbridge.web=error\nformat = json")
            text = text.replace("[outbox]", "[outbox]\nconcurrency = 3")
            service.config_path.write_text(text)
            service.proc.send_signal(signal.SIGHUP)
            log = wait_log(service, "need a restart")
            assert "applied [log] level, [log] format, [log] levels" in log
            assert "[outbox] concurrency changed; these need a restart" in log
            # json from now on, and fsbridge.web at ERROR: a refused makeCall leaves no line
            service.post(cmd="makeCall", token="wrong", **{"from": "101", "to": "1"})
            service.config_path.write_text(text.replace("[outbox]", "[outbox]\nnonsense"))
            service.proc.send_signal(signal.SIGHUP)
            log = wait_log(service, "not applied; the running configuration stays")
            assert service.health()["freeswitch"]["state"] == "connected"
    assert '"logger": "fsbridge.reload"' in log
    assert "refused with 401" not in log


def test_sighup_applies_click_to_call_limits_to_the_running_service(tmp_path):
    c2c = {"click_to_call": {"calls_per_extension_per_minute": "1"}}
    with FakeFreeSwitch() as fs:
        with ServiceProcess(tmp_path, fs_port=fs.port, settings=c2c) as service:
            service.wait_health(lambda h: h["freeswitch"]["state"] == "connected")
            call = {"cmd": "makeCall", "token": service.token, "from": "101", "to": "+7 910 123-45-67"}
            assert service.post(**call).status_code == 200
            refused = service.post(**call)
            assert refused.status_code == 400 and "from 101" in refused.json()["detail"]
            text = service.config_path.read_text()
            service.config_path.write_text(text.replace("calls_per_extension_per_minute = 1",
                                                        "calls_per_extension_per_minute = 3"))
            service.proc.send_signal(signal.SIGHUP)
            wait_log(service, "applied [click_to_call] calls_per_extension_per_minute")
            assert service.post(**call).status_code == 200  # no restart: calls in progress are kept
    assert "calls_per_extension_per_minute changed; these need a restart" not in service.log()


def test_a_restart_key_beside_a_live_one_is_named_again_at_the_next_reload(tmp_path):
    ini = tmp_path / "fsbridge.ini"
    ini.write_text(f"[server]\ntoken = {'t' * 32}\n[storage]\ndir = {tmp_path}\n")
    applied = []
    reloader = Reloader(config.load(str(ini)), apply_click_to_call=applied.append)
    ini.write_text(ini.read_text() + "[click_to_call]\nmax_concurrent = 5\nkeep_plus = yes\n")
    assert reloader.reload() == [("click_to_call", "keep_plus")]
    assert reloader.reload() == [("click_to_call", "keep_plus")]  # still not running: named again
    assert [c.click_to_call.max_concurrent for c in applied] == [5, 5]


def test_tenant_sections_apply_live_and_nodes_or_switching_to_tenants_need_a_restart(tmp_path):
    ini = tmp_path / "fsbridge.ini"
    base = f"[storage]\ndir = {tmp_path}\n[tenant.acme]\ntoken = {'a' * 32}\ndomains = acme.example\n"
    ini.write_text(base)
    seen = []
    reloader = Reloader(config.load(str(ini)), apply_click_to_call=lambda new: None, apply_tenants=seen.append)
    ini.write_text(base + f"[tenant.beta]\ntoken = {'b' * 32}\ndids = 74951111111\n[click_to_call]\ntimeout = 20\n")
    assert reloader.reload() == []  # a new tenant and a changed default of every tenant: both live
    assert [t.name for t in seen[-1].tenants] == ["acme", "beta"]
    assert seen[-1].tenant("beta").click_to_call.timeout == 20
    assert [t.name for t in reloader.cfg.tenants] == ["acme", "beta"]  # what runs now
    ini.write_text(base + "[freeswitch.a]\nhost = 10.0.0.1\n")
    assert ("freeswitch.a", "section") in reloader.reload()
    assert [t.name for t in seen[-1].tenants] == ["acme"]  # beta removed, live
    ini.write_text(f"[server]\ntoken = {'t' * 32}\n[storage]\ndir = {tmp_path}\n")
    assert ("tenant.*", "sections added or all removed") in reloader.reload()
