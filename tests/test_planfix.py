"""PlanfixClient against the fake PlanFix over real HTTP, and the `fsbridge ping` comparison."""

from __future__ import annotations

import os
import resource
import socket
import ssl
import threading
import time
import urllib.parse

import pytest

from fsbridge.planfix import (
    Contact,
    Credentials,
    Outcome,
    PlanfixClient,
    PlanfixNotConfigured,
    PlanfixRejected,
    PlanfixUnauthorized,
    PlanfixUnavailable,
    _form,
    _target,
    cli_ping,
    compare_ping,
    mask_secret,
)
from fsbridge import planfix, planfix_address
from fsbridge.fakes.planfix import FakePlanfix

COMPLETED = {
    "cmd": "event",
    "type": "out",
    "event": "COMPLETED",
    "phone": "79101234567",
    "ext": "102",
    "callid": "D10D0EB124F4E64AF4EA-1511",
    "duration": "124",
    "is_recorded": "1",
    "status": "Success",
    "record_link": "https://pbx.example.com/rec/file.mp3",
    "data_utm_source": "site.io",
}


@pytest.fixture
def fake():
    with FakePlanfix() as server:
        yield server


def make_client(fake: FakePlanfix, token: str | None = None, **kw) -> PlanfixClient:
    return PlanfixClient(lambda: Credentials(fake.url, token or fake.token), **kw)


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/tel/api"  # nothing listens there any more


def test_send_delivers_form_with_token_and_reuses_the_connection(fake):
    client = make_client(fake)
    for _ in range(3):
        result = client.send(COMPLETED)
        assert result.outcome is Outcome.DELIVERED and result.status == 200 and result.reply == {}
    got = fake.received
    assert [r.form for r in got] == [dict(COMPLETED, planfix_token=fake.token)] * 3
    assert len({r.client_port for r in got}) == 1, "each request opened a new connection"
    fake.assert_no_violations()


def test_send_utf8_values_arrive_intact(fake):
    client = make_client(fake)
    fields = {"cmd": "record", "callid": "c-1", "record_link": "https://pbx.example.com/r/Запись 1.mp3?a=1&b=2"}
    assert client.send(fields).delivered
    assert fake.requests[0]["record_link"] == fields["record_link"]
    fake.assert_no_violations()


@pytest.mark.parametrize(
    ("behaviour", "outcome", "status"),
    [(400, Outcome.REJECTED, 400), (401, Outcome.UNAUTHORIZED, 401), (503, Outcome.RETRY, 503),
     (500, Outcome.RETRY, 500), ("garbage", Outcome.RETRY, 200), ("close", Outcome.RETRY, None)],
)
def test_send_classifies_answers(fake, behaviour, outcome, status):
    fake.script(behaviour)
    result = make_client(fake).send(COMPLETED)
    assert (result.outcome, result.status) == (outcome, status)
    assert result.error
    if behaviour == 400:
        assert result.reply == {"error": "Invalid parameters"}


def test_wrong_token_is_unauthorized_and_logged_loudly(fake, caplog):
    result = make_client(fake, token="not-the-token").send(COMPLETED)
    assert result.outcome is Outcome.UNAUTHORIZED
    assert result.reply == {"error": "Invalid token"}
    assert any(r.levelname == "ERROR" and "401" in r.getMessage() for r in caplog.records)
    assert "not-the-token" not in caplog.text


def test_invalid_request_is_rejected_by_the_strict_fake(fake):
    result = make_client(fake).send(dict(COMPLETED, status="Missed"))  # Missed is for incoming calls only
    assert result.outcome is Outcome.REJECTED
    assert "type=out" in fake.violations[0][1]


def test_read_timeout_is_a_retry(fake):
    fake.failure = "hang"
    started = time.monotonic()
    result = make_client(fake, read_timeout=0.2).send(COMPLETED)
    assert result.outcome is Outcome.RETRY and "timeout" in result.error
    assert time.monotonic() - started < 2


def test_connection_refused_is_a_retry():
    client = PlanfixClient(lambda: Credentials(dead_url(), "t" * 32), connect_timeout=0.5)
    result = client.send(COMPLETED)
    assert result.outcome is Outcome.RETRY and result.status is None


