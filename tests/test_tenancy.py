"""Cloud PBX: which tenant a call, a token or a lookup belongs to, and the config that says so.

In-process: tenancy.TenantMap and match_token, the [tenant.*]/[freeswitch.*]
config checks, the tracker tagging real captures copied for other tenants
(fsbridge.fakes.tenants), the endpoint choosing the tenant by its token, the
open-calls registry remembering tenant and node, and `fsbridge tenants`.
"""

from __future__ import annotations

import collections
import dataclasses
import sqlite3

import gevent
import pytest

from fsbridge import config, tenant_report
from fsbridge import service as service_mod
from fsbridge.config import ConfigError
from fsbridge.core.events import SUBSCRIBED_EVENTS, channel_event
from fsbridge.fakes.freeswitch import trace_events
from fsbridge.fakes.tenants import Tenant, interleave, make_tenants, uuid_map
from fsbridge.planfix import Credentials
from fsbridge.recordings.index import IndexEntry, RecordingIndex
from fsbridge.outbox import OutboxError
from fsbridge.service import Service, tenant_map
from fsbridge.state import SettingsStore
from fsbridge.core.tenancy import IMPLICIT_TENANT, TenantMap, TenantRules, match_token
from fsbridge.core.tracker import CallTracker, PlanfixCommand, TrackerSettings
from fsbridge.web import TenantWeb, WebDeps, WebSettings, create_app, health_body
from fsbridge.core.wire import parse_event_plain
from tests.conftest import REPO, TRACES

TOKEN_A = "acme-token-0123456789abcdef"
TOKEN_B = "beta-token-0123456789abcdef"


def write(tmp_path, text):
    path = tmp_path / "f.ini"
    path.write_text(f"[storage]\ndir = {tmp_path / 'state'}\n" + text)
    return str(path)


TWO_TENANTS = f"""
[tenant.acme]
token = {TOKEN_A}
domains = acme.pbx.example
dids = 74950000000
[tenant.beta]
token = {TOKEN_B}
domains = beta.pbx.example, beta2.pbx.example
dids = 74951111111
extension_pattern = ^2\\d\\d$
context = beta.pbx.example
"""


# -- TenantMap and tokens -----------------------------------------------------


def test_owner_prefers_our_tag_then_domain_then_did():
    tmap = TenantMap([TenantRules("acme", ("acme.pbx.example",), ("74950000000",)),
                      TenantRules("beta", ("beta.pbx.example",), ("74951111111",))])
    assert tmap.owner(tag="beta", domains=("acme.pbx.example",), did="74950000000").name == "beta"
    assert tmap.owner(domains=("", "ACME.pbx.example"), did="74951111111").name == "acme"
    assert tmap.owner(did="+7 (495) 111-11-11").name == "beta"
    nobody = tmap.owner(domains=("evil.example",), did="74959999999")
    assert nobody.name == "" and nobody.seen == "domain evil.example"
    assert tmap.owner(tag="nobody-tagged-this").name == ""  # a tag names only a configured tenant
    assert tmap.find(domain="beta.pbx.example", did="74950000000") == "beta"
    assert tmap.find(domain="", did="74950000000") == "acme"
    assert tmap.find(domain="unknown", did="") == ""


def test_single_tenant_owns_everything():
    tmap = TenantMap([], single=IMPLICIT_TENANT)
    assert tmap.owner(domains=("whatever",), did="1").name == IMPLICIT_TENANT
    assert tmap.owner().name == IMPLICIT_TENANT
    assert tmap.find(domain="x", did="") == IMPLICIT_TENANT


def test_match_token_finds_exactly_the_one_key():
    tokens = [("acme", TOKEN_A.encode()), ("beta", TOKEN_B.encode())]
    assert match_token(TOKEN_A, tokens) == "acme"
    assert match_token(TOKEN_B, tokens) == "beta"
    assert match_token(TOKEN_A[:-1], tokens) is None
    assert match_token(TOKEN_A + "x", tokens) is None
    assert match_token("", tokens) is None
    assert match_token("\udcff", tokens) is None  # undecodable input is compared, never crashes


# -- config ------------------------------------------------------------------


