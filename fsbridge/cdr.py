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
* ``register_route(app, secret, max_bytes, on_cdr)``: ``POST /cdr`` on the
  loopback lookup listener, HTTP basic auth (mod_json_cdr's ``cred``) with
  the password compared in constant time, a hard body-size limit.

Pure apart from the route; no clock reads.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import unquote, unquote_plus

from flask import Flask, jsonify, request

from fsbridge.events import (
    MAX_DATA_FIELDS, MAX_DATA_NAME_CHARS, MAX_ID_CHARS, MAX_NUMBER_CHARS, MAX_PATH_CHARS, MAX_TEXT_CHARS, sanitize,
)
from fsbridge.tracker import CANCELLED, MISSED, SUCCESS, TYPE_IN, outgoing_status

__all__ = ["CdrError", "CdrFacts", "CdrRetry", "parse_body", "facts", "completions", "register_route"]

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
    return CdrFacts(
        uuid=uuid,
        call_uuid=sanitize(get("call_uuid", ""), MAX_ID_CHARS) or uuid,
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
        is_b_leg=isinstance(profile.get("originator"), dict) and bool(profile.get("originator")),
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


_BASIC = re.compile(r"^Basic ([A-Za-z0-9+/=]{1,1024})$")


def authorized(header: str, secret: str) -> bool:
    """HTTP basic auth whose password is ``secret`` (any user name), in constant time."""
    match = _BASIC.match(header or "")
    if not match or not secret:
        return False
    try:
        decoded = base64.b64decode(match.group(1), validate=True)
    except binascii.Error:
        return False
    _user, sep, password = decoded.partition(b":")
    return bool(sep) and hmac.compare_digest(password, secret.encode("utf-8"))


def register_route(app: Flask, secret: str, max_bytes: int, on_cdr: Callable[[CdrFacts], str]) -> None:
    """``POST /cdr``: 401 without the credential, 413 above ``max_bytes``,
    400 for a body that is no CDR, 503 when ``on_cdr`` raises ``CdrRetry``,
    else 200 with what ``on_cdr`` did (any 2xx stops mod_json_cdr's
    retries, so a CDR fsbridge ignores is a 200)."""

    @app.post("/cdr")
    def cdr_post():
        if not authorized(request.headers.get("Authorization", ""), secret):
            response = jsonify(error="Unauthorized")
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Basic realm="fsbridge cdr"'
            return response
        length = request.content_length
        if length is None or length > max_bytes:
            return jsonify(error="Payload too large", detail=f"at most {max_bytes} bytes, with Content-Length"), 413
        body = request.stream.read(max_bytes + 1)
        if len(body) > max_bytes:
            return jsonify(error="Payload too large", detail=f"at most {max_bytes} bytes"), 413
        try:
            parsed = facts(parse_body(body, request.content_type or ""))
        except CdrError as exc:
            return jsonify(error="Invalid parameters", detail=str(exc)), 400
        try:
            return jsonify(result=on_cdr(parsed)), 200
        except CdrRetry as exc:
            return jsonify(error="Service unavailable", detail=str(exc)), 503
