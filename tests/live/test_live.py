"""Real SIP calls through a real FreeSWITCH with fsbridge's installed dialplan.

Each test places calls with SIPp (carrier on the external profile, phones
101-103 registered on the internal one), and asserts the exact PlanFix
requests the real `fsbridge run` sent to the fake PlanFix, and what the phones
saw (the INVITE's From display name).
"""

from __future__ import annotations

import re
import shutil
import time
from datetime import datetime

import pytest
import requests

from tests.live import conftest as live_conf
from tests.live.lab import DID, free_udp_port, messages

CLIENT = "79101234567"
CLIENT_NAME = "Иванов Иван"


# ---- helpers --------------------------------------------------------------


def phone(env, user: str, scenario: str, *args: str):
    """Phone `user` answering its next call as `scenario` (on its registered port).

    -aa: like a real phone, answer FreeSWITCH's NOTIFY/OPTIONS with 200 (a
    NOTIFY reaches a phone during a transfer; SIPp would abort the call)."""
    # -m 3: an auto-answered NOTIFY counts as a call for SIPp; the INVITE must still be served
    return env.lab.sipp(scenario, "-m", "3", "-aa", *args, port=env.phone_ports[user])


def carrier_uas(env, scenario: str, *args: str):
    return env.lab.sipp(scenario, "-m", "1", *args, port=env.lab.carrier_port, target="external")


def carrier_call(env, caller: str, scenario: str = "carrier-uac-inbound"):
    return env.lab.sipp(scenario, "-s", DID, "-key", "caller", caller, "-m", "1",
                        port=free_udp_port(), target="external")


def phone_dials(env, user: str, number: str):
    return env.lab.sipp("phone-uac-outbound", "-s", number, "-key", "ext", user, "-au", user, "-ap", "1234",
                        "-m", "1", port=free_udp_port())


def wait(proc, timeout: float = 40) -> int:
    return proc.wait(timeout)


def events(env) -> list[dict[str, str]]:
    return [r for r in env.planfix.delivered if r.get("cmd") == "event"]


def brief(env) -> list[tuple[str, ...]]:
    """(event, ext, status) of every event, in the order PlanFix got them."""
    return [(r["event"], r.get("ext", ""), r.get("status", "")) for r in events(env)]


def moved_on(first: str, nxt: str, then: list[tuple[str, ...]]) -> list[list[tuple[str, ...]]]:
    """The two orders of a hunt or queue passing ``first`` over for ``nxt``.

    FreeSWITCH reports a leg's end from that leg's own thread, after its CDR
    is posted (mod_json_cdr, loaded in the lab), while the hunt already
    rings on: ``first``'s COMPLETED comes right before ``nxt``'s INCOMING,
    or right after it when its end arrived later.  ``then``: what follows.
    """
    passed = [("INCOMING", first, ""), ("COMPLETED", first, "Cancelled")]
    return [passed + [("INCOMING", nxt, "")] + then, passed[:1] + [("INCOMING", nxt, ""), passed[1]] + then]


def wait_calls_done(env, completed: int, timeout: float = 20) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [r for r in events(env) if r["event"] == "COMPLETED"]
        if len(done) >= completed and env.service.health()["outbox"]["depth"] == 0:
            time.sleep(0.3)  # nothing more may follow
            return events(env)
        time.sleep(0.1)
    raise AssertionError(f"PlanFix got {brief(env)}, expected {completed} COMPLETED")


def invite_display_name(proc) -> str | None:
    """The display name in the From of the INVITE a phone received."""
    log = messages(proc)
    match = re.search(r"INVITE sip:[^\n]*\n(?:[^\n]+\n)*?From: *\"([^\"]*)\"", log)
    return match.group(1) if match else None


def received_invite(proc) -> bool:
    return "INVITE sip:" in messages(proc)


def calls(env) -> set[str]:
    return {r["callid"] for r in events(env)}


# ---- the dialplan as installed ----------------------------------------------