def test_not_configured_sends_nothing(fake):
    assert PlanfixClient(lambda: None).send(COMPLETED).outcome is Outcome.NOT_CONFIGURED
    assert PlanfixClient(lambda: Credentials(fake.url, "")).send(COMPLETED).outcome is Outcome.NOT_CONFIGURED
    assert fake.requests == []


def test_credentials_are_read_on_every_request(fake):
    current = {"creds": Credentials(fake.url, "old-token-xxxxxxxx")}
    client = PlanfixClient(lambda: current["creds"])
    assert client.send(COMPLETED).outcome is Outcome.UNAUTHORIZED
    current["creds"] = Credentials(fake.url, fake.token)
    assert client.send(COMPLETED).delivered


def test_send_refuses_bad_fields(fake):
    client = make_client(fake)
    with pytest.raises(ValueError):
        client.send(dict(COMPLETED, planfix_token="x"))
    with pytest.raises(TypeError):
        client.send(dict(COMPLETED, duration=124))
    assert fake.requests == []


@pytest.mark.parametrize("fields", [
    COMPLETED,
    {"cmd": "event", "phone": "+7 (910) 123-45-67", "name": "Иван Петров", "note": "a&b=c%d+e/f?g#h~i_j.k-l"},
    {"cmd": "event", "empty": "", "crlf": "x\r\nHost: evil"},
])
def test_form_is_what_urlencode_makes(fields):
    # The client encodes the form itself (the plain values as they are):
    # PlanFix must get exactly the bytes urllib's urlencode would send.
    token = "tok+en/=&" * 4
    expected = urllib.parse.urlencode({**fields, "planfix_token": token}).encode("ascii")
    assert _form(fields, "planfix_token=" + urllib.parse.quote_plus(token)) == expected


def test_a_url_with_spaces_or_control_characters_is_not_sent(fake):
    # The request head is written by the client: nothing from the URL may end its line.
    client = PlanfixClient(lambda: Credentials(fake.url.replace("/tel/api", "/tel api"), fake.token))
    result = client.send(COMPLETED)
    assert result.outcome is Outcome.RETRY and "control characters" in result.error
    assert fake.requests == []


def test_credentials_repr_masks_the_token():
    creds = Credentials("https://x.planfix.ru/tel/api", "303cb962ac59075b964b07152d234b70")
    assert "303cb962ac59075b964b07152d234b70" not in repr(creds)


# ---- contact ------------------------------------------------------------------
def test_contact_found_with_responsible(fake):
    fake.contacts["79101234567"] = {"contact_name": "Иванов Иван Иванович", "responsible": 103}
    assert make_client(fake).contact("79101234567", callid="abc") == Contact("Иванов Иван Иванович", "103")
    assert fake.requests[0] == {"cmd": "contact", "phone": "79101234567", "callid": "abc", "planfix_token": fake.token}


def test_contact_without_responsible(fake):
    fake.contacts["79101234567"] = {"contact_name": "Petrov"}
    assert make_client(fake).contact("79101234567") == Contact("Petrov", None)
    assert "callid" not in fake.requests[0]


def test_contact_not_found_is_none(fake):
    assert make_client(fake).contact("70000000000") is None
    fake.contact_not_found_reply = {"contact_name": ""}
    assert make_client(fake).contact("70000000000") is None


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [(401, PlanfixUnauthorized), (400, PlanfixRejected), (503, PlanfixUnavailable), ("garbage", PlanfixUnavailable)],
)
def test_contact_failures_raise_distinctly(fake, behaviour, error):
    fake.script(behaviour)
    with pytest.raises(error):
        make_client(fake).contact("79101234567")


def test_contact_timeout_bounds_the_wait(fake):
    fake.failure = "hang"
    started = time.monotonic()
    with pytest.raises(PlanfixUnavailable):
        make_client(fake, read_timeout=10).contact("79101234567", timeout=0.2)
    assert time.monotonic() - started < 2


def test_contact_not_configured():
    with pytest.raises(PlanfixNotConfigured):
        PlanfixClient(lambda: None).contact("79101234567")


# ---- ping and compare_ping --------------------------------------------------------
PBX_TOKEN = "202cb962ac59075b964b07152d234b70"
PBX_URL = "https://pbx.example.com/planfix"


