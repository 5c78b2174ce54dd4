"""Calls across a restart of fsbridge and a dropped Event Socket, over real SIP.

The lab's FreeSWITCH runs mod_json_cdr as conf/json_cdr.conf.xml says,
posting every finished channel to the service's ``/cdr`` and retrying
(lab.CDR_RETRIES x lab.CDR_DELAY) while fsbridge is down; the service has
``[cdr] secret``.  Each test takes the call of test_live.py's known-client
test (the responsible 101 answers, the call is recorded, the dialplan sets
``planfix_data_line``) and breaks fsbridge in the middle of it: PlanFix must
get what it gets without the break (INCOMING, ACCEPTED, COMPLETED Success
with the real talk time, the recording link and ``data_line``), requests
the stopped process had delivered may come twice.  Calls that begin and end
while fsbridge is down or cut off are reported from their legs' CDRs; calls
it saw are never reported again from theirs.  The lab keeps a disk copy of
every CDR (``lab.cdrs()``), which the tests read the real figures from.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import requests

from tests.live import lab as lab_mod
from tests.live.lab import DID
from tests.live.test_live import (
    CLIENT_NAME, brief, carrier_call, carrier_uas, events, phone, phone_dials, wait, wait_calls_done,
)

ANSWERED = [("INCOMING", "101", ""), ("ACCEPTED", "101", ""), ("COMPLETED", "101", "Success")]
TALK = 15  # carrier-uac-inbound-long hangs up this long after the answer


def firsts(env) -> list[tuple[str, ...]]:
    """``brief`` with repeats of a request dropped (a stopped process may re-send what it had sent)."""
    seen: list[tuple[str, ...]] = []
    for row in brief(env):
        if row not in seen:
            seen.append(row)
    return seen


def wait_delivered(env, row: tuple[str, ...], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while row not in brief(env):
        if time.monotonic() > deadline:
            raise AssertionError(f"PlanFix got {brief(env)}, never {row}")
        time.sleep(0.1)


def wait_cdr(env, uuid: str, timeout: float = 30) -> dict:
    """The CDR mod_json_cdr wrote for channel ``uuid`` (it also posts it)."""
    deadline = time.monotonic() + timeout
    while uuid not in (got := env.lab.cdrs()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no CDR of {uuid} in {env.cdr_dir}")
        time.sleep(0.2)
    return got[uuid]


def start_again(env) -> None:
    env.service.start()
    env.service.wait_health(lambda h: h["freeswitch"]["state"] == "connected", timeout=20)


def known_client_call(env, scenario: str = "uas-answer-wait-bye"):
    """The client calls the DID; the responsible 101 answers; the carrier hangs up TALK s later."""
    env.planfix.contacts[env.client] = {"contact_name": CLIENT_NAME, "responsible": 101}
    phone(env, "101", scenario)
    return carrier_call(env, env.client, scenario="carrier-uac-inbound-long")


def assert_reported_as_without_the_break(env, a_leg: dict, ext: str | None = None) -> None:
    """PlanFix's firsts (``ext``'s only, if given) are the answered call's, the
    COMPLETED with the CDR's real figures."""
    assert [row for row in firsts(env) if ext is None or row[1] == ext] == ANSWERED
    assert len({r["callid"] for r in events(env)}) == 1
    done = next(r for r in events(env) if r["event"] == "COMPLETED" and r["ext"] == "101")
    variables = a_leg["variables"]
    assert done["callid"] == variables["uuid"]
    assert {r["phone"] for r in events(env)} == {env.client} and {r["diversion"] for r in events(env)} == {DID}
    real = (int(variables["end_uepoch"]) - int(variables["bridge_uepoch"])) // 1_000_000
    assert abs(int(done["duration"]) - real) <= 1 and TALK - 2 <= real <= TALK + 1, (done, real)
    assert done["data_line"] == DID
    assert done["is_recorded"] == "1"
    wav = requests.get(done["record_link"], timeout=10)
    assert wav.status_code == 200 and wav.content[:4] == b"RIFF" and len(wav.content) > 44 + 8000


def a_leg_of(env) -> str:
    """The callid PlanFix was given (the caller's leg)."""
    (callid,) = {r["callid"] for r in events(env)}
    return callid


def test_sigkill_mid_call_the_call_ends_while_down_and_its_cdr_finishes_it(live):
    call = known_client_call(live)
    wait_delivered(live, ("ACCEPTED", "101", ""))
    callid = a_leg_of(live)
    live.service.kill()
    assert wait(call, TALK + 25) == 0
    a_leg = wait_cdr(live, callid)
    time.sleep(2)  # mod_json_cdr's first posts fail: fsbridge is down
    start_again(live)
    wait_calls_done(live, 1, timeout=30)
    assert_reported_as_without_the_break(live, a_leg)
    assert f"call {callid} finished from its CDR" in live.service.log()