# Warnings a vanilla 1.10.12 conf logs by itself (nothing to do with fsbridge).
VANILLA_NOISE = re.compile(r"deprecated use media_(hold_)?timeout variable|MSG Thread \d+ Started")


def test_installed_dialplan_loads_without_warnings_and_survives_reloadxml(env):
    assert "to do: apply it" in env.install_output
    # up to the end of the start-up: the tests of test_flows_live.py may have placed calls already
    problems = [line for line in env.lab.log_problems(0, env.log_offset_after_start) if not VANILLA_NOISE.search(line)]
    assert problems == []
    for context, extension in (("public", "fsbridge_inbound_lookup"), ("public", "fsbridge_record"),
                               ("default", "fsbridge_outbound"), ("default", "fsbridge_record")):
        located = env.lab.cli(f"xml_locate dialplan context name {context}")
        assert f'extension name="{extension}"' in located, (context, extension)
    assert env.lab.cli("global_getvar fsbridge_fallback").strip() == FALLBACK_LOADED
    offset = env.lab.log_size()
    assert "+OK" in env.lab.cli("reloadxml")
    time.sleep(0.5)
    assert [line for line in env.lab.log_problems(offset) if not VANILLA_NOISE.search(line)] == []


FALLBACK_LOADED = live_conf.FALLBACK.replace("$${domain}", "127.0.0.1")


# ---- inbound ------------------------------------------------------------------


def test_known_client_rings_the_responsible_manager_with_the_clients_name(live):
    live.planfix.contacts[live.client] = {"contact_name": CLIENT_NAME, "responsible": 102}
    manager = phone(live, "102", "uas-answer-wait-bye")
    call = carrier_call(live, "+" + live.client)
    assert wait(call) == 0
    got = wait_calls_done(live, 1)
    contact = [r for r in live.planfix.requests if r.get("cmd") == "contact"]
    assert [(r["phone"]) for r in contact] == [live.client]
    assert invite_display_name(manager) == CLIENT_NAME
    assert brief(live) == [("INCOMING", "102", ""), ("ACCEPTED", "102", ""), ("COMPLETED", "102", "Success")]
    assert {r["phone"] for r in got} == {live.client} and {r["diversion"] for r in got} == {DID}
    assert {r["type"] for r in got} == {"in"} and len(calls(live)) == 1
    assert contact[0]["callid"] in calls(live)


@pytest.mark.parametrize("responsible,scenario", [("102", "uas-reject-486"), ("102", "uas-noanswer"), ("109", None)],
                         ids=["busy", "no-answer", "not-in-directory"])
def test_responsible_unavailable_falls_back_to_the_group(live, responsible, scenario):
    live.planfix.contacts[live.client] = {"contact_name": CLIENT_NAME, "responsible": int(responsible)}
    if scenario:
        phone(live, responsible, scenario)
    first = phone(live, "101", "uas-answer-wait-bye")
    other = phone(live, "103", "uas-noanswer")
    assert wait(carrier_call(live, live.client)) == 0
    wait_calls_done(live, 3 if scenario else 2)
    assert invite_display_name(first) == CLIENT_NAME
    seen = brief(live)
    if scenario:  # the manager's slot ends before the group rings
        assert seen[0] == ("INCOMING", responsible, "")
        assert ("COMPLETED", responsible, "Cancelled") in seen
    assert ("ACCEPTED", "101", "") in seen and ("COMPLETED", "101", "Success") in seen
    assert ("COMPLETED", "103", "Cancelled") in seen
    assert received_invite(other)


def test_unknown_number_rings_the_group_and_cancels_the_others(live):
    winner = phone(live, "103", "uas-answer-wait-bye")
    phone(live, "101", "uas-noanswer")
    assert wait(carrier_call(live, live.other)) == 0
    wait_calls_done(live, 2)
    assert [r["phone"] for r in live.planfix.requests if r.get("cmd") == "contact"] == [live.other]
    assert invite_display_name(winner) in (live.other, "", None)  # the carrier's caller ID, no PlanFix name
    seen = brief(live)
    assert sorted(seen[:2]) == [("INCOMING", "101", ""), ("INCOMING", "103", "")]
    assert seen[2:] == [("ACCEPTED", "103", ""), ("COMPLETED", "101", "Cancelled"), ("COMPLETED", "103", "Success")]


