"""Cloud PBX end to end: many PlanFix accounts (tenants) and two FreeSWITCH
nodes through the real `fsbridge run` process (issue 16).

Real captures are copied as each tenant's calls (``fsbridge.fakes.tenants``:
its domain, its DID, new UUIDs, every Content-Length fixed), interleaved on
one ESL connection per fake FreeSWITCH node ([freeswitch.a], [freeswitch.b]).
Each tenant has its own strict fake PlanFix (own token); what each receives
is compared with the single-tenant table of tests/test_tracker_traces.py
(EXPECTED) mapped to that tenant's callids and DID: exactly its own calls'
events, in order, nothing of anyone else's.

No recordings directory is configured: every COMPLETED says is_recorded=0.
Waits are bounded (generous timeouts); nothing here measures time.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from functools import lru_cache

import pytest
import requests

from fsbridge.core.events import SUBSCRIBED_EVENTS
from fsbridge.fakes.clicktocall import originate_variables
from fsbridge.fakes.freeswitch import FakeFreeSwitch, TraceEvent, read_trace, trace_events
from fsbridge.fakes.planfix import FakePlanfix
from fsbridge.fakes.tenants import Tenant, interleave, make_tenants, tenant_originate_answer, uuid_map
from tests.conftest import REPO, TRACES
from tests.service_proc import ServiceProcess, free_port
from tests.test_fake_tenants import commands_of
from tests.test_tracker_traces import CALLER, EXPECTED, MANAGER_UUID

CAPTURES = (
    "01-inbound-single-answer",
    "02-inbound-ring-group",
    "05a-outbound-answer",
    "20-inbound-blind-transfer-uuid_transfer-101-to-102",
    "22-inbound-pickup-102-intercepts-101",
    "23-inbound-callcenter-queue-ring-all",
)
CLICK_TO_CALL = "06a-click-to-call-answer"
LAB_DID = re.compile(r"7495000000[0-9]")
WAIT = 30.0  # seconds: generous, for a loaded 2-core machine
SETTLE = 0.5  # after the expected count arrived: time for anything extra to show up


# -- captures and what PlanFix must get from them ------------------------------------

@lru_cache(maxsize=None)
def subscribed(name: str) -> tuple[TraceEvent, ...]:
    """The capture's events a connection subscribed like the service receives."""
    return tuple(e for e in trace_events(TRACES / f"{name}.plain.txt") if e.name in SUBSCRIBED_EVENTS)


def on_node(tenant: Tenant, node: str) -> Tenant:
    """The same tenant's other calls (new UUIDs): its calls on another node."""
    return Tenant(tenant.domain, tenant.did, f"{tenant.seed}/{node}")


def expected(name: str, tenant: Tenant, callid: str | None = None) -> dict[str, list[dict]]:
    """callid -> the requests PlanFix gets for capture ``name`` as ``tenant``'s call:
    the single-tenant table with the tenant's UUIDs and DID (``callid``: our
    makeCall's call, for click-to-call)."""
    uuids = {MANAGER_UUID: callid} if callid else uuid_map(subscribed(name), tenant.seed)
    calls: dict[str, list[dict]] = {}
    for fields, _recording in EXPECTED[name]:
        mapped = {k: tenant.did if LAB_DID.fullmatch(v) else uuids.get(v, v) for k, v in fields.items()}
        if mapped["event"] == "COMPLETED":
            mapped["is_recorded"] = "0"  # no [recordings] dir in these tests
        calls.setdefault(mapped["callid"], []).append(mapped)
    return calls


def merged(*parts: dict[str, list[dict]]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for part in parts:
        assert not set(part) & set(out), "two calls share a callid"
        out.update(part)
    return out


def received(planfix: FakePlanfix) -> dict[str, list[dict]]:
    """callid -> the requests this fake PlanFix got, in arrival order (token checked, then left out)."""
    calls: dict[str, list[dict]] = {}
    for form in planfix.requests:
        form = dict(form)
        assert form.pop("planfix_token", None) == planfix.token, form
        calls.setdefault(form.get("callid", ""), []).append(form)
    return calls


def wait_received(service: ServiceProcess, wanted: list[tuple[FakePlanfix, dict[str, list[dict]] | int]],
                  timeout: float = WAIT) -> None:
    """Until every fake got at least as many requests as it should (the calls
    it should get, or a count), then a little longer."""
    deadline = time.monotonic() + timeout
    for planfix, calls in wanted:
        count = calls if isinstance(calls, int) else sum(map(len, calls.values()))
        while len(planfix.requests) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"PlanFix {planfix.url}: {len(planfix.requests)} of {count} requests "
                                     f"after {timeout}s\n--- log ---\n{service.log()[-4000:]}")
            time.sleep(0.02)
    time.sleep(SETTLE)


