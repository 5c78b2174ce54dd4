"""Captures copied for other tenants (fsbridge.fakes.tenants) are real-looking ESL
that gives each tenant exactly the PlanFix commands of the original call.

Copies are fed as the service gets them: framed by fsbridge.core.wire, reduced by
channel_event, tracked by CallTracker.  Only SUBSCRIBED_EVENTS are copied
for the tracker tests (what a subscribed connection receives; also faster).
"""

from __future__ import annotations

import collections
import re
from functools import lru_cache

import pytest

from fsbridge.core.events import SUBSCRIBED_EVENTS, channel_event
from fsbridge.fakes.clicktocall import rewrite_click_to_call
from fsbridge.fakes.freeswitch import FakeFreeSwitch, TraceEvent, events_of, read_trace, rewrite_event
from fsbridge.fakes.tenants import (
    Tenant,
    interleave,
    make_tenants,
    tenant_copy,
    tenant_originate_answer,
    tenant_uuid,
    uuid_map,
)
from fsbridge.core.originate import OriginateSettings, build_originate
from fsbridge.core.tracker import CallTracker
from fsbridge.core.wire import FrameParser, parse_event_plain
from tests.conftest import TRACES
from tests.test_fake_freeswitch import RawClient

CALLER = "79101234567"
MANAGER_UUID = "0f3c5a8e-7d1b-4c2a-9e6f-1b2c3d4e5f60"
JOB_UUID = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
CAPTURES = [
    "01-inbound-single-answer",
    "02-inbound-ring-group",
    "05a-outbound-answer",
    "06a-click-to-call-answer",
    "20-inbound-blind-transfer-uuid_transfer-101-to-102",
    "21-inbound-attended-transfer-101-consults-102",
    "22-inbound-pickup-102-intercepts-101",
    "23-inbound-callcenter-queue-ring-all",
    "25-inbound-group-noanswer-then-voicemail",
]
UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
LAB_DID = re.compile(rb"7495000000[0-9]")
TENANT = Tenant("tenant7.pbx.test", "74990000007", "tenant7")
NODE_CORE = "c0de0000-0000-4000-8000-00000000c0de"


@lru_cache(maxsize=None)
def capture(name: str) -> tuple[TraceEvent, ...]:
    """Every event of a capture; click-to-call as our own originate made it."""
    raw = read_trace(TRACES / f"{name}.plain.txt")
    if name.startswith("06"):
        raw = rewrite_click_to_call(raw, manager_uuid=MANAGER_UUID, job_uuid=JOB_UUID,
                                    request_id="mc-42", ext="101", phone=CALLER)
    return tuple(events_of(raw))


@lru_cache(maxsize=None)
def subscribed(name: str) -> tuple[TraceEvent, ...]:
    return tuple(e for e in capture(name) if e.name in SUBSCRIBED_EVENTS)


def lab_did(name: str) -> str:
    return next(m.group().decode() for e in capture(name) for m in [LAB_DID.search(e.body)] if m)


def commands_of(frames, tracker: CallTracker | None = None) -> list[tuple[dict, str | None]]:
    """PlanFix commands (fields, recording path) for frames fed as the service feeds them."""
    tracker = tracker or CallTracker()
    parser = FrameParser()
    out = []
    for frame in parser.feed(b"".join(frames)):
        event = channel_event(*parse_event_plain(frame.body))
        if event is not None:
            out += [(c.fields, c.recording_path) for c in tracker.feed(event)]
    assert parser.buffered == 0
    return out


@lru_cache(maxsize=None)
def original_commands(name: str) -> tuple:
    commands = commands_of([e.raw for e in subscribed(name)])
    assert commands, f"{name} gives PlanFix commands"  # else the comparisons below hold vacuously
    return tuple(commands)


def expected_for(name: str, tenant: Tenant) -> list[tuple[dict, str | None]]:
    """The original's commands with its UUIDs and DID as the tenant's."""
    pairs = [*uuid_map(subscribed(name), tenant.seed).items(), (lab_did(name), tenant.did)]

    def mapped(value: str | None) -> str | None:
        for old, new in pairs if value else ():
            value = value.replace(old, new)
        return value

    return [({k: mapped(v) for k, v in fields.items()}, mapped(path)) for fields, path in original_commands(name)]


def by_callid(commands) -> dict[str, list]:
    grouped = collections.defaultdict(list)
    for fields, path in commands:
        grouped[fields["callid"]].append((fields, path))
    return dict(grouped)


# -- the frames ---------------------------------------------------------------

@pytest.mark.parametrize("name", CAPTURES)
def test_every_copied_frame_is_framed_and_parses(name):
    copy = TENANT.copy(capture(name))
    parser = FrameParser()
    frames = parser.feed(b"".join(copy))
    assert parser.buffered == 0 and len(frames) == len(copy) == len(capture(name))
    for frame, original in zip(frames, capture(name)):
        assert frame.content_type == "text/event-plain"
        assert int(frame.headers["Content-Length"]) == len(frame.body)
        headers, body = parse_event_plain(frame.body)
        assert headers.get("Event-Name") == original.name
        if headers.get("Content-Length") is not None:
            assert int(headers["Content-Length"]) == len(body)
            assert frame.body.endswith(b"\n\n" + body)