def test_missed_when_nobody_answers(live):
    phone(live, "101", "uas-noanswer")
    phone(live, "103", "uas-noanswer")
    assert wait(carrier_call(live, live.other)) == 0
    wait_calls_done(live, 2)
    assert sorted(e for e in brief(live) if e[0] == "COMPLETED") == [("COMPLETED", "101", "Missed"), ("COMPLETED", "103", "Missed")]


def test_missed_when_the_caller_gives_up(live):
    phone(live, "101", "uas-noanswer")
    phone(live, "103", "uas-noanswer")
    call = carrier_call(live, live.other, scenario="carrier-uac-cancel")
    assert wait(call) == 0
    assert re.search(r"^CANCEL sip:", messages(call), flags=re.M), "the caller must give up before the group times out"
    wait_calls_done(live, 2)
    assert sorted(e for e in brief(live) if e[0] == "COMPLETED") == [("COMPLETED", "101", "Missed"), ("COMPLETED", "103", "Missed")]


def test_hunt_list_after_reloadxml(live):
    vars_file = live.lab.conf / "fsbridge" / "fsbridge-vars.xml"
    original = vars_file.read_text()
    hunt = "[leg_timeout=3]user/101@$${domain}|[leg_timeout=5]user/103@$${domain}"
    try:
        vars_file.write_text(re.sub(r'data="fsbridge_fallback=[^"]*"', f'data="fsbridge_fallback={hunt}"', original))
        assert "+OK" in live.lab.cli("reloadxml")
        phone(live, "101", "uas-noanswer")
        phone(live, "103", "uas-answer-wait-bye")
        assert wait(carrier_call(live, live.other)) == 0
        wait_calls_done(live, 2)
        assert brief(live) in moved_on("101", "103", [("ACCEPTED", "103", ""), ("COMPLETED", "103", "Success")])
    finally:
        vars_file.write_text(original)
        live.lab.cli("reloadxml")


def test_blind_transfer_by_the_manager_reaches_the_default_context(live):
    live.planfix.contacts[live.client] = {"contact_name": CLIENT_NAME, "responsible": 101}
    phone(live, "101", "uas-answer-refer", "-key", "refer_to", "102", "-au", "101", "-ap", "1234")
    target = phone(live, "102", "uas-answer-wait-bye")
    call = carrier_call(live, live.client, scenario="carrier-uac-inbound-long")
    assert wait(call, 60) == 0
    assert received_invite(target), "the transfer target never rang: REFER looked up in the wrong context"
    # the target answered and the caller was bridged to it (not hung up on the REFER)
    assert re.search(r"^SIP/2.0 200 OK[\s\S]*^ACK sip:", messages(target), flags=re.M)
    wait_calls_done(live, 2)
    # capture 27: each employee his own part, one callid
    assert brief(live) == [("INCOMING", "101", ""), ("ACCEPTED", "101", ""), ("COMPLETED", "101", "Success"),
                           ("INCOMING", "102", ""), ("ACCEPTED", "102", ""), ("COMPLETED", "102", "Success")]
    assert len(calls(live)) == 1


# ---- outbound from a phone ------------------------------------------------------


@pytest.mark.parametrize("scenario,status", [
    ("uas-answer-wait-bye", "Success"), ("uas-reject-486", "Busy"), ("uas-reject-404", "NotAvailable"),
    ("uas-reject-480", "NotAvailable"), ("uas-reject-403", "NotAllowed"), ("uas-noanswer", "NoAnswer"),
])
def test_outbound_from_a_phone(live, scenario, status):
    carrier = carrier_uas(live, scenario)
    assert wait(phone_dials(live, "102", "8" + CLIENT[1:])) == 0
    wait_calls_done(live, 1)
    got = events(live)
    assert [(r["event"], r["ext"], r.get("status", "")) for r in got] == (
        [("OUTGOING", "102", ""), ("ACCEPTED", "102", ""), ("COMPLETED", "102", "Success")]
        if status == "Success" else [("OUTGOING", "102", ""), ("COMPLETED", "102", status)])
    assert {r["type"] for r in got} == {"out"} and {r["phone"] for r in got} == {CLIENT}
    # the carrier saw our DID as the caller
    assert re.search(rf"From: *(\"[^\"]*\" *)?<sip:{DID}@", messages(carrier))