def wait_log(service: ServiceProcess, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in service.log():
        if time.monotonic() > deadline:
            raise AssertionError(f"never logged {text!r}:\n{service.log()[-4000:]}")
        time.sleep(0.05)
    return service.log()


def token_of(name: str) -> str:
    return f"pbx-{name}-" + hashlib.sha256(name.encode()).hexdigest()[:20]


def tenant_section(name: str, tenant: Tenant, planfix: FakePlanfix | str | None = None, **extra: str) -> dict:
    """A [tenant.NAME] section: its key, domain and DID; ``planfix``: a fake (its url and
    token in the config), a bare URL (nobody listening) or None (waits for setup)."""
    section = {"token": token_of(name), "domains": tenant.domain, "dids": tenant.did}
    if isinstance(planfix, FakePlanfix):
        section.update(planfix_url=planfix.url, planfix_token=planfix.token)
    elif planfix:
        section.update(planfix_url=planfix, planfix_token="f" * 32)
    section.update(extra)
    return section


def nobody_listening() -> str:
    return f"http://127.0.0.1:{free_port()}/tel/api"


def all_connected(health: dict) -> bool:
    return all(node["state"] == "connected" for node in health["nodes"].values())


def replay(node: FakeFreeSwitch, streams: list[list[bytes]]) -> None:
    """One connection, the calls' frames interleaved, all sent before returning."""
    assert node.replay(interleave(*streams)).wait(WAIT), "replay not sent in time"


# -- fixtures: every process and fake is stopped, pass or fail -------------------------

@pytest.fixture
def nodes():
    with FakeFreeSwitch() as a, FakeFreeSwitch() as b:
        yield {"a": a, "b": b}


@pytest.fixture
def planfix_fakes():
    started: list[FakePlanfix] = []

    def make(**kwargs) -> FakePlanfix:
        fake = FakePlanfix(**kwargs).start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop()


@pytest.fixture
def services(tmp_path):
    started: list[ServiceProcess] = []

    def start(nodes: dict[str, FakeFreeSwitch], tenants: dict[str, dict], **kwargs) -> ServiceProcess:
        service = ServiceProcess(
            tmp_path / f"service{len(started)}", nodes={name: fs.port for name, fs in nodes.items()},
            tenants=tenants,
            # freeswitch_dir that does not exist: no recordings dir is taken by default
            settings={"recordings": {"freeswitch_dir": str(tmp_path / "no-recordings")}}, **kwargs)
        started.append(service)
        service.start()
        service.wait_health(all_connected)
        return service

    yield start
    for service in started:
        service.__exit__(None, None, None)  # SIGTERM, SIGKILL if ignored; no-op when already stopped


# -- 1. two, then 50 tenants, interleaved, on two nodes ---------------------------------

@pytest.mark.parametrize("count", [2, 50])
def test_each_tenant_gets_exactly_its_own_calls(nodes, planfix_fakes, services, count):
    """Two tenants make every capture on both nodes; 50 tenants one capture on
    each node.  All calls of a node share its one connection, interleaved
    frame by frame; meanwhile each tenant places a click-to-call (makeCall
    with its token, answered with capture 06a as its call).  Each tenant's
    PlanFix gets its calls' events in the single-tenant order, and nothing
    else."""
    tenants = make_tenants(count)
    fakes = [planfix_fakes() for _ in tenants]
    names = [f"t{i}" for i in range(count)]
    service = services(nodes, {name: tenant_section(name, t, fake) for name, t, fake in zip(names, tenants, fakes)})
    raw = read_trace(TRACES / f"{CLICK_TO_CALL}.plain.txt")
    for fs in nodes.values():
        fs.on_command("bgapi originate", tenant_originate_answer(raw, tenants))
    want: dict[Tenant, dict[str, list[dict]]] = {t: {} for t in tenants}
    jobs = []
    for shift, (node, fs) in enumerate(nodes.items()):
        streams = []
        for i, tenant in enumerate(tenants):
            copy = on_node(tenant, node)
            for name in CAPTURES if count <= 2 else [CAPTURES[(i + 3 * shift) % len(CAPTURES)]]:
                streams.append(copy.copy(subscribed(name), core_uuid=fs.core_uuid))
                want[tenant] = merged(want[tenant], expected(name, copy))
        jobs.append(fs.replay(interleave(*streams)))
    for name, tenant in zip(names, tenants):
        answer = service.post(cmd="makeCall", token=token_of(name), **{"from": "101", "to": "+7 (910) 123-45-67"})
        assert answer.status_code == 200, answer.text
        # its contact lookup (the client's name for the manager's phone), then the call
        want[tenant] = merged(want[tenant], {"": [{"cmd": "contact", "phone": CALLER}]},
                              expected(CLICK_TO_CALL, tenant, callid=answer.json()["callid"]))
    assert all(job.wait(WAIT) for job in jobs)
    wait_received(service, [(fake, want[t]) for t, fake in zip(tenants, fakes)])
    for tenant, fake in zip(tenants, fakes):
        assert received(fake) == want[tenant], tenant
        fake.assert_no_violations()
    health = service.wait_health(lambda h: h["open_calls"] == 0)
    assert all(t["outbox"]["depth"] == 0 for t in health["tenants"].values())


# -- 2. setup stores one tenant's settings only, across restarts -------------------------

def until_bridge(frames: list[bytes]) -> list[bytes]:
    """A call's frames up to its first CHANNEL_BRIDGE: answered, still up."""
    bridge = next(i for i, f in enumerate(frames) if b"\nEvent-Name: CHANNEL_BRIDGE\n" in f)
    return frames[:bridge + 1]


def settings_file(service: ServiceProcess, name: str):
    return service.storage / "tenants" / name / "planfix-settings.json"


def test_setup_of_one_tenant_leaves_the_others_untouched_across_restarts(nodes, planfix_fakes, services):
    """setup with one tenant's key writes that tenant's file only (byte for
    byte the others stay as they were, before and after SIGTERM + start); a
    call up across the restart is closed for its own tenant, once."""
    acme, beta, gamma = make_tenants(3)
    pf = {name: planfix_fakes() for name in ("acme", "beta", "gamma")}
    service = services(nodes, {
        "acme": tenant_section("acme", acme),
        "beta": tenant_section("beta", beta),
        "gamma": tenant_section("gamma", gamma, pf["gamma"]),  # from the config, no setup
    })

    def setup(name: str, fake: FakePlanfix) -> None:
        answer = service.post(cmd="setup", token=token_of(name), planfix_url=fake.url, planfix_token=fake.token)
        assert answer.status_code == 200 and answer.json() == {"status": "ok"}, answer.text

    setup("beta", pf["beta"])
    beta_bytes = settings_file(service, "beta").read_bytes()
    assert not settings_file(service, "acme").exists() and not settings_file(service, "gamma").exists()
    setup("acme", pf["acme"])
    stored = json.loads(settings_file(service, "acme").read_text())
    assert (stored["planfix_url"], stored["planfix_token"]) == (pf["acme"].url, pf["acme"].token)
    assert settings_file(service, "beta").read_bytes() == beta_bytes
    assert not settings_file(service, "gamma").exists()
    assert not (service.storage / "planfix-settings.json").exists()  # no service-wide setup either

    def configured(health: dict) -> dict:
        return {name: (t["planfix_configured"], t["planfix_host"]) for name, t in health["tenants"].items()}

    assert configured(service.health()) == {name: (True, "127.0.0.1") for name in pf}

    # Beta's call on node b is up (answered) when the service stops; node b
    # says it ended meanwhile: the new process closes it, for beta only.
    open_call = on_node(beta, "b").copy(subscribed("01-inbound-single-answer"), core_uuid=nodes["b"].core_uuid)
    (open_id, open_events), = expected("01-inbound-single-answer", on_node(beta, "b")).items()
    replay(nodes["b"], [until_bridge(open_call)])
    wait_received(service, [(pf["beta"], 2)])
    service.wait_health(lambda h: h["tenants"]["beta"]["outbox"]["depth"] == 0)

    acme_bytes = settings_file(service, "acme").read_bytes()
    assert service.stop() == 0
    service.start()
    service.wait_health(all_connected)
    wait_received(service, [(pf["beta"], 3)])
    closed = received(pf["beta"])[open_id]
    assert len(closed) == 3, closed  # closed once, by its own node
    assert closed[:2] == open_events[:2]
    assert closed[2]["duration"].isdigit()
    assert dict(closed[2], duration="") == dict(open_events[2], duration="")  # 101 talked: Success
    assert service.health()["open_calls_from_before_restart"] == 0
    assert pf["acme"].requests == [] and pf["gamma"].requests == []
    for name in pf:
        pf[name].clear()
    assert settings_file(service, "acme").read_bytes() == acme_bytes
    assert settings_file(service, "beta").read_bytes() == beta_bytes
    assert not settings_file(service, "gamma").exists()
    assert configured(service.health()) == {name: (True, "127.0.0.1") for name in pf}

    # The stored setups are what the restarted service delivers with: each to its own PlanFix.
    tenants = {"acme": acme, "beta": beta, "gamma": gamma}
    replay(nodes["a"], [t.copy(subscribed("01-inbound-single-answer")) for t in tenants.values()])
    want = {name: expected("01-inbound-single-answer", t) for name, t in tenants.items()}
    wait_received(service, [(pf[name], want[name]) for name in pf])
    for name in pf:
        assert received(pf[name]) == want[name], name


# -- 3. a tenant's token acts on its own tenant only ---------------------------------------

def test_a_tenants_token_dials_only_its_own_extensions(nodes, planfix_fakes, services):
    """makeCall with a tenant's key rings user/<from>@<its domain>, tagged
    fsbridge_tenant=<it>, on the node where the phone is registered (or its
    configured node), and the call's events reach its PlanFix only; a key
    that is nobody's gets the spec's 401, and no key reaches another
    tenant's phones."""
    acme, beta = make_tenants(2)
    pf_acme, pf_beta = planfix_fakes(), planfix_fakes()
    service = services(nodes, {
        "acme": tenant_section("acme", acme, pf_acme),
        "beta": tenant_section("beta", beta, pf_beta, node="b"),  # its phones are on node b
    })
    raw = read_trace(TRACES / f"{CLICK_TO_CALL}.plain.txt")
    for fs in nodes.values():
        fs.on_command("bgapi originate", tenant_originate_answer(raw, [acme, beta]))
    # Acme's 101 is registered on node b only (node a answers as mod_sofia for a
    # user without a registration): its makeCall goes where the phone is.
    nodes["a"].set_api(f"sofia_contact 101@{acme.domain}", "error/user_not_registered")

    def make_call(token: str, ext: str = "101") -> requests.Response:
        return service.post(cmd="makeCall", token=token, **{"from": ext, "to": "+7 (910) 123-45-67"})

    def originates() -> dict[str, list[str]]:
        return {name: [c for c in fs.commands if c.startswith("bgapi originate")] for name, fs in nodes.items()}

    # Nobody's token: the spec's 401 and nothing dialled.
    for token in ("pbx-nobody-0123456789abcdef", token_of("acme") + "x", ""):
        answer = make_call(token)
        assert answer.status_code == 401 and answer.json() == {"error": "Invalid token"}, answer.text
    # Beta's token cannot name acme's domain: an extension is digits only.
    answer = make_call(token_of("beta"), ext=f"101@{acme.domain}")
    assert answer.status_code == 400 and answer.json()["error"] == "Invalid parameters", answer.text
    assert originates() == {"a": [], "b": []}

    calls = {}
    for name, tenant, node in (("acme", acme, "b"), ("beta", beta, "b")):
        answer = make_call(token_of(name))
        assert answer.status_code == 200, answer.text
        callid = answer.json()["callid"]
        command = nodes[node].wait_for_command("bgapi originate", timeout=10)
        variables = originate_variables(command)
        # The tenant's own phone (user/101@its domain), tagged with the tenant, our call's UUID.
        assert re.fullmatch(r"bgapi originate \{[^\s]*\}user/101@" + re.escape(tenant.domain)
                            + r" 79101234567 XML default\nJob-UUID: [0-9a-f-]{36}", command), command
        assert variables["fsbridge_tenant"] == name
        assert variables["origination_uuid"] == callid and variables["fsbridge_phone"] == CALLER
        calls[name] = callid
        asked = {n: f"api sofia_contact 101@{tenant.domain}" in fs.commands for n, fs in nodes.items()}
        # acme: both nodes asked; beta: only its configured node
        assert asked == ({"a": True, "b": True} if name == "acme" else {"a": False, "b": True}), asked
        for fs in nodes.values():
            fs.clear_commands()
    assert originates() == {"a": [], "b": []}  # each originate went to one node only

    # Each asked its own PlanFix for the client's name (caller ID on the manager's phone).
    name_lookup = {"": [{"cmd": "contact", "phone": CALLER}]}
    want_acme = merged(name_lookup, expected(CLICK_TO_CALL, acme, callid=calls["acme"]))
    want_beta = merged(name_lookup, expected(CLICK_TO_CALL, beta, callid=calls["beta"]))
    wait_received(service, [(pf_acme, want_acme), (pf_beta, want_beta)])
    assert received(pf_acme) == want_acme
    assert received(pf_beta) == want_beta
    pf_acme.assert_no_violations()
    pf_beta.assert_no_violations()


# -- 4. one tenant's PlanFix down for the whole run ------------------------------------------

def test_one_tenants_planfix_down_does_not_hold_up_the_others(nodes, planfix_fakes, services):
    """PlanFix not listening, answering 503, refusing the key (401) or never
    answering, for the whole run: the healthy tenants' events all arrive;
    the broken ones stay queued, each asked only for its own calls."""
    down, *broken_tenants = make_tenants(4)
    healthy = make_tenants(2, first=5)
    broken = {}
    for name, failure in (("error", 503), ("refused", 401), ("hanging", "hang")):
        broken[name] = planfix_fakes()
        broken[name].failure = failure
    fakes = [planfix_fakes() for _ in healthy]
    sections = {"down": tenant_section("down", down, nobody_listening())}
    sections.update({name: tenant_section(name, t, broken[name]) for name, t in zip(broken, broken_tenants)})
    sections.update({f"ok{i}": tenant_section(f"ok{i}", t, f) for i, (t, f) in enumerate(zip(healthy, fakes))})
    service = services(nodes, sections)
    everyone = {"down": down, **dict(zip(broken, broken_tenants)),
                **{f"ok{i}": t for i, t in enumerate(healthy)}}
    split = (("a", CAPTURES[:3]), ("b", CAPTURES[3:]))
    for node, names in split:
        replay(nodes[node], [on_node(t, node).copy(subscribed(n)) for t in everyone.values() for n in names])

    def want(tenant: Tenant) -> dict[str, list[dict]]:
        return merged(*(expected(n, on_node(tenant, node)) for node, names in split for n in names))

    wait_received(service, [(fake, want(t)) for t, fake in zip(healthy, fakes)])
    for tenant, fake in zip(healthy, fakes):
        assert received(fake) == want(tenant)
        fake.assert_no_violations()
    # The broken PlanFixes are asked only for their own calls, and those all stay queued.
    for name, fake in broken.items():
        assert fake.requests, name
        assert set(received(fake)) <= set(want(everyone[name])), name
        assert {r.outcome for r in fake.received} <= {"error", "hang", None}, name
    count = {name: sum(map(len, want(everyone[name]).values())) for name in ("down", *broken)}
    health = service.wait_health(lambda h: all(h["tenants"][n]["outbox"]["depth"] == c for n, c in count.items()))
    for name in count:
        assert health["tenants"][name]["outbox"]["kept_aside"] == 0
    for name in ("down", "error", "refused"):
        assert health["tenants"][name]["outbox"]["last_error"], health["tenants"][name]
    assert all(health["tenants"][f"ok{i}"]["outbox"]["depth"] == 0 for i in range(len(healthy)))
    # Per-tenant figures, never a key: neither the tenants' nor their PlanFix's.
    shown = json.dumps(health) + requests.get(service.metrics_url, timeout=5).text
    for name, section in sections.items():
        assert f'tenant="{name}"' in shown
        assert section["token"] not in shown and section["planfix_token"] not in shown


# -- 5. a call nobody owns goes nowhere ----------------------------------------------------

def test_a_call_from_an_unknown_domain_and_did_goes_nowhere(nodes, planfix_fakes, services):
    """Calls of a domain and DID no tenant owns, mixed with known tenants'
    calls: not one request of theirs reaches any PlanFix, each unknown
    DID / domain is logged once, every dropped request is counted; their
    dialplan lookup asks nobody (and a tenant's lookup only its own PlanFix,
    with its own cache)."""
    known = make_tenants(2)
    fakes = [planfix_fakes() for _ in known]
    service = services(nodes, {f"k{i}": tenant_section(f"k{i}", t, f) for i, (t, f) in enumerate(zip(known, fakes))})
    stranger = Tenant("stranger.pbx.test", "74990009999", "stranger")
    strangers = [on_node(stranger, str(i)) for i in range(2)]
    inbound, outbound = "01-inbound-single-answer", "05a-outbound-answer"
    # Two inbound calls to the unknown DID (routed into the unknown domain) and
    # one outbound from an unknown domain's phone, between the known tenants' calls.
    replay(nodes["a"], [known[0].copy(subscribed(inbound)), strangers[0].copy(subscribed(inbound)),
                        strangers[1].copy(subscribed(inbound)), known[1].copy(subscribed(inbound)),
                        strangers[0].copy(subscribed(outbound))])
    wanted = [(fake, expected(inbound, t)) for t, fake in zip(known, fakes)]
    wait_received(service, wanted)
    for fake, want in wanted:
        assert received(fake) == want  # the known calls only: no stranger's callid
    log = service.log()
    unrouted = [line for line in log.splitlines() if "belongs to no tenant" in line]
    # Once per unknown DID / domain (not per call, not per request).
    assert len(unrouted) == 2, unrouted
    assert sum(f"DID {stranger.did}" in line for line in unrouted) == 1, unrouted
    assert sum(f"domain {stranger.domain}" in line for line in unrouted) == 1, unrouted
    dropped = sum(len(EXPECTED[n]) for n in (inbound, inbound, outbound))
    metrics = requests.get(service.metrics_url, timeout=5).text
    assert re.search(rf"^fsbridge_unrouted_commands_total {dropped}\.0$", metrics, re.M), \
        [line for line in metrics.splitlines() if "unrouted" in line]
    assert service.health()["open_calls"] == 0

    # The dialplan lookup of such a call asks nobody's PlanFix; a tenant's, its own only.
    def lookup(domain: str, did: str) -> str:
        answer = requests.get(service.dialplan_url + "/dialplan/contact", timeout=10, params={
            "phone": "79160000077", "callid": "lookup-1", "domain": domain, "did": did})
        assert answer.status_code == 200, answer.text
        return answer.text

    for fake in fakes:
        fake.clear()
    assert lookup(stranger.domain, stranger.did).startswith("status=unknown;")
    assert lookup("", stranger.did).startswith("status=unknown;")
    assert lookup(known[1].domain, "").startswith("status=not_found;")
    assert lookup("", known[0].did).startswith("status=not_found;")
    assert [r["phone"] for r in fakes[0].requests] == ["79160000077"]
    assert [r["phone"] for r in fakes[1].requests] == ["79160000077"]


# -- 6. reload: a tenant added and another removed while calls are up ------------------------

def split_at_half(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    half = len(frames) // 2
    return frames[:half], frames[half:]


def delivered(planfix: FakePlanfix) -> list[dict]:
    """What this fake answered 200, token left out."""
    return [{k: v for k, v in form.items() if k != "planfix_token"} for form in planfix.delivered]


def test_reload_adds_and_removes_tenants_while_calls_are_up(nodes, planfix_fakes, services):
    """SIGHUP with one tenant removed and one added while calls are up (the
    removed tenant's PlanFix is down meanwhile), then the removed one added
    back: no restart, the unchanged tenant's call completes normally, the
    removed one's call in progress is still kept for its PlanFix to its end
    (no pop-up left open), the new tenant works at once, the returning one
    gets its whole call."""
    keep, gone, new = make_tenants(3)
    pf = {name: planfix_fakes() for name in ("keep", "gone", "new")}
    pf["gone"].failure = 503
    sections = {name: tenant_section(name, t, pf[name]) for name, t in (("keep", keep), ("gone", gone), ("new", new))}
    service = services(nodes, {name: sections[name] for name in ("keep", "gone")})
    pid = service.proc.pid
    ring_group, single = "02-inbound-ring-group", "01-inbound-single-answer"
    keep_first, keep_rest = split_at_half(keep.copy(subscribed(ring_group)))
    gone_first, gone_rest = split_at_half(gone.copy(subscribed(single)))
    # What the first halves give (the pure tracker says how many).
    keep_before, gone_before = len(commands_of(keep_first)), len(commands_of(gone_first))
    assert 0 < keep_before < len(EXPECTED[ring_group]) and 0 < gone_before < len(EXPECTED[single])
    replay(nodes["a"], [keep_first, gone_first])
    service.wait_health(lambda h: h["open_calls"] == 2 and h["tenants"]["gone"]["outbox"]["depth"] == gone_before)
    wait_received(service, [(pf["keep"], keep_before)])

    service.write_tenants({name: sections[name] for name in ("keep", "new")})
    service.reload()
    log = wait_log(service, "reload: tenants keep, new")
    assert "tenant gone removed: its calls in progress are still reported until they end" in log
    assert service.proc.poll() is None and service.proc.pid == pid  # no restart

    # The calls go on; the new tenant's call comes in on the other node.
    replay(nodes["a"], [keep_rest, gone_rest])
    replay(nodes["b"], [new.copy(subscribed(single))])
    want_keep, want_new = expected(ring_group, keep), expected(single, new)
    wait_received(service, [(pf["keep"], want_keep), (pf["new"], want_new)])
    assert received(pf["keep"]) == want_keep  # completed normally across the reload
    assert received(pf["new"]) == want_new
    # The removed tenant's call was kept for its own PlanFix to its end (never the others'),
    # then the tenant stopped delivering.
    gone_all = len(EXPECTED[single])
    wait_log(service, f"tenant gone removed: no call of it is up any more; {gone_all} of its PlanFix requests stay")
    assert "tenant gone (no longer configured)" not in service.log()
    assert service.wait_health(lambda h: h["open_calls"] == 0)["tenants"].keys() == {"keep", "new"}

    # The endpoint follows: the new tenant's key works, the removed one's is nobody's.
    answer = service.post(cmd="setup", token=token_of("new"), planfix_url=pf["new"].url,
                          planfix_token=pf["new"].token)
    assert answer.status_code == 200, answer.text
    answer = service.post(cmd="setup", token=token_of("gone"), planfix_url=pf["gone"].url,
                          planfix_token=pf["gone"].token)
    assert answer.status_code == 401 and answer.json() == {"error": "Invalid token"}, answer.text
    for name, status in (("gone", 401), ("new", 200)):
        answer = service.post(cmd="makeCall", token=token_of(name), **{"from": "101", "to": "79101234567"})
        assert answer.status_code == status, answer.text
    command = nodes["a"].wait_for_command("bgapi originate", timeout=10)
    assert f"}}user/101@{new.domain} " in command and originate_variables(command)["fsbridge_tenant"] == "new"

    # Back again, its PlanFix up: its whole call, held meanwhile.
    assert delivered(pf["gone"]) == []
    pf["gone"].failure = None
    service.write_tenants(sections)
    service.reload()
    wait_log(service, "reload: tenants gone, keep, new")
    service.wait_health(lambda h: h["tenants"]["gone"]["outbox"]["depth"] == 0)
    time.sleep(SETTLE)
    (gone_call, gone_events), = expected(single, gone).items()
    assert delivered(pf["gone"]) == gone_events
    assert service.proc.pid == pid


# -- 7. fsbridge tenants ---------------------------------------------------------------------

def test_tenants_command_lists_setup_pending_and_kept_aside(nodes, planfix_fakes, services):
    """done: set up by PlanFix, delivered; config: PlanFix from the config, not
    listening; aside: PlanFix refuses its requests (400); waiting: no setup
    yet, its calls stored meanwhile; idle: nothing happened yet."""
    done, config, aside, waiting, idle = make_tenants(5)
    pf_done, pf_aside = planfix_fakes(), planfix_fakes()
    pf_aside.failure = 400  # PlanFix refuses them: kept aside at once
    down_url = nobody_listening()
    service = services(nodes, {
        "done": tenant_section("done", done),
        "config": tenant_section("config", config, down_url),
        "aside": tenant_section("aside", aside, pf_aside),
        "waiting": tenant_section("waiting", waiting),
        "idle": tenant_section("idle", idle),
    })
    answer = service.post(cmd="setup", token=token_of("done"), planfix_url=pf_done.url, planfix_token=pf_done.token)
    assert answer.status_code == 200, answer.text
    call = "01-inbound-single-answer"
    per_call = len(EXPECTED[call])
    replay(nodes["a"], [t.copy(subscribed(call)) for t in (done, config, aside, waiting)])
    wait_received(service, [(pf_done, expected(call, done)), (pf_aside, expected(call, aside))])
    service.wait_health(lambda h: [h["tenants"][n]["outbox"]["depth"] for n in ("done", "config", "aside", "waiting")]
                        == [0, per_call, 0, per_call] and h["tenants"]["aside"]["outbox"]["kept_aside"] == per_call)

    # Read while the service runs (SQLite lets both), as an operator would.
    result = subprocess.run([sys.executable, "-m", "fsbridge", "tenants", "-c", str(service.config_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert re.split(r"\s{2,}", header) == ["TENANT", "PLANFIX HOST", "SETUP", "LAST DELIVERY", "PENDING",
                                           "KEPT ASIDE", "DOMAINS / DIDS"]
    rows = {row[0]: row for row in (re.split(r"\s{2,}", line) for line in lines)}
    assert set(rows) == {"done", "config", "aside", "waiting", "idle"}, result.stdout
    assert rows["done"][1:3] == ["127.0.0.1", "done"] and re.fullmatch(r"\d+s ago", rows["done"][3])
    assert rows["done"][4:6] == ["0", "0"]
    assert rows["config"][1:6] == ["127.0.0.1", "from the config", "never", str(per_call), "0"]
    assert rows["aside"][1:6] == ["127.0.0.1", "from the config", "never", "0", str(per_call)]
    assert rows["waiting"][1:6] == ["-", "waiting for PlanFix's setup", "never", str(per_call), "0"]
    assert rows["idle"][1:6] == ["-", "waiting for PlanFix's setup", "never", "0", "0"]
    for name, tenant in (("done", done), ("config", config), ("aside", aside), ("waiting", waiting), ("idle", idle)):
        assert rows[name][6] == f"{tenant.domain} {tenant.did}"
    for secret in (token_of("done"), pf_done.token, pf_aside.token, "f" * 32):
        assert secret not in result.stdout
    # The metrics say the same per tenant.
    metrics = requests.get(service.metrics_url, timeout=5).text
    for name, configured in (("done", 1), ("config", 1), ("aside", 1), ("waiting", 0), ("idle", 0)):
        assert f'fsbridge_tenant_planfix_configured{{tenant="{name}"}} {configured}.0' in metrics
    for name, pending in (("done", 0), ("config", per_call), ("aside", 0), ("waiting", per_call), ("idle", 0)):
        assert f'fsbridge_outbox_depth{{tenant="{name}"}} {pending}.0' in metrics


# -- a DID two tenants claim, in two spellings ------------------------------------------------

def test_a_did_claimed_by_two_tenants_in_different_spellings_is_refused(nodes, planfix_fakes, tmp_path):
    """74990000001 and 84990000001 (the same Moscow number, trunk prefix 8) are
    one DID to the call routing: two tenants cannot both own it, or one
    tenant's inbound calls would go to the other's PlanFix."""
    first, second = make_tenants(2)
    service = ServiceProcess(tmp_path, nodes={name: fs.port for name, fs in nodes.items()}, tenants={
        "first": tenant_section("first", first, planfix_fakes(), dids="74990000001"),
        "second": tenant_section("second", second, planfix_fakes(), dids="84990000001"),
    })
    try:
        with pytest.raises(RuntimeError, match=r"service exited with 2:[\s\S]*\[tenant.second\] dids: "
                                               r"84990000001 is also a DID of \[tenant.first\]"):
            service.start()
    finally:
        service.__exit__(None, None, None)  # had it started, it must not outlive the test


# -- 8. one node down: the other goes on, the down one reconciles on its own -----------------

def test_a_node_going_down_leaves_the_other_nodes_calls_alone(nodes, planfix_fakes, services):
    """Node a restarts while a call of acme's is up on it and one of beta's on node b:
    beta's call is reported whole meanwhile; node a reconnects and closes acme's
    call, which ended while it was away, from its own listing (exactly one COMPLETED
    per extension shown); no event crosses tenants or nodes."""
    acme, beta = make_tenants(2)
    pf = {"acme": planfix_fakes(), "beta": planfix_fakes()}
    service = services(nodes, {"acme": tenant_section("acme", acme, pf["acme"], node="a"),
                               "beta": tenant_section("beta", beta, pf["beta"], node="b")})
    group = "02-inbound-ring-group"
    acme_first, _acme_rest = split_at_half(acme.copy(subscribed(group)))
    beta_first, beta_rest = split_at_half(beta.copy(subscribed(group)))
    replay(nodes["a"], [acme_first])
    replay(nodes["b"], [beta_first])
    shown = len([f for f, _path in commands_of(acme_first) if f["event"] == "INCOMING"])
    assert shown and service.wait_health(lambda h: h["open_calls"] == 2)
    connections = service.health()["nodes"]["a"]["connections"]

    nodes["a"].restart(down_for=1.0)  # acme's call ends while node a is away (its listing: idle)
    service.wait_health(lambda h: h["nodes"]["a"]["state"] != "connected" and h["nodes"]["b"]["state"] == "connected")
    replay(nodes["b"], [beta_rest])  # beta's call goes on on its own node meanwhile
    service.wait_health(lambda h: all_connected(h) and h["nodes"]["a"]["connections"] > connections, timeout=WAIT)
    service.wait_health(lambda h: h["open_calls"] == 0, timeout=WAIT)
    wait_received(service, [(pf["beta"], expected(group, beta))])
    assert received(pf["beta"]) == expected(group, beta)
    ((callid, acme_requests),) = received(pf["acme"]).items()
    assert callid == next(iter(expected(group, acme)))
    incoming = sorted(r["ext"] for r in acme_requests if r["event"] == "INCOMING")
    completed = sorted(r["ext"] for r in acme_requests if r["event"] == "COMPLETED")
    assert len(incoming) == shown and completed == incoming  # closed by node a's reconcile, once each
    assert "reconcile: 1 calls ended while fsbridge could not see them" in service.log()
