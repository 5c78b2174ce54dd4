"""POST /planfix and GET /healthz, served for real by gevent's WSGI server.

The app is built with create_app and real parts (SettingsStore on tmp_path,
the real originate builder and phone cleaning); only what talks to
FreeSWITCH is a recorder standing in for the ESL connection.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import flask
import pytest
import requests
from gevent.pywsgi import WSGIServer

from fsbridge import __version__
from fsbridge.esl import EslNotConnected, EslTimeout
from fsbridge.core.originate import OriginateSettings
from fsbridge.planfix import Credentials
from fsbridge.state import SettingsError, SettingsStore
from fsbridge.core.originate import CallPolicy
from fsbridge.web import WebDeps, WebSettings, apply_click_to_call, create_app, register_detailed_health

TOKEN = "202cb962ac59075b964b07152d234b70"
PF_URL = "https://test.planfix.ru/tel/api"
PF_TOKEN = "303cb962ac59075b964b07152d234b70"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
COMMAND = re.compile(
    rf"originate \{{origination_uuid=(?P<call>{UUID}),fsbridge_click_to_call=(?P<req>{UUID}),"
    r"fsbridge_ext=(?P<ext>\d{2,6}),fsbridge_phone=(?P<phone>\+?[0-9*#]{1,32}),"
    r"origination_caller_id_number=(?P=phone),origination_caller_id_name='(?P<name>[^\s,{}'$|]+(?: [^\s,{}'$|]+)*)',"
    r"ignore_early_media=true,originate_timeout=30\}user/(?P=ext) (?P=phone) XML default"
)
INJECTION = [" ", ",", "|", "{", "}", "$", "'", "\n", "&", "\r", ";", "@", "/", "%", "\\", "[", "=", "^", "<",
             '"', "\t", "\x00"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Pbx:
    """Stands in for the ESL connection: records what would be sent."""

    sent: list[tuple[str, str]] = field(default_factory=list)
    fail_with: BaseException | None = None

    def originate(self, command: str, job_uuid: str) -> str:
        if self.fail_with is not None:
            raise self.fail_with
        self.sent.append((command, job_uuid))
        return job_uuid


class Harness:
    def __init__(self, tmp_path, **settings_overrides):
        self.pbx = Pbx()
        self.clock = FakeClock()
        self.store_path = tmp_path / "planfix-settings.json"
        self.store = SettingsStore(self.store_path)
        self.credential_changes = 0
        self.names: dict[str, str] = {}
        self.health = {"status": "ok", "esl": {"state": "connected", "password": "ClueCon"}, "outbox": {"depth": 0},
                       "planfix_token": PF_TOKEN}
        # The click-to-call policy has its own tests (below and test_originate.py);
        # the others use numbers outside it (e.g. +44 1632 drama numbers).
        settings_overrides.setdefault("call_policy", None)
        settings = WebSettings(pbx_token=TOKEN, **settings_overrides)
        self.deps = WebDeps(
            originate=self.pbx.originate,
            settings_store=self.store,
            on_credentials_changed=self._changed,
            health=lambda: self.health,
            not_connected_errors=(EslNotConnected, EslTimeout),
            client_name=self._name,
            clock=self.clock,
        )
        self.app = create_app(settings, self.deps)
        self.client = self.app.test_client()

    def _changed(self) -> None:
        self.credential_changes += 1

    def _name(self, number: str) -> str | None:
        name = self.names.get(number)
        if name == "boom":
            raise RuntimeError("PlanFix down")
        return name

    @property
    def limiter(self):
        return self.app.extensions["fsbridge.auth_limiter"]

    def post(self, address: str = "127.0.0.1", **fields):
        return self.client.post("/planfix", data=fields, environ_base={"REMOTE_ADDR": address})


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


@pytest.fixture
def served(h):
    """The harness's app behind a real gevent WSGI server; yields the base URL."""
    server = WSGIServer(("127.0.0.1", 0), h.app, log=None)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.stop(timeout=1)