def test_ping_returns_what_planfix_holds(fake):
    fake.ping_reply = {"pbxToken": PBX_TOKEN, "pbxUrl": PBX_URL}
    assert make_client(fake).ping() == fake.ping_reply
    assert fake.requests == [{"cmd": "ping", "planfix_token": fake.token}]


def test_compare_ping_match_tolerates_trailing_slash_case_and_default_port():
    ok, lines = compare_ping({"pbxToken": PBX_TOKEN, "pbxUrl": "HTTPS://PBX.example.com:443/planfix/"}, PBX_URL, PBX_TOKEN)
    assert ok
    assert "URL: match" in lines and "token: match" in lines
    assert not any(PBX_TOKEN in line for line in lines)


def test_compare_ping_url_mismatch():
    ok, lines = compare_ping({"pbxToken": PBX_TOKEN, "pbxUrl": "https://old.example.com/planfix"}, PBX_URL, PBX_TOKEN)
    assert not ok
    assert any(line.startswith("URL: MISMATCH") for line in lines)
    assert "token: match" in lines


def test_compare_ping_token_mismatch_is_masked():
    other = "ffffffffffffffffffffffffffffffff"
    ok, lines = compare_ping({"pbxToken": other, "pbxUrl": PBX_URL}, PBX_URL, PBX_TOKEN)
    assert not ok
    assert any(line.startswith("token: MISMATCH") for line in lines)
    text = "\n".join(lines)
    assert other not in text and PBX_TOKEN not in text
    assert mask_secret(other) in text and mask_secret(PBX_TOKEN) in text


@pytest.mark.parametrize("reply", [{}, {"pbxToken": None, "pbxUrl": 5}, []])
def test_compare_ping_empty_or_odd_reply_is_not_ok(reply):
    ok, lines = compare_ping(reply, PBX_URL, PBX_TOKEN)
    assert not ok and lines[-1].startswith("NOT OK")


def test_compare_ping_without_our_settings():
    ok, lines = compare_ping({"pbxToken": PBX_TOKEN, "pbxUrl": PBX_URL}, "", "")
    assert not ok
    assert any("public_url is not set" in line for line in lines)
    assert any("[server] token is not set" in line for line in lines)


def test_mask_secret_short_and_long():
    assert mask_secret("") == "(empty)"
    assert mask_secret("abc") == "***(3 chars)"
    assert mask_secret(PBX_TOKEN) == "202c…70(32 chars)"


def test_cli_ping_exit_codes(fake):
    fake.ping_reply = {"pbxToken": PBX_TOKEN, "pbxUrl": PBX_URL}
    code, text = cli_ping(make_client(fake), PBX_URL, PBX_TOKEN)
    assert code == 0 and text.endswith("OK: PlanFix and this service agree")
    code, text = cli_ping(make_client(fake), "https://elsewhere.example.com/", PBX_TOKEN)
    assert code == 1 and "URL: MISMATCH" in text
    code, text = cli_ping(make_client(fake, token="wrong-token-123456"), PBX_URL, PBX_TOKEN)
    assert code == 1 and "refused our planfix_token" in text
    code, text = cli_ping(PlanfixClient(lambda: None), PBX_URL, PBX_TOKEN)
    assert code == 2 and "cannot ping" in text


def test_401_errors_are_rate_limited(fake, caplog):
    client = make_client(fake, token="not-the-token")
    for _ in range(5):
        assert client.send(COMPLETED).outcome is Outcome.UNAUTHORIZED
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1


def test_contact_timeout_is_a_deadline_for_the_whole_request(fake):
    # The answer comes after 0.6 s, the deadline is 0.3 s: the overall
    # deadline (not the 10 s read timeout) ends the wait.
    fake.delay = 0.6
    started = time.monotonic()
    with pytest.raises(PlanfixUnavailable, match="within 0.3s"):
        make_client(fake, read_timeout=10).contact("79101234567", timeout=0.3)
    assert time.monotonic() - started < 0.5


def test_a_kept_alive_connection_closed_under_a_request_is_resent_once_on_a_new_one(fake):
    # PlanFix (or a proxy) may close an idle kept-alive connection as the
    # request goes out: the client resends it on a fresh connection.  The
    # price is a possible duplicate, which the outbox accepts (at-least-once).
    client = make_client(fake)
    fake.script("ok", "close")
    assert client.send(COMPLETED).delivered
    assert client.send(COMPLETED).delivered
    got = fake.received
    assert [r.outcome for r in got] == ["ok", "close", "ok"]
    assert got[0].client_port == got[1].client_port != got[2].client_port


