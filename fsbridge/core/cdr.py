"""FreeSWITCH's CDR posts (mod_json_cdr): a finished channel's facts.

A call that ends while fsbridge is down or disconnected leaves no events for
it; FreeSWITCH's mod_json_cdr still POSTs every finished channel's CDR (and
retries ``retries`` times, ``delay`` seconds apart).  This module:

* ``parse_body(body, content_type)``: the POST body -> the CDR document.
  mod_json_cdr sends ``cdr=<url-encoded JSON>`` (``encode=true``, form
  content type), ``cdr=<base64 JSON>`` (``encode=base64``) or the raw JSON
  (``encode=false``).  With ``encode-values=true`` (its default) every
  variable value is url-encoded inside the JSON: ``facts`` decodes them.
* ``facts(doc)``: the document -> ``CdrFacts``, the channel facts the
  tracker reads from events (sanitized and bounded as events.py does).
* ``completions(legs, a_leg)``: pure; the PlanFix events that
  finish a call an earlier process reported and left open, from its A leg's
  CDR, instead of the blind close of opencalls.py.

Pure: no I/O and no clock reads.  The ``POST /cdr`` route that receives the
posts is fsbridge.cdr_endpoint.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, unquote_plus

from fsbridge.core.events import (
    ChannelEvent, channel_event,
    MAX_DATA_FIELDS, MAX_DATA_NAME_CHARS, MAX_ID_CHARS, MAX_NUMBER_CHARS, MAX_PATH_CHARS, MAX_TEXT_CHARS, sanitize,
)
from fsbridge.core.wire import EventHeaders
from fsbridge.core.tracker import CANCELLED, MISSED, SUCCESS, TYPE_IN, outgoing_status

__all__ = ["CdrError", "CdrFacts", "CdrRetry", "parse_body", "facts", "completions", "call_events", "leg_events", "UnseenCalls"]

DATA_PREFIX = "planfix_data_"
RECORD_VAR = "fsbridge_record_file"   # set by dialplan/fsbridge-record.xml


class CdrError(ValueError):
    """The body is not a CDR mod_json_cdr would send."""


class CdrRetry(Exception):
    """The CDR cannot be judged yet: answer 503 so that mod_json_cdr posts it again."""


@dataclass(frozen=True, slots=True)
class CdrFacts:
    uuid: str
    call_uuid: str
    direction: str                 # "inbound" / "outbound" (channel_data.direction)
    caller: str                    # caller_id_number
    destination: str               # destination_number
    answer_us: int
    bridge_us: int
    end_us: int
    hangup_cause: str
    billsec: int
    originate_disposition: str
    sip_term_status: str
    last_bridge_to: str            # the other leg of its (last) bridge
    bridged_ext: str               # destination of the leg it bridged (originated_legs)
    recording_path: str
    record_ms: int                 # -1: not present
    voicemail_path: str
    planfix_data: tuple[tuple[str, str], ...]
    queue_member_uuid: str         # cc_member_session_uuid
    is_b_leg: bool                 # has an originator (mod_json_cdr's own test)
    # For a call fsbridge never saw (``call_events``):
    created_us: int = 0            # start_uepoch
    parent_uuid: str = ""          # a rung leg's caller: originator, else cc_member_session_uuid
    rung_legs: tuple[str, ...] = ()  # the legs the A leg rang (originate_causes)
    headers: bytes = b""           # its variables and caller profile as event headers
    core_uuid: str = ""            # the FreeSWITCH that wrote it


def facts_to_json(facts: CdrFacts) -> str:
    """``facts`` as stored while held (fsbridge.gaps), read back by ``facts_from_json``."""
    values = dataclasses.asdict(facts)
    values["headers"] = base64.b64encode(facts.headers).decode("ascii")
    return json.dumps(values, ensure_ascii=False, separators=(",", ":"))


def facts_from_json(text: str) -> CdrFacts:
    """CdrFacts back from ``facts_to_json``; CdrError if the text is not that."""
    try:
        values = json.loads(text)
        values["headers"] = base64.b64decode(values["headers"], validate=True)
        values["planfix_data"] = tuple((str(k), str(v)) for k, v in values["planfix_data"])
        values["rung_legs"] = tuple(str(leg) for leg in values["rung_legs"])
        return CdrFacts(**values)
    except (ValueError, TypeError, KeyError, binascii.Error) as exc:
        raise CdrError(f"not a held CDR: {exc}") from None


def parse_body(body: bytes, content_type: str = "") -> dict[str, Any]:
    """The CDR JSON object of one mod_json_cdr POST; CdrError if it is none."""
    text: str
    try:
        raw = body.decode("ascii") if body.startswith(b"cdr=") else body.decode("utf-8")
    except UnicodeDecodeError:
        raise CdrError("the body is not text") from None
    if raw.startswith("cdr="):
        value = raw[4:]
        if "base64" in content_type:
            try:
                text = base64.b64decode(unquote_plus(value), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise CdrError("cdr= is not base64 of UTF-8 text") from None
        else:
            try:
                text = unquote_plus(value, errors="strict")
            except UnicodeDecodeError:
                raise CdrError("cdr= is not url-encoded UTF-8") from None
    else:
        text = raw
    try:
        doc = json.loads(text)
    except ValueError:
        hint = ""
        if raw.startswith("cdr=") and "base64" not in content_type:
            # FreeSWITCH 1.10's url-encoding keeps every %XX as it is, so the
            # values encode-values already encoded decode with the document
            # (a quote in a value breaks it): tests/data/cdr/README.md.
            hint = " (set encode=false in json_cdr.conf.xml: with encode=true FreeSWITCH does not escape the values)"
        raise CdrError("the CDR is not JSON" + hint) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("variables"), dict):
        raise CdrError("the CDR has no \"variables\" object")
    return doc


_HEADER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
MAX_HEADERS = 1000


def _header_block(variables: dict[str, str], profile: dict[str, Any], direction: str, uuid: str,
                  call_uuid: str, parent: str, b_leg: bool) -> bytes:
    """The headers FreeSWITCH puts on the channel's events, from its CDR:
    Caller-* from the caller profile, variable_* (values url-encoded, as on
    the wire: a value cannot forge a header)."""
    lines = [f"Unique-ID: {quote(uuid, safe='')}", f"Channel-Call-UUID: {quote(call_uuid, safe='')}",
             f"Call-Direction: {quote(direction, safe='')}"]
    for key, name in (("caller_id_number", "Caller-Caller-ID-Number"),
                      ("destination_number", "Caller-Destination-Number")):
        value = profile.get(key)
        if isinstance(value, str):
            lines.append(f"{name}: {quote(value, safe='')}")
    if parent and b_leg:
        lines += [f"Other-Leg-Unique-ID: {quote(parent, safe='')}", "Other-Type: originator"]
    for name, value in list(variables.items())[:MAX_HEADERS]:
        if _HEADER_NAME.fullmatch(name):
            lines.append(f"variable_{name}: {quote(value, safe='')}")
    return "\n".join(lines).encode("utf-8")


def _legs_rung(originate_causes: str) -> tuple[str, ...]:
    """``originate_causes``: ``[ARRAY::]<uuid>;<cause>|:<uuid>;<cause>...``: the uuids."""
    body = originate_causes[len("ARRAY::"):] if originate_causes.startswith("ARRAY::") else originate_causes
    legs = (sanitize(item.split(";", 1)[0], MAX_ID_CHARS) for item in body.split("|:") if item)
    return tuple(leg for leg in legs if leg)[:64]


def _int(value: str) -> int:
    value = value.strip()
    return int(value) if value.isdigit() and len(value) < 20 else 0


def _us(variables: dict[str, str], name: str) -> int:
    micro = _int(variables.get(name + "_uepoch", ""))
    return micro or _int(variables.get(name + "_epoch", "")) * 1_000_000


def _bridged_ext(originated: str, other: str) -> str:
    """``originated_legs`` is ``ARRAY::<uuid>;<name>;<dest>|:...``: the dest of ``other``."""
    body = originated[len("ARRAY::"):] if originated.startswith("ARRAY::") else originated
    for item in body.split("|:"):
        parts = item.split(";")
        if len(parts) >= 3 and parts[0] == other:
            return parts[-1]
    return ""


def _record_path(doc: dict[str, Any], variables: dict[str, str]) -> str:
    path = variables.get(RECORD_VAR, "")
    if path:
        return path
    apps = (doc.get("app_log") or {}).get("applications") if isinstance(doc.get("app_log"), dict) else None
    for app in apps if isinstance(apps, list) else ():
        if isinstance(app, dict) and app.get("app_name") == "record_session":
            data = app.get("app_data")
            return unquote(data) if isinstance(data, str) else ""
    return ""


def facts(doc: dict[str, Any]) -> CdrFacts:
    """The channel facts of one CDR document (from ``parse_body``)."""
    variables = {
        str(k): unquote(v) for k, v in doc["variables"].items() if isinstance(v, str)
    }
    get = variables.get
    channel = doc.get("channel_data") if isinstance(doc.get("channel_data"), dict) else {}
    callflow = doc.get("callflow")
    first = callflow[0] if isinstance(callflow, list) and callflow and isinstance(callflow[0], dict) else {}
    profile = first.get("caller_profile") if isinstance(first.get("caller_profile"), dict) else {}
    uuid = sanitize(get("uuid") or str(profile.get("uuid", "")), MAX_ID_CHARS)
    if not uuid:
        raise CdrError("the CDR names no channel uuid")
    other = sanitize(get("last_bridge_to", ""), MAX_ID_CHARS)
    data: list[tuple[str, str]] = []
    for name, value in variables.items():
        if not name.startswith(DATA_PREFIX):
            continue
        field = sanitize(name[len(DATA_PREFIX):], MAX_DATA_NAME_CHARS)
        if field and not any(ch in field for ch in "=&% ") and len(data) < MAX_DATA_FIELDS:
            data.append((field, sanitize(value, MAX_TEXT_CHARS)))
    record_ms = -1
    if get("record_ms"):
        record_ms = _int(get("record_ms", ""))
    elif get("record_seconds"):
        record_ms = _int(get("record_seconds", "")) * 1000
    direction = str(channel.get("direction", "")) or get("direction", "")
    is_b_leg = isinstance(profile.get("originator"), dict) and bool(profile.get("originator"))
    call_uuid = sanitize(get("call_uuid", ""), MAX_ID_CHARS) or uuid
    parent = sanitize(get("originator", "") if is_b_leg else get("cc_member_session_uuid", ""), MAX_ID_CHARS)
    if parent == uuid:
        parent = ""
    return CdrFacts(
        uuid=uuid,
        call_uuid=call_uuid,
        direction=sanitize(direction, 16),
        caller=sanitize(get("caller_id_number") or str(profile.get("caller_id_number", "")), MAX_NUMBER_CHARS),
        destination=sanitize(get("destination_number") or str(profile.get("destination_number", "")),
                             MAX_NUMBER_CHARS),
        answer_us=_us(variables, "answer"),
        bridge_us=_us(variables, "bridge"),
        end_us=_us(variables, "end"),
        hangup_cause=sanitize(get("hangup_cause", ""), 64),
        billsec=_int(get("billsec", "")),
        originate_disposition=sanitize(get("originate_disposition", ""), 64),
        sip_term_status=sanitize(get("sip_term_status", ""), 8),
        last_bridge_to=other,
        bridged_ext=sanitize(_bridged_ext(get("originated_legs", ""), other), MAX_NUMBER_CHARS) if other else "",
        recording_path=sanitize(_record_path(doc, variables), MAX_PATH_CHARS),
        record_ms=record_ms,
        voicemail_path=sanitize(get("voicemail_file_path", ""), MAX_PATH_CHARS),
        planfix_data=tuple(data),
        queue_member_uuid=sanitize(get("cc_member_session_uuid", ""), MAX_ID_CHARS),
        is_b_leg=is_b_leg,
        created_us=_us(variables, "start"),
        parent_uuid=parent,
        rung_legs=_legs_rung(get("originate_causes", "")),
        headers=_header_block(variables, profile, sanitize(direction, 16), uuid, call_uuid, parent, is_b_leg),
        core_uuid=sanitize(str(doc.get("core-uuid", "")), MAX_ID_CHARS),
    )


def _talk_seconds(a: CdrFacts) -> int:
    start = a.bridge_us or a.answer_us
    if start and a.end_us > start:
        return (a.end_us - start) // 1_000_000
    return a.billsec


def completions(
    legs: list[tuple[dict[str, str], bool]], a: CdrFacts
) -> list[tuple[dict[str, str], str | None]]:
    """PlanFix events finishing an inherited call from its A leg's CDR.

    ``legs``: the (start fields, accepted) pairs opencalls.py kept for the
    call.  Returns (fields, recording path) in sending order: an ACCEPTED
    for the extension the A leg bridged to if PlanFix has not had it (he
    answered while fsbridge was down), then one COMPLETED per leg: the
    talker ``Success`` with his talk time (bridge to end) and the
    recording; others ``Cancelled`` (someone else took it), ``Missed``
    (incoming nobody took, with a voicemail message as the recording) or
    the outgoing status of the A leg's disposition and cause.
    """
    data = {"data_" + name: value for name, value in a.planfix_data}
    bridged = bool(a.bridge_us)
    talker = -1
    if bridged:
        for i, (start, accepted) in enumerate(legs):
            if accepted:
                talker = i
        if talker < 0 and a.bridged_ext:
            talker = next((i for i, (start, _) in enumerate(legs) if start.get("ext") == a.bridged_ext), -1)
        if talker < 0 and len(legs) == 1:
            talker = 0
    out: list[tuple[dict[str, str], str | None]] = []
    if talker >= 0 and not legs[talker][1]:
        out.append(({**legs[talker][0], "event": "ACCEPTED"}, None))
    # The talker's end last: the others' parts ended when he answered.
    order = [i for i in range(len(legs)) if i != talker] + ([talker] if talker >= 0 else [])
    for i in order:
        start = legs[i][0]
        fields = {**start, "event": "COMPLETED"}
        path: str | None = None
        duration = 0
        if i == talker:
            status = SUCCESS
            duration = _talk_seconds(a)
            recorded = a.record_ms > 0 or (a.record_ms < 0 and bool(a.recording_path))
            path = a.recording_path if recorded and a.recording_path else None
        elif talker >= 0:
            status = CANCELLED
        elif start.get("type") == TYPE_IN:
            status = MISSED
            path = a.voicemail_path or None
        else:
            status = outgoing_status("", a.sip_term_status, a.originate_disposition, a.hangup_cause)
        fields.update(duration=str(duration), is_recorded="1" if path else "0", status=status, **data)
        out.append((fields, path))
    return out


def _event(name: str, facts: CdrFacts, at_us: int, *extra: str) -> ChannelEvent | None:
    block = "\n".join((f"Event-Name: {name}", f"Event-Date-Timestamp: {at_us}", *extra)).encode() + b"\n"
    return channel_event(EventHeaders(block + facts.headers), b"", tenants=True)


def _answered_leg(a: CdrFacts) -> CdrFacts:
    """The leg the A leg bridged to, from the A leg alone (mod_json_cdr with
    log-b-leg=false posts no B legs): its uuid and destination."""
    lines = [f"Unique-ID: {quote(a.last_bridge_to, safe='')}", f"Channel-Call-UUID: {quote(a.uuid, safe='')}",
             "Call-Direction: outbound", f"Caller-Destination-Number: {quote(a.bridged_ext, safe='')}",
             f"Other-Leg-Unique-ID: {quote(a.uuid, safe='')}", "Other-Type: originator",
             f"variable_billsec: {_talk_seconds(a)}"]
    return CdrFacts(
        uuid=a.last_bridge_to, call_uuid=a.uuid, direction="outbound", caller=a.caller, destination=a.bridged_ext,
        answer_us=a.bridge_us, bridge_us=a.bridge_us, end_us=a.end_us, hangup_cause=a.hangup_cause, billsec=-1,
        originate_disposition="", sip_term_status="", last_bridge_to=a.uuid, bridged_ext="", recording_path="",
        record_ms=-1, voicemail_path="", planfix_data=(), queue_member_uuid="", is_b_leg=True,
        created_us=a.created_us, parent_uuid=a.uuid, headers="\n".join(lines).encode(),
    )


def leg_events(leg: CdrFacts) -> tuple[ChannelEvent | None, ChannelEvent | None]:
    """A rung leg's CHANNEL_CREATE and CHANNEL_HANGUP_COMPLETE, from its CDR."""
    end = leg.end_us or leg.created_us
    return (_event("CHANNEL_CREATE", leg, leg.created_us),
            _event("CHANNEL_HANGUP_COMPLETE", leg, end, f"Hangup-Cause: {leg.hangup_cause}",
                   f"Caller-Channel-Hangup-Time: {end}"))