def make_call(**extra):
    return {"cmd": "makeCall", "from": "101", "to": "79101234567", "token": TOKEN, **extra}


def setup_fields(**extra):
    return {"cmd": "setup", "token": TOKEN, "planfix_url": PF_URL, "planfix_token": PF_TOKEN, **extra}


# --- makeCall ----------------------------------------------------------------


def test_make_call_over_http(h, served):
    r = requests.post(f"{served}/planfix", data=make_call(to="+7 (910) 123-45-67"), timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    callid = r.json()["callid"]
    [(command, job_uuid)] = h.pbx.sent
    m = COMMAND.fullmatch(command)
    assert m, command
    assert m["call"] == callid and m["req"] == job_uuid and m["call"] != m["req"]
    assert (m["ext"], m["phone"], m["name"]) == ("101", "79101234567", "79101234567")


def test_each_call_gets_fresh_ids(h):
    ids = {h.post(**make_call()).get_json()["callid"] for _ in range(3)}
    assert len(ids) == 3 and len({job for _, job in h.pbx.sent}) == 3


def test_keep_plus(tmp_path):
    h = Harness(tmp_path, originate=OriginateSettings(keep_plus=True))
    assert h.post(**make_call(to="+44 1632.960-961")).status_code == 200
    assert h.pbx.sent[0][0].endswith("user/101 +441632960961 XML default")


def test_client_name_shown_to_manager(h):
    h.names["79101234567"] = "Иванов Иван, ООО {Рога}"
    assert h.post(**make_call()).status_code == 200
    assert "origination_caller_id_name='Иванов Иван ООО Рога'," in h.pbx.sent[0][0]


def test_failing_name_lookup_does_not_stop_the_call(h):
    h.names["79101234567"] = "boom"
    assert h.post(**make_call()).status_code == 200
    assert COMMAND.fullmatch(h.pbx.sent[0][0])


@pytest.mark.parametrize(
    "fields,detail",
    [
        ({"from": None}, "from must be"),
        ({"to": None}, "to must be"),
        ({"from": "1"}, "from must be"),
        ({"from": "1234567"}, "from must be"),
        ({"from": "abc"}, "from must be"),
        ({"from": ""}, "from must be"),
        ({"to": ""}, "to must be"),
        ({"to": "ivan"}, "to must be"),
        ({"to": "1" * 33}, "to must be"),
        ({"to": "+"}, "to must be"),
        ({"to": "７９１０"}, "to must be"),  # full-width digits are not digits here
    ],
)
def test_make_call_bad_parameters(h, served, fields, detail):
    data = {k: v for k, v in make_call(**fields).items() if v is not None}
    r = requests.post(f"{served}/planfix", data=data, timeout=5)
    assert r.status_code == 400
    assert r.json()["error"] == "Invalid parameters" and detail in r.json()["detail"]
    assert h.pbx.sent == []


def test_repeated_fields_are_ambiguous(h):
    r = h.client.post("/planfix", data=f"cmd=makeCall&token={TOKEN}&from=101&to=79101234567&to=666",
                      content_type="application/x-www-form-urlencoded")
    assert r.status_code == 400 and h.pbx.sent == []


@pytest.mark.parametrize("ch", INJECTION)
@pytest.mark.parametrize("where", ["from", "to", "to-start"])
def test_injection_reaches_nothing(h, served, ch, where):
    if ch == " " and where != "from":
        # A space in `to` is a separator the spec drops ("+7 910 ..."): the
        # cleaned number is sent, and no space reaches the line.
        r = requests.post(f"{served}/planfix", data=make_call(to=f"7910{ch}1234567"), timeout=5)
        assert r.status_code == 200 and COMMAND.fullmatch(h.pbx.sent[0][0])
        return
    if where == "from":
        data = make_call(**{"from": f"101{ch}102"})
    elif where == "to":
        data = make_call(to=f"7910{ch}1234567")
    else:
        data = make_call(to=f"{ch}79101234567")
    r = requests.post(f"{served}/planfix", data=data, timeout=5)
    assert r.status_code == 400, (ch, where)
    assert r.json()["error"] == "Invalid parameters"
    assert h.pbx.sent == []


def test_raw_injection_bytes(h, served):
    # Percent-encoded CR/LF, a literal '&' splitting fields, and a whole originate fragment.
    for body in [
        f"cmd=makeCall&token={TOKEN}&from=101&to=7910%0D%0Aapi%20shutdown",
        f"cmd=makeCall&token={TOKEN}&from=101%0A&to=79101234567",
        f"cmd=makeCall&token={TOKEN}&from=101&to=79101234567%20XML%20evil",
        f"cmd=makeCall&token={TOKEN}&from=101}}user/666&to=1",
        f"cmd=makeCall&token={TOKEN}&from=101&to=${{system(reboot)}}",
    ]:
        r = requests.post(f"{served}/planfix", data=body, timeout=5,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 400, body
    assert h.pbx.sent == []


@pytest.mark.parametrize("error", [EslNotConnected("down"), EslTimeout("no reply")])
def test_freeswitch_unavailable_is_503(h, served, error):
    h.pbx.fail_with = error
    r = requests.post(f"{served}/planfix", data=make_call(), timeout=5)
    assert r.status_code == 503
    assert r.json() == {"error": "FreeSWITCH is not connected"}


def test_unexpected_failure_is_bare_json_500(h, served, caplog):
    h.pbx.fail_with = RuntimeError("secret internals")
    r = requests.post(f"{served}/planfix", data=make_call(), timeout=5)
    assert r.status_code == 500
    assert r.json() == {"error": "Internal error"}
    assert "secret internals" not in r.text and "Traceback" not in r.text
    assert "secret internals" in caplog.text  # but the admin can find it


# --- token -------------------------------------------------------------------


BAD_TOKENS = [
    ("wrong", {"token": "x" * 32}),
    ("empty", {"token": ""}),
    ("missing", {"token": None}),
    ("upper-case", {"token": TOKEN.upper()}),
    ("prefix", {"token": TOKEN[:-1]}),
    ("longer", {"token": TOKEN + "0"}),
    ("padded", {"token": f" {TOKEN}"}),
    ("non-ascii", {"token": "токен"}),
]


@pytest.mark.parametrize("name,fields", BAD_TOKENS, ids=[n for n, _ in BAD_TOKENS])
@pytest.mark.parametrize("cmd", ["makeCall", "setup", "nonsense", None])
def test_wrong_token_is_401_everywhere(h, served, name, fields, cmd):
    data = {k: v for k, v in {**setup_fields(), **make_call(), **fields, "cmd": cmd}.items() if v is not None}
    r = requests.post(f"{served}/planfix", data=data, timeout=5)
    assert r.status_code == 401
    assert r.json() == {"error": "Invalid token"}
    assert h.pbx.sent == [] and h.store.load() is None


def test_token_sent_twice_is_refused(h):
    r = h.client.post("/planfix", data=f"cmd=makeCall&token=x&token={TOKEN}&from=101&to=79101234567",
                      content_type="application/x-www-form-urlencoded")
    assert r.status_code == 401 and h.pbx.sent == []


def test_token_in_query_string_is_ignored(h):
    r = h.client.post(f"/planfix?token={TOKEN}", data={"cmd": "makeCall", "from": "101", "to": "79101234567"})
    assert r.status_code == 401


def test_token_never_logged(h, caplog):
    caplog.set_level(logging.DEBUG)
    h.post(**make_call())
    h.post(**setup_fields())
    h.post(**make_call(token=TOKEN + "x"))
    h.post(**make_call(to="bad"))
    assert TOKEN not in caplog.text and PF_TOKEN not in caplog.text


# --- rate limit ----------------------------------------------------------------


def test_rate_limit_refuses_wrong_tokens_but_not_valid_ones(h, caplog):
    caplog.set_level(logging.INFO)
    statuses = [h.post(**make_call(token="guess")).status_code for _ in range(25)]
    assert statuses == [401] * 10 + [429] * 15
    assert h.post(**make_call(token="guess")).get_json() == {"error": "Too many requests"}
    # PlanFix's valid request from the same address passes, immediately
    assert h.post(**make_call()).status_code == 200
    # another address is not affected
    assert h.post(address="192.0.2.7", **make_call(token="guess")).status_code == 401
    # logged once per block, not per attempt
    assert caplog.text.count("refusing its wrong tokens") == 1
    # after the cool-down, wrong tokens are plain 401 again and the refused count is reported
    h.clock.now += 301
    assert h.post(**make_call(token="guess")).status_code == 401
    assert "more wrong tokens were refused" in caplog.text


def test_rate_limit_window_slides(h):
    for _ in range(9):
        assert h.post(**make_call(token="guess")).status_code == 401
    h.clock.now += 61  # the old failures leave the window
    for _ in range(9):
        assert h.post(**make_call(token="guess")).status_code == 401
    h.clock.now += 30
    assert h.post(**make_call(token="guess")).status_code == 401  # 10th within 60 s: block starts
    assert h.post(**make_call(token="guess")).status_code == 429


def test_rate_limit_over_http(h, served):
    codes = [requests.post(f"{served}/planfix", data=make_call(token="guess"), timeout=5).status_code
             for _ in range(11)]
    assert codes == [401] * 10 + [429]
    assert requests.post(f"{served}/planfix", data=make_call(), timeout=5).status_code == 200


def test_ipv6_counted_per_prefix(h):
    for i in range(10):
        h.post(address=f"2001:db8::{i + 1}", **make_call(token="guess"))
    assert h.post(address="2001:db8::ffff", **make_call(token="guess")).status_code == 429
    assert h.post(address="2001:db8:1::1", **make_call(token="guess")).status_code == 401


def test_rate_limit_table_is_bounded(tmp_path):
    h = Harness(tmp_path, auth_max_addresses=50)
    for i in range(500):
        h.post(address=f"10.0.{i // 256}.{i % 256}", **make_call(token="guess"))
    assert len(h.limiter) == 50


def test_a_flood_of_new_addresses_does_not_evict_a_blocked_one(h):
    """Issue 14: 10,000 wrong tokens from distinct addresses (the table holds 10,000)."""
    for _ in range(10):
        h.post(address="203.0.113.9", **make_call(token="guess"))
    assert h.limiter.is_blocked("203.0.113.9")
    for i in range(10_000):
        h.post(address=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", **make_call(token="guess"))
    assert h.limiter.is_blocked("203.0.113.9")
    assert h.post(address="203.0.113.9", **make_call(token="guess")).status_code == 429
    assert len(h.limiter) <= 2 * h.limiter.max_addresses


def test_ipv6_flood_from_one_prefix_is_one_entry(h):
    for i in range(1000):
        h.post(address=f"2001:db8:5::{i + 1:x}", **make_call(token="guess"))
    assert len(h.limiter) == 1 and h.limiter.is_blocked("2001:db8:5::1")


# --- setup ---------------------------------------------------------------------


def test_setup_persists_and_takes_effect(h, served):
    r = requests.post(f"{served}/planfix", data=setup_fields(), timeout=5)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert SettingsStore(h.store_path).load() == Credentials(url=PF_URL, token=PF_TOKEN)
    assert h.credential_changes == 1
    assert requests.get(f"{served}/healthz", timeout=5).json()["planfix_configured"] is True


@pytest.mark.parametrize(
    "fields,detail",
    [
        ({"planfix_url": "http://test.planfix.ru/tel/api"}, "planfix_url must start with https://"),
        ({"planfix_url": "test.planfix.ru/tel/api"}, "planfix_url must start with https://"),
        ({"planfix_url": ""}, "planfix_url is empty"),
        ({"planfix_url": None}, "planfix_url is missing"),
        ({"planfix_url": "https://u:p@test.planfix.ru/"}, "user name or password"),
        ({"planfix_url": "https:///x"}, "no host"),
        ({"planfix_token": ""}, "planfix_token is empty"),
        ({"planfix_token": None}, "planfix_token is missing"),
        ({"planfix_token": "a b"}, "planfix_token may only contain"),
    ],
)
def test_setup_failures_tell_the_admin_what_to_fix(h, served, fields, detail):
    data = {k: v for k, v in setup_fields(**fields).items() if v is not None}
    r = requests.post(f"{served}/planfix", data=data, timeout=5)
    assert r.status_code == 400
    assert r.json()["error"] == "Invalid parameters"
    assert detail in r.json()["detail"]
    assert h.store.load() is None and h.credential_changes == 0


def test_setup_http_allowed_for_labs(tmp_path):
    h = Harness(tmp_path, allow_http=True)
    assert h.post(**setup_fields(planfix_url="http://127.0.0.1:9000/tel")).status_code == 200
    assert h.store.load().url == "http://127.0.0.1:9000/tel"


def test_setup_storage_failure(h, monkeypatch):
    def broken(creds):
        raise SettingsError("cannot store PlanFix settings in /x: No space left on device")

    monkeypatch.setattr(h.store, "save", broken)
    r = h.post(**setup_fields())
    assert r.status_code == 500
    assert r.get_json()["error"] == "Internal error" and "could not store" in r.get_json()["detail"]
    assert h.credential_changes == 0


def test_setup_succeeds_even_if_the_wake_up_fails(h):
    def broken():
        raise RuntimeError("outbox stopped")

    h.deps.on_credentials_changed = broken
    assert h.post(**setup_fields()).status_code == 200
    assert h.store.load() is not None


# --- protocol edges ------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_wrong_method(served, method):
    r = requests.request(method, f"{served}/planfix", data=make_call(), timeout=5)
    assert r.status_code == 405
    assert r.json() == {"error": "Method not allowed"}
    assert r.headers["Allow"] == "POST"


@pytest.mark.parametrize(
    "content_type,body",
    [
        ("application/json", '{"cmd": "makeCall"}'),
        ("text/plain", f"cmd=makeCall&token={TOKEN}&from=101&to=1"),
        ("multipart/form-data; boundary=x", "--x--"),
        (None, f"cmd=makeCall&token={TOKEN}&from=101&to=1"),
    ],
)
def test_wrong_content_type(h, served, content_type, body):
    headers = {"Content-Type": content_type} if content_type else {}
    r = requests.post(f"{served}/planfix", data=body.encode(), headers=headers, timeout=5)
    assert r.status_code == 400
    assert r.json()["error"] == "Invalid parameters"
    assert "application/x-www-form-urlencoded" in r.json()["detail"]
    assert h.pbx.sent == []


def test_charset_parameter_is_fine(h):
    r = h.client.post("/planfix", data=f"cmd=makeCall&token={TOKEN}&from=101&to=79101234567",
                      content_type="application/x-www-form-urlencoded; charset=UTF-8")
    assert r.status_code == 200


def test_oversized_body(h, served):
    r = requests.post(f"{served}/planfix", data=make_call(pad="x" * 20000), timeout=5)
    assert r.status_code == 413 and r.json() == {"error": "Request too large"}
    assert h.pbx.sent == []


def test_oversized_chunked_body(h, served):
    def chunks():
        yield f"cmd=makeCall&token={TOKEN}&from=101&to=79101234567&pad=".encode()
        for _ in range(40):
            yield b"x" * 1024

    r = requests.post(f"{served}/planfix", data=chunks(), timeout=5,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413 and r.json() == {"error": "Request too large"}
    assert h.pbx.sent == []


def test_too_many_fields(h):
    body = f"cmd=makeCall&token={TOKEN}&from=101&to=79101234567&" + "&".join(f"f{i}=1" for i in range(100))
    r = h.client.post("/planfix", data=body, content_type="application/x-www-form-urlencoded")
    assert r.status_code == 413 and h.pbx.sent == []
    assert r.get_json() == {"error": "Request too large", "detail": "more than 64 form fields"}


@pytest.mark.parametrize("extra,status", [(0, 200), (1, 413)])
def test_body_limit_is_exact(h, extra, status):
    head = f"cmd=makeCall&token={TOKEN}&from=101&to=79101234567&pad="
    body = head + "x" * (16 * 1024 - len(head) + extra)
    r = h.client.post("/planfix", data=body, content_type="application/x-www-form-urlencoded")
    assert r.status_code == status


def test_invalid_utf8_is_no_crash(h):
    r = h.client.post("/planfix", data=b"cmd=makeCall&token=" + TOKEN.encode() + b"&from=101&to=%FF%FE7910",
                      content_type="application/x-www-form-urlencoded")
    assert r.status_code == 400 and h.pbx.sent == []
    r = h.client.post("/planfix", data=b"cmd=setup&token=\xff\xfe", content_type="application/x-www-form-urlencoded")
    assert r.status_code == 401


@pytest.mark.parametrize("cmd", ["", "makecall", "MAKECALL", "ping", "event", "x" * 500])
def test_unknown_cmd(h, cmd):
    r = h.post(**make_call(cmd=cmd))
    assert r.status_code == 400
    body = r.get_json()
    assert body["error"] == "Invalid parameters" and "unknown cmd" in body["detail"]
    assert len(body["detail"]) < 120
    assert h.pbx.sent == []


def test_missing_cmd(h):
    data = make_call()
    del data["cmd"]
    r = h.post(**data)
    assert r.status_code == 400 and "unknown cmd missing" in r.get_json()["detail"]


def test_unknown_path_is_json(served):
    r = requests.get(f"{served}/admin", timeout=5)
    assert r.status_code == 404 and r.json() == {"error": "Not found"}


# --- healthz --------------------------------------------------------------------


def test_healthz_has_no_secrets(h, served):
    h.post(**setup_fields())
    r = requests.get(f"{served}/healthz", timeout=5)
    assert r.status_code == 200
    body = r.json()
    assert body["version"] == __version__
    assert body["planfix_configured"] is True
    # The public view: status and counts only; the ESL state text stays on loopback.
    assert "esl" not in body and body["outbox"] == {"depth": 0}
    for secret in (TOKEN, PF_TOKEN, "ClueCon"):
        assert secret not in r.text


def test_public_healthz_shows_no_upstream_text_addresses_or_uuids(h):
    h.deps.health = lambda: {
        "status": "degraded",
        "freeswitch": {"state": "connected", "detail": "10.0.0.5:8021", "core_uuid": "c0ffee-uuid", "connections": 3},
        "outbox": {"depth": 7, "last_error": "HTTP 500 from http://10.1.1.1/x: secret reply", "in_flight": 1},
        "storage_error": "disk /var/lib/fsbridge full",
    }
    body = h.client.get("/healthz").get_json()
    assert body == {"version": __version__, "planfix_configured": False, "status": "degraded",
                    "freeswitch": {"connections": 3, "connected": True}, "outbox": {"depth": 7, "in_flight": 1}}


def test_detailed_healthz_is_served_where_registered(h):
    h.deps.health = lambda: {"status": "ok", "outbox": {"depth": 0, "last_error": "HTTP 500 from x"}}
    loopback_app = flask.Flask("loopback")
    register_detailed_health(loopback_app, h.deps)
    body = loopback_app.test_client().get("/healthz").get_json()
    assert body["outbox"]["last_error"] == "HTTP 500 from x"


def test_healthz_reports_unconfigured_and_corrupt_settings(h):
    assert h.client.get("/healthz").get_json()["planfix_configured"] is False
    h.store_path.write_text("{broken")
    public = h.client.get("/healthz").get_json()
    assert public["planfix_configured"] is False and "planfix_settings_error" not in public
    loopback_app = flask.Flask("loopback")
    register_detailed_health(loopback_app, h.deps)
    body = loopback_app.test_client().get("/healthz").get_json()
    assert body["planfix_configured"] is False and "damaged" in body["planfix_settings_error"]


def test_healthz_uses_effective_credentials(h):
    h.deps.credentials = lambda: Credentials(url=PF_URL, token=PF_TOKEN)  # e.g. from the config file
    assert h.client.get("/healthz").get_json()["planfix_configured"] is True


def test_healthz_degraded_is_503_with_the_same_body(h):
    h.health = dict(h.health, status="degraded", esl={"state": "disconnected"})
    r = h.client.get("/healthz")
    assert r.status_code == 503 and r.get_json()["status"] == "degraded"
    loopback_app = flask.Flask("loopback")
    register_detailed_health(loopback_app, h.deps)
    detailed = loopback_app.test_client().get("/healthz")
    assert detailed.status_code == 503 and detailed.get_json()["esl"] == {"state": "disconnected"}


def test_healthz_survives_a_failing_health_source(h):
    def broken():
        raise RuntimeError("db locked")

    h.deps.health = broken
    r = h.client.get("/healthz")
    assert r.status_code == 503 and r.get_json()["health_error"]


# --- settings --------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"pbx_token": ""}, {"pbx_token": TOKEN, "max_body_bytes": 10},
                                    {"pbx_token": TOKEN, "auth_failures": 0}])
def test_bad_web_settings(kwargs):
    with pytest.raises(ValueError):
        WebSettings(**kwargs)


def test_settings_from_config(tmp_path):
    from fsbridge import config

    ini = tmp_path / "fsbridge.ini"
    ini.write_text(
        f"[server]\ntoken = {TOKEN}\nmax_body_bytes = 4096\nauth_failures_per_minute = 5\n"
        f"[storage]\ndir = {tmp_path}\n[planfix]\nallow_http = yes\n"
        "[click_to_call]\ndial_string = sofia/internal/{ext}@pbx\ncontext = public\ntimeout = 20\nkeep_plus = yes\n"
        "[calls]\nextension_pattern = ^\\d{3}$\n"
    )
    settings = WebSettings.from_config(config.load(str(ini)))
    assert (settings.pbx_token, settings.allow_http, settings.max_body_bytes, settings.auth_failures) == (
        TOKEN, True, 4096, 5)
    assert settings.originate == OriginateSettings(dial_string="sofia/internal/{ext}@pbx", context="public",
                                                   timeout_s=20, keep_plus=True, extension_pattern=r"^\d{3}$")


def test_config_refuses_what_originate_refuses(tmp_path):
    # the config applies the originate builder's own dial-string rule, so
    # `fsbridge check` and the running endpoint can never disagree
    from fsbridge import config

    ini = tmp_path / "fsbridge.ini"
    ini.write_text(f"[server]\ntoken = {TOKEN}\n[storage]\ndir = {tmp_path}\n"
                   "[click_to_call]\ndial_string = {ext}=x\n")
    with pytest.raises(config.ConfigError, match=r"\[click_to_call\] dial_string: dial_string may only"):
        config.load(str(ini))


def test_reloaded_click_to_call_limits_and_policy_apply_to_the_next_make_call(tmp_path):
    h = Harness(tmp_path, call_policy=CallPolicy(), calls_per_extension=1)
    assert h.post(**make_call()).status_code == 200
    assert "per 60s from 101" in h.post(**make_call()).get_json()["detail"]
    # SIGHUP with calls_per_extension_per_minute = 5 and +7910 on the deny list
    apply_click_to_call(h.app, WebSettings(pbx_token=TOKEN, calls_per_extension=5,
                                           call_policy=CallPolicy(deny_prefixes=("+7910",))))
    refused = h.post(**make_call())
    assert refused.status_code == 400 and "deny" in refused.get_json()["detail"]
    assert h.post(**make_call(to="79261234567")).status_code == 200  # the per-extension limit is now 5
    assert len(h.pbx.sent) == 2
