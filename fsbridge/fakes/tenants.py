"""Real captures replayed as if many tenants (cloud PBX) had made them.

The lab captures come from one tenant: every extension's SIP domain is
``127.0.0.1`` and the carrier called the DID ``74950000000`` (23 and 25 used
``74950000001`` / ``74950000003``).  ``tenant_copy`` turns a capture's events
into another tenant's call on the same FreeSWITCH: new channel UUIDs, that
tenant's domain and DID, everything else byte for byte (timestamps, caller
numbers, addresses).  ``interleave`` mixes copies on one connection, each
keeping its own order.  Shared by the tests and the benchmark.

What is rewritten, in a frame's header block (values percent-encoded as
FreeSWITCH sends them) and in its own body (raw):

* every UUID-shaped string except the Core-UUID becomes
  ``tenant_uuid(old, seed)``: Unique-ID, Other-Leg-*, Channel-Call-UUID,
  Bridge-*, Job-UUID, ``variable_*`` holding UUIDs, Record-File-Path,
  dial strings like ``**<uuid>``.  The Core-UUID names the FreeSWITCH, not
  the call: it stays unless ``core_uuid`` is given (a copy replayed by
  another node);
* the lab DIDs ``7495000000N`` (a whole number, also after an encoded
  ``%3A`` or ``%7C``) become ``did``;
* ``127.0.0.1`` where it is the SIP domain becomes ``domain``: after ``@``
  (``user/101%40127.0.0.1``, presence ids, SIP URIs) unless a port follows
  (``sip:101@127.0.0.1:5091`` is a phone's contact address) or it is a
  SIP Call-ID; as an application's argument (``voicemail default
  127.0.0.1 101``, ``hash insert/127.0.0.1-last_dial/...``,
  ``domain_name=127.0.0.1``); and as the
  whole value of the domain headers
  (``variable_domain_name``, ``variable_dialed_domain``, ``*_invite_domain``,
  ``*realm``, ``sip_{from,to,req}_host``).  As an address (Network-Addr,
  media and via IPs, SDP, contacts with a port, FreeSWITCH-IPv4) it stays:
  tenants share the FreeSWITCH and the carrier.  A carrier's From URI
  without a port (``79101234567@127.0.0.1``) counts as a domain: harmless.

``domain``, ``did`` and ``core_uuid`` may only hold characters FreeSWITCH
does not percent-encode, so one replacement serves headers and bodies.
Every frame's two Content-Lengths are recomputed; FreeSWITCH's layout is
kept (a copy with nothing changed would be the original bytes).

Each capture is cut once (cached) into a ``%``-format template per frame,
so a copy costs two C calls a frame: 50 copies of a capture take
milliseconds.

API
---
``tenant_copy(events, *, domain, did, seed, core_uuid=None) -> list[bytes]``
    ``events``: TraceEvents (``trace_events``, ``events_of``) and/or byte
    streams (their event frames).  Event order kept.
``tenant_uuid(old, seed) -> str``
    The copy's UUID for an original one (deterministic, version 4 shape
    like FreeSWITCH's): a test's expected callid is
    ``tenant_uuid(A01, seed)``.
``uuid_map(events, seed) -> dict[str, str]``
    Every UUID of ``events`` that a copy with ``seed`` replaces, old -> new.
``interleave(*streams) -> list[bytes]``
    Round robin, one frame of each stream in turn.
``Tenant(domain, did, seed)``, ``make_tenants(n, first=1) -> list[Tenant]``
    ``tenant<i>.pbx.test`` / ``7499<i:07d>`` / seed ``tenant<i>``; and
    ``Tenant.copy(events, core_uuid=None)``.
``tenant_originate_answer(raw, tenants)``
    A ``FakeFreeSwitch.on_command("bgapi originate", ...)`` hook answering
    a click-to-call with capture ``raw`` copied for the tenant whose
    ``@domain`` the originate names, then tagged as ours.

Example: 50 tenants on two FreeSWITCH nodes, each node one connection::

    events = [e for e in trace_events(path) if e.name in SUBSCRIBED_EVENTS]
    tenants = make_tenants(50)
    for i, node in enumerate((node_a, node_b)):
        mine = tenants[i::2]
        node.replay(interleave(*(t.copy(events, core_uuid=node.core_uuid) for t in mine)))
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache
from itertools import zip_longest
from operator import itemgetter
from typing import Callable, Iterable

from fsbridge.fakes.clicktocall import originate_answer
from fsbridge.fakes.freeswitch import TraceEvent, events_of

_UUID = rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_TOKENS = re.compile(
    rb"(?P<uuid>" + _UUID + rb")"
    # A whole number: not inside longer digits, but "%3A74950000000" counts
    # (an encoded character ends in a hex digit).
    rb"|(?P<did>(?:(?<=%[0-9A-F]{2})|(?<![0-9]))7495000000[0-9](?![0-9]))"
    rb"|(?:%40|@)(?P<at>127\.0\.0\.1)(?![0-9]|%3A|:)"
    # An application's argument: "voicemail default <domain> 101",
    # "hash insert/<domain>-last_dial/...", "set domain_name=<domain>".
    rb"|(?:(?<=%20)|(?<=/)|(?<=%3D))(?P<arg>127\.0\.0\.1)(?=%20|-|,|$)"
    rb"|^(?P<name>[^\n:]+): (?P<value>127\.0\.0\.1)$",
    re.MULTILINE,
)
# Headers whose whole value 127.0.0.1 is the SIP domain, not an address.
_DOMAIN_HEADER = re.compile(rb"domain|realm|(?:from|to|req)[_-]host$")
# user@host values that are no domain.
_NOT_DOMAIN_AT = frozenset({b"variable_sip_call_id", b"call-id"})
_CORE_UUID = re.compile(rb"(?:^|\n)Core-UUID: (" + _UUID + rb")\n")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")
_DIGITS = re.compile(r"[0-9]{1,32}")
_UUID_TEXT = re.compile(_UUID.decode())
# Slot numbers in a template; a UUID's is _FIRST_UUID + its index.
_DOMAIN, _DID, _CORE, _FIRST_UUID = 0, 1, 2, 3
_OUTER = b"Content-Length: %d\nContent-Type: text/event-plain\n\n"
_NAMESPACE = b"fsbridge.fakes.tenants/"


def tenant_uuid(old: str, seed: object) -> str:
    """The UUID a copy made with ``seed`` has in place of ``old``."""
    digest = hashlib.sha256(_NAMESPACE + f"{seed}/{old}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


@dataclass(frozen=True, slots=True)
class _Frame:
    head: bytes                   # header lines (no inner Content-Length), %-format
    head_slots: Callable | None   # values -> the tuple for head (None: no slot)
    body: bytes | None            # the event's own body, %-format; None: none
    body_slots: Callable | None


@dataclass(frozen=True, slots=True)
class _Template:
    frames: tuple[_Frame, ...]
    uuids: tuple[str, ...]        # in order of first appearance
    core_uuid: str


def _getter(slots: list[int]) -> Callable | None:
    if not slots:
        return None
    if len(slots) == 1:
        index = slots[0]
        return lambda values: (values[index],)
    return itemgetter(*slots)


def _cut(text: bytes, is_head: bool, index: dict[bytes, int], core: bytes) -> tuple[bytes, Callable | None]:
    """``text`` as a %-format string with a ``%s`` per replaced token."""
    out: list[bytes] = []
    slots: list[int] = []
    pos = 0
    for match in _TOKENS.finditer(text):
        kind = match.lastgroup
        if kind == "uuid":
            found = match.group()
            slot = _CORE if found == core else index.setdefault(found, _FIRST_UUID + len(index))
            start, end = match.span()
        elif kind == "did":
            slot, (start, end) = _DID, match.span()
        elif kind == "at":
            if is_head:
                line = text.rfind(b"\n", 0, match.start()) + 1
                if text[line:text.find(b": ", line)] in _NOT_DOMAIN_AT:
                    continue
            slot, (start, end) = _DOMAIN, match.span("at")
        elif kind == "arg":
            slot, (start, end) = _DOMAIN, match.span("arg")
        else:  # a whole header value
            if not is_head or not _DOMAIN_HEADER.search(match.group("name")):
                continue
            slot, (start, end) = _DOMAIN, match.span("value")
        out += (text[pos:start].replace(b"%", b"%%"), b"%s")
        slots.append(slot)
        pos = end
    if not slots:
        return text, None
    out.append(text[pos:].replace(b"%", b"%%"))
    return b"".join(out), _getter(slots)


def _bodies(events: Iterable[TraceEvent | bytes]) -> tuple[bytes, ...]:
    bodies: list[bytes] = []
    for item in events:
        if isinstance(item, TraceEvent):
            bodies.append(item.body)
        elif isinstance(item, (bytes, bytearray, memoryview)):
            bodies.extend(event.body for event in events_of(bytes(item)))
        else:
            raise TypeError(f"tenant_copy: expected TraceEvents or frame bytes, got {type(item).__name__}")
    return tuple(bodies)


@lru_cache(maxsize=64)
def _template(bodies: tuple[bytes, ...]) -> _Template:
    core = next((m.group(1) for m in map(_CORE_UUID.search, bodies) if m), b"")
    index: dict[bytes, int] = {}
    frames = []
    for plain in bodies:
        block, _, rest = plain.partition(b"\n\n")
        lines = block.split(b"\n")
        length = next((int(line[16:]) for line in lines if line.startswith(b"Content-Length: ")), None)
        head = b"".join(line + b"\n" for line in lines if not line.startswith(b"Content-Length: "))
        head, head_slots = _cut(head, True, index, core)
        body, body_slots = (None, None) if not length else _cut(rest[:length], False, index, core)
        frames.append(_Frame(head, head_slots, body, body_slots))
    return _Template(tuple(frames), tuple(u.decode() for u in index), core.decode())


def _check(domain: str, did: str, core_uuid: str | None) -> None:
    # Only characters FreeSWITCH leaves unencoded: the same bytes fit headers and bodies.
    if not isinstance(domain, str) or not _HOSTNAME.fullmatch(domain):
        raise ValueError(f"tenant_copy: domain must be a host name (letters, digits, '-', '.'), got {domain!r}")
    if not isinstance(did, str) or not _DIGITS.fullmatch(did):
        raise ValueError(f"tenant_copy: did must be 1-32 digits, got {did!r}")
    if core_uuid is not None and not (isinstance(core_uuid, str) and _UUID_TEXT.fullmatch(core_uuid)):
        raise ValueError(f"tenant_copy: core_uuid must be a lowercase UUID, got {core_uuid!r}")


def uuid_map(events: Iterable[TraceEvent | bytes], seed: object) -> dict[str, str]:
    """Old -> new for every UUID a copy of ``events`` with ``seed`` replaces."""
    return {old: tenant_uuid(old, seed) for old in _template(_bodies(events)).uuids}


def tenant_copy(events: Iterable[TraceEvent | bytes], *, domain: str, did: str, seed: object,
                core_uuid: str | None = None) -> list[bytes]:
    """The event frames of ``events`` as tenant (``domain``, ``did``) would have
    produced them; ``seed`` derives the new UUIDs (see ``tenant_uuid``),
    ``core_uuid`` (optional) replaces the FreeSWITCH's Core-UUID."""
    _check(domain, did, core_uuid)
    template = _template(_bodies(events))
    values = [domain.encode(), did.encode(), (core_uuid or template.core_uuid).encode()]
    values += [tenant_uuid(old, seed).encode() for old in template.uuids]
    out = []
    for frame in template.frames:
        head = frame.head % frame.head_slots(values) if frame.head_slots else frame.head
        if frame.body is None:
            inner = head + b"\n"
        else:
            body = frame.body % frame.body_slots(values) if frame.body_slots else frame.body
            inner = head + b"Content-Length: %d\n\n" % len(body) + body
        out.append(_OUTER % len(inner) + inner)
    return out


