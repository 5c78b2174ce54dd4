"""Property tests of /planfix: whatever arrives, the answer is the spec's JSON,
never a 500, and FreeSWITCH only ever sees a strictly shaped originate line.

Driven through Flask's test client (no sockets: thousands of requests in a
second or two); test_web.py covers the same app over real HTTP.
"""

from __future__ import annotations

import json
import tempfile
import urllib.parse

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fsbridge.core.originate import MAX_NUMBER_LENGTH
from fsbridge.state import validate_planfix_token, validate_planfix_url
from tests.test_web import COMMAND, TOKEN, Harness

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SPEC_ERRORS = {
    400: "Invalid parameters",
    401: "Invalid token",
    404: "Not found",
    405: "Method not allowed",
    413: "Request too large",
    429: "Too many requests",
    503: "FreeSWITCH is not connected",
}

FIELD_NAMES = ["cmd", "token", "from", "to", "planfix_url", "planfix_token", "Token", "CMD", "to[]", ""]
COMMANDS = ["makeCall", "setup", "makecall", "ping", "", "makeCall\n", "setup "]
# Characters that matter somewhere: originate syntax, URL/form syntax, controls, non-ASCII.
NASTY = " \t\r\n\x00,|{}[]<>='\"\\^$@/;%&+*#().-_:?~`!\u00a0\u2028\u202eЁя😀\ufffd"
nasty_text = st.text(alphabet=st.sampled_from(NASTY) | st.characters(), max_size=60)
phoneish = st.text(alphabet=st.sampled_from("0123456789+*# -.()") | st.sampled_from(NASTY), max_size=45)
values = nasty_text | phoneish | st.sampled_from([TOKEN, "101", "79101234567", "+7 (910) 123-45-67",
                                                  "https://test.planfix.ru/tel/api", ""])
CONTENT_TYPES = [
    "application/x-www-form-urlencoded",
    "application/x-www-form-urlencoded",
    "application/x-www-form-urlencoded",
    "application/x-www-form-urlencoded; charset=utf-8",
    "application/x-www-form-urlencoded; charset=latin-1",
    "APPLICATION/X-WWW-FORM-URLENCODED",
    "application/json",
    "multipart/form-data; boundary=zz",
    "multipart/form-data",
    "text/plain",
    "",
    "x/y; ;;=",
]
METHODS = ["POST"] * 12 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND"]


def check_answer(h: Harness, response, method: str = "POST") -> None:
    """The invariants every answer must hold."""
    status = response.status_code
    event(f"HTTP {status}")  # shown by --hypothesis-show-statistics: every branch is reached
    assert status in (200, *SPEC_ERRORS), status
    assert response.mimetype == "application/json"
    if method == "HEAD":
        assert response.data == b""
    else:
        body = json.loads(response.data)
        assert isinstance(body, dict)
        if status != 200:
            assert body["error"] == SPEC_ERRORS[status]
            assert set(body) <= {"error", "detail"}
        assert b"Traceback" not in response.data
    for command, job_uuid in h.pbx.sent:
        match = COMMAND.fullmatch(command)
        assert match, command
        assert match["req"] == job_uuid


def encode_fields(fields: list[tuple[str, str]], encoding: str) -> bytes:
    return urllib.parse.urlencode(fields, encoding=encoding, errors="replace").encode("ascii")


@pytest.fixture(scope="module")
def harness():
    with tempfile.TemporaryDirectory() as tmp:
        import pathlib

        yield Harness(pathlib.Path(tmp))


@FUZZ
@given(
    fields=st.lists(st.tuples(st.sampled_from(FIELD_NAMES) | nasty_text, values), max_size=8)
    | st.just([("from", "101"), ("to", "79101234567")]),
    cmd=st.none() | st.sampled_from(COMMANDS),
    token=st.sampled_from([TOKEN, TOKEN, TOKEN.upper(), "", None]),
    encoding=st.sampled_from(["utf-8", "cp1251", "latin-1"]),
    content_type=st.sampled_from(CONTENT_TYPES),
    method=st.sampled_from(METHODS),
)
def test_arbitrary_forms(harness, fields, cmd, token, encoding, content_type, method):
    h = harness
    h.clock.now += 1000  # every example starts outside any rate-limit block
    head = [("cmd", cmd)] if cmd is not None else []
    head += [("token", token)] if token is not None else []
    body = encode_fields(head + fields, encoding)
    response = h.client.open("/planfix", method=method, data=body, content_type=content_type or None)
    check_answer(h, response, method)


# Large bodies are built by repetition: drawing 16 KiB of random bytes is slow
# and finds nothing a repeated pattern around the limit does not.
big_bodies = st.builds(lambda unit, count: unit * count, st.binary(min_size=1, max_size=8),
                       st.integers(16 * 1024 // 8, 17 * 1024))


@FUZZ
@given(body=st.binary(max_size=2048) | big_bodies,
       content_type=st.sampled_from(CONTENT_TYPES), path=st.sampled_from(["/planfix", "/planfix/", "/healthz",
                                                                          "/", "/planfix?token=" + TOKEN]))
def test_arbitrary_bytes(harness, body, content_type, path):
    h = harness
    response = h.client.post(path, data=body, content_type=content_type or None)
    check_answer(h, response)


@FUZZ
@given(
    ext=st.sampled_from(["101", "2001", "99"]) | values,
    to=st.sampled_from(["79101234567", "+7 (910) 123-45-67", "8-800-100.00.00", "*72#"]) | phoneish | values,
    extra=st.lists(st.tuples(st.sampled_from(["from", "to"]), values), max_size=1),
)
def test_make_call_only_ever_sends_clean_lines(harness, ext, to, extra):
    h = harness
    before = len(h.pbx.sent)
    fields = [("cmd", "makeCall"), ("token", TOKEN), ("from", ext), ("to", to), *extra]
    response = h.client.post("/planfix", data=encode_fields(fields, "utf-8"),
                             content_type="application/x-www-form-urlencoded")
    check_answer(h, response)
    if response.status_code == 200:
        [(command, _)] = h.pbx.sent[before:]
        match = COMMAND.fullmatch(command)
        assert match["ext"] == ext and not extra
        assert match["phone"] == "".join(c for c in to if c not in " -.()").lstrip("+")
        assert len(match["phone"]) <= MAX_NUMBER_LENGTH
        assert response.get_json()["callid"] == match["call"]
    else:
        assert response.status_code == 400 and len(h.pbx.sent) == before


@FUZZ
@given(url=values | st.builds(lambda s: "https://" + s, nasty_text), pf_token=values)
def test_setup_stores_only_valid_values(harness, url, pf_token):
    h = harness
    fields = [("cmd", "setup"), ("token", TOKEN), ("planfix_url", url), ("planfix_token", pf_token)]
    response = h.client.post("/planfix", data=encode_fields(fields, "utf-8"),
                             content_type="application/x-www-form-urlencoded")
    check_answer(h, response)
    if response.status_code == 200:
        stored = h.store.load()
        assert stored.url == url.strip() and stored.token == pf_token
        validate_planfix_url(stored.url, allow_http=False)
        validate_planfix_token(stored.token)
    else:
        assert response.status_code == 400 and response.get_json()["detail"]