def call_events(a: CdrFacts, legs: list[CdrFacts]) -> list[ChannelEvent]:
    """The events FreeSWITCH sent for a call fsbridge never saw, rebuilt from
    its legs' CDRs (``a`` its A leg, ``legs`` the legs it rang), in their
    real order: each leg's CHANNEL_CREATE at its start, the A leg's (last)
    CHANNEL_BRIDGE, RECORD_STOP with the recording, and each leg's
    CHANNEL_HANGUP_COMPLETE at its end (rung legs before the A leg's).  Fed
    to a tracker, they give the PlanFix events the live call would have.
    Tenant facts are always read (the tracker ignores them without tenants)."""
    order = {leg: n for n, leg in enumerate(a.rung_legs)}  # the dial string's order, for legs created at once
    legs = sorted((leg for leg in legs if leg.uuid != a.uuid),
                  key=lambda leg: (leg.created_us, order.get(leg.uuid, len(order))))
    by_uuid = {leg.uuid: leg for leg in legs}
    if a.bridge_us and a.last_bridge_to and a.last_bridge_to not in by_uuid and a.bridged_ext:
        legs.append(_answered_leg(a))
        by_uuid[a.last_bridge_to] = legs[-1]
    # (time, rank, order): creates first, then bridge, record stop, hangups; A before B, then B before A
    timed: list[tuple[int, int, int, ChannelEvent | None]] = [(a.created_us, 0, 0, _event("CHANNEL_CREATE", a, a.created_us))]
    for n, leg in enumerate(legs, 1):
        create, hangup = leg_events(leg)
        timed.append((leg.created_us, 0, n, create))
        timed.append((leg.end_us or leg.created_us, 3, n, hangup))
    other = by_uuid.get(a.last_bridge_to)
    if a.bridge_us and other is not None:
        timed.append((a.bridge_us, 1, 0, _event(
            "CHANNEL_BRIDGE", a, a.bridge_us, f"Bridge-A-Unique-ID: {quote(a.uuid, safe='')}",
            f"Bridge-B-Unique-ID: {quote(other.uuid, safe='')}",
            f"Other-Leg-Channel-Answered-Time: {other.answer_us or a.bridge_us}",
            f"Other-Leg-Destination-Number: {quote(other.destination, safe='')}")))
    end = a.end_us or a.created_us
    if a.recording_path:
        timed.append((end, 2, 0, _event("RECORD_STOP", a, end, f"Record-File-Path: {quote(a.recording_path, safe='')}")))
    timed.append((end, 4, 0, _event("CHANNEL_HANGUP_COMPLETE", a, end, f"Hangup-Cause: {a.hangup_cause}",
                                    f"Caller-Channel-Hangup-Time: {end}")))
    timed.sort(key=lambda item: item[:3])
    return [event for *_, event in timed if event is not None]


