"""Property-based fuzzing of the running service over real sockets: /planfix
and the dialplan lookup, arbitrary forms, encodings, bytes, sizes, methods
and content types.  Never a 500, never a traceback, the spec's JSON errors,
and FreeSWITCH only ever receives strictly shaped originate lines.

The in-process fuzzing (tests/test_web_fuzz.py) runs thousands of examples
through Flask's test client; here fewer examples go through the real
process: its HTTP server, its config, its ESL connection.
"""

from __future__ import annotations

import re
import socket
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsbridge.lookup import ANSWER_REGEX, CONTACT_PATH
from fsbridge.fakes.freeswitch import FakeFreeSwitch
from fsbridge.fakes.planfix import FakePlanfix
from tests.faults.conftest import assert_clean_log, wait_connected
from tests.faults.rawhttp import request
from tests.service_proc import ServiceProcess
from tests.test_web import COMMAND
from tests.test_web_fuzz import (
    COMMANDS, CONTENT_TYPES, FIELD_NAMES, METHODS, SPEC_ERRORS, big_bodies, encode_fields, nasty_text, phoneish,
    values,
)

EXAMPLES = 60
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# Commands the service itself sends on connect; everything else must be an originate.
SESSION_COMMANDS = re.compile(
    r"auth \S+|event plain [A-Z_ ]+|api show channels as json|api global_getvar core_uuid|exit"
    # the registration check before a makeCall: a validated extension only
    r"|api sofia_contact [0-9]{2,6}")
