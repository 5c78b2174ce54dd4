"""dialplan/*.xml against the service: parse, agree on every URL, port, variable and format.

A change on one side (the lookup's path, port, answer format, the phone
normalisation, a variable name) must break a test here, not a live PBX.  The
inbound route is checked end to end: the URL the dialplan builds is sent to the
real lookup app, and its answer is run through the dialplan's own conditions by
a small simulation of FreeSWITCH's XML hunt (pre-processor variables, inline
`set`, `continue="true"`, regex captures).

Defaults come from fsbridge.lookup and are tied to fsbridge.config's schema
(the values an admin gets without touching the config).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import pytest

from fsbridge import config, install_dialplan
from fsbridge.install_dialplan import TenantRoute
from fsbridge.lookup import (
    ANSWER_REGEX,
    CONTACT_PATH,
    DEFAULT_LISTEN,
    ContactLookup,
    LookupSettings,
    create_lookup_app,
)
from fsbridge.core.phone import dial_number
from fsbridge.core.tenancy import TenantMap, TenantRules

DIALPLAN = pathlib.Path(__file__).resolve().parent.parent / "dialplan"
VARS_FILE = DIALPLAN / "fsbridge-vars.xml"
INBOUND = DIALPLAN / "fsbridge-inbound.xml"
OUTBOUND = DIALPLAN / "fsbridge-outbound.xml"
RECORD_SNIPPET = "fsbridge-record.xml"  # written with the recordings (issue 6)
INCLUDE_DIR = "fsbridge"  # where the README tells admins to copy dialplan/ under conf_dir
# Includes must be absolute: FreeSWITCH resolves a relative one from the
# including file's directory and silently includes nothing.
INCLUDE_PREFIX = f"$${{conf_dir}}/{INCLUDE_DIR}/"
# FreeSWITCH's own pre-processor variables (vars.xml) the files may use.
STOCK_GLOBALS = {"domain": "pbx.example", "conf_dir": "/etc/freeswitch", "recordings_dir": "/var/lib/freeswitch/recordings"}
OUR_FILES = sorted(p for p in DIALPLAN.glob("*.xml") if not p.name.startswith("fsbridge-record"))
SCHEMA = config.defaults()


def _preprocess_vars() -> dict[str, str]:
    values = {}
    for element in ET.parse(VARS_FILE).getroot():
        assert element.tag == "X-PRE-PROCESS" and element.get("cmd") == "set", ET.tostring(element)
        name, _, value = element.get("data", "").partition("=")
        assert name and value, element.get("data")
        # FreeSWITCH expands $${...} in a set line as it reads it (vars.xml sets domain first).
        values[name] = re.sub(r"\$\$\{(\w+)\}", lambda m: STOCK_GLOBALS[m.group(1)], value)
    return values


VARS = _preprocess_vars()


def _uses(text: str) -> set[str]:
    return set(re.findall(r"\$\$\{(\w+)\}", text))


def _without_comments(text: str) -> str:
    return re.sub(r"<!--.*?-->", "", text, flags=re.S)


def _preprocess(text: str, variables: dict[str, str], files: dict[str, str]) -> list[str]:
    """The lines FreeSWITCH's pre-processor makes of ``text``: read in order,
    ``$${...}`` expanded with what was set so far, ``set`` and ``include`` run
    where they stand (so one file included twice gets the values set before
    each include, as a tenants file does)."""
    out: list[str] = []
    for line in text.splitlines():
        line = re.sub(r"\$\$\{(\w+)\}", lambda m: variables[m.group(1)], line)
        directive = re.search(r'<X-PRE-PROCESS cmd="(\w+)" data="([^"]*)"/>', line)
        if directive is None:
            out.append(line)
        elif directive.group(1) == "set":
            name, _, value = directive.group(2).partition("=")
            variables[name] = value
        else:
            assert directive.group(1) == "include"
            prefix = f"{STOCK_GLOBALS['conf_dir']}/{INCLUDE_DIR}/"
            assert directive.group(2).startswith(prefix), directive.group(2)
            name = directive.group(2).removeprefix(prefix)
            included = files[name] if name in files else (DIALPLAN / name).read_text(encoding="utf-8")
            out += _preprocess(included, variables, files)
    return out


def _flatten(element: ET.Element) -> None:
    # FreeSWITCH drops the <include> wrapper of an included file: its extensions join the context.
    for index, child in reversed(list(enumerate(element))):
        _flatten(child)
        if child.tag == "include":
            element.remove(child)
            for offset, grandchild in enumerate(child):
                element.insert(index + offset, grandchild)


def _loaded(path: pathlib.Path, files: dict[str, str] | None = None, text: str | None = None) -> ET.Element:
    """The file (or ``text``) as FreeSWITCH sees it after vars.xml and fsbridge-vars.xml:
    pre-processed, includes inlined (``files``: generated files by name)."""
    lines = _preprocess(path.read_text(encoding="utf-8") if text is None else text,
                        {**STOCK_GLOBALS, **VARS}, files or {})
    root = ET.fromstring("\n".join(lines))
    _flatten(root)
    return root


# ---- every file ---------------------------------------------------------


@pytest.mark.parametrize("path", OUR_FILES, ids=lambda p: p.name)
def test_file_parses_and_starts_with_its_documentation(path):
    text = path.read_text(encoding="utf-8")
    root = ET.fromstring(text)
    assert root.tag == "include"
    assert text.startswith("<!--"), "each file starts with a comment"
    head = text[: text.index("-->")]
    assert path.name in head
    for topic in ("What it does", "Where to include it", "Variables to set"):
        assert topic in head, f"{path.name}: the opening comment must say {topic!r}"
    # Pre-processor includes name files under $${conf_dir}/fsbridge/, as documented.
    for element in root.iter("X-PRE-PROCESS"):
        if element.get("cmd") == "include":
            assert element.get("data").startswith(INCLUDE_PREFIX)


@pytest.mark.parametrize("path", sorted(DIALPLAN.glob("*.xml")), ids=lambda p: p.name)
def test_no_directive_inside_a_comment(path):
    # FreeSWITCH's pre-processor scans raw lines: an X-PRE-PROCESS tag inside
    # <!-- --> still runs (a self-include there stopped FreeSWITCH from starting).
    comments = re.findall(r"<!--.*?-->", path.read_text(encoding="utf-8"), flags=re.S)
    assert comments
    for comment in comments:
        assert "<X-PRE-PROCESS" not in comment.upper()


def test_preprocessor_values_hold_no_channel_variables():
    # In X-PRE-PROCESS set values FreeSWITCH turns "${" into "%{": only $${...}
    # (expanded at load) may appear there.
    for name, value in VARS.items():
        assert not re.search(r"(?<!\$)\$\{", value), f"{name}={value}"


def test_every_variable_is_defined_in_the_one_vars_file_and_used():
    used = set()
    for path in (INBOUND, OUTBOUND):
        names = _uses(_without_comments(path.read_text(encoding="utf-8")))
        undefined = names - VARS.keys() - STOCK_GLOBALS.keys()
        assert not undefined, f"{path.name} uses $${{}} not set in {VARS_FILE.name}: {undefined}"
        used |= names
    # The values themselves may reference others (none today), count those too.
    assert set(VARS) <= used, f"set but never used: {set(VARS) - used}"


# ---- the lookup URL, port and timeouts ----------------------------------


def test_defaults_agree_with_the_config_schema():
    section = SCHEMA["dialplan"]
    assert DEFAULT_LISTEN == section["listen"]
    defaults = LookupSettings()
    assert defaults.deadline == float(section["deadline"])
    assert defaults.cache_ttl == float(section["cache_ttl"])
    assert defaults.cache_ttl_not_found == float(section["cache_ttl_not_found"])
    assert defaults.cache_ttl_failure == float(section["cache_ttl_failure"])
    assert defaults.cache_size == int(section["cache_size"])
    assert defaults.max_concurrent_fetches == int(section["max_concurrent_lookups"])
    assert defaults.region == SCHEMA["phone"]["default_region"]
    assert defaults.phone_format == SCHEMA["phone"]["format"]
    assert defaults.extension_pattern == SCHEMA["calls"]["extension_pattern"]


def test_lookup_url_points_at_the_lookup_listener():
    url = urllib.parse.urlsplit(VARS["fsbridge_lookup_url"])
    assert url.scheme == "http"
    assert url.netloc == DEFAULT_LISTEN  # loopback: never the public listener
    assert url.netloc != SCHEMA["server"]["listen"]
    assert url.path == CONTACT_PATH
    assert not url.query and not url.fragment


def test_curl_timeouts_are_set_and_outlast_the_deadline():
    connect, total = int(VARS["fsbridge_lookup_connect_timeout"]), int(VARS["fsbridge_lookup_timeout"])
    assert 1 <= connect <= total
    # fsbridge answers by its deadline; curl must not give up before that answer.
    assert total > LookupSettings().deadline
    actions = _actions(_loaded(INBOUND))
    assert ("set", f"curl_connect_timeout={connect}") in actions
    assert ("set", f"curl_timeout={total}") in actions
    call = _curl_call(_loaded(INBOUND))
    assert (call.connect_timeout, call.timeout) == (connect, total)


@dataclass
class CurlCall:
    variable: str
    url: str
    connect_timeout: int
    timeout: int


def _curl_call(root: ET.Element) -> CurlCall:
    calls = []
    for extension in root.iter("extension"):
        for action in extension.iter("action"):
            match = re.fullmatch(
                r"(\w+)=\$\{curl\((\S+) connect-timeout (\d+) timeout (\d+)\)\}", action.get("data", "")
            )
            if match:
                assert action.get("application") == "set" and action.get("inline") == "true"
                assert extension.get("continue") == "true"
                calls.append(CurlCall(match.group(1), match.group(2), int(match.group(3)), int(match.group(4))))
    assert len(calls) == 1, calls
    return calls[0]


def test_lookup_query_passes_every_value_through_url_encode():
    url = _curl_call(_loaded(INBOUND)).url
    base, _, query = url.partition("?")
    assert base == VARS["fsbridge_lookup_url"]
    params = dict(pair.split("=", 1) for pair in query.split("&"))
    # domain and did: which tenant's PlanFix a multi-tenant fsbridge asks (lookup.py's select)
    assert set(params) == {"phone", "callid", "domain", "did"}
    for value in params.values():
        assert re.fullmatch(r"\$\{url_encode\(\$\{\w+\}\)\}", value), value


# ---- a small simulation of FreeSWITCH's XML dialplan hunt ---------------


def _actions(root: ET.Element) -> list[tuple[str, str]]:
    return [(a.get("application"), a.get("data")) for a in root.iter("action")]


def _expand(text: str, variables: dict[str, str]) -> str:
    """${url_encode(${v})} and ${v}, the only expansions these files use at hunt time."""
    text = re.sub(
        r"\$\{url_encode\(\$\{(\w+)\}\)\}",
        lambda m: urllib.parse.quote(variables.get(m.group(1), ""), safe=""),
        text,
    )
    return re.sub(r"\$\{(\w+)\}", lambda m: variables.get(m.group(1), ""), text)


def _captures(template: str, match: re.Match) -> str:
    return re.sub(r"\$(\d)", lambda m: match.group(int(m.group(1))) or "", template)


def _test(element: ET.Element, variables: dict[str, str]) -> re.Match | None:
    field = element.get("field")
    value = _expand(field, variables) if field.startswith("${") else variables.get(field, "")
    return re.search(element.get("expression"), value)


def hunt(root: ET.Element, variables: dict[str, str], curl) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Run the hunt over `root`'s extensions: (channel variables, queued actions)."""
    variables = dict(variables)
    queued: list[tuple[str, str]] = []
    for extension in root.findall("extension"):
        match = None
        for condition in extension.findall("condition"):
            if condition.get("regex") == "any":  # one of its <regex field= expression=/> children
                match = next(filter(None, (_test(r, variables) for r in condition.findall("regex"))), None)
            else:
                assert condition.get("regex") is None
                match = _test(condition, variables)
            if not match:
                break
        if not match:
            continue
        for action in condition.findall("action"):
            data = _captures(action.get("data"), match)
            if action.get("inline") == "true":
                assert action.get("application") == "set"
                name, _, value = data.partition("=")
                curl_call = re.fullmatch(r"\$\{curl\((\S+) .*\)\}", value)
                variables[name] = curl(_expand(curl_call.group(1), variables)) if curl_call else _expand(value, variables)
            else:
                queued.append((action.get("application"), data))
        if extension.get("continue") != "true":
            break
    return variables, queued