@pytest.mark.parametrize("name", CAPTURES)
def test_copy_is_the_original_with_only_ids_changed(name):
    """Mapping the tenant's ids back gives the original bytes, frame by frame:
    nothing else changed and FreeSWITCH's layout is kept."""
    back = {new.encode(): old.encode() for old, new in uuid_map(capture(name), TENANT.seed).items()}
    back[TENANT.domain.encode()] = b"127.0.0.1"
    back[TENANT.did.encode()] = lab_did(name).encode()

    def restore(data: bytes) -> bytes:
        for new, old in back.items():
            data = data.replace(new, old)
        return data

    copy = TENANT.copy(capture(name))
    for frame, original in zip(FrameParser().feed(b"".join(copy)), capture(name), strict=True):
        block, _, rest = frame.body.partition(b"\n\n")
        headers, body = parse_event_plain(frame.body)
        restored = rewrite_event(TraceEvent("", "", b"", restore(block) + b"\n\n"),
                                 body=restore(body) if rest else None)
        assert restored == original.raw


@pytest.mark.parametrize("name", CAPTURES)
def test_no_original_uuid_did_or_domain_is_left(name):
    original = b"".join(e.raw for e in capture(name))
    copy = b"".join(TENANT.copy(capture(name), core_uuid=NODE_CORE))
    assert not set(UUID.findall(original)) & set(UUID.findall(copy))
    assert not LAB_DID.search(copy)
    for found in re.finditer(rb"127\.0\.0\.1", copy):
        assert is_address(copy, found.start(), found.end()), copy[found.start() - 60:found.end() + 20]
    domains = collections.Counter()
    for frame in FrameParser().feed(copy):
        headers, _ = parse_event_plain(frame.body)
        assert headers.get("Core-UUID") == NODE_CORE
        for header in ("variable_domain_name", "variable_dialed_domain", "variable_sip_invite_domain",
                       "variable_sip_from_host"):
            if headers.get(header) is not None:
                assert headers[header] == TENANT.domain
                domains[header] += 1
        for header in ("Channel-Presence-ID", "variable_presence_id"):
            if headers.get(header):
                assert headers[header].endswith("@" + TENANT.domain)
                domains[header] += 1
    assert domains  # every capture names its tenant's domain somewhere


# Where 127.0.0.1 is the address of a machine (the tenants share FreeSWITCH,
# carrier and lab phones), written independently of the module's rules.
ADDRESS_HEADER = re.compile(rb"Network-Addr|IPv4|_ip|network-ip|network_addr|contact_host|via_host|reply_host|call[-_]id")


def is_address(data: bytes, start: int, end: int) -> bool:
    if re.match(rb"%3A[0-9]", data[end:end + 4]):          # host:port
        return True
    if data[start - 6:start] in (b"IP4%20", b"UDP%20"):
        return True                                          # SDP c=/o=, Via
    line = data.rfind(b"\n", 0, start) + 1
    return bool(ADDRESS_HEADER.search(data[line:data.find(b": ", line)]))


def test_core_uuid_stays_unless_given():
    events = capture("01-inbound-single-answer")
    core = parse_event_plain(events[0].body)[0]["Core-UUID"]
    assert core not in uuid_map(events, "x")
    for frame in TENANT.copy(events):
        assert parse_event_plain(FrameParser().feed(frame)[0].body)[0]["Core-UUID"] == core


def test_tenant_uuids_are_deterministic_distinct_uuid4():
    old = "e84e4329-8051-40a2-9c6c-a3d6cf741ee9"
    assert tenant_uuid(old, "a") == tenant_uuid(old, "a") != tenant_uuid(old, "b") != old
    assert UUID4.fullmatch(tenant_uuid(old, 3))
    mapping = uuid_map(capture("02-inbound-ring-group"), "a")
    assert len(set(mapping.values())) == len(mapping) > 5
    assert all(new == tenant_uuid(old, "a") for old, new in mapping.items())
    assert Tenant("d.test", "1", "a").uuid(old) == tenant_uuid(old, "a")
    assert tenant_copy(capture("02-inbound-ring-group"), domain="d.test", did="1", seed="a") == \
        tenant_copy(list(capture("02-inbound-ring-group")), domain="d.test", did="1", seed="a")


