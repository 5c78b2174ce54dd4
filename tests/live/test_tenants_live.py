"""Cloud PBX over real SIP: two PlanFix accounts on one FreeSWITCH (issue 16).

A lab of its own (FreeSWITCH with two domains, alpha.lab and beta.lab, each
with phones 101 and 102: the same numbers, other phones), the dialplan
installed by `fsbridge install-dialplan -c` from a config with two
[tenant.*] sections, the real `fsbridge run`, and one fake PlanFix per
tenant.  Every call is placed with SIPp; each tenant's PlanFix must get
exactly its own calls, and the other tenant's phones must never ring.

FreeSWITCH's dialplan lookup goes through a recording relay in this process
(fsbridge-vars.xml points the lookup URL at it, as an admin may edit the
URL), so the test sees the query FreeSWITCH sent: the domain and the DID.
"""

from __future__ import annotations

import http.server
import itertools
import random
import re
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import requests

from fsbridge.fakes.planfix import FakePlanfix
from tests.live import lab as lab_mod
from tests.live.conftest import started
from tests.live.lab import free_udp_port, messages
from tests.live.test_live import VANILLA_NOISE, invite_display_name, received_invite
from tests.service_proc import ServiceProcess

USERS = ("101", "102")
RESPONSIBLE_RING = 4
TENANTS = {
    # name: (domain, DID, context, PBX token)
    "alpha": ("alpha.lab", "74950000010", "default", "alpha-live-token-0123456789"),
    "beta": ("beta.lab", "74950000020", "beta", "beta-live-token-0123456789ab"),
}
_NUMBERS = itertools.count(random.randrange(1_000_000, 8_000_000))


class LookupRelay:
    """HTTP relay between FreeSWITCH's curl and fsbridge's lookup: records each
    query string and passes the answer back unchanged (loopback, daemon threads)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.queries: list[dict[str, str]] = []
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                parts = urllib.parse.urlsplit(self.path)
                relay.queries.append(dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True)))
                answer = requests.get(relay.target + self.path, timeout=5)
                body = answer.content
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("Content-Type", "text/plain"))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args) -> None:  # noqa: A002 - quiet test output
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "LookupRelay":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class Cloud:
    """The lab, the service and one fake PlanFix per tenant."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lab = lab_mod.Lab(root / "fs")
        self.planfix = {name: FakePlanfix() for name in TENANTS}
        self.ports = {(name, user): free_udp_port() for name in TENANTS for user in USERS}
        self.service: ServiceProcess | None = None
        self.relay: LookupRelay | None = None
        self.log_offset_after_start = 0

    def start(self) -> None:
        for planfix in self.planfix.values():
            planfix.start()
        self.lab.build_conf()
        for name, (domain, _, context, _) in TENANTS.items():
            self.lab.add_domain(domain, USERS, context)
            if context != "default":
                self.lab.add_context(context, domain)
        tenants = {
            f"tenant.{name}": {
                "token": token, "domains": domain, "dids": did, "context": context,
                "planfix_url": self.planfix[name].url, "planfix_token": self.planfix[name].token,
                # bare user/ legs: install-dialplan puts them in the tenant's domain
                "fallback": "[leg_timeout=5]user/101,[leg_timeout=5]user/102",
            }
            for name, (domain, did, context, token) in TENANTS.items()
        }
        self.service = ServiceProcess(
            self.root / "svc", fs_port=self.lab.esl_port,
            settings={
                "server": {"token": ""},
                "recordings": {"dir": str(self.lab.dirs["recordings"]),
                               "freeswitch_dir": str(self.lab.dirs["recordings"])},
                "click_to_call": {"timeout": "6"},
                "log": {"level": "INFO"},
                **tenants,
            },
        )
        self.install_output = self.lab.install_dialplan(self.service.config_path, fallback=None, did=None,
                                                        responsible_ring=RESPONSIBLE_RING)
        self.relay = LookupRelay(self.service.dialplan_url).start()
        lab_mod._sub(self.lab.conf / "fsbridge/fsbridge-vars.xml", r'data="fsbridge_lookup_url=http://[^/"]+',
                     f'data="fsbridge_lookup_url={self.relay.url}')
        self.lab.start()
        self.service.start()
        self.service.wait_health(lambda h: h["freeswitch"]["state"] == "connected", timeout=20)
        for (name, user), port in self.ports.items():
            self.lab.register(user, port, domain=TENANTS[name][0])
        self.log_offset_after_start = self.lab.log_size()

    def stop(self) -> None:
        if self.service is not None:
            self.service.__exit__(None, None, None)
        self.lab.stop()
        if self.relay is not None:
            self.relay.stop()
        for planfix in self.planfix.values():
            planfix.stop()