def test_two_tenants_load_with_their_own_and_inherited_settings(tmp_path):
    cfg = config.load(write(tmp_path, TWO_TENANTS + "[calls]\nreport_internal_calls = yes\n"))
    assert cfg.multi_tenant
    acme, beta = cfg.tenants
    assert acme.domains == ("acme.pbx.example",) and acme.dids == ("74950000000",)
    # A plain user/{ext} would ring FreeSWITCH's default domain: another tenant's phone.
    assert acme.click_to_call.dial_string == "user/{ext}@acme.pbx.example"
    assert acme.calls.report_internal_calls is True  # inherited from [calls]
    assert beta.calls.extension_pattern == r"^2\d\d$" and beta.click_to_call.context == "beta.pbx.example"
    assert acme.click_to_call.context == "default"
    assert [n.name for n in cfg.nodes] == [IMPLICIT_TENANT] and cfg.nodes[0].implicit


def test_without_tenants_one_implicit_tenant_from_server_token(tmp_path):
    cfg = config.load(write(tmp_path, "[server]\ntoken = 0123456789abcdef0123\n"))
    assert not cfg.multi_tenant
    (only,) = cfg.tenants
    assert only.implicit and only.name == IMPLICIT_TENANT and only.token == "0123456789abcdef0123"
    assert only.click_to_call.dial_string == "user/{ext}"


@pytest.mark.parametrize("text, expected", [
    (TWO_TENANTS.replace(TOKEN_B, TOKEN_A),
     "[tenant.beta] token: the same as [tenant.acme]'s"),
    (TWO_TENANTS.replace("beta2.pbx.example", "acme.pbx.example"),
     "[tenant.beta] domains: acme.pbx.example is also a domain of [tenant.acme]"),
    (TWO_TENANTS.replace("74951111111", "+74950000000"),
     "[tenant.beta] dids: +74950000000 is also a DID of [tenant.acme]"),
    (TWO_TENANTS + "[server]\ntoken = 0123456789abcdef0123\n",
     "[server] token: leave it empty when [tenant.*] sections exist"),
    (TWO_TENANTS.replace(f"token = {TOKEN_B}\n", ""), "[tenant.beta] token: must not be empty"),
    (TWO_TENANTS.replace(f"token = {TOKEN_B}", "token = short"), "[tenant.beta] token: must be at least 16"),
    (TWO_TENANTS + "node = nowhere\n", "[tenant.beta] node: no [freeswitch.nowhere] section"),
    (TWO_TENANTS + "planfix_url = https://beta.planfix.ru/x\n",
     "[tenant.beta] planfix_token: planfix_url and planfix_token must be set together"),
    (TWO_TENANTS + "colour = blue\n", "[tenant.beta] colour: unknown key"),
    (TWO_TENANTS + "[tenant.bad name]\ntoken = 0123456789abcdef0123\n", "[tenant.bad name]: the name after 'tenant.'"),
    (TWO_TENANTS.replace("domains = acme.pbx.example\ndids = 74950000000\n", ""),
     "[tenant.acme] domains: a tenant needs at least one domain or DID"),
    (TWO_TENANTS + "dial_string = user/{ext}@{domain}\n[tenant.gamma]\ntoken = gamma-token-0123456789ab\n"
     "dids = 74952222222\ndial_string = user/{ext}@{domain}\n",
     "[tenant.gamma] dial_string: uses {domain} but the tenant has no domains"),
    ("[server]\ntoken = 0123456789abcdef0123\n[click_to_call]\ndial_string = user/{ext}@{domain}\n",
     "[click_to_call] dial_string: {domain} is filled in per tenant"),
    (TWO_TENANTS + "[freeswitch.a]\nport = 8021\n[freeswitch.b]\nport = 8021\n",
     "[freeswitch.b] host: 127.0.0.1:8021 is also [freeswitch.a]"),
    (TWO_TENANTS + "[freeswitch.a]\nport = 0\n", "[freeswitch.a] port: must be between 1 and 65535"),
])
def test_tenant_and_node_problems_name_section_and_key(tmp_path, text, expected):
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text))
    assert expected in str(err.value)
    assert str(tmp_path / "f.ini") in str(err.value)


def test_every_clash_is_reported_at_once(tmp_path):
    text = TWO_TENANTS.replace(TOKEN_B, TOKEN_A).replace("beta2.pbx.example", "acme.pbx.example")
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text))
    assert len(err.value.problems) == 2


def test_nodes_take_plain_freeswitch_as_their_defaults(tmp_path):
    cfg = config.load(write(tmp_path, TWO_TENANTS + "node = b\n[freeswitch]\npassword = Secret1\n"
                            "[freeswitch.a]\nhost = 10.0.0.1\n[freeswitch.b]\nhost = 10.0.0.2\nport = 8022\n"))
    a, b = cfg.nodes
    assert (a.name, a.section.host, a.section.port, a.section.password) == ("a", "10.0.0.1", 8021, "Secret1")
    assert (b.name, b.section.host, b.section.port) == ("b", "10.0.0.2", 8022)
    assert cfg.tenant("beta").node == "b" and cfg.tenant("acme").node == ""