@dataclass
class Contact:
    name: str
    responsible: str | None


def _lookup_app(contact: Contact | None = None, fail: bool = False):
    def fetch(phone, callid, timeout):
        assert phone == "79101234567" and callid == CALL_UUID
        if fail:
            raise ConnectionError("PlanFix down")
        return contact

    settings = LookupSettings()
    return create_lookup_app(settings, lookup=ContactLookup(settings, fetch)).test_client()


CALL_UUID = "e84e4329-8051-40a2-9c6c-a3d6cf741ee9"
CALL = {"destination_number": VARS["fsbridge_did"], "caller_id_number": "+79101234567", "uuid": CALL_UUID}


def _inbound_call(app, caller: dict[str, str] = CALL):
    asked = []

    def curl(url: str) -> str:
        asked.append(url)
        parts = urllib.parse.urlsplit(url)
        assert f"{parts.scheme}://{parts.netloc}{parts.path}" == VARS["fsbridge_lookup_url"]
        return app.get(f"{parts.path}?{parts.query}").get_data(as_text=True)

    variables, queued = hunt(_loaded(INBOUND), caller, curl)
    assert len(asked) == 1
    bridges = [data for application, data in queued if application == "bridge"]
    assert len(bridges) == 1, queued
    return variables, queued, bridges[0]