@pytest.fixture(scope="module")
def cloud():
    yield from started(Cloud, "fsbridge-live-tenants-")


@pytest.fixture
def live(cloud):
    """Per test: clean PlanFix logs and a fresh client number; every SIPp ended after it."""
    for planfix in cloud.planfix.values():
        planfix.clear()
        planfix.contacts.clear()
    cloud.relay.queries.clear()
    cloud.client = f"7910{next(_NUMBERS):07d}"  # the lookup caches answers per number
    yield cloud
    for proc in cloud.lab.sipps:
        lab_mod._end(proc)
    cloud.lab.sipps.clear()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "0 total" not in cloud.lab.cli("show calls count"):
        time.sleep(0.2)
    for planfix in cloud.planfix.values():
        planfix.assert_no_violations()


# ---- helpers ------------------------------------------------------------------


def phone(env: Cloud, tenant: str, user: str, scenario: str):
    """That tenant's phone `user` answering its next call as `scenario` (see test_live.phone)."""
    return env.lab.sipp(scenario, "-m", "3", "-aa", port=env.ports[(tenant, user)], domain=TENANTS[tenant][0])


def carrier_call(env: Cloud, did: str, caller: str):
    return env.lab.sipp("carrier-uac-inbound", "-s", did, "-key", "caller", caller, "-m", "1",
                        port=free_udp_port(), target="external")


def carrier_uas(env: Cloud, scenario: str):
    return env.lab.sipp(scenario, "-m", "1", port=env.lab.carrier_port, target="external")


def events(env: Cloud, tenant: str) -> list[dict[str, str]]:
    return [r for r in env.planfix[tenant].delivered if r.get("cmd") == "event"]


def brief(env: Cloud, tenant: str) -> list[tuple[str, str, str]]:
    return [(r["event"], r.get("ext", ""), r.get("status", "")) for r in events(env, tenant)]