def test_graceful_stop_mid_call_the_call_ends_while_stopped_and_its_cdr_finishes_it(live):
    call = known_client_call(live)
    wait_delivered(live, ("ACCEPTED", "101", ""))
    callid = a_leg_of(live)
    assert live.service.stop() == 0
    assert wait(call, TALK + 25) == 0
    a_leg = wait_cdr(live, callid)
    time.sleep(2)
    start_again(live)
    wait_calls_done(live, 1, timeout=30)
    assert_reported_as_without_the_break(live, a_leg)


def test_call_starting_while_down_and_up_at_the_restart_is_adopted_to_its_real_end(live):
    """fsbridge is down when the call comes in (the dialplan's lookup fails: the
    fallback group 101, 103 rings; 101 answers); it starts while they talk."""
    live.service.kill()
    phone(live, "103", "uas-noanswer")
    call = known_client_call(live)
    deadline = time.monotonic() + 20
    while "ACTIVE" not in live.lab.cli("show channels"):
        assert time.monotonic() < deadline, live.lab.cli("show channels")
        time.sleep(0.2)
    time.sleep(2)
    start_again(live)
    assert wait(call, TALK + 25) == 0
    wait_calls_done(live, 2, timeout=30)
    # 103 stopped ringing before the restart: its leg's CDR gives its part
    assert [row for row in firsts(live) if row[1] == "103"] == [("INCOMING", "103", ""),
                                                                ("COMPLETED", "103", "Cancelled")]
    assert_reported_as_without_the_break(live, wait_cdr(live, a_leg_of(live)), ext="101")
    assert "live calls taken up (1 answer times from uuid_dump)" in live.service.log()


class CuttableProxy:
    """A TCP proxy on loopback to FreeSWITCH's Event Socket that a test can cut:
    ``cut()`` drops the connections and refuses new ones (they are closed at
    once) until ``resume()``.  Threads; ``close()`` ends them all."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cutting = False
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cutting:
                client.close()
                continue
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                thread.start()
                self.threads.append(thread)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.cutting = True
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.sockets.clear()

    def resume(self) -> None:
        self.cutting = False

    def close(self) -> None:
        self.cut()
        self.listener.close()
        for thread in self.threads:
            thread.join(5)


def esl_port(service, old: int, new: int) -> None:
    """Point the service's [freeswitch] port elsewhere (the file is edited in place)."""
    text = service.config_path.read_text()
    assert f"\nport = {old}\n" in text
    service.config_path.write_text(text.replace(f"\nport = {old}\n", f"\nport = {new}\n", 1))


@contextlib.contextmanager
def through_proxy(env):
    """The service restarted to reach FreeSWITCH's Event Socket through a CuttableProxy."""
    service = env.service
    proxy = CuttableProxy(env.lab.esl_port)
    service.stop()
    esl_port(service, env.lab.esl_port, proxy.port)
    try:
        start_again(env)
        yield proxy
    finally:
        service.stop()
        esl_port(service, proxy.port, env.lab.esl_port)
        proxy.close()
        start_again(env)


def test_event_socket_dropped_while_the_call_ends_its_cdr_finishes_it(live):
    """The TCP connection to FreeSWITCH's Event Socket breaks mid-call and stays
    down until after the hangup; the call is finished from its CDR, not blind."""
    with through_proxy(live) as proxy:
        service = live.service
        call = known_client_call(live)
        wait_delivered(live, ("ACCEPTED", "101", ""))
        callid = a_leg_of(live)
        proxy.cut()
        service.wait_health(lambda h: h["freeswitch"]["state"] != "connected", timeout=10)
        assert wait(call, TALK + 25) == 0
        a_leg = wait_cdr(live, callid)
        time.sleep(2)  # mod_json_cdr posted while the socket was down: answered 503, posted again
        proxy.resume()
        service.wait_health(lambda h: h["freeswitch"]["state"] == "connected", timeout=20)
        wait_calls_done(live, 1, timeout=30)
        assert_reported_as_without_the_break(live, a_leg)
        assert f"call {callid} finished from its CDR" in service.log()


def test_call_wholly_inside_an_event_socket_drop_is_reported_from_its_cdrs(live):
    """fsbridge runs (the dialplan's lookup works: the responsible 101 rings) but
    its Event Socket connection is down for the whole call."""
    with through_proxy(live) as proxy:
        service = live.service
        log_start = len(service.log())
        proxy.cut()
        service.wait_health(lambda h: h["freeswitch"]["state"] != "connected", timeout=10)
        live.planfix.contacts[live.client] = {"contact_name": CLIENT_NAME, "responsible": 101}
        phone(live, "101", "uas-answer-wait-bye")
        assert wait(carrier_call(live, live.client), 40) == 0
        proxy.resume()
        service.wait_health(lambda h: h["freeswitch"]["state"] == "connected", timeout=20)
        wait_calls_done(live, 1, timeout=30)
        assert brief(live) == ANSWERED
        done = events(live)[-1]
        assert 1 <= int(done["duration"]) <= 4 and done["data_line"] == DID and done["is_recorded"] == "1"
        assert "began and ended while fsbridge could not see it" in service.log()[log_start:]