def test_sample_tenant_example_is_valid_and_names_every_tenant_key(tmp_path):
    sample = (REPO / "conf" / "fsbridge.ini").read_text()
    example = sample[sample.index(";[tenant.acme]"):sample.index(";[freeswitch.node1]")]
    for key in config.TENANT_KEYS:
        assert f";{key.name} =" in example, key.name
    uncommented = "\n".join(line[1:] for line in example.splitlines() if line.startswith(";") and "=" in line
                            or line.startswith(";["))
    cfg = config.load(write(tmp_path, uncommented))
    assert cfg.tenant("acme").dids == ("74950000000", "74951111111")


# -- the tracker on copies of real captures ----------------------------------


def events_for(tenant: Tenant, capture: str):
    frames = tenant.copy([e for e in trace_events(TRACES / f"{capture}.plain.txt") if e.name in SUBSCRIBED_EVENTS])
    return frames


def feed(tracker: CallTracker, frames) -> list[PlanfixCommand]:
    out = []
    for frame in frames:
        body = frame.split(b"\n\n", 1)[1]
        headers, event_body = parse_event_plain(body)
        event = channel_event(headers, event_body, tenants=True)
        if event is not None:
            out += tracker.feed(event)
    return out


def multi_tracker(tenants: list[Tenant], **rules) -> CallTracker:
    tmap = TenantMap([TenantRules(t.seed, (t.domain,), (t.did,), **rules) for t in tenants])
    return CallTracker(TrackerSettings(tenants=tmap))


@pytest.mark.parametrize("capture", ["01-inbound-single-answer", "02-inbound-ring-group", "05a-outbound-answer",
                                     "20-inbound-blind-transfer-uuid_transfer-101-to-102",
                                     "22-inbound-pickup-102-intercepts-101",
                                     "23-inbound-callcenter-queue-ring-all",
                                     "41-inbound-forward-noanswer-101-to-mobile",
                                     "44-inbound-fifo-members-ringall-102-answers",
                                     "47-inbound-group-pickup-app-103-picks-101-102"])
def test_each_tenant_gets_exactly_its_own_calls(capture):
    tenants = make_tenants(50)
    tracker = multi_tracker(tenants)
    commands = feed(tracker, interleave(*(events_for(t, capture) for t in tenants)))
    single = feed(CallTracker(), events_for(Tenant("127.0.0.1", "74950000000", "orig"), capture))
    by_tenant = collections.defaultdict(list)
    for command in commands:
        assert command.tenant, command  # every event has an owner
        by_tenant[command.tenant].append(command)
    assert set(by_tenant) == {t.seed for t in tenants}
    for tenant in tenants:
        mine = by_tenant[tenant.seed]
        assert [(c.fields["event"], c.fields["ext"], c.fields.get("status")) for c in mine] == \
               [(c.fields["event"], c.fields["ext"], c.fields.get("status")) for c in single]
        assert {c.call_id for c in mine} <= set(uuid_map(events_for_raw(capture), tenant.seed).values())
    assert tracker.open_calls() == 0


def events_for_raw(capture):
    return [e for e in trace_events(TRACES / f"{capture}.plain.txt") if e.name in SUBSCRIBED_EVENTS]


def test_a_call_of_an_unknown_domain_and_did_belongs_to_nobody_and_says_what_it_had():
    known, stranger = make_tenants(2)
    tracker = multi_tracker([known])
    commands = feed(tracker, events_for(stranger, "01-inbound-single-answer"))
    assert commands and all(c.tenant == "" for c in commands)
    assert commands[0].unmatched in (f"DID {stranger.did}", f"domain {stranger.domain}")


def test_a_did_alone_gives_the_tenant_and_its_extension_pattern_applies():
    (acme,) = make_tenants(1)
    # Only the DID is known (the domain is FreeSWITCH's default one, not the tenant's):
    tmap = TenantMap([TenantRules("acme", (), (acme.did,), extension_pattern=r"^1\d\d$")])
    commands = feed(CallTracker(TrackerSettings(tenants=tmap)), events_for(acme, "01-inbound-single-answer"))
    assert [c.fields["event"] for c in commands] == ["INCOMING", "ACCEPTED", "COMPLETED"]
    assert {c.tenant for c in commands} == {"acme"}
    # The same call for a tenant whose extensions are 2xx rings nobody it reports.
    tmap = TenantMap([TenantRules("acme", (), (acme.did,), extension_pattern=r"^2\d\d$")])
    assert feed(CallTracker(TrackerSettings(tenants=tmap)), events_for(acme, "01-inbound-single-answer")) == []


