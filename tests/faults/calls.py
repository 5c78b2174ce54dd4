"""Call captures turned into fresh calls: new UUIDs, optionally hostile values.

Each copy of a capture gets its own channel UUIDs so that several copies
can run through one service (and one tracker) side by side.  Values are
swapped in the header blocks only, as raw bytes, so a copy can carry
exactly what a hostile peer would make FreeSWITCH send (percent-encoded
newlines, %00, invalid UTF-8, huge values); both Content-Lengths are
recomputed by ``rewrite_event``.
"""

from __future__ import annotations

import re
import uuid

from fsbridge.fakes.freeswitch import TraceEvent, events_of, rewrite_event
from tests.test_tracker_traces import CALLER, EXPECTED, capture

_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def call_events(traces_dir, trace: str) -> list[TraceEvent]:
    return events_of(capture(traces_dir, trace))


def channel_uuids(events: list[TraceEvent]) -> set[bytes]:
    """Every Unique-ID in the capture (the legs), not Core-UUIDs or Job-UUIDs."""
    found = set()
    for ev in events:
        match = re.search(rb"\nUnique-ID: (" + _UUID.pattern + rb")\n", ev.body)
        if match:
            found.add(match.group(1))
    return found


def fresh_call(traces_dir, trace: str, header_subs: dict[bytes, bytes] | None = None) -> tuple[str, list[bytes]]:
    """(new A-leg callid, frames): the capture with new leg UUIDs and `header_subs` applied."""
    events = call_events(traces_dir, trace)
    old_callid = EXPECTED[trace][0][0]["callid"].encode()
    mapping = {old: str(uuid.uuid4()).encode() for old in channel_uuids(events)}
    frames = []
    for ev in events:
        block, sep, rest = ev.body.partition(b"\n\n")
        for old, new in mapping.items():  # same length: inner Content-Length stays right
            block, rest = block.replace(old, new), rest.replace(old, new)
        for old, new in (header_subs or {}).items():
            block = block.replace(old, new)
        frames.append(rewrite_event(TraceEvent(ev.name, ev.subclass, b"", block + sep + rest)))
    return mapping[old_callid].decode(), frames


def caller_subs(value: bytes) -> dict[bytes, bytes]:
    """Replace the caller's number and name (header values, as sent on the wire)."""
    return {
        b"Caller-Caller-ID-Number: " + CALLER.encode(): b"Caller-Caller-ID-Number: " + value,
        b"Caller-Caller-ID-Name: " + CALLER.encode(): b"Caller-Caller-ID-Name: " + value,
        b"variable_sip_from_user: " + CALLER.encode(): b"variable_sip_from_user: " + value,
        b"variable_caller_id_number: " + CALLER.encode(): b"variable_caller_id_number: " + value,
    }


def expected_with_callid(rows: list[dict[str, str]], callid: str) -> list[dict[str, str]]:
    return [{**row, "callid": callid} for row in rows]