class UnseenCalls:
    """CDRs of calls fsbridge never saw, gathered per call until its legs are in.

    mod_json_cdr posts each leg on its own (log-b-leg=true), each retried
    on its own ``delay``: after an outage they come in any order, seconds
    apart.  A call is ready once its A leg and every leg the A leg names
    (``originate_causes``, the bridged ``last_bridge_to``) are in, or
    ``settle_s`` after its A leg came (a leg never posted: log-b-leg=false).
    Rung legs whose A leg has not come are kept ``keep_s``.  Bounded:
    beyond ``max_cdrs`` the oldest are dropped.  Pure; the caller's clock.
    """

    def __init__(self, settle_s: float = 10.0, keep_s: float = 900.0, max_cdrs: int = 20_000) -> None:
        self.settle_s, self.keep_s, self.max_cdrs = settle_s, keep_s, max_cdrs
        self._a: dict[str, tuple[CdrFacts, float]] = {}           # A-leg uuid -> (CDR, arrival)
        self._legs: dict[str, dict[str, tuple[CdrFacts, float]]] = {}  # A-leg uuid -> its legs
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def holds(self, call_id: str) -> bool:
        return call_id in self._a

    def add(self, facts: CdrFacts, now: float) -> None:
        """An A leg (no ``parent_uuid``) or a leg it rang."""
        if facts.parent_uuid:
            legs = self._legs.setdefault(facts.parent_uuid, {})
            self._count += facts.uuid not in legs
            legs[facts.uuid] = (facts, now)
        else:
            self._count += facts.uuid not in self._a
            self._a[facts.uuid] = (facts, now)
        while self._count > self.max_cdrs:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        oldest_a = next(iter(self._a), None)
        oldest_leg = next(iter(self._legs), None)
        if oldest_leg is not None and (oldest_a is None or next(iter(self._legs[oldest_leg].values()))[1]
                                       <= self._a[oldest_a][1]):
            self._count -= len(self._legs.pop(oldest_leg))
        elif oldest_a is not None:
            del self._a[oldest_a]
            self._count -= 1

    def pop_legs(self, call_id: str) -> list[CdrFacts]:
        """The rung legs held for a call that turned out to be live (adopted)."""
        legs = self._legs.pop(call_id, {})
        self._count -= len(legs)
        return [facts for facts, _ in legs.values()]

    def ready(self, now: float) -> list[tuple[CdrFacts, list[CdrFacts]]]:
        """The calls whose CDRs are in (A leg, its legs), taken out."""
        out = []
        for uuid, (a, since) in list(self._a.items()):
            legs = self._legs.get(uuid, {})
            wanted = set(a.rung_legs) | ({a.last_bridge_to} if a.bridge_us and a.last_bridge_to else set())
            if wanted <= set(legs) or now - since >= self.settle_s:
                del self._a[uuid]
                taken = self._legs.pop(uuid, {})
                self._count -= 1 + len(taken)
                out.append((a, [facts for facts, _ in taken.values()]))
        for uuid, legs in list(self._legs.items()):
            if uuid not in self._a and all(now - at >= self.keep_s for _, at in legs.values()):
                self._count -= len(self._legs.pop(uuid))
        return out