def test_tenant_map_of_a_config_normalises_dids(tmp_path):
    cfg = config.load(write(tmp_path, TWO_TENANTS))
    tmap = tenant_map(cfg, lambda n: "".join(ch for ch in n if ch.isdigit()).replace("8495", "7495", 1))
    assert tmap.find(did="84951111111") == "beta"
    assert tenant_map(config.load(write(tmp_path, "[server]\ntoken = 0123456789abcdef0123\n")), str).single


# -- the endpoint ------------------------------------------------------------


class Placed:
    """The originates the endpoint handed to FreeSWITCH, with the tenant that placed them."""

    def __init__(self):
        self.calls = []


def tenant_web(name, token, placed, store, domain):
    settings = WebSettings(pbx_token=token, call_policy=None)
    settings = dataclasses.replace(settings, originate=dataclasses.replace(
        settings.originate, dial_string=f"user/{{ext}}@{domain}", tenant=name))

    def route(ext):
        return None, lambda command, job: placed.calls.append((name, command)) or job

    deps = WebDeps(originate=lambda c, j: j, settings_store=store, route_call=route)
    return TenantWeb(name, settings, deps)


def test_the_token_selects_the_tenant_and_acts_on_its_extensions_only(tmp_path):
    placed = Placed()
    stores = {n: SettingsStore(tmp_path / f"{n}.json") for n in ("acme", "beta")}
    tenants = {"acme": tenant_web("acme", TOKEN_A, placed, stores["acme"], "acme.pbx.example"),
               "beta": tenant_web("beta", TOKEN_B, placed, stores["beta"], "beta.pbx.example")}
    app = create_app(WebSettings(pbx_token=TOKEN_A), WebDeps(originate=lambda c, j: j, settings_store=stores["acme"],
                                                             tenants=lambda: tenants))
    client = app.test_client()
    ok = client.post("/planfix", data={"cmd": "makeCall", "token": TOKEN_B, "from": "101", "to": "79101234567"})
    assert ok.status_code == 200, ok.json
    ((who, command),) = placed.calls
    assert who == "beta" and "}user/101@beta.pbx.example " in command and "fsbridge_tenant=beta" in command
    nobody = client.post("/planfix", data={"cmd": "makeCall", "token": "x" * 27, "from": "101", "to": "79101234567"})
    assert nobody.status_code == 401 and nobody.json == {"error": "Invalid token"}
    setup = client.post("/planfix", data={"cmd": "setup", "token": TOKEN_A, "planfix_url": "https://acme.planfix.ru/t",
                                          "planfix_token": "pf-acme"})
    assert setup.status_code == 200
    assert stores["acme"].load().url == "https://acme.planfix.ru/t"
    assert stores["beta"].load() is None  # another tenant's setup never touches it


# -- files written before tenants -------------------------------------------------


def old_database(path, *statements: str) -> None:
    """A SQLite file as an fsbridge from before tenants left it."""
    db = sqlite3.connect(path)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()


# -- fsbridge tenants ------------------------------------------------------------


def test_tenants_report_shows_setup_host_and_counts_never_tokens(tmp_path):
    cfg = config.load(write(tmp_path, TWO_TENANTS.replace(
        "dids = 74951111111\n", "dids = 74951111111\nplanfix_url = https://beta.planfix.ru/x\nplanfix_token = pfbeta\n")))
    (tmp_path / "state" / "tenants" / "acme").mkdir(parents=True)
    SettingsStore(tmp_path / "state" / "tenants" / "acme" / "planfix-settings.json").save(
        Credentials("https://acme.planfix.ru/hook", "pf-secret"))
    text, code = tenant_report.report(cfg)
    assert code == 0
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["TENANT", "PLANFIX", "HOST"]
    acme = next(line for line in lines if line.startswith("acme"))
    beta = next(line for line in lines if line.startswith("beta"))
    assert "acme.planfix.ru" in acme and "done" in acme and "never" in acme
    assert "beta.planfix.ru" in beta and "from the config" in beta
    assert "pf-secret" not in text and TOKEN_A not in text and "pfbeta" not in text


