"""FreeSWITCH channel events reduced to what call tracking reads.

``channel_event`` turns one parsed plain event into a small frozen
``ChannelEvent``.  It reads only the headers the tracker uses, through
``EventHeaders.get`` (each lookup decodes one line; decoding all ~200
headers of a channel event would cost more than everything else done with
it), and returns ``None`` for events the tracker does not need.

Values that end up in PlanFix fields (numbers, the DID, ``planfix_data_*``
variables) come from SIP headers an outside caller controls, so they are
sanitized here, once: control and format characters removed (no line
breaks, no bidi overrides), length bounded.  Identifiers (UUIDs) are only
used as dictionary keys and the PlanFix ``callid``; they are bounded too.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

from fsbridge.core.wire import EventHeaders

# Everything the tracker needs, and nothing more: every event subscribed to
# is parsed and costs CPU on a busy box.  Why each one is here:
#   CHANNEL_CREATE           a call (A leg) or a ringing leg (B leg) appears
#   CHANNEL_BRIDGE           the only reliable name of who answered
#   CHANNEL_HANGUP_COMPLETE  a leg ended, with its cause, billsec, recording
#   CHANNEL_DESTROY          fallback end of a leg whose HANGUP_COMPLETE was lost
#   RECORD_STOP              the recording file FreeSWITCH closed
#   BACKGROUND_JOB           results of our own bgapi (makeCall)
#   HEARTBEAT                liveness of the ESL connection
SUBSCRIBED_EVENTS: tuple[str, ...] = (
    "CHANNEL_CREATE",
    "CHANNEL_BRIDGE",
    "CHANNEL_HANGUP_COMPLETE",
    "CHANNEL_DESTROY",
    "RECORD_STOP",
    "BACKGROUND_JOB",
    "HEARTBEAT",
)

# Names of the channel variables a click-to-call originate sets on the
# manager leg (see originate.py); FreeSWITCH reports them as variable_<name>.
CLICK_TO_CALL_VAR = "fsbridge_click_to_call"
CLICK_TO_CALL_EXT_VAR = "fsbridge_ext"
CLICK_TO_CALL_PHONE_VAR = "fsbridge_phone"
# The extension a leg to elsewhere (a mobile) is a forward of, set by the
# dialplan when it sends no Diversion header naming him (docs/event-mapping.md).
FORWARDED_FROM_VAR = "fsbridge_forwarded_from"
# The tenant a click-to-call originate was made for (cloud PBX, fsbridge.core.tenancy).
TENANT_VAR = "fsbridge_tenant"
# Dialplan-set variables planfix_data_<field> become PlanFix data_<field>.
PLANFIX_DATA_PREFIX = "variable_planfix_data_"

MAX_ID_CHARS = 64          # a UUID is 36; anything longer is not ours
MAX_NUMBER_CHARS = 64      # phone numbers, extensions, DIDs
MAX_TEXT_CHARS = 256       # data_* values, cause names
MAX_PATH_CHARS = 1024      # recording file paths
MAX_DATA_FIELDS = 32       # planfix_data_* variables carried per call
MAX_DATA_NAME_CHARS = 64



def sanitize(value: str | None, limit: int = MAX_TEXT_CHARS) -> str:
    """Drop control/format/separator characters, trim, bound the length.

    Unicode categories Cc (C0/C1 controls incl. CR/LF/NUL), Cf (bidi
    overrides, zero-width joiners) and Zl/Zp (line/paragraph separators)
    can forge lines or hide text in PlanFix; everything else is kept.
    """
    if not value:
        return ""
    if not value.isprintable():
        value = "".join(
            ch for ch in value
            if ch == " " or unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn")
        )
    return value.strip()[:limit]


def _int(value: str | None) -> int:
    """An integer header; absent or garbage counts as 0 (FreeSWITCH's own default)."""
    if not value:
        return 0
    try:
        return int(value)
    except ValueError:
        return 0


# Not frozen, though never changed once made (the tracker derives variants
# with dataclasses.replace): a frozen dataclass sets each of these ~40 fields
# through object.__setattr__, 3.7 us per event against 0.6.
@dataclass(slots=True)
class ChannelEvent:
    """One FreeSWITCH event, reduced to plain values the tracker reads.

    Times are microseconds since the epoch as FreeSWITCH stamped them
    (0 = not happened / not present).  Strings are sanitized; an absent
    header is "".  Each event type fills only the fields the tracker reads
    from it (see ``_READERS``); the others keep their defaults.
    """

    name: str                                 # Event-Name
    uuid: str                                 # Unique-ID of the channel ("" for BACKGROUND_JOB)
    call_uuid: str = ""                       # Channel-Call-UUID (A leg's UUID, mostly)
    direction: str = ""                       # Call-Direction: inbound / outbound
    caller_number: str = ""                   # Caller-Caller-ID-Number
    destination_number: str = ""              # Caller-Destination-Number
    dialed_user: str = ""                     # variable_dialed_user (user/<x> legs)
    user_name: str = ""                       # variable_user_name (digest-authenticated phone)
    other_leg_uuid: str = ""                  # Other-Leg-Unique-ID
    other_type: str = ""                      # Other-Type: originator (B leg) / originatee (A leg)
    bridge_a_uuid: str = ""                   # Bridge-A-Unique-ID (CHANNEL_BRIDGE)
    bridge_b_uuid: str = ""                   # Bridge-B-Unique-ID (CHANNEL_BRIDGE)
    other_leg_answered_us: int = 0            # Other-Leg-Channel-Answered-Time (on CHANNEL_BRIDGE)
    answered_us: int = 0                      # Caller-Channel-Answered-Time (CHANNEL_BRIDGE: the bridging channel's own)
    hangup_cause: str = ""                    # Hangup-Cause
    originate_disposition: str = ""           # variable_originate_disposition
    sip_term_status: str = ""                 # variable_sip_term_status (SIP final code of a failed leg)
    billsec: int = 0                          # variable_billsec (talk seconds; HANGUP_COMPLETE)
    hangup_us: int = 0                        # Caller-Channel-Hangup-Time
    timestamp_us: int = 0                     # Event-Date-Timestamp
    record_file_path: str = ""                # Record-File-Path (RECORD_STOP)
    record_ms: int = -1                       # variable_record_ms (-1 = not present)
    # variable_cc_member_session_uuid (mod_callcenter agent leg -> caller), else
    # variable_fifo_bridge_uuid (mod_fifo member rung for that caller, ringall)
    queue_member_uuid: str = ""
    forwarded_from: str = ""                  # variable_fsbridge_forwarded_from, else the user of variable_sip_h_Diversion
    redirect_to: str = ""                     # variable_sip_redirect_contact_user_0 of a leg the phone redirected (302)
    other_leg_destination: str = ""           # Other-Leg-Destination-Number (CHANNEL_BRIDGE)
    voicemail_path: str = ""                  # variable_voicemail_file_path (mod_voicemail: message left)
    voicemail_seconds: int = -1               # variable_voicemail_message_len "HH:MM:SS" (-1 = not present)
    click_to_call_id: str = ""                # variable_fsbridge_click_to_call (our makeCall request id)
    click_to_call_ext: str = ""               # variable_fsbridge_ext
    click_to_call_phone: str = ""             # variable_fsbridge_phone
    # (field, value) pairs from variable_planfix_data_<field>
    planfix_data: tuple[tuple[str, str], ...] = ()
    # Cloud PBX (read only when tenants are configured, see fsbridge.core.tenancy):
    tenant_tag: str = ""                      # variable_fsbridge_tenant (our click-to-call)
    # variable_domain_name, variable_dialed_domain, the presence id's domain ("" where absent)
    domains: tuple[str, ...] = ()
    job_uuid: str = ""                        # Job-UUID (BACKGROUND_JOB)
    job_body: str = ""                        # BACKGROUND_JOB body: "+OK <uuid>" / "-ERR <CAUSE>"


def _record_ms(headers: EventHeaders) -> int:
    ms = headers.get("variable_record_ms")
    if ms is not None and ms != "":
        return max(_int(ms), 0)
    seconds = headers.get("variable_record_seconds")
    if seconds is not None and seconds != "":
        return max(_int(seconds), 0) * 1000
    return -1


def _planfix_data(headers: EventHeaders) -> tuple[tuple[str, str], ...]:
    found = headers.with_prefix(PLANFIX_DATA_PREFIX)
    if not found:
        return ()
    fields: list[tuple[str, str]] = []
    for name, value in found.items():
        field = sanitize(name[len(PLANFIX_DATA_PREFIX):], MAX_DATA_NAME_CHARS)
        # The field name becomes a form key: no separators that could
        # confuse a reader of the form or the logs.
        if not field or any(ch in field for ch in "=&% "):
            continue
        fields.append((field, sanitize(value, MAX_TEXT_CHARS)))
        if len(fields) >= MAX_DATA_FIELDS:
            break
    return tuple(fields)


# What the tracker reads of an event (CallTracker.wants): nothing (the event
# is dropped undecoded), an open call's A leg or other leg (end events are
# read in part), or everything.
WANT_NOTHING = ""
WANT_CALL = "call"
WANT_LEG = "leg"
WANT_ALL = "all"


def channel_event(headers: EventHeaders, body: bytes, tenants: bool = False,
                  wants: Callable[[str, str], str] | None = None, name: str | None = None) -> ChannelEvent | None:
    """Reduce one plain event to a ``ChannelEvent``; None if the tracker ignores it.

    Each event type reads only the headers the tracker uses for it: a
    lookup of an absent header scans the whole ~9 kB block, so asking
    every event for everything would triple the cost.  ``tenants``: also
    read the facts that tell a channel's tenant (CHANNEL_CREATE only).
    ``wants(name, uuid)`` (``CallTracker.wants``): how much of it to read;
    without, everything.  ``name``: its Event-Name when the caller read it
    already (each lookup is ~0.7 us of an event's ~30); None: read here.
    """
    if name is None:
        name = headers.get("Event-Name") or ""
    if name == "BACKGROUND_JOB":
        return ChannelEvent(
            name=name,
            uuid="",
            timestamp_us=_int(headers.get("Event-Date-Timestamp")),
            job_uuid=sanitize(headers.get("Job-UUID"), MAX_ID_CHARS),
            job_body=sanitize(body.decode("utf-8", "replace"), MAX_TEXT_CHARS),
        )
    read = _READERS.get(name)
    if read is None:
        return None
    uuid = sanitize(headers.get("Unique-ID"), MAX_ID_CHARS)
    if not uuid:
        return None
    want = WANT_ALL if wants is None else wants(name, uuid)
    if want == WANT_NOTHING:
        return None
    fields = read(headers, want)
    if tenants and name == "CHANNEL_CREATE":
        fields.update(_tenant_fields(headers))
    return ChannelEvent(
        name=name, uuid=uuid, timestamp_us=_int(headers.get("Event-Date-Timestamp")), **fields
    )


def _tenant_fields(headers: EventHeaders) -> dict:
    get = headers.get
    presence = sanitize(get("variable_presence_id") or get("Channel-Presence-ID"), MAX_TEXT_CHARS)
    _, at, presence_domain = presence.rpartition("@")
    return {
        "tenant_tag": sanitize(get("variable_" + TENANT_VAR), MAX_NUMBER_CHARS),
        "domains": (
            sanitize(get("variable_domain_name"), MAX_TEXT_CHARS),
            sanitize(get("variable_dialed_domain"), MAX_TEXT_CHARS),
            presence_domain if at else "",
        ),
    }


def _create_fields(headers: EventHeaders, want: str = WANT_ALL) -> dict:
    get = headers.get
    fields = {
        "call_uuid": sanitize(get("Channel-Call-UUID"), MAX_ID_CHARS),
        "direction": sanitize(get("Call-Direction"), 16),
        "caller_number": sanitize(get("Caller-Caller-ID-Number"), MAX_NUMBER_CHARS),
        "destination_number": sanitize(get("Caller-Destination-Number"), MAX_NUMBER_CHARS),
        "other_leg_uuid": sanitize(get("Other-Leg-Unique-ID"), MAX_ID_CHARS),
    }
    if fields["direction"] == "outbound":
        fields["dialed_user"] = sanitize(get("variable_dialed_user"), MAX_NUMBER_CHARS)
        if not fields["dialed_user"]:
            # A user/<ext> leg is his whatever it rings; only other legs can
            # be a forward (two lookups saved on every ordinary ring).
            fields["forwarded_from"] = _forwarded_from(headers)
        if fields["other_leg_uuid"]:
            fields["other_type"] = sanitize(get("Other-Type"), 16)
        else:
            # An outbound channel nobody originated: a queue's agent leg
            # (mod_callcenter, mod_fifo ringall: its only link to the caller),
            # or an `originate`, maybe ours.
            fields["queue_member_uuid"] = sanitize(
                get("variable_cc_member_session_uuid") or get("variable_fifo_bridge_uuid"), MAX_ID_CHARS)
            fields["click_to_call_id"] = sanitize(get("variable_" + CLICK_TO_CALL_VAR), MAX_ID_CHARS)
            if fields["click_to_call_id"]:
                fields["click_to_call_ext"] = sanitize(get("variable_" + CLICK_TO_CALL_EXT_VAR), MAX_NUMBER_CHARS)
                fields["click_to_call_phone"] = sanitize(get("variable_" + CLICK_TO_CALL_PHONE_VAR), MAX_NUMBER_CHARS)
    else:
        fields["user_name"] = sanitize(get("variable_user_name"), MAX_NUMBER_CHARS)
    return fields


# The user part of a Diversion header value: `<sip:101@pbx>;reason=no-answer`, `"Ann" <tel:101>`.
_DIVERSION_USER = re.compile(r"<?(?:sips?|tel):([^@;>]+)")


def _forwarded_from(headers: EventHeaders) -> str:
    """The extension a leg forwards: our tag, else the Diversion header it sends (RFC 5806)."""
    tag = sanitize(headers.get("variable_" + FORWARDED_FROM_VAR), MAX_NUMBER_CHARS)
    if tag:
        return tag
    diversion = headers.get("variable_sip_h_Diversion")
    if not diversion:
        return ""
    # several diversions: the first one (left) is the latest, RFC 5806 4.
    match = _DIVERSION_USER.search(diversion.split(",", 1)[0])
    return sanitize(match.group(1), MAX_NUMBER_CHARS) if match else ""


def _bridge_fields(headers: EventHeaders, want: str = WANT_ALL) -> dict:
    get = headers.get
    return {
        "bridge_a_uuid": sanitize(get("Bridge-A-Unique-ID"), MAX_ID_CHARS),
        "bridge_b_uuid": sanitize(get("Bridge-B-Unique-ID"), MAX_ID_CHARS),
        "other_leg_answered_us": _int(get("Other-Leg-Channel-Answered-Time")),
        "answered_us": _int(get("Caller-Channel-Answered-Time")),
        # Names the extension of a leg bridged in from another call
        # (attended transfer), whose CHANNEL_CREATE belonged to that call.
        "other_leg_destination": sanitize(get("Other-Leg-Destination-Number"), MAX_NUMBER_CHARS),
        # The bridging channel's own extension when it is one we did not follow
        # (a mod_fifo member rung for no caller in particular; a phone whose
        # call serves caller after caller, `fifo ... out wait`).
        "dialed_user": sanitize(get("variable_dialed_user"), MAX_NUMBER_CHARS),
        "user_name": sanitize(get("variable_user_name"), MAX_NUMBER_CHARS),
        "planfix_data": _planfix_data(headers),
    }


def _leg_end_fields(headers: EventHeaders, want: str = WANT_ALL, complete: bool = False) -> dict:
    """The end of a leg: what the tracker reads of an A leg's end (its
    disposition, data, recording, voicemail) and of another leg's (its SIP
    status, billsec, a redirect), both with ``WANT_ALL``.  Each variable read
    is a search of the block, so the part not used is not read.  ``complete``:
    it is a CHANNEL_HANGUP_COMPLETE, not a CHANNEL_DESTROY (known from the
    reader's key, not looked up again)."""
    get = headers.get
    fields = {
        "hangup_cause": sanitize(get("Hangup-Cause"), 64),
        "hangup_us": _int(get("Caller-Channel-Hangup-Time")),
    }
    if want != WANT_LEG:
        fields["originate_disposition"] = sanitize(get("variable_originate_disposition"), 64)
        fields["planfix_data"] = _planfix_data(headers)
        if complete:
            fields["record_ms"] = _record_ms(headers)
            # mod_voicemail sets these on the caller's channel once it saved a
            # message (voicemail_leave_main, after deliver_vm).
            path = sanitize(get("variable_voicemail_file_path"), MAX_PATH_CHARS)
            if path:
                fields["voicemail_path"] = path
                fields["voicemail_seconds"] = _hms_seconds(get("variable_voicemail_message_len"))
    if want != WANT_CALL:
        fields["sip_term_status"] = sanitize(get("variable_sip_term_status"), 8)
        fields["billsec"] = _int(get("variable_billsec"))
        if fields["hangup_cause"] == "REDIRECTION_TO_NEW_DESTINATION":
            # The phone answered 302 (its own call forwarding): mod_sofia sends
            # the caller on to the Contact's user (a transfer of the A leg).
            fields["redirect_to"] = sanitize(get("variable_sip_redirect_contact_user_0"), MAX_NUMBER_CHARS)
    return fields


def _hms_seconds(value: str | None) -> int:
    """``HH:MM:SS`` -> seconds; -1 when absent or not in that shape."""
    parts = (value or "").split(":")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        return -1
    hours, minutes, seconds = map(int, parts)
    return hours * 3600 + minutes * 60 + seconds


def _record_stop_fields(headers: EventHeaders, want: str = WANT_ALL) -> dict:
    return {
        "record_file_path": sanitize(headers.get("Record-File-Path"), MAX_PATH_CHARS),
        "record_ms": _record_ms(headers),
    }


# Event-Name -> the headers read for it (keys must match SUBSCRIBED_EVENTS);
# each reader takes what the tracker wants of the event (only the end events
# read less than everything for some).
_READERS = {
    "CHANNEL_CREATE": _create_fields,
    "CHANNEL_BRIDGE": _bridge_fields,
    "CHANNEL_HANGUP_COMPLETE": functools.partial(_leg_end_fields, complete=True),
    "CHANNEL_DESTROY": _leg_end_fields,
    "RECORD_STOP": _record_stop_fields,
}