def test_inbound_known_client_with_responsible_rings_the_manager_first():
    variables, queued, bridge = _inbound_call(_lookup_app(Contact("Иванов Иван", "103")))
    assert variables["effective_caller_id_name"] == "Иванов Иван"
    assert bridge == f"[leg_timeout={VARS['fsbridge_responsible_ring']}]user/103@{STOCK_GLOBALS['domain']}|{VARS['fsbridge_fallback']}"
    # a REFER from the manager's phone is routed among the phones, not in "public"
    assert ("set", "force_transfer_context=default") in queued
    assert variables["domain_name"] == STOCK_GLOBALS["domain"]
    assert ("set", "hangup_after_bridge=true") in queued and ("set", "ignore_early_media=true") in queued
    assert queued[-1][0] == "bridge"


def test_inbound_known_client_without_responsible_rings_the_fallback():
    variables, _, bridge = _inbound_call(_lookup_app(Contact("ООО Ромашка", None)))
    assert variables["effective_caller_id_name"] == "ООО Ромашка"
    assert bridge == VARS["fsbridge_fallback"]


@pytest.mark.parametrize("app", [_lookup_app(None), _lookup_app(fail=True)], ids=["not-found", "planfix-down"])
def test_inbound_unknown_client_keeps_the_carrier_name_and_rings_the_fallback(app):
    variables, _, bridge = _inbound_call(app)
    assert "effective_caller_id_name" not in variables
    assert bridge == VARS["fsbridge_fallback"]


