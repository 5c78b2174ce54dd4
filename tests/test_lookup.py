"""The dialplan lookup over real HTTP, against the fake PlanFix through the real PlanFix client.

The lookup app is served by gevent's WSGI server on an ephemeral loopback
port, exactly as the service serves it; requests go through `requests` with a
kept-alive session like mod_curl's.  Deadlines are a few hundred ms so the
suite stays fast; cache ageing uses an injected clock instead of sleeping.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass

import gevent
import gevent.event
import pytest
import requests

from fsbridge import config
from fsbridge.lookup import (
    ANSWER_REGEX,
    CONTACT_PATH,
    ContactLookup,
    LookupResult,
    LookupSettings,
    NoDelayWSGIServer,
    create_lookup_app,
    format_answer,
    safe_display_name,
)
from fsbridge.planfix import Credentials, PlanfixClient
from fsbridge.fakes.planfix import FakePlanfix

DEADLINE = 0.25
MARGIN = 0.2  # scheduling + HTTP on a busy CI machine
CALLID = "e84e4329-8051-40a2-9c6c-a3d6cf741ee9"
IVANOV = {"contact_name": "Иванов Иван Иванович", "responsible": 103}


class Clock:
    """The lookup's cache clock, moved by hand (deadlines still use real time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Lookup:
    fake: FakePlanfix
    contacts: ContactLookup
    clock: Clock
    url: str
    http: requests.Session

    def get(self, phone: str | None, callid: str | None = CALLID, **params: str) -> requests.Response:
        if phone is not None:
            params["phone"] = phone
        if callid is not None:
            params["callid"] = callid
        return self.http.get(self.url, params=params, timeout=5)

    def body(self, phone: str, callid: str | None = CALLID) -> str:
        response = self.get(phone, callid)
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.text

    def settle(self, timeout: float = 3.0) -> None:
        """Wait until no PlanFix request of the lookup is still running."""
        end = time.monotonic() + timeout
        while self.contacts.stats()["inflight"]:
            assert time.monotonic() < end, "background PlanFix request never finished"
            gevent.sleep(0.01)


def _serve(settings: LookupSettings, credentials: Credentials, clock: Clock):
    client = PlanfixClient(lambda: credentials, connect_timeout=1, read_timeout=2)
    contacts = ContactLookup(settings, client.contact, clock=clock)
    server = NoDelayWSGIServer(("127.0.0.1", 0), create_lookup_app(settings, lookup=contacts), log=None)
    server.start()
    return server, contacts


@pytest.fixture
def lookup():
    clock = Clock()
    settings = LookupSettings(deadline=DEADLINE, cache_ttl=300, cache_ttl_not_found=60, cache_ttl_failure=5, fetch_timeout=2)
    with FakePlanfix() as fake:
        server, contacts = _serve(settings, Credentials(fake.url, fake.token), clock)
        try:
            with requests.Session() as http:
                yield Lookup(fake, contacts, clock, f"http://127.0.0.1:{server.server_port}{CONTACT_PATH}", http)
        finally:
            server.stop(timeout=1)
        fake.assert_no_violations()


def test_name_and_responsible(lookup):
    lookup.fake.contacts["79101234567"] = IVANOV
    assert lookup.body("+7 (910) 123-45-67") == "status=found;name=Иванов Иван Иванович;responsible=103"
    (sent,) = lookup.fake.requests
    # Normalised number and the call's id, as the spec's `contact` wants them.
    assert sent["cmd"] == "contact" and sent["phone"] == "79101234567" and sent["callid"] == CALLID
    assert re.fullmatch(ANSWER_REGEX, lookup.body("89101234567"))


def test_name_only(lookup):
    lookup.fake.contacts["79101234567"] = {"contact_name": "ООО Ромашка"}
    assert lookup.body("79101234567") == "status=found;name=ООО Ромашка;responsible="