ORIGINATE = re.compile(r"bgapi (?P<line>originate [^\n]*)\nJob-UUID: (?P<job>[0-9a-f-]{36})")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One service for the whole module (started once: fuzzing needs many requests, not many processes)."""
    fs = FakeFreeSwitch().start()
    pf = FakePlanfix().start()
    svc = ServiceProcess(tmp_path_factory.mktemp("fuzz"), fs_port=fs.port, planfix_url=pf.url,
                         planfix_token=pf.token,
                         # The limiter has its own test; here wrong tokens must stay 401.
                         settings={"server": {"auth_failures_per_minute": "100000"},
                                   "dialplan": {"deadline": "0.3"}})
    try:
        svc.start()
        wait_connected(svc, fs)
        yield svc, fs, pf
        svc.stop()
        check_freeswitch_commands(fs)
        pf.assert_no_violations()
        assert_clean_log(svc)
    finally:
        # also when start, a test or a check above failed: no process outlives the module
        svc.kill()
        pf.stop()
        fs.stop()


def check_freeswitch_commands(fs: FakeFreeSwitch) -> int:
    """Every command the fake FreeSWITCH received is a session command or a strict originate."""
    originates = 0
    for command in fs.commands:
        if SESSION_COMMANDS.fullmatch(command):
            continue
        match = ORIGINATE.fullmatch(command)
        assert match, f"unexpected command reached FreeSWITCH: {command!r}"
        line = COMMAND.fullmatch(match["line"])
        assert line, f"originate line not strictly shaped: {match['line']!r}"
        assert line["req"] == match["job"]
        originates += 1
    return originates


def check_planfix_answer(answer, method: str) -> None:
    assert answer.status in (200, *SPEC_ERRORS), (answer.status, answer.body[:300])
    assert b"Traceback" not in answer.body
    if method == "HEAD":
        return
    assert answer.content_type.split(";")[0] == "application/json", (
        answer.status, answer.content_type, answer.body[:200])
    body = answer.json()
    assert isinstance(body, dict)
    if answer.status != 200:
        assert body["error"] == SPEC_ERRORS[answer.status], body


@FUZZ
@given(
    fields=st.lists(st.tuples(st.sampled_from(FIELD_NAMES) | nasty_text, values), max_size=8)
    | st.builds(lambda to: [("from", "101"), ("to", to)], phoneish),
    cmd=st.none() | st.sampled_from(COMMANDS),
    token=st.sampled_from(["valid", "valid", "valid", "upper", "", None]),
    encoding=st.sampled_from(["utf-8", "cp1251", "latin-1"]),
    content_type=st.sampled_from(CONTENT_TYPES),
    method=st.sampled_from(METHODS),
)
def test_planfix_endpoint_arbitrary_forms(live, fields, cmd, token, encoding, content_type, method):
    svc, fs, _ = live
    head = [("cmd", cmd)] if cmd is not None else []
    if token is not None:
        head.append(("token", {"valid": svc.token, "upper": svc.token.upper()}.get(token, token)))
    body = encode_fields(head + fields, encoding)
    answer = request(svc.port, method, "/planfix", body, content_type or None)
    check_planfix_answer(answer, method)


@FUZZ
@given(body=st.binary(max_size=2048) | big_bodies, content_type=st.sampled_from(CONTENT_TYPES),
       path=st.sampled_from(["/planfix", "/planfix/", "/healthz", "/", "/recordings/x", "/planfix?token=x",
                             "/%00", "/planfix/../planfix", "/" + "a" * 3000]))
def test_planfix_endpoint_arbitrary_bytes(live, body, content_type, path):
    svc, _, _ = live
    answer = request(svc.port, "POST", path, body, content_type or None)
    check_planfix_answer(answer, "POST")


@FUZZ
@given(ext=st.sampled_from(["101", "2001", "99"]) | values, to=phoneish | values)
def test_make_call_only_sends_strict_lines(live, ext, to):
    svc, fs, _ = live
    body = encode_fields([("cmd", "makeCall"), ("token", svc.token), ("from", ext), ("to", to)], "utf-8")
    answer = request(svc.port, "POST", "/planfix", body)
    check_planfix_answer(answer, "POST")
    if answer.status == 200:
        fs.wait_for_command("bgapi originate {origination_uuid=" + answer.json()["callid"])
    check_freeswitch_commands(fs)


def test_make_call_reached_freeswitch(live):
    """The properties above are not vacuous: a valid makeCall does reach FreeSWITCH."""
    svc, fs, _ = live
    body = encode_fields([("cmd", "makeCall"), ("token", svc.token), ("from", "101"), ("to", "+7 (910) 123-45-67")],
                         "utf-8")
    answer = request(svc.port, "POST", "/planfix", body)
    assert answer.status == 200, answer.body
    line = fs.wait_for_command("bgapi originate {origination_uuid=" + answer.json()["callid"])
    assert "fsbridge_phone=79101234567," in line
    assert check_freeswitch_commands(fs) >= 1


lookup_values = nasty_text | phoneish | st.sampled_from(["79101234567", "+7 910 123-45-67", "101", ""])
LOOKUP_STATUSES = {200, 400, 404, 405, 413, 414}


@FUZZ
@given(params=st.lists(st.tuples(st.sampled_from(["phone", "callid", "Phone", ""]) | nasty_text, lookup_values),
                       max_size=4),
       method=st.sampled_from(["GET"] * 6 + ["POST", "HEAD", "PUT", "OPTIONS"]),
       path=st.sampled_from([CONTACT_PATH, CONTACT_PATH + "/", "/", "/planfix", "/dialplan"]))
def test_dialplan_lookup_arbitrary_queries(live, params, method, path):
    svc, _, _ = live
    query = urllib.parse.urlencode(params, errors="replace")
    answer = request(svc.dialplan_port, method, path + ("?" + query if query else ""), None, None)
    assert answer.status in LOOKUP_STATUSES, (answer.status, answer.body[:200])
    assert b"Traceback" not in answer.body
    if method == "HEAD":
        return
    assert answer.content_type.startswith("text/plain"), answer.content_type
    text = answer.body.decode("utf-8")
    if answer.status == 200:
        # Exactly the one-line answer the dialplan's regex takes apart: no injected ';' or newline.
        assert re.fullmatch(ANSWER_REGEX, text), text
    else:
        assert re.fullmatch(r"error=[^\n;]*", text), text


RAW_REQUESTS = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS ClientHello on the plain port
    b"GARBAGE\r\n\r\n",
    b"POST /planfix HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /planfix HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\nabc",
    b"POST /planfix HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"POST /planfix HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    b"Content-Length: 100\r\n\r\ncmd=setup",  # body shorter than announced, then the client closes
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 2000 + b"\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: \x00\xff\r\n\r\n",
]


@pytest.mark.parametrize("raw", RAW_REQUESTS, ids=range(len(RAW_REQUESTS)))
@pytest.mark.parametrize("which", ["public", "dialplan"])
def test_malformed_http_never_500(live, raw, which):
    svc, _, _ = live
    port = svc.port if which == "public" else svc.dialplan_port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        data = b""
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close early on an oversized request: what it said is still read
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    status_line = data.split(b"\r\n", 1)[0]
    assert not re.match(rb"HTTP/1\.[01] 5\d\d", status_line), data[:500]
    assert b"Traceback" not in data
    # Still serving.
    assert request(svc.port, "GET", "/healthz", None, None).status == 200


@pytest.mark.parametrize("method", ["OPTIONS", "PUT", "DELETE", "POST"])
def test_dialplan_lookup_other_methods_are_plain_405(live, method):
    svc, _, _ = live
    answer = request(svc.dialplan_port, method, CONTACT_PATH + "?phone=79101234567", None, None)
    assert (answer.status, answer.content_type.split(";")[0], answer.body) == (
        405, "text/plain", b"error=method not allowed")