@pytest.mark.parametrize("answer", ["", "-ERR timeout", "error=phone is not a phone number", "<html>502</html>"])
def test_inbound_when_the_lookup_itself_fails_rings_the_fallback(answer):
    variables, _ = hunt(_loaded(INBOUND), CALL, lambda url: answer)
    assert "effective_caller_id_name" not in variables
    assert "fsbridge_responsible" not in variables


def test_inbound_anonymous_caller_is_a_400_and_still_routed():
    variables, _, bridge = _inbound_call(_lookup_app(), {**CALL, "caller_id_number": "anonymous"})
    assert variables["fsbridge_lookup"].startswith("error=")
    assert bridge == VARS["fsbridge_fallback"]


def test_inbound_other_numbers_are_left_alone():
    variables, queued = hunt(_loaded(INBOUND), {**CALL, "destination_number": "74951111111"}, lambda url: pytest.fail("looked up"))
    # No lookup, no route: only the shared recording extension (its own rule) applies.
    assert "fsbridge_lookup" not in variables
    assert [application for application, _ in queued if application != "set"] == ["record_session"]


def test_dialplan_conditions_accept_exactly_the_lookup_answer_format():
    expressions = [c.get("expression") for c in _loaded(INBOUND).iter("condition") if c.get("field") == "${fsbridge_lookup}"]
    assert expressions
    for answer in ("status=found;name=Иванов Иван;responsible=103", "status=found;name=Ivan;responsible="):
        assert re.fullmatch(ANSWER_REGEX, answer)
        assert any(re.search(e, answer) for e in expressions)
    for answer in ("status=not_found;name=;responsible=", "status=unknown;name=;responsible=", "status=internal;name=;responsible="):
        assert re.fullmatch(ANSWER_REGEX, answer)
        assert not any(re.search(e, answer) for e in expressions)