@pytest.mark.parametrize("kwargs, message", [
    ({"domain": "a b.test"}, "domain must be a host name"),
    ({"domain": "x%40y"}, "domain must be a host name"),
    ({"domain": ""}, "domain must be a host name"),
    ({"did": "+74950000000"}, "did must be 1-32 digits"),
    ({"did": ""}, "did must be 1-32 digits"),
    ({"core_uuid": "not-a-uuid"}, "core_uuid must be a lowercase UUID"),
])
def test_bad_tenant_values_are_refused(kwargs, message):
    args = {"domain": "t.test", "did": "74990000001", "seed": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        tenant_copy(capture("01-inbound-single-answer"), **args)


def test_events_must_be_trace_events_or_bytes():
    with pytest.raises(TypeError, match="expected TraceEvents or frame bytes, got str"):
        tenant_copy(["CHANNEL_CREATE"], domain="t.test", did="1", seed=1)


def test_byte_streams_are_taken_as_their_event_frames():
    events = capture("05a-outbound-answer")
    stream = read_trace(TRACES / "05a-outbound-answer.plain.txt")  # with command replies
    assert TENANT.copy([stream]) == TENANT.copy(events)


# -- PlanFix commands -----------------------------------------------------------

@pytest.mark.parametrize("name", CAPTURES)
def test_copy_gives_the_originals_commands_for_the_tenant(name):
    commands = commands_of(TENANT.copy(subscribed(name)))
    assert commands == expected_for(name, TENANT)
    assert {f["callid"] for f, _ in commands} <= set(uuid_map(subscribed(name), TENANT.seed).values())
    diversions = {f["diversion"] for f, _ in commands} - {""}
    assert diversions == {TENANT.did}


def test_interleave_round_robin_keeps_each_order():
    assert interleave([b"a1", b"a2", b"a3"], [b"b1"], [], [b"c1", b"c2"]) == \
        [b"a1", b"b1", b"c1", b"a2", b"c2", b"a3"]
    assert interleave() == []


@pytest.mark.parametrize("count", [2, 50])
def test_interleaved_tenants_on_one_connection_each_get_their_own_calls(count):
    tenants = make_tenants(count)
    names = [CAPTURES[i % len(CAPTURES)] for i in range(count)]
    copies = [t.copy(subscribed(n)) for t, n in zip(tenants, names)]
    mixed = interleave(*copies)
    assert len(mixed) == sum(map(len, copies))
    tracker = CallTracker()
    got = by_callid(commands_of(mixed, tracker))
    want = {}
    for tenant, name in zip(tenants, names):
        want.update(by_callid(expected_for(name, tenant)))
    assert got == want
    assert tracker.open_calls() == 0


def test_fifty_tenants_split_across_two_freeswitch_nodes():
    """Two fake FreeSWITCHes, each replaying its half of the tenants on one
    connection: each node delivers its mix byte for byte, and each tenant's
    calls come whole from its own node."""
    tenants = make_tenants(50)
    names = {t: CAPTURES[i % len(CAPTURES)] for i, t in enumerate(tenants)}
    nodes = [FakeFreeSwitch(core_uuid=NODE_CORE), FakeFreeSwitch()]
    clients = []
    try:
        sent = []
        for i, node in enumerate(nodes):
            mix = interleave(*(t.copy(subscribed(names[t]), core_uuid=node.core_uuid) for t in tenants[i::2]))
            node.replay_on_subscribe(mix)
            node.start()
            sent.append(mix)
        for node, mix in zip(nodes, sent):
            client = RawClient(node.port)
            clients.append(client)
            client.subscribe(" ".join(SUBSCRIBED_EVENTS).encode())
            received = client.read_frames(len(mix), timeout=10.0)
            assert [f.body for f in received] == [f.partition(b"\n\n")[2] for f in mix]
            assert {parse_event_plain(f.body)[0]["Core-UUID"] for f in received} == {node.core_uuid}
        for i, mix in enumerate(sent):
            got = by_callid(commands_of(mix))
            want = {}
            for tenant in tenants[i::2]:
                want.update(by_callid(expected_for(names[tenant], tenant)))
            assert got == want
    finally:
        for client in clients:
            client.close()
        for node in nodes:
            node.stop()


def test_originate_answer_copies_click_to_call_for_the_named_tenant():
    tenants = make_tenants(3)
    raw = read_trace(TRACES / "06a-click-to-call-answer.plain.txt")
    answer = tenant_originate_answer(raw, tenants)
    tenant = tenants[1]
    call_uuid = "5b0e6a42-1c1e-4b57-9a39-6c8f2d7e0a11"
    command = build_originate(
        "101", CALLER, call_uuid=call_uuid, request_id="7c6f2a0e-9d0b-4c1a-8e27-3b5d9f1a2c44", client_name=None,
        settings=OriginateSettings(dial_string=f"user/{{ext}}@{tenant.domain}"))
    frames = answer("bgapi " + command, {}, JOB_UUID)
    commands = commands_of(frames)
    # The capture's own click-to-call, with our originate's callid and the tenant's DID.
    want = [({k: v.replace(MANAGER_UUID, call_uuid).replace("74950000000", tenant.did) for k, v in f.items()},
             p and p.replace(MANAGER_UUID, call_uuid)) for f, p in original_commands("06a-click-to-call-answer")]
    assert commands == want
    assert ("%40" + tenant.domain).encode() in b"".join(frames)  # percent-encoded "@domain"
    other = build_originate("101", CALLER, call_uuid=call_uuid, request_id="7c6f2a0e-9d0b-4c1a-8e27-3b5d9f1a2c44",
                            client_name=None, settings=OriginateSettings(dial_string="user/{ext}@elsewhere.test"))
    assert answer("bgapi " + other, {}, JOB_UUID) is None