def test_an_idle_connection_planfix_closed_is_dropped_before_a_request_goes_out_on_it(monkeypatch):
    # PlanFix answers, then closes the kept-alive connection (its idle
    # timeout): the next request must go on a fresh connection at once,
    # not be written into the dead one and resent.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(2)
    served = []

    def serve() -> None:
        for _ in range(2):
            conn, _ = server.accept()
            with conn:
                data = b""
                while b"planfix_token=" not in data:
                    data += conn.recv(65536)
                served.append(data.split(b"\r\n", 1)[0])
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
                time.sleep(0.05)  # then close: the client has its answer

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = PlanfixClient(lambda: Credentials(f"http://127.0.0.1:{server.getsockname()[1]}/tel", "t"))
    takes = []
    real_take = planfix._ResolvingPool.take

    def spy(pool):
        got = real_take(pool)
        takes.append(got[1])
        return got

    monkeypatch.setattr(planfix._ResolvingPool, "take", spy)
    try:
        assert client.send(COMPLETED).delivered
        time.sleep(0.2)  # the server has closed the connection by now
        assert client.send(COMPLETED).delivered
        thread.join(5)
    finally:
        client.close()
        server.close()
    assert served == [b"POST /tel HTTP/1.1"] * 2
    assert takes == [False, False]  # never a reused (dead) connection, so nothing resent


def test_a_fresh_connection_closed_without_answer_is_not_resent(fake):
    fake.script("close")
    assert make_client(fake).send(COMPLETED).outcome is Outcome.RETRY
    assert len(fake.received) == 1


def test_every_connection_goes_through_the_address_policy(fake, monkeypatch):
    # One place where a PlanFix host becomes addresses: the connect-time
    # address check (planfix_address.resolve) with the client's policy.
    asked = []
    real = planfix_address.resolve

    def spy(host, port, policy):
        asked.append((host, port, policy))
        return real(host, port, policy)

    monkeypatch.setattr(planfix_address, "resolve", spy)
    client = make_client(fake)
    assert client.send(COMPLETED).delivered
    assert asked == [("127.0.0.1", fake.port, None)]


def test_https_verifies_the_certificate_and_host_name():
    client = PlanfixClient(lambda: Credentials("https://example.planfix.com/tel/api", "t" * 32))
    context = client._pool_for(_target("https://example.planfix.com/tel/api")).ssl_context
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    client.close()


def test_lean_fake_records_arrivals_and_still_checks_the_token():
    # The benchmark's fake PlanFix: same client, same wire, fewer checks.
    with FakePlanfix(lean=True) as lean:
        assert make_client(lean).send(COMPLETED).delivered
        assert make_client(lean, token="wrong-token-0123").send(COMPLETED).outcome is Outcome.UNAUTHORIZED
        assert [(c, e) for c, e, _ in lean.arrivals] == [(COMPLETED["callid"], "COMPLETED")] * 2


def test_lean_fake_can_hang_like_a_planfix_that_never_answers():
    # The benchmark's "PlanFix down" that holds requests: the request arrives, no answer comes.
    with FakePlanfix(lean=True) as lean:
        lean.failure = "hang"
        client = make_client(lean, read_timeout=0.3)
        result = client.send(COMPLETED)
        client.close()
        assert result.outcome is Outcome.RETRY and result.status is None
        assert [(c, e) for c, e, _ in lean.arrivals] == [(COMPLETED["callid"], "COMPLETED")]


def test_a_connection_above_descriptor_1023_is_kept_alive_like_any_other(fake):
    # A cloud PBX process holds thousands of sockets: the idle-connection
    # check must not be select(), which refuses descriptors above 1023
    # (every connection would then look dead and be made anew per request).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip(f"open-files limit {hard}: cannot hold a descriptor above 1023")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    client = make_client(fake)
    try:
        assert client.send(COMPLETED).delivered
        assert client.send(COMPLETED).delivered
    finally:
        client.close()
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    got = fake.received
    assert len(got) == 2 and got[0].client_port == got[1].client_port