# ---- outbound and click-to-call ------------------------------------------


def _outbound_extension() -> ET.Element:
    (extension,) = _loaded(OUTBOUND).findall("extension")
    return extension


@pytest.mark.parametrize("keep_plus", [False, True])
@pytest.mark.parametrize("typed", ["+7 (910) 123-45-67", "8 910 123 45 67", "79101234567"])
def test_click_to_call_numbers_reach_the_outbound_route(typed, keep_plus):
    # makeCall's `to` as the service normalises it with the default config.
    target = dial_number(
        typed,
        region=SCHEMA["phone"]["default_region"],
        keep_plus=keep_plus,
        extension_pattern=SCHEMA["calls"]["extension_pattern"],
    )
    variables, queued = hunt(_loaded(OUTBOUND), {"destination_number": target}, lambda url: pytest.fail("curl"))
    assert ("bridge", f"sofia/gateway/{VARS['fsbridge_gateway']}/79101234567") in queued
    assert ("set", f"effective_caller_id_number={VARS['fsbridge_did']}") in queued
    assert ("set", f"call_timeout={VARS['fsbridge_outbound_ring']}") in queued


def test_outbound_route_is_documented_for_the_click_to_call_context():
    assert SCHEMA["click_to_call"]["context"] == "default"
    assert '<context name="default">' in OUTBOUND.read_text(encoding="utf-8")


@pytest.mark.parametrize("destination", ["101", "112", "+44 20 7946 0958", "7910123456"])
def test_outbound_route_ignores_other_destinations(destination):
    _, queued = hunt(_loaded(OUTBOUND), {"destination_number": destination}, lambda url: pytest.fail("curl"))
    assert "bridge" not in [application for application, _ in queued]


# ---- recording snippet and analytics variables ---------------------------


@pytest.mark.parametrize("path", [INBOUND, OUTBOUND], ids=lambda p: p.name)
def test_routes_include_the_shared_recording_extension_before_bridging(path):
    root = ET.parse(path).getroot()
    includes = [i for i, e in enumerate(root) if e.tag == "X-PRE-PROCESS" and e.get("cmd") == "include"]
    assert [root[i].get("data") for i in includes] == [f"{INCLUDE_PREFIX}{RECORD_SNIPPET}"]
    # fsbridge-record.xml holds extensions: it belongs between extensions, not among actions.
    assert not any(e.tag == "X-PRE-PROCESS" for c in root.iter("condition") for e in c)
    bridging = [i for i, e in enumerate(root) if e.tag == "extension" and any(a.get("application") == "bridge" for a in e.iter("action"))]
    assert includes[0] < min(bridging)
    snippet = ET.parse(DIALPLAN / RECORD_SNIPPET).getroot()
    assert snippet.tag == "include" and all(e.get("continue") == "true" for e in snippet.findall("extension"))


def test_inbound_call_is_recorded_before_the_bridge():
    _, queued, _ = _inbound_call(_lookup_app(Contact("Ivan", "103")))
    applications = [application for application, _ in queued]
    assert applications.index("record_session") < applications.index("bridge")
    assert ("record_session", f"${{fsbridge_record_file}}") in queued


def test_outbound_call_is_recorded_before_the_bridge():
    _, queued = hunt(_loaded(OUTBOUND), {"destination_number": "79101234567"}, lambda url: pytest.fail("curl"))
    applications = [application for application, _ in queued]
    assert applications.index("record_session") < applications.index("bridge")


def test_planfix_data_variables_use_the_prefix_the_events_read():
    events = pytest.importorskip("fsbridge.core.events")
    prefix = events.PLANFIX_DATA_PREFIX.removeprefix("variable_")
    names = [data.split("=", 1)[0] for path in (INBOUND, OUTBOUND) for app, data in _actions(_loaded(path)) if app == "set"]
    analytics = [n for n in names if n.startswith(prefix)]
    assert analytics, "examples of planfix_data_* are part of the files"
    assert all(re.fullmatch(r"\w+", n[len(prefix):]) for n in analytics)