def test_not_found_is_cached_for_the_shorter_ttl(lookup):
    assert lookup.body("79101234567") == "status=not_found;name=;responsible="
    assert lookup.body("89101234567") == "status=not_found;name=;responsible="
    assert len(lookup.fake.requests) == 1
    lookup.fake.contacts["79101234567"] = IVANOV
    lookup.clock.now += 61  # past cache_ttl_not_found, well within cache_ttl
    assert lookup.body("79101234567").startswith("status=found;name=Иванов")
    assert len(lookup.fake.requests) == 2


def test_found_is_cached_for_cache_ttl(lookup):
    lookup.fake.contacts["79101234567"] = IVANOV
    lookup.body("79101234567")
    lookup.clock.now += 299
    lookup.body("79101234567")
    assert len(lookup.fake.requests) == 1
    lookup.clock.now += 2
    lookup.body("79101234567")
    assert len(lookup.fake.requests) == 2


def test_slow_planfix_deadline_holds_and_fills_the_cache(lookup):
    lookup.fake.contacts["79101234567"] = IVANOV
    lookup.fake.delay = DEADLINE + 0.3
    started = time.monotonic()
    assert lookup.body("79101234567") == "status=unknown;name=;responsible="
    assert time.monotonic() - started < DEADLINE + MARGIN
    # PlanFix's late answer lands in the cache: the next call is a hit.
    lookup.fake.wait_for(1, delivered=True)
    lookup.settle()
    lookup.fake.delay = 0
    started = time.monotonic()
    assert lookup.body("79101234567").startswith("status=found;")
    assert time.monotonic() - started < 0.05
    assert len(lookup.fake.requests) == 1


def test_concurrent_lookups_of_one_number_share_one_planfix_request(lookup):
    lookup.fake.contacts["79101234567"] = IVANOV
    lookup.fake.delay = 0.1
    jobs = [gevent.spawn(requests.get, lookup.url, params={"phone": p}, timeout=5) for p in ["79101234567", "89101234567", "+79101234567"] * 3]
    gevent.joinall(jobs, timeout=5, raise_error=True)
    assert {job.value.text for job in jobs} == {"status=found;name=Иванов Иван Иванович;responsible=103"}
    assert len(lookup.fake.requests) == 1


def test_stale_name_beats_unknown_when_the_refresh_is_late(lookup):
    lookup.fake.contacts["79101234567"] = IVANOV
    lookup.body("79101234567")
    lookup.clock.now += 301
    lookup.fake.delay = DEADLINE + 0.2
    started = time.monotonic()
    assert lookup.body("79101234567").startswith("status=found;name=Иванов")
    assert time.monotonic() - started < DEADLINE + MARGIN
    lookup.settle()
    assert len(lookup.fake.requests) == 2


@pytest.mark.parametrize("failure", [503, 401, "garbage", "close"])
def test_planfix_failing_answers_unknown_and_is_not_cached_long(lookup, failure):
    lookup.fake.contacts["79101234567"] = IVANOV
    lookup.fake.failure = failure
    started = time.monotonic()
    assert lookup.body("79101234567") == "status=unknown;name=;responsible="
    assert time.monotonic() - started < DEADLINE + MARGIN
    lookup.settle()
    # Within cache_ttl_failure: no request storm while PlanFix is down.
    assert lookup.body("79101234567") == "status=unknown;name=;responsible="
    assert len(lookup.fake.requests) == 1
    # PlanFix is back and a few seconds passed: the name is there again.
    lookup.fake.failure = None
    lookup.clock.now += 6
    assert lookup.body("79101234567").startswith("status=found;")


def test_planfix_unreachable_answers_unknown_within_deadline():
    clock = Clock()
    settings = LookupSettings(deadline=DEADLINE, fetch_timeout=1)
    with FakePlanfix() as fake:
        credentials = Credentials(fake.url, fake.token)
    # The fake has stopped: its port now refuses connections.
    server, contacts = _serve(settings, credentials, clock)
    try:
        started = time.monotonic()
        response = requests.get(f"http://127.0.0.1:{server.server_port}{CONTACT_PATH}", params={"phone": "79101234567"}, timeout=5)
        assert response.text == "status=unknown;name=;responsible="
        assert time.monotonic() - started < DEADLINE + MARGIN
    finally:
        server.stop(timeout=1)