def interleave(*streams: Iterable[bytes]) -> list[bytes]:
    """One frame of each stream in turn (a finished stream drops out): every
    stream keeps its own order, and the mix is the same at every run."""
    missing = object()
    return [frame for turn in zip_longest(*streams, fillvalue=missing) for frame in turn if frame is not missing]


@dataclass(frozen=True, slots=True)
class Tenant:
    domain: str
    did: str
    seed: str

    def copy(self, events: Iterable[TraceEvent | bytes], core_uuid: str | None = None) -> list[bytes]:
        return tenant_copy(events, domain=self.domain, did=self.did, seed=self.seed, core_uuid=core_uuid)

    def uuid(self, old: str) -> str:
        return tenant_uuid(old, self.seed)


def make_tenants(n: int, first: int = 1) -> list[Tenant]:
    """``n`` distinct tenants: ``tenant<i>.pbx.test``, DID ``7499<i:07d>`` (no lab DID)."""
    if n < 0 or first < 0 or first + n > 10_000_000:
        raise ValueError(f"make_tenants: need 0 <= first, 0 <= n, first + n <= 10^7, got n={n}, first={first}")
    return [Tenant(f"tenant{i}.pbx.test", f"7499{i:07d}", f"tenant{i}") for i in range(first, first + n)]