# ---- cloud PBX: several tenants, each its own domains and DIDs ---------------
# install-dialplan's generated files (tenants_text) pre-processed with the
# packaged templates, then hunted like the one-DID files above.

ALPHA = TenantRoute("alpha", ("alpha.example",), ("74950000010", "74950000011"),
                    "[leg_timeout=5]user/101@alpha.example,user/102@alpha.example", "default", "74950000010")
BETA = TenantRoute("beta", ("beta.example", "beta2.example"), ("74950000020",),
                   "user/101@beta.example|user/102@beta.example", "beta", "74950000029")
TENANTS = [ALPHA, BETA]


def _tenants(context: str, routes: list[TenantRoute] = TENANTS) -> ET.Element:
    return _loaded(DIALPLAN, text=install_dialplan.tenants_text(context, routes))


def _tenant_lookup(contacts: dict[str, Contact]):
    """The real lookup app with one ContactLookup per tenant, chosen as the service does
    (TenantMap.find by domain, else DID); `asked` records whose PlanFix was asked."""
    settings = LookupSettings()
    asked: list[tuple[str, str]] = []

    def lookup_of(name: str) -> ContactLookup:
        def fetch(phone, callid, timeout):
            asked.append((name, phone))
            return contacts.get(name)
        return ContactLookup(settings, fetch)

    lookups = {route.name: lookup_of(route.name) for route in TENANTS}
    owners = TenantMap([TenantRules(r.name, r.domains, r.dids) for r in TENANTS])
    app = create_lookup_app(settings, lookup=lookups["alpha"],
                            select=lambda domain, did: lookups.get(owners.find(domain=domain, did=did)))
    return app.test_client(), asked


def _tenant_call(destination: str, contacts: dict[str, Contact]):
    client, asked = _tenant_lookup(contacts)
    urls = []

    def curl(url: str) -> str:
        urls.append(url)
        parts = urllib.parse.urlsplit(url)
        assert f"{parts.scheme}://{parts.netloc}{parts.path}" == VARS["fsbridge_lookup_url"]
        return client.get(f"{parts.path}?{parts.query}").get_data(as_text=True)

    variables, queued = hunt(_tenants("public"), {**CALL, "destination_number": destination}, curl)
    bridges = [data for application, data in queued if application == "bridge"]
    return variables, queued, bridges, urls, asked


@pytest.mark.parametrize("route,dialled", [(ALPHA, "74950000011"), (BETA, "+74950000020")], ids=["alpha", "beta"])
def test_tenant_call_asks_its_own_planfix_and_rings_its_own_domain(route, dialled):
    # The same responsible extension in both tenants: two different phones.
    contacts = {"alpha": Contact("Alpha Client", "101"), "beta": Contact("Beta Client", "101")}
    variables, queued, bridges, urls, asked = _tenant_call(dialled, contacts)
    assert asked == [(route.name, "79101234567")]
    (url,) = urls
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["domain"] == [route.domains[0]] and query["did"] == [dialled]
    assert variables["domain_name"] == route.domains[0]
    assert variables["effective_caller_id_name"] == contacts[route.name].name
    ring = VARS["fsbridge_responsible_ring"]
    assert bridges == [f"[leg_timeout={ring}]user/101@{route.domains[0]}|{route.fallback}"]
    assert ("set", f"planfix_data_line={dialled.lstrip('+')}") in queued
    assert ("set", f"force_transfer_context={route.context}") in queued
    applications = [application for application, _ in queued]
    assert applications.index("record_session") < applications.index("bridge")


@pytest.mark.parametrize("contacts", [{}, {"beta": Contact("No Manager", None)}], ids=["not-found", "no-responsible"])
def test_tenant_call_without_responsible_rings_its_own_fallback(contacts):
    _, _, bridges, _, asked = _tenant_call("74950000020", contacts)
    assert bridges == [BETA.fallback] and [name for name, _ in asked] == ["beta"]


def test_tenant_call_when_the_lookup_fails_rings_its_own_fallback():
    variables, queued = hunt(_tenants("public"), {**CALL, "destination_number": "74950000010"}, lambda url: "")
    assert "fsbridge_responsible" not in variables
    assert [data for application, data in queued if application == "bridge"] == [ALPHA.fallback]