def test_cache_hits_are_fast_and_do_not_ask_planfix(lookup):
    lookup.fake.contacts["79101234567"] = IVANOV
    lookup.body("79101234567")
    timings = []
    for raw in ["79101234567", "+7 910 123-45-67", "8 (910) 1234567"] * 10:
        started = time.perf_counter()
        assert lookup.body(raw).startswith("status=found;")
        timings.append(time.perf_counter() - started)
    assert statistics.median(timings) < 0.005, timings
    assert len(lookup.fake.requests) == 1
    assert lookup.contacts.stats()["hit"] >= 30


@pytest.mark.parametrize("phone", ["101", "2000", "123456"])
def test_internal_extensions_are_not_looked_up(lookup, phone):
    assert lookup.body(phone) == "status=internal;name=;responsible="
    assert lookup.fake.requests == []


@pytest.mark.parametrize(
    "params, reason",
    [
        ({}, "phone is missing"),
        ({"phone": ""}, "phone is missing"),
        ({"phone": "   "}, "phone is missing"),
        ({"phone": "7" * 33}, "not a phone number"),
        ({"phone": "anonymous"}, "not a phone number"),
        ({"phone": "7910;1234567"}, "not a phone number"),
        ({"phone": "${system(id)}"}, "not a phone number"),
        ({"phone": "79101234567\n"}, "not a phone number"),
        ({"phone": "7910,1234567"}, "not a phone number"),
        ({"phone": "*72"}, "not a phone number"),
        ({"phone": "79101234567", "callid": "a b"}, "callid"),
        ({"phone": "79101234567", "callid": "x" * 200}, "callid"),
        ({"phone": "79101234567", "callid": "a&cmd=ping"}, "callid"),
    ],
)
def test_bad_input_is_400_and_never_reaches_planfix(lookup, params, reason):
    response = lookup.http.get(lookup.url, params=params, timeout=5)
    assert response.status_code == 400
    assert response.text.startswith("error=") and reason in response.text
    assert not re.fullmatch(ANSWER_REGEX, response.text)  # the dialplan routes it as unknown
    assert lookup.fake.requests == []


def test_other_methods_and_paths_answer_plain_text(lookup):
    post = lookup.http.post(lookup.url, data={"phone": "79101234567"}, timeout=5)
    assert post.status_code == 405 and post.text.startswith("error=")
    other = lookup.http.get(lookup.url.replace(CONTACT_PATH, "/planfix"), timeout=5)
    assert other.status_code == 404 and other.text.startswith("error=")
    assert lookup.fake.requests == []


def test_hostile_names_cannot_inject_into_the_dialplan(lookup):
    lookup.fake.contacts["79101234567"] = {"contact_name": "Ivan ${system(reboot)}; O'Brien|x\nstatus=found", "responsible": 103}
    body = lookup.body("79101234567")
    assert body == "status=found;name=Ivan system(reboot) O’Brien x status found;responsible=103"
    assert re.fullmatch(ANSWER_REGEX, body)


def test_contact_name_for_click_to_call_shares_the_cache(lookup):
    lookup.fake.contacts["79101234567"] = IVANOV
    assert lookup.contacts.contact_name_for("+7 (910) 123-45-67", callid=CALLID) == "Иванов Иван Иванович"
    assert lookup.body("89101234567").startswith("status=found;")
    assert len(lookup.fake.requests) == 1
    assert lookup.contacts.contact_name_for("79997654321") is None  # not found
    assert lookup.contacts.contact_name_for("101") is None  # an extension: never asked
    assert lookup.contacts.contact_name_for("79101234567;x") is None  # not a number
    assert len(lookup.fake.requests) == 2