def wait_done(env: Cloud, tenant: str, completed: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [r for r in events(env, tenant) if r["event"] == "COMPLETED"]
        if len(done) >= completed and env.service.health()["outbox"]["depth"] == 0:
            time.sleep(0.5)  # nothing more may follow, for this tenant or the other
            return
        time.sleep(0.1)
    raise AssertionError(f"{tenant}'s PlanFix got {brief(env, tenant)}, expected {completed} COMPLETED")


def other(tenant: str) -> str:
    (name,) = set(TENANTS) - {tenant}
    return name


def presented_caller(carrier) -> str | None:
    """The caller number in the From of the INVITE the carrier received."""
    match = re.search(r"^INVITE sip:[^\n]*\n(?:[^\n]+\n)*?From: *(?:\"[^\"]*\" *)?<sip:([^@>]+)@", messages(carrier),
                      flags=re.M)
    return match.group(1) if match else None


# ---- the installed dialplan -----------------------------------------------------


def test_tenant_dialplan_loads_cleanly_with_each_tenants_routes(cloud):
    problems = [line for line in cloud.lab.log_problems(0, cloud.log_offset_after_start)
                if not VANILLA_NOISE.search(line)]
    assert problems == []
    public = cloud.lab.cli("xml_locate dialplan context name public")
    for name in TENANTS:
        assert f'extension name="fsbridge_inbound_lookup_{name}"' in public
    assert 'extension name="fsbridge_inbound_lookup"' not in public  # the one-DID route is out
    default = cloud.lab.cli("xml_locate dialplan context name default")
    assert 'extension name="fsbridge_outbound_alpha"' in default and "fsbridge_outbound_beta" not in default
    assert 'extension name="fsbridge_outbound"' not in default
    beta = cloud.lab.cli("xml_locate dialplan context name beta")
    assert 'extension name="fsbridge_outbound_beta"' in beta and 'extension name="fsbridge_record"' in beta


# ---- inbound: each DID to its own tenant -------------------------------------------


@pytest.mark.parametrize("tenant", list(TENANTS))
def test_call_to_a_did_reaches_only_its_tenants_phones_and_planfix(live, tenant):
    domain, did, _, _ = TENANTS[tenant]
    # the same client, responsible 102, in both accounts: only the called one may be asked
    for name in TENANTS:
        live.planfix[name].contacts[live.client] = {"contact_name": f"Client of {name}", "responsible": 102}
    manager = phone(live, tenant, "102", "uas-answer-wait-bye")
    strangers = [phone(live, other(tenant), user, "uas-answer-wait-bye") for user in USERS]
    assert carrier_call(live, did, "+" + live.client).wait(40) == 0
    wait_done(live, tenant, 1)
    assert live.relay.queries == [{"phone": "+" + live.client, "callid": live.relay.queries[0]["callid"],
                                   "domain": domain, "did": did}]
    assert [r["phone"] for r in live.planfix[tenant].requests if r.get("cmd") == "contact"] == [live.client]
    assert invite_display_name(manager) == f"Client of {tenant}"
    assert brief(live, tenant) == [("INCOMING", "102", ""), ("ACCEPTED", "102", ""), ("COMPLETED", "102", "Success")]
    got = events(live, tenant)
    assert {r["diversion"] for r in got} == {did} and {r["callid"] for r in got} == {live.relay.queries[0]["callid"]}
    (done,) = [r for r in got if r["event"] == "COMPLETED"]
    assert done["data_line"] == did
    assert live.planfix[other(tenant)].requests == []
    assert not any(received_invite(p) for p in strangers)


def test_unknown_caller_rings_its_tenants_own_fallback_group(live):
    _, did, _, _ = TENANTS["beta"]
    winner = phone(live, "beta", "101", "uas-answer-wait-bye")
    phone(live, "beta", "102", "uas-noanswer")
    strangers = [phone(live, "alpha", user, "uas-answer-wait-bye") for user in USERS]
    assert carrier_call(live, did, live.client).wait(40) == 0
    wait_done(live, "beta", 2)
    assert received_invite(winner) and not any(received_invite(p) for p in strangers)
    seen = brief(live, "beta")
    assert sorted(seen[:2]) == [("INCOMING", "101", ""), ("INCOMING", "102", "")]
    assert seen[2:] == [("ACCEPTED", "101", ""), ("COMPLETED", "102", "Cancelled"), ("COMPLETED", "101", "Success")]
    assert [r["phone"] for r in live.planfix["beta"].requests if r.get("cmd") == "contact"] == [live.client]
    assert live.planfix["alpha"].requests == []


# ---- outbound and click-to-call: each tenant's own number -------------------------


@pytest.mark.parametrize("tenant", list(TENANTS))
def test_phone_call_to_a_client_presents_its_tenants_number(live, tenant):
    domain, did, _, _ = TENANTS[tenant]
    carrier = carrier_uas(live, "uas-answer-wait-bye")
    dialled = live.lab.sipp("phone-uac-outbound", "-s", "8" + live.client[1:], "-key", "ext", "102",
                            "-au", "102", "-ap", lab_mod.USER_PASSWORD, "-m", "1", port=free_udp_port(), domain=domain)
    assert dialled.wait(40) == 0
    wait_done(live, tenant, 1)
    assert presented_caller(carrier) == did
    assert brief(live, tenant) == [("OUTGOING", "102", ""), ("ACCEPTED", "102", ""), ("COMPLETED", "102", "Success")]
    assert {r["phone"] for r in events(live, tenant)} == {live.client}
    assert live.planfix[other(tenant)].requests == []


def test_make_call_with_betas_token_rings_betas_phone_not_alphas(live):
    _, did, _, token = TENANTS["beta"]
    live.planfix["beta"].contacts[live.client] = {"contact_name": "Client of beta", "responsible": 101}
    betas = phone(live, "beta", "101", "uas-answer-wait-bye")
    alphas = phone(live, "alpha", "101", "uas-answer-wait-bye")
    carrier = carrier_uas(live, "uas-answer-send-bye")
    answer = requests.post(live.service.url + "/planfix", timeout=10, data={
        "cmd": "makeCall", "from": "101", "to": f"+{live.client}", "token": token})
    assert answer.status_code == 200, answer.text
    assert carrier.wait(40) == 0
    wait_done(live, "beta", 1)
    assert received_invite(betas) and not received_invite(alphas)
    assert invite_display_name(betas) == "Client of beta"
    assert presented_caller(carrier) == did  # beta's context, beta's number
    assert brief(live, "beta") == [("OUTGOING", "101", ""), ("ACCEPTED", "101", ""), ("COMPLETED", "101", "Success")]
    assert {r["phone"] for r in events(live, "beta")} == {live.client}
    assert live.planfix["alpha"].requests == []