# ---- calls that begin and end while fsbridge is down: reported from their CDRs ----


def wait_cdrs(env, count: int, timeout: float = 20) -> dict[str, dict]:
    """The CDRs written so far, once there are ``count``."""
    deadline = time.monotonic() + timeout
    while len(got := env.lab.cdrs()) < count:
        assert time.monotonic() < deadline, f"{len(got)} CDRs, not {count}"
        time.sleep(0.2)
    return got


def end_phones(env) -> None:
    for proc in env.lab.sipps:
        lab_mod._end(proc)
    env.lab.sipps.clear()


def test_calls_wholly_inside_the_outage_are_reported_from_their_cdrs(live):
    """fsbridge is down for three calls (the dialplan's lookup fails: the fallback
    group 101, 103 rings): one answered by 101, one nobody answers, one 102 dials
    out.  Started again within mod_json_cdr's retries, fsbridge reports each from
    its legs' CDRs as the tracker reports them live; nothing for the calls it saw."""
    before = len(live.lab.cdrs())
    log_start = len(live.service.log())
    live.service.kill()
    phone(live, "101", "uas-answer-send-bye", "-d", "1000")  # rings 1 s, talks 2 s
    phone(live, "103", "uas-noanswer")
    assert wait(carrier_call(live, live.client), 40) == 0
    wait_cdrs(live, before + 3)
    end_phones(live)
    for user in ("101", "103"):
        phone(live, user, "uas-noanswer")
    assert wait(carrier_call(live, live.other), 40) == 0
    wait_cdrs(live, before + 6)
    end_phones(live)
    carrier_uas(live, "uas-answer-wait-bye")
    assert wait(phone_dials(live, "102", "8" + live.client[1:]), 40) == 0
    wait_cdrs(live, before + 8)
    cdrs = live.lab.cdrs()
    start_again(live)
    wait_calls_done(live, 5, timeout=40)
    by_call: dict[str, list[dict[str, str]]] = {}
    for row in events(live):
        by_call.setdefault(row["callid"], []).append(row)
    assert len(by_call) == 3
    # in the order and with the statuses test_live.py's live calls get
    answered, missed, outbound = sorted(by_call.values(), key=lambda rows: cdrs[rows[0]["callid"]]["variables"]
                                        ["start_uepoch"])
    seen = [(r["event"], r["ext"], r.get("status", "")) for r in answered]
    assert sorted(seen[:2]) == [("INCOMING", "101", ""), ("INCOMING", "103", "")]  # rung at once
    assert seen[2:] == [("ACCEPTED", "101", ""), ("COMPLETED", "103", "Cancelled"), ("COMPLETED", "101", "Success")]
    assert {r["phone"] for r in answered} == {live.client} and {r["diversion"] for r in answered} == {DID}
    talk = answered[-1]
    # The manager's talk time is his own leg's billsec: FreeSWITCH counts each
    # leg's in whole clock seconds, so the A leg's may be one less or more.
    manager_leg = cdrs[cdrs[talk["callid"]]["variables"]["last_bridge_to"]]
    assert talk["duration"] == manager_leg["variables"]["billsec"] and 1 <= int(talk["duration"]) <= 3
    assert talk["data_line"] == DID and talk["is_recorded"] == "1"
    wav = requests.get(talk["record_link"], timeout=10)
    assert wav.status_code == 200 and wav.content[:4] == b"RIFF"
    assert sorted((r["event"], r["ext"], r.get("status", "")) for r in missed) == [
        ("COMPLETED", "101", "Missed"), ("COMPLETED", "103", "Missed"), ("INCOMING", "101", ""), ("INCOMING", "103", "")]
    assert {r["phone"] for r in missed} == {live.other}
    assert [(r["event"], r["ext"], r.get("status", "")) for r in outbound] == [
        ("OUTGOING", "102", ""), ("ACCEPTED", "102", ""), ("COMPLETED", "102", "Success")]
    assert {r["phone"] for r in outbound} == {live.client} and {r["diversion"] for r in outbound} == {DID}
    assert outbound[-1]["is_recorded"] == "1"
    assert live.service.log()[log_start:].count("began and ended while fsbridge could not see it") == 3


def test_calls_seen_live_are_never_reported_again_from_their_cdrs(live):
    """Every CDR of a call fsbridge followed is answered "ignored" and PlanFix gets
    the call once, also after a restart (the CDRs of the calls before it)."""
    log_start = len(live.service.log())
    known_client = phone(live, "101", "uas-answer-send-bye", "-d", "1000")
    assert wait(carrier_call(live, live.client), 40) == 0
    wait_calls_done(live, 1)
    lab_mod._end(known_client)
    seen = list(events(live))
    live.service.stop()
    start_again(live)
    time.sleep(3)
    assert events(live) == seen
    assert "began and ended while fsbridge could not see it" not in live.service.log()[log_start:]