def test_health_shows_tenants_on_loopback_only_and_a_name_like_monkey_survives_the_scrub():
    detail = {"status": "ok", "outbox": {"depth": 3},
              "tenants": {"monkey": {"outbox": {"depth": 3}, "planfix_host": "m.planfix.ru", "token": "x"}},
              "nodes": {"default": {"state": "connected"}}}
    deps = WebDeps(originate=lambda c, j: j, settings_store=None, health=lambda: detail, credentials=lambda: None)
    loopback, code = health_body(deps, detailed=True)
    assert code == 200 and loopback["tenants"]["monkey"]["planfix_host"] == "m.planfix.ru"
    assert "token" not in loopback["tenants"]["monkey"]
    public, _ = health_body(deps, detailed=False)
    assert "tenants" not in public and "nodes" not in public and public["outbox"] == {"depth": 3}


def test_a_recordings_index_from_before_tenants_keeps_its_entries(tmp_path):
    path = tmp_path / "recordings.sqlite3"
    old_database(path, "CREATE TABLE recordings (call_id TEXT PRIMARY KEY, wav_name TEXT, mp3_name TEXT,"
                       " state TEXT NOT NULL, recorded_at REAL NOT NULL)",
                 "INSERT INTO recordings VALUES ('old', 'old.wav', NULL, 'converting', 1.0)")
    index = RecordingIndex(str(path))
    assert index.get("old") == IndexEntry("old", "old.wav", None, "converting", 1.0, "")
    index.put(IndexEntry("new", "new.wav", None, "ready", 2.0, "beta"))
    assert index.get("new").tenant == "beta"
    index.close()


def test_one_tenants_storage_failing_holds_only_its_commands(tmp_path, monkeypatch):
    """A tenant whose outbox cannot store (disk, a damaged file) keeps its commands in
    memory, in order, and gets them stored once it can; the others are stored at once."""
    cfg = config.load(write(tmp_path, TWO_TENANTS))
    service = Service(cfg)
    try:
        acme, beta = service.accounts["acme"].outbox, service.accounts["beta"].outbox
        broken = {"on": True}
        real_put = acme.put

        def put(commands):
            if broken["on"]:
                raise OutboxError("disk I/O error")
            real_put(commands)

        monkeypatch.setattr(acme, "put", put)

        def command(tenant, call_id, event):
            return PlanfixCommand(call_id, {"cmd": "event", "event": event, "ext": "101", "type": "in",
                                            "callid": call_id}, tenant=tenant)

        service._store([command("acme", "a1", "INCOMING"), command("beta", "b1", "INCOMING")])
        service._flush()
        assert [e.call_id for e in beta.list_entries()] == ["b1"]  # not held back by acme
        service._store([command("acme", "a1", "COMPLETED"), command("beta", "b1", "COMPLETED")])
        service._flush()
        assert len(beta.list_entries()) == 2
        assert acme.list_entries() == [] and service.health()["outbox"]["unsaved_in_memory"] == 2
        assert "disk I/O error" in service.health()["storage_error"]
        broken["on"] = False
        assert gevent.wait([service._retrying], timeout=5)
        assert [e.fields["event"] for e in acme.list_entries()] == ["INCOMING", "COMPLETED"]  # in order
        health = service.health()
        assert "unsaved_in_memory" not in health["outbox"] and health["storage_error"] is None
    finally:
        for account in service.accounts.values():
            account.stop(drain_timeout=0)
        service.recordings.close()


def test_a_burst_the_reader_never_yields_in_is_stored_every_max_batch_commands(tmp_path, monkeypatch):
    """Under a sustained burst the ESL reader does not yield, so the flusher it
    spawned does not run: the batch is stored in the reader itself once it holds
    MAX_BATCH commands (bounded memory), in order, and the rest when it yields."""
    monkeypatch.setattr(service_mod, "MAX_BATCH", 4)
    service = Service(config.load(write(tmp_path, TWO_TENANTS)))
    try:
        acme = service.accounts["acme"].outbox
        for n in range(10):  # one event's commands each, no yield in between
            service._store([PlanfixCommand(f"a{n}", {"cmd": "event", "event": "INCOMING", "ext": "101",
                                                     "type": "in", "callid": f"a{n}"}, tenant="acme")])
        assert [e.call_id for e in acme.list_entries()] == [f"a{n}" for n in range(8)]
        gevent.sleep(0)  # the reader yields: the spawned flusher stores the rest
        assert [e.call_id for e in acme.list_entries()] == [f"a{n}" for n in range(10)]
    finally:
        for account in service.accounts.values():
            account.stop(drain_timeout=0)
        service.recordings.close()