def tenant_originate_answer(raw: bytes, tenants: Iterable[Tenant]):
    """An on_command hook answering ``bgapi originate`` with click-to-call
    capture ``raw`` copied for the tenant whose ``@domain`` the command
    names (then rewritten for our originate, as ``originate_answer``).  New
    UUIDs per originate: seed = tenant seed + our origination_uuid.  An
    originate naming no known domain gets None: the fake's own
    BACKGROUND_JOB."""
    by_domain = {t.domain: t for t in tenants}
    events = events_of(raw)
    domain_in = re.compile(r"@(" + "|".join(map(re.escape, by_domain)) + r")(?![A-Za-z0-9.-])")

    def answer(command: str, headers: dict[str, str], job_uuid: str | None):
        found = domain_in.search(command) if by_domain else None
        if found is None:
            return None
        tenant = by_domain[found.group(1)]
        origination = re.search(r"origination_uuid=([^,}\s]+)", command)
        seed = f"{tenant.seed}/{origination.group(1) if origination else job_uuid}"
        copy = b"".join(tenant_copy(events, domain=tenant.domain, did=tenant.did, seed=seed))
        return originate_answer(copy)(command, headers, job_uuid)

    return answer


__all__ = [
    "Tenant", "interleave", "make_tenants", "tenant_copy",
    "tenant_originate_answer", "tenant_uuid", "uuid_map",
]