# ---- click-to-call ----------------------------------------------------------------


def make_call(env, ext: str = "101", to: str = "+7 910 123-45-67") -> requests.Response:
    return requests.post(env.service.url + "/planfix", timeout=10,
                         data={"cmd": "makeCall", "from": ext, "to": to, "token": env.service.token})


def test_click_to_call_answered_on_both_sides(live):
    live.planfix.contacts[live.client] = {"contact_name": CLIENT_NAME, "responsible": 101}
    manager = phone(live, "101", "uas-answer-wait-bye")
    client = carrier_uas(live, "uas-answer-send-bye")
    assert make_call(live, to=f"+{live.client}").status_code == 200
    assert wait(client) == 0
    wait_calls_done(live, 1)
    assert invite_display_name(manager) == CLIENT_NAME
    assert brief(live) == [("OUTGOING", "101", ""), ("ACCEPTED", "101", ""), ("COMPLETED", "101", "Success")]
    assert {r["phone"] for r in events(live)} == {live.client}


@pytest.mark.parametrize("manager_scenario,client_scenario,status", [
    ("uas-noanswer", None, "NoAnswer"), ("uas-answer-wait-bye", "uas-reject-486", "Busy"),
], ids=["manager-not-answering", "client-busy"])
def test_click_to_call_failures(live, manager_scenario, client_scenario, status):
    phone(live, "101", manager_scenario)
    if client_scenario:
        carrier_uas(live, client_scenario)
    assert make_call(live).status_code == 200
    wait_calls_done(live, 1, timeout=30)
    seen = brief(live)
    assert seen[0] == ("OUTGOING", "101", "") and seen[-1][0] == "COMPLETED"
    assert seen[-1][2] == status, seen


def test_setup_takes_effect_live(live):
    from fsbridge.fakes.planfix import FakePlanfix  # a second PlanFix only this test needs

    with FakePlanfix() as other:
        original = {"cmd": "setup", "planfix_url": live.planfix.url, "planfix_token": live.planfix.token}
        answer = requests.post(live.service.url + "/planfix", timeout=10, data={
            "cmd": "setup", "token": live.service.token, "planfix_url": other.url, "planfix_token": other.token})
        try:
            assert answer.status_code == 200, answer.text
            phone(live, "101", "uas-answer-wait-bye")
            assert wait(carrier_call(live, live.other)) == 0
            other.wait_for(3, timeout=20, delivered=True)
            assert {r["cmd"] for r in other.delivered} >= {"contact", "event"}
            assert live.planfix.requests == []
        finally:
            requests.post(live.service.url + "/planfix", timeout=10, data={**original, "token": live.service.token})
        other.assert_no_violations()


# ---- recordings -----------------------------------------------------------------


def test_answered_call_is_recorded_and_the_link_downloads_the_wav(live):
    phone(live, "101", "uas-answer-wait-bye")
    assert wait(carrier_call(live, live.other)) == 0
    got = wait_calls_done(live, 2)
    (done,) = [r for r in got if r.get("status") == "Success"]
    assert done["is_recorded"] == "1"
    link = done["record_link"]
    whole = requests.get(link, timeout=10)
    assert whole.status_code == 200 and whole.content[:4] == b"RIFF" and whole.content[8:12] == b"WAVE"
    assert len(whole.content) > 44
    part = requests.get(link, headers={"Range": "bytes=0-99"}, timeout=10)
    assert part.status_code == 206 and part.content == whole.content[:100]