def test_number_of_no_tenant_is_left_alone():
    variables, queued = hunt(_tenants("public"), {**CALL, "destination_number": "74950000099"},
                             lambda url: pytest.fail("looked up"))
    assert "fsbridge_lookup" not in variables
    assert [application for application, _ in queued if application != "set"] == ["record_session"]


def test_tenant_without_dids_has_no_inbound_route():
    quiet = TenantRoute("quiet", ("quiet.example",), (), "", "default", "74950000077")
    root = _tenants("public", [quiet])
    assert [e.get("name") for e in root.iter("extension")] == ["fsbridge_record"]


SHARED = [ALPHA, dataclasses.replace(BETA, context="default")]  # both tenants' phones in one context


@pytest.mark.parametrize("variables,caller_id", [
    ({"domain_name": "alpha.example"}, ALPHA.caller_id),
    ({"domain_name": "beta2.example"}, BETA.caller_id),
    # click-to-call: the originate's tag names the tenant, whatever the leg's domain
    ({"fsbridge_tenant": "beta"}, BETA.caller_id),
    ({"fsbridge_tenant": "alpha", "domain_name": "beta.example"}, ALPHA.caller_id),
    ({"fsbridge_tenant": "beta", "domain_name": "alpha.example"}, BETA.caller_id),  # alpha's routes come first
], ids=["alpha-phone", "beta-phone", "beta-click-to-call", "tag-wins", "tag-wins-over-an-earlier-tenant"])
def test_shared_context_presents_the_callers_tenant_number(variables, caller_id):
    _, queued = hunt(_tenants("default", SHARED), {"destination_number": "89101234567", **variables},
                     lambda url: pytest.fail("curl"))
    assert [data for application, data in queued if application == "bridge"] == [
        f"sofia/gateway/{VARS['fsbridge_gateway']}/79101234567"]
    assert ("set", f"effective_caller_id_number={caller_id}") in queued
    assert ("set", f"planfix_data_line={caller_id}") in queued
    applications = [application for application, _ in queued]
    assert applications.index("record_session") < applications.index("bridge")


@pytest.mark.parametrize("variables", [
    {}, {"domain_name": "other.example"}, {"domain_name": "alpha.example.evil"},
    {"fsbridge_tenant": "gamma", "domain_name": "alpha.example"},
], ids=["no-domain", "other-domain", "domain-suffix", "other-tenants-click-to-call"])
def test_call_no_tenant_of_the_context_claims_does_not_go_out(variables):
    _, queued = hunt(_tenants("default", SHARED), {"destination_number": "79101234567", **variables},
                     lambda url: pytest.fail("curl"))
    assert "bridge" not in [application for application, _ in queued]


def test_context_file_holds_only_its_own_tenants_routes():
    names = [e.get("name") for e in _tenants("beta").iter("extension")]
    assert names == ["fsbridge_record", "fsbridge_outbound_beta", "fsbridge_outbound_international_beta"]
    _, queued = hunt(_tenants("beta"), {"destination_number": "+442079460958", "domain_name": "beta.example"},
                     lambda url: pytest.fail("curl"))
    prefix = VARS["fsbridge_international_prefix"]
    assert ("bridge", f"sofia/gateway/{VARS['fsbridge_gateway']}/{prefix}442079460958") in queued
    assert ("set", f"effective_caller_id_number={BETA.caller_id}") in queued


def test_templates_use_only_what_the_generated_files_and_vars_file_set():
    for template, context in ((DIALPLAN / install_dialplan.TENANT_INBOUND, "public"),
                              (DIALPLAN / install_dialplan.TENANT_OUTBOUND, "beta")):
        generated = install_dialplan.tenants_text(context, TENANTS)
        tenant_vars = set(re.findall(r'cmd="set" data="(\w+)=', generated))
        used = _uses(_without_comments(template.read_text(encoding="utf-8")))
        assert used - VARS.keys() - STOCK_GLOBALS.keys() == tenant_vars, template.name
        # a channel variable read with ${...} falls back to a global of that name: none may clash
        read = set(re.findall(r"(?<!\$)\$\{(\w+)\}", template.read_text(encoding="utf-8")))
        assert not read & tenant_vars