def test_contact_name_for_keeps_the_deadline(lookup):
    lookup.fake.contacts["79101234567"] = IVANOV
    lookup.fake.delay = 0.5
    started = time.monotonic()
    assert lookup.contacts.contact_name_for("79101234567", timeout=0.1) is None
    assert time.monotonic() - started < 0.1 + MARGIN
    lookup.settle()
    assert lookup.contacts.contact_name_for("79101234567", timeout=0) == "Иванов Иван Иванович"


# ---- the cache itself, with a plain fetch function in place of PlanFix ----


@dataclass
class Found:
    name: str
    responsible: object = None


def test_cache_is_bounded_least_recently_used_first():
    asked: list[str] = []

    def fetch(phone, callid, timeout):
        asked.append(phone)
        return Found(f"client {phone}")

    contacts = ContactLookup(LookupSettings(cache_size=2), fetch)
    for phone in ["79101111111", "79102222222", "79101111111", "79103333333"]:
        assert contacts.lookup(phone).found
    assert contacts.stats()["cached"] == 2
    contacts.lookup("79101111111")  # still cached (recently used)
    contacts.lookup("79102222222")  # evicted: asked again
    assert asked == ["79101111111", "79102222222", "79103333333", "79102222222"]


@pytest.mark.parametrize("responsible, shown", [(103, "103"), ("205", "205"), ("1; rm", ""), ("user/1@x", ""), ("12345678", ""), (True, "")])
def test_responsible_must_be_an_extension(responsible, shown):
    contacts = ContactLookup(LookupSettings(), lambda phone, callid, timeout: Found("Ivan", responsible))
    assert contacts.lookup("79101234567").responsible == shown


def test_fetch_gets_the_configured_timeout_and_callid():
    seen = []
    contacts = ContactLookup(LookupSettings(fetch_timeout=7.5), lambda *args: seen.append(args))
    assert contacts.lookup("79101234567", "abc").status == "not_found"
    assert seen == [("79101234567", "abc", 7.5)]


def test_answer_format_and_name_cleaning():
    assert safe_display_name("  Петров\tПётр  ") == "Петров Пётр"
    assert safe_display_name("A" * 200) == "A" * 80
    assert safe_display_name(None) == ""
    assert safe_display_name("{a}[b]<c>\\d\"e\"") == "a b c d e"
    for status in ("found", "not_found", "unknown", "internal"):
        assert re.fullmatch(ANSWER_REGEX, format_answer(LookupResult(status, "X", "")))


def test_pending_fetches_are_bounded_when_planfix_hangs():
    release = gevent.event.Event()
    asked = []

    def fetch(phone, callid, timeout):
        asked.append(phone)
        release.wait()
        return Found("late")

    contacts = ContactLookup(LookupSettings(max_concurrent_fetches=1, max_pending_fetches=3), fetch)
    for n in range(5):
        assert contacts.lookup(f"7910000000{n}", timeout=0.01).status == "unknown"
    gevent.sleep(0.01)
    assert contacts.stats()["inflight"] == 3 and contacts.stats()["overloaded"] == 2
    assert len(asked) == 1  # one PlanFix request at a time (max_concurrent_fetches)
    release.set()
    gevent.sleep(0.05)
    assert contacts.stats()["inflight"] == 0 and len(asked) == 3
    assert contacts.lookup("79100000000", timeout=0).name == "late"


def test_settings_from_the_loaded_config(tmp_path):
    path = tmp_path / "fsbridge.ini"
    path.write_text(
        f"[server]\ntoken = {'t' * 32}\n[storage]\ndir = {tmp_path}\n"
        "[dialplan]\ndeadline = 0.8\ncache_ttl = 120\n[phone]\ndefault_region = by\n[planfix]\nread_timeout = 4\n"
    )
    settings = LookupSettings.from_config(config.load(str(path)))
    assert (settings.deadline, settings.cache_ttl, settings.cache_ttl_not_found) == (0.8, 120, 60)
    assert (settings.region, settings.fetch_timeout, settings.extension_pattern) == ("BY", 4, r"^\d{2,6}$")