# ---- post-dial delay ------------------------------------------------------------


def _ringing_delay(proc) -> float:
    """Seconds from the carrier's INVITE to the first 180/183 it got (SIPp message log stamps)."""
    log = messages(proc)
    stamps = re.findall(r"^-+ (\S+ \S+)\n[^\n]*\n\n([^\n]*)", log, flags=re.M)
    sent = next(datetime.fromisoformat(t) for t, line in stamps if line.startswith("INVITE "))
    ringing = next(datetime.fromisoformat(t) for t, line in stamps if re.match(r"SIP/2.0 18[03]", line))
    return (ringing - sent).total_seconds()


@pytest.mark.parametrize("delay", [0.0, 0.3], ids=["planfix-instant", "planfix-300ms"])
def test_post_dial_delay_of_the_lookup(live, delay):
    live.planfix.delay = delay
    number = f"7910765432{int(delay * 10)}"  # a number per case: the lookup caches answers
    live.planfix.contacts[number] = {"contact_name": "Delay Test", "responsible": 101}
    phone(live, "101", "uas-answer-wait-bye")
    call = carrier_call(live, number)
    assert wait(call) == 0
    wait_calls_done(live, 1)
    figure = _ringing_delay(call)
    live_conf.FIGURES.append(f"post-dial delay (carrier INVITE -> 180), PlanFix answering in {delay * 1000:.0f} ms: "
                             f"{figure * 1000:.0f} ms")
    assert figure < 5


@pytest.mark.skipif(shutil.which("lame") is None, reason="no lame (apt-get install lame) for MP3 mode")
def test_mp3_mode_sends_the_mp3_link_by_record(live):
    service = live.service
    config = service.config_path.read_text()
    service.stop()
    service.config_path.write_text(config.replace("[recordings]\n", "[recordings]\nconvert = mp3\n", 1))
    try:
        service.start()
        service.wait_health(lambda h: h["freeswitch"]["state"] == "connected", timeout=20)
        phone(live, "101", "uas-answer-wait-bye")
        assert wait(carrier_call(live, live.other)) == 0
        wait_calls_done(live, 2)
        (done,) = [r for r in events(live) if r.get("status") == "Success"]
        assert done["is_recorded"] == "1"
        deadline = time.monotonic() + 20
        while not [r for r in live.planfix.delivered if r.get("cmd") == "record"] and time.monotonic() < deadline:
            time.sleep(0.2)
        (record,) = [r for r in live.planfix.delivered if r.get("cmd") == "record"]
        assert record["callid"] == done["callid"] and record["record_link"].endswith(".mp3")
        mp3 = requests.get(record["record_link"], timeout=10)
        assert mp3.status_code == 200
        assert mp3.content[:3] == b"ID3" or (mp3.content[0] == 0xFF and mp3.content[1] & 0xE0 == 0xE0)
    finally:
        service.stop()
        service.config_path.write_text(config)
        service.start()
        service.wait_health(lambda h: h["freeswitch"]["state"] == "connected", timeout=20)


# ---- last: a restart of FreeSWITCH with the installed dialplan ---------------------


def test_freeswitch_restart_loads_cleanly_and_calls_still_route(live):
    live.lab.stop()
    offset = live.lab.log_size()
    live.lab.start()
    assert [line for line in live.lab.log_problems(offset) if not VANILLA_NOISE.search(line)] == []
    live.service.wait_health(lambda h: h["freeswitch"]["state"] == "connected", timeout=30)
    for user, port in live.phone_ports.items():
        live.lab.register(user, port)
    live.planfix.contacts[live.client] = {"contact_name": CLIENT_NAME, "responsible": 103}
    manager = phone(live, "103", "uas-answer-wait-bye")
    assert wait(carrier_call(live, live.client)) == 0
    wait_calls_done(live, 1)
    assert invite_display_name(manager) == CLIENT_NAME
    assert brief(live) == [("INCOMING", "103", ""), ("ACCEPTED", "103", ""), ("COMPLETED", "103", "Success")]
