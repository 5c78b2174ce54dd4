"""The call state machine: FreeSWITCH channel events in, PlanFix commands out.

Pure: no sockets, no clock reads, no globals.  Time comes in with the
events (their FreeSWITCH timestamps) and with ``reconcile(now_us=...)``.
The full mapping of FreeSWITCH facts to PlanFix fields is documented in
``docs/event-mapping.md``; the short version:

* A call is keyed by its A leg (the channel with no originator): an inbound
  channel from the carrier or a phone, or the manager leg of our own
  click-to-call originate (tagged ``fsbridge_click_to_call``).  Its UUID is
  the PlanFix ``callid``.
* Legs the A leg originates (B legs) are attached through
  ``Other-Leg-Unique-ID`` / ``Channel-Call-UUID`` on their CHANNEL_CREATE and
  from then on found by their own ``Unique-ID`` (late B-leg events may carry
  their own UUID as Channel-Call-UUID again).
* Each extension taking part gets a *slot*: exactly one INCOMING or
  OUTGOING, at most one ACCEPTED, exactly one COMPLETED, same ext and callid.
* The winner comes only from CHANNEL_BRIDGE (``Other-Leg-*`` on the A leg's
  CHANNEL_ANSWER can name a loser).  A later CHANNEL_BRIDGE on the A leg is
  a transfer: the previous talker's part ends, the new one's begins.  A
  bridge on another call's A leg whose Bridge-B is our A leg is a pickup.
* Queue legs carry no originator: mod_callcenter agent legs are attached
  by ``variable_cc_member_session_uuid``, mod_fifo members rung for a
  caller by ``variable_fifo_bridge_uuid``.  A channel that bridges itself
  to a caller (mod_fifo's ``fifo ... out``) is that caller's bridge to it.
* A leg to a mobile is an extension's when it names the extension it
  forwards (``user/<ext>``, our ``fsbridge_forwarded_from``, its Diversion
  header) or rings the number his phone redirected the caller to (302); it
  continues his part when his phone rang before it.
* Cloud PBX: a call belongs to the tenant its A leg names, or else the
  first of its legs that names one (``fsbridge.core.tenancy``); every command
  carries it, and that tenant's extension pattern and internal-call rule apply.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Callable, Mapping

from fsbridge.core.events import WANT_ALL, WANT_CALL, WANT_LEG, WANT_NOTHING, ChannelEvent, sanitize
from fsbridge.core.tenancy import TenantMap, domain_of_presence

__all__ = [
    "CallTracker",
    "PlanfixCommand",
    "TrackerSettings",
    "default_normalize_phone",
    "adoption_events",
    "live_uuids_from_show_json",
    "outgoing_status",
]

TYPE_IN = "in"
TYPE_OUT = "out"

SUCCESS = "Success"
MISSED = "Missed"
CANCELLED = "Cancelled"
BUSY = "Busy"
NO_ANSWER = "NoAnswer"
NOT_AVAILABLE = "NotAvailable"
NOT_ALLOWED = "NotAllowed"

_LEG_END_EVENTS = ("CHANNEL_HANGUP_COMPLETE", "CHANNEL_DESTROY")


def default_normalize_phone(raw: str) -> str:
    """Digits only (``+7 (910) 123-45-67`` -> ``79101234567``).

    A value without any digit (``anonymous``) is kept as it is rather than
    dropped: PlanFix should still see what the caller presented.  The
    service replaces this with ``fsbridge.core.phone.normalize_phone``.
    """
    digits = "".join(ch for ch in raw if ch.isdigit() and ch.isascii())
    return digits or raw


@dataclass(frozen=True, slots=True)
class TrackerSettings:
    # An extension (PlanFix "ext", an employee's short number).  Candidates
    # come from the channel: variable_dialed_user / Caller-Destination-Number
    # of a leg we ring, variable_user_name of a digest-authenticated phone.
    extension_pattern: str = r"^\d{2,6}$"
    # Calls from one extension to another are internal: not shown in PlanFix
    # unless this is on (then reported as incoming to the called extension).
    report_internal_calls: bool = False
    # Applied to `phone` and `diversion`; the service plugs in phone.py.
    normalize_phone: Callable[[str], str] = default_normalize_phone
    # Bounds memory if FreeSWITCH never ends some channels (lost events and
    # no reconnect): beyond this many open calls the oldest is closed.
    max_open_calls: int = 10_000
    # UUIDs of recently finished calls remembered so that a re-delivered
    # CHANNEL_CREATE does not start the call again.
    finished_memory: int = 4096
    # The number a click-to-call client sees ([click_to_call]
    # client_caller_id): the diversion of every event of such a call.
    # Empty: taken from the client leg once it exists.
    click_to_call_diversion: str = ""
    # Cloud PBX: who owns a call (and each tenant's extension pattern and
    # internal-call rule).  None: calls belong to nobody in particular
    # (commands carry tenant "") and the settings above apply.
    tenants: TenantMap | None = None
    # The FreeSWITCH node this tracker follows ("" for the one node), carried
    # by every command so the open-calls registry knows whose listing closes it.
    node: str = ""

    def __post_init__(self) -> None:
        try:
            re.compile(self.extension_pattern)
        except re.error as exc:
            raise ValueError(f"extension_pattern {self.extension_pattern!r} is not a valid regex: {exc}") from None
        if self.max_open_calls < 1:
            raise ValueError("max_open_calls must be at least 1")
        if self.finished_memory < 0:
            raise ValueError("finished_memory must not be negative")


@dataclass(frozen=True, slots=True)
class PlanfixCommand:
    call_id: str                 # ordering key for the outbox: the PlanFix callid (A-leg UUID)
    fields: dict[str, str]       # form fields WITHOUT planfix_token
    recording_path: str | None = None   # on COMPLETED of a recorded answered call
    tenant: str = ""                    # the PlanFix account it goes to ("" = none matched)
    node: str = ""                      # the FreeSWITCH it came from (TrackerSettings.node)
    # For a call no tenant owns: the domain or DID it came with (for the log).
    unmatched: str = ""


class _Slot:
    """One extension's part in a call: one INCOMING/OUTGOING ... one COMPLETED."""

    __slots__ = ("type", "ext", "phone", "diversion", "live_legs", "legs", "last_failed_leg")

    def __init__(self, type_: str, ext: str, phone: str, diversion: str) -> None:
        self.type = type_
        self.ext = ext
        self.phone = phone
        self.diversion = diversion
        self.live_legs = 0           # legs of this slot not ended yet
        self.legs: list[_Leg] = []
        self.last_failed_leg: _Leg | None = None

    @property
    def passed_over(self) -> bool:
        """Every leg rung for this extension has ended (hunt moved on, or all failed)."""
        return self.live_legs == 0 and bool(self.legs)


class _Leg:
    """A channel taking part in a call besides its A leg.

    Mostly a B leg the A leg (or a queue for it) originated; also a channel
    that joined the call later: the transfer target of an attended transfer
    (a leg of the consult call) or the channel of a phone that picked the
    call up.  Those are *joined* legs: they count talk time from the join.
    """

    __slots__ = ("uuid", "slot", "ended", "billsec", "cause", "sip_term_status", "answered_us", "joined_us", "end_us",
                 "number", "rung_us")

    def __init__(self, uuid: str, slot: _Slot | None, joined_us: int = 0, number: str = "", rung_us: int = 0) -> None:
        self.uuid = uuid
        self.slot = slot
        self.rung_us = rung_us       # its CHANNEL_CREATE (0: not known, e.g. adopted after a restart)
        self.number = number         # a leg to the outside: the number it rings
        self.ended = False
        self.billsec = -1            # -1: leg not ended (or ended without billsec)
        self.cause = ""
        self.sip_term_status = ""
        self.answered_us = 0         # when it answered (from the CHANNEL_BRIDGE that made it the talker)
        self.joined_us = joined_us   # 0: rung for this call; else when it was bridged in
        self.end_us = 0


class _Call:
    __slots__ = (
        "uuid", "caller_ext", "phone", "diversion", "click_to_call", "slots", "legs",
        "winner", "recording_path", "record_ms", "data", "voicemail_path", "tenant", "seen", "rules",
        "redirects", "rung_us", "rung_slot",
    )

    def __init__(self, uuid: str, rules: "_Rules") -> None:
        self.uuid = uuid
        self.tenant = ""             # its PlanFix account ("" until a channel names one)
        self.seen = ""               # the domain/DID that named no tenant (for the log)
        self.rules = rules           # the tenant's extension pattern and internal-call rule
        self.caller_ext = ""         # the A leg is this extension's phone / click-to-call manager
        self.phone = ""              # inbound: the caller; outbound: set per slot
        self.diversion = ""          # inbound: the DID dialled
        self.click_to_call = False
        self.slots: dict[int, _Slot] = {}   # open slots, in the order their first event went out
        self.legs: dict[str, _Leg] = {}
        self.winner: _Leg | None = None     # the leg talking with the caller (the latest bridge)
        self.recording_path = ""
        self.record_ms = -1          # -1: unknown
        self.data: dict[str, str] = {}
        self.voicemail_path = ""     # the message the caller left, if any
        self.redirects: dict[str, _Slot] = {}  # number a phone redirected to (302) -> that extension's part
        # When the latest extension was shown ringing (FreeSWITCH's time), and whose part it is.
        self.rung_us = 0
        self.rung_slot: _Slot | None = None


class CallTracker:
    """Feed ``ChannelEvent``s in FreeSWITCH order; get PlanFix ``event`` commands.

    COMPLETED contract (fields besides cmd/type/event/phone/diversion/ext/callid):

    * ``status``: ``Success`` for the extension that talked; ``Cancelled``
      for an extension another one answered before, or passed over by a hunt
      (sent right before the next INCOMING, or at the leg's end when that
      arrives after the next ring); ``Missed`` for every extension
      still ringing (or rung last) when an unanswered inbound call ended;
      outgoing failures per ``outgoing_status``.  A click-to-call whose
      manager leg fails before the client is rung ends ``NoAnswer``.
    * ``duration``: talk seconds of the winning leg (its ``billsec``, or its
      answer-to-hangup time when its HANGUP_COMPLETE has not arrived) for
      ``Success``; ``0`` otherwise.
    * ``is_recorded``: ``1`` only for ``Success`` when the call was recorded
      with content: a RECORD_STOP or HANGUP_COMPLETE said ``record_ms``
      (or ``record_seconds``) > 0, or RECORD_STOP named a file and no length
      was reported at all.  ``0`` otherwise (also for every loser, and for
      a talker whose part ended before the call did: a transfer).  A
      ``Missed`` COMPLETED is ``1`` when the caller left a voicemail
      message (``variable_voicemail_file_path`` on the A leg's end).
    * ``PlanfixCommand.recording_path``: the ``Record-File-Path`` of the
      last RECORD_STOP of the call (the voicemail message for ``Missed``),
      set only when ``is_recorded`` is ``1`` and the file is named.  The service checks that file on disk and
      adds ``record_link`` (or downgrades ``is_recorded``) before sending.
    * ``data_<field>``: every ``planfix_data_<field>`` variable seen on the
      A leg so far (all of them on the final COMPLETED).
    """

    def __init__(self, settings: TrackerSettings | None = None) -> None:
        self._settings = settings or TrackerSettings()
        self._default_rules = _Rules(self._settings.extension_pattern, self._settings.report_internal_calls)
        self._tenants: TenantMap | None = None
        self._rules: dict[str, _Rules] = {}
        if self._settings.tenants is not None:
            self.set_tenants(self._settings.tenants)
        self._normalize = self._settings.normalize_phone
        self._calls: dict[str, _Call] = {}       # A-leg UUID -> call, oldest first
        self._owner: dict[str, _Call] = {}       # B-leg UUID -> call
        self._finished: dict[str, None] = {}     # recently finished A-leg UUIDs (ordered set)

    # -- public ---------------------------------------------------------------

    def open_calls(self) -> int:
        return len(self._calls)

    def set_tenants(self, tenants: TenantMap) -> None:
        """A reload changed the tenants: new calls use the new map; open calls keep their tenant."""
        self._tenants = tenants
        self._rules = {name: _Rules(rule.extension_pattern, rule.report_internal_calls)
                       for name, rule in tenants.rules.items()}

    def replay(self, events: list[ChannelEvent]) -> list[PlanfixCommand]:
        """The commands one call this tracker never saw would have given, from
        its events rebuilt afterwards (cdr.call_events).  Followed by a tracker
        of its own with these settings and tenants: the open calls here are
        not touched, and a call this tracker follows is never among them."""
        other = CallTracker(self._settings)
        if self._tenants is not None:
            other.set_tenants(self._tenants)
        out: list[PlanfixCommand] = []
        for event in events:
            out += other.feed(event)
        return out

    def late_leg(self, create: ChannelEvent, hangup: ChannelEvent) -> list[PlanfixCommand]:
        """A leg a followed call rang and that ended unseen, known afterwards
        (its CDR: ``create``/``hangup`` rebuilt by cdr.leg_events).

        The call was taken up at a reconnect (adopted), and the listing no
        longer had this leg: a group member who stopped ringing during the
        gap.  An extension with no part in the call yet gets it now, as it
        would have live: INCOMING, then COMPLETED ``Cancelled`` if someone
        answered; else its part stays open and ends by the usual rules
        (``Missed`` when nobody answers).  Nothing for a leg that answered,
        is known already, or belongs to no followed call."""
        parent = self._parent_uuid(create)
        call = self._calls.get(parent) or self._owner.get(parent)
        if call is None or create.uuid in self._owner or create.uuid in call.legs or call.click_to_call:
            return []
        ext, _forward = self._leg_ext(call, create)
        if not ext or (call.caller_ext and not call.rules.report_internal_calls):
            return []
        if any(slot.ext == ext for slot in call.slots.values()):
            return []
        out: list[PlanfixCommand] = []
        phone, diversion = (call.caller_ext, "") if call.caller_ext else (call.phone, call.diversion)
        slot = self._open_slot(call, TYPE_IN, ext, phone, diversion)
        out.append(self._command(call, slot, "INCOMING"))
        leg = _Leg(create.uuid, slot)
        leg.ended, leg.billsec, leg.cause = True, hangup.billsec, hangup.hangup_cause
        leg.end_us = hangup.hangup_us or hangup.timestamp_us
        slot.legs.append(leg)
        slot.last_failed_leg = leg
        call.legs[create.uuid] = leg
        self._owner[create.uuid] = call
        if call.winner is not None:
            out.append(self._completed(call, slot, CANCELLED))
        return out

    def open_call_list(self) -> list[_Call]:
        """The open calls, oldest first, for read-only views (fsbridge.calls)."""
        return list(self._calls.values())

    def feed(self, event: ChannelEvent) -> list[PlanfixCommand]:
        name = event.name
        if name == "CHANNEL_CREATE":
            return self._on_create(event)
        call = self._calls.get(event.uuid)
        if call is not None:
            return self._on_a_leg_event(call, event)
        call = self._owner.get(event.uuid)
        if call is not None:
            return self._on_b_leg_event(call, call.legs[event.uuid], event)
        if name == "CHANNEL_BRIDGE":
            call = self._calls.get(event.bridge_b_uuid)
            if call is not None and event.bridge_a_uuid == event.uuid:
                return self._on_joining_bridge(call, event)
        # BACKGROUND_JOB, HEARTBEAT, channels we do not track, late events
        # of calls already closed: nothing to say.
        return []

    def wants(self, name: str, uuid: str) -> str:
        """What ``feed`` reads of an event of this name for this channel.

        The reader asks first, so it decodes no more of the ~9 kB of headers
        than is used (``events.channel_event``): ``WANT_NOTHING`` where
        ``feed`` would return nothing and change nothing (a channel no open
        call has, such as the end events of a call already closed, or a leg's
        second end event: a call's CHANNEL_DESTROYs are a quarter of its
        events); ``WANT_CALL`` / ``WANT_LEG`` for an open call's A leg / other
        leg, whose end events are read in part; else ``WANT_ALL``.
        """
        if name == "CHANNEL_CREATE" or name == "CHANNEL_BRIDGE":
            return WANT_ALL
        if uuid in self._calls:
            return WANT_CALL
        call = self._owner.get(uuid)
        if call is None or (name in _LEG_END_EVENTS and call.legs[uuid].ended):
            return WANT_NOTHING
        return WANT_LEG

    def reconcile(self, live_call_uuids: set[str], now_us: int) -> list[PlanfixCommand]:
        """Close every open call none of whose channels is still up.

        Run after an ESL reconnect with the UUIDs from ``show calls/channels
        as json`` (``live_uuids_from_show_json``): whatever ended while the
        connection was down gets its COMPLETED, with ``now_us`` standing in
        for the unknown hangup time.
        """
        out: list[PlanfixCommand] = []
        for call in list(self._calls.values()):
            if call.uuid in live_call_uuids or any(uuid in live_call_uuids for uuid in call.legs):
                continue
            out += self._finish(call, end_us=now_us, disposition="", a_cause="")
        return out

    def tracks(self, uuid: str) -> bool:
        """``uuid`` is a leg of a call followed live (its events decide its end)."""
        return uuid in self._calls or uuid in self._owner

    def forget_gone(self, live_call_uuids: set[str]) -> list[str]:
        """Drop, without a COMPLETED, every open call none of whose channels
        is still up; return their callids.

        The alternative to ``reconcile`` when FreeSWITCH's CDRs are received
        (``[cdr]``): the service hands such calls to the open-calls registry,
        which finishes them from their CDR (``fsbridge.core.cdr.completions``) or,
        past ``[cdr] wait``, closes them blind.
        """
        gone = [call for call in self._calls.values()
                if call.uuid not in live_call_uuids and not any(uuid in live_call_uuids for uuid in call.legs)]
        for call in gone:
            self._forget(call)
        return [call.uuid for call in gone]

    def tracks(self, uuid: str) -> bool:
        """A channel of a call this tracker follows."""
        return uuid in self._calls or uuid in self._owner

    def adopt(self, show_channels_json: str, now_us: int,
              answered_us: Mapping[str, int] | None = None) -> list[PlanfixCommand]:
        """Take up calls that started while we could not see FreeSWITCH.

        Run after a (re)connect with ``show channels as json``: each live
        call not tracked yet (begun during the gap, or before this process
        started) is fed as the events its channels imply
        (``adoption_events``), so it is shown now and its real end (billsec,
        recording, data_*) arrives with FreeSWITCH's own later events.
        Calls already tracked are left alone (their duplicates are dropped
        as re-deliveries).  ``answered_us``: when answered legs answered
        (``answered_legs``, ``answered_us_from_dump``), else now.  Raises
        ValueError as ``live_uuids_from_show_json``.
        """
        out: list[PlanfixCommand] = []
        for event in adoption_events(show_channels_json, now_us, answered_us):
            out += self.feed(event)
        return out

    # -- events ---------------------------------------------------------------

    def _on_create(self, ev: ChannelEvent) -> list[PlanfixCommand]:
        uuid = ev.uuid
        if uuid in self._calls or uuid in self._owner or uuid in self._finished:
            return []  # duplicate delivery
        parent = self._parent_uuid(ev)
        if parent:
            call = self._calls.get(parent) or self._owner.get(parent)
            if call is None:
                return []  # a leg of something we do not track
            return self._on_leg_created(call, ev)
        return self._on_call_created(ev)

    @staticmethod
    def _parent_uuid(ev: ChannelEvent) -> str:
        # A B leg names its originator in Other-Leg-Unique-ID
        # (Other-Type: originator); Channel-Call-UUID is the A leg's on
        # CHANNEL_CREATE.  An A leg's Other-Leg (originatee) is its child.
        if ev.other_leg_uuid and ev.other_leg_uuid != ev.uuid and ev.other_type != "originatee":
            return ev.other_leg_uuid
        if ev.call_uuid and ev.call_uuid != ev.uuid:
            return ev.call_uuid
        # mod_callcenter originates agent legs on its own: their only link
        # to the caller is the member session variable.
        if ev.queue_member_uuid and ev.queue_member_uuid != ev.uuid:
            return ev.queue_member_uuid
        return ""

    def _on_call_created(self, ev: ChannelEvent) -> list[PlanfixCommand]:
        out: list[PlanfixCommand] = []
        if ev.click_to_call_id:
            rules = self._rules_for(self._owner_of(ev, a_leg=True)[0])
            ext = ev.click_to_call_ext if rules.is_ext(ev.click_to_call_ext) else ""
            if not ext:
                return []  # our tag without a usable extension: cannot be shown to anyone
            call = self._new_call(ev, out)
            call.click_to_call = True
            call.caller_ext = ext
            # The manager's phone rings first; the client leg comes after
            # the manager answers.  PlanFix shows the call from now on.
            slot = self._open_slot(
                call, TYPE_OUT, ext, self._phone(ev.click_to_call_phone),
                self._phone(self._settings.click_to_call_diversion),
            )
            out.append(self._command(call, slot, "OUTGOING"))
            return out
        if ev.direction != "inbound":
            return []  # e.g. an `originate` from fs_cli: not a call we report
        call = self._new_call(ev, out)
        if call.rules.is_ext(ev.user_name):
            call.caller_ext = ev.user_name      # an extension's own phone dials
        call.phone = self._phone(ev.caller_number)
        call.diversion = self._phone(ev.destination_number)
        return out

    def _new_call(self, ev: ChannelEvent, out: list[PlanfixCommand]) -> _Call:
        if len(self._calls) >= self._settings.max_open_calls:
            oldest = next(iter(self._calls.values()))
            out += self._finish(oldest, end_us=ev.timestamp_us, disposition="", a_cause="")
        tenant, seen = self._owner_of(ev, a_leg=True)
        call = self._calls[ev.uuid] = _Call(ev.uuid, self._rules_for(tenant))
        call.tenant, call.seen = tenant, seen
        return call

    def _owner_of(self, ev: ChannelEvent, a_leg: bool) -> tuple[str, str]:
        """(tenant, the fact seen when none matched) of a channel; a DID counts on an A leg only."""
        if self._tenants is None:
            return "", ""
        owner = self._tenants.owner(
            tag=ev.tenant_tag, domains=ev.domains,
            did=ev.destination_number if a_leg and ev.direction == "inbound" else "",
        )
        return owner.name, owner.seen

    def _rules_for(self, tenant: str) -> "_Rules":
        return self._rules.get(tenant, self._default_rules) if tenant else self._default_rules

    def _on_leg_created(self, call: _Call, ev: ChannelEvent) -> list[PlanfixCommand]:
        if not call.tenant and self._tenants is not None:
            # The caller's leg named no tenant (a DID nobody owns, no domain):
            # the extension it rings does.
            tenant, seen = self._owner_of(ev, a_leg=False)
            if tenant:
                call.tenant, call.rules = tenant, self._rules_for(tenant)
            elif seen and not call.seen:
                call.seen = seen
        ext, forward = self._leg_ext(call, ev)
        number = "" if ext else ev.destination_number
        redirected = self._redirected_to(call, number)
        if redirected is not None:
            ext, forward = redirected.ext, True  # the number his phone forwarded to
        out: list[PlanfixCommand] = []
        slot: _Slot | None = None
        if call.click_to_call or (call.caller_ext and not ext):
            # The leg to the client (click-to-call) or to the outside world
            # (an extension dialling out): it decides the outgoing outcome.
            slot = self._outgoing_slot(call, ev, out)
        elif ext and (not call.caller_ext or call.rules.report_internal_calls):
            self._talker_left(call, ext, ev.timestamp_us, out)
            slot = self._incoming_slot(call, ext, out, forward=forward)
            call.rung_us, call.rung_slot = ev.timestamp_us, slot
        leg = _Leg(ev.uuid, slot, number=number, rung_us=ev.timestamp_us)
        call.legs[ev.uuid] = leg
        self._owner[ev.uuid] = call
        if slot is not None:
            slot.legs.append(leg)
            slot.live_legs += 1
        return out

    def _talker_left(self, call: _Call, ext: str, now_us: int, out: list[PlanfixCommand]) -> None:
        """The caller's leg rings someone new while a talker had it: FreeSWITCH
        does that only once their bridge is over (a blind transfer), so his
        part ends now, even if his leg's CHANNEL_HANGUP_COMPLETE is still to
        come (a CDR module posting in the reporting state delays it)."""
        talker = call.winner
        if (talker is not None and not talker.ended and talker.slot is not None
                and id(talker.slot) in call.slots and talker.slot.ext != ext):
            out.append(self._completed_success(call, talker.slot, talker, now_us, final=False))

    def _incoming_slot(self, call: _Call, ext: str, out: list[PlanfixCommand], forward: bool = False) -> _Slot:
        if forward:
            # His phone rang out and his forward (a mobile) rings on: the same
            # part of his, not a new ring, unless he had talked already.
            talker = call.winner.slot if call.winner is not None else None
            for slot in call.slots.values():
                if slot.type == TYPE_IN and slot.ext == ext and slot is not talker:
                    self._close_ended_parts(call, out, keep=slot)
                    return slot
        # Whoever's part is over gets COMPLETED before the next one is shown
        # ringing: a hunt moved on, or the talker left (a transfer).
        self._close_ended_parts(call, out)
        for slot in call.slots.values():
            if slot.type == TYPE_IN and slot.ext == ext:
                return slot  # another device of the same extension: one pop-up
        if call.caller_ext:  # internal call, reported on request
            phone, diversion = call.caller_ext, ""
        else:
            phone, diversion = call.phone, call.diversion
        slot = self._open_slot(call, TYPE_IN, ext, phone, diversion)
        out.append(self._command(call, slot, "INCOMING"))
        return slot

    def _outgoing_slot(self, call: _Call, ev: ChannelEvent, out: list[PlanfixCommand]) -> _Slot:
        for slot in call.slots.values():
            if slot.type == TYPE_OUT:
                if not slot.diversion:
                    # Click-to-call: the caller ID the client sees is known
                    # only once the client leg exists.
                    slot.diversion = self._phone(ev.caller_number)
                return slot
        slot = self._open_slot(
            call, TYPE_OUT, call.caller_ext, self._phone(ev.destination_number), self._phone(ev.caller_number)
        )
        out.append(self._command(call, slot, "OUTGOING"))
        return slot

    def _close_ended_parts(self, call: _Call, out: list[PlanfixCommand], keep: _Slot | None = None) -> None:
        winner_slot = call.winner.slot if call.winner is not None else None
        for slot in list(call.slots.values()):
            if not slot.passed_over or slot is keep:
                continue
            if slot is winner_slot:
                # The talker hung up or was transferred away; the caller
                # stays.  The recording covers the whole call and is still
                # being written: it goes with the last talker's COMPLETED.
                out.append(self._completed_success(call, slot, call.winner, 0, final=False))
            else:
                out.append(self._completed(call, slot, CANCELLED))

    def _on_a_leg_event(self, call: _Call, ev: ChannelEvent) -> list[PlanfixCommand]:
        if ev.planfix_data:
            call.data.update(ev.planfix_data)
        name = ev.name
        if name == "CHANNEL_BRIDGE":
            target = self._calls.get(ev.bridge_b_uuid)
            if (target is not None and target is not call and not call.click_to_call
                    and target.tenant == call.tenant):  # a phone picks up only its own tenant's calls
                if call.caller_ext:
                    # An extension's own call bridged to another call's caller.
                    return self._on_pickup(target, call, ev)
                if target.caller_ext and not target.click_to_call:
                    # The caller bridged to an extension's own call: mod_dptools
                    # `pickup` swaps the picker's channel in for pickup/<group>.
                    return self._on_pickup(call, target, ev)
            return self._on_bridge(call, ev)
        if name == "RECORD_STOP":
            self._on_record_stop(call, ev)
            return []
        if name in _LEG_END_EVENTS:
            if ev.record_ms >= 0:
                call.record_ms = max(call.record_ms, ev.record_ms)
            if ev.voicemail_path and ev.voicemail_seconds != 0:
                call.voicemail_path = ev.voicemail_path
            end_us = ev.hangup_us or ev.timestamp_us
            return self._finish(call, end_us, ev.originate_disposition, ev.hangup_cause)
        return []

    def _on_b_leg_event(self, call: _Call, leg: _Leg, ev: ChannelEvent) -> list[PlanfixCommand]:
        name = ev.name
        if name == "CHANNEL_BRIDGE" and ev.bridge_a_uuid == leg.uuid and ev.bridge_b_uuid == call.uuid:
            # The leg bridged itself to the caller (a mod_fifo member runs
            # `fifo ... out` on his own channel): the caller's bridge to it.
            # Other-Leg-* here describe the caller; Caller-* the leg.
            return self._on_bridge(call, replace(ev, bridge_a_uuid=call.uuid, bridge_b_uuid=leg.uuid,
                                                 other_leg_answered_us=ev.answered_us, other_leg_destination=""))
        if name == "RECORD_STOP":
            self._on_record_stop(call, ev)
        elif name in _LEG_END_EVENTS and not leg.ended:
            leg.ended = True
            leg.billsec = ev.billsec
            leg.cause = ev.hangup_cause
            leg.sip_term_status = ev.sip_term_status
            leg.end_us = ev.hangup_us or ev.timestamp_us
            slot = leg.slot
            if slot is not None:
                slot.live_legs -= 1
                if leg is not call.winner:
                    slot.last_failed_leg = leg
                target = self._phone(ev.redirect_to) if slot.type == TYPE_IN else ""
                if target:
                    call.redirects[target] = slot
                if self._rung_after_end(call, slot, leg):
                    return [self._completed(call, slot, CANCELLED)]
        return []

    @staticmethod
    def _rung_after_end(call: _Call, slot: _Slot, leg: _Leg) -> bool:
        """The part's last leg hung up before (FreeSWITCH's clock) another
        extension was shown ringing, but its end arrived after that ring.

        A channel reports its end from its own thread, after its CDR is
        posted when mod_json_cdr is loaded, while the hunt or the queue
        (mod_callcenter's next agent) already rings on: the live suite saw
        both orders.  In the order of their times the ring closed this part
        as passed over (``_incoming_slot``); it is closed so now, so that
        the status and the moment do not depend on which event came first.
        """
        # A leg rung in the same clock tick as the other (FreeSWITCH's clock
        # moves in ~20 ms steps) rang with it: a group's leg declining at
        # once, not one a hunt moved on from.
        return (slot.passed_over and id(slot) in call.slots and call.rung_slot is not None
                and call.rung_slot is not slot and 0 < leg.end_us <= call.rung_us
                and 0 < leg.rung_us < call.rung_us
                and (call.winner is None or call.winner.slot is not slot))

    def _on_bridge(self, call: _Call, ev: ChannelEvent) -> list[PlanfixCommand]:
        """The A leg is bridged: the other side is now the one talking.

        The first bridge names who answered; a later one is a transfer
        (blind: to a leg the A leg originated again; attended: to a leg of
        the consult call, which joins this call here).
        """
        other = ev.bridge_b_uuid
        if call.winner is not None and call.winner.uuid == other:
            return []  # re-delivered
        out: list[PlanfixCommand] = []
        leg = call.legs.get(other)
        if leg is None and call.winner is None and other not in self._owner:
            return []  # bridged to a channel we did not see originate
        redirected = self._redirected_to(call, leg.number) if leg is not None and leg.slot is None else None
        if redirected is not None and id(redirected) in call.slots:
            # Rung before the redirecting leg's end arrived: his forward after all.
            leg.slot = redirected
            redirected.legs.append(leg)
            redirected.live_legs += 1
        self._end_talker(call, leg, ev.timestamp_us, out)
        if leg is None:
            joined_ext = ev.other_leg_destination if call.rules.is_ext(ev.other_leg_destination) else ""
            leg = self._join(call, other, joined_ext, ev.timestamp_us, out)
        elif leg.slot is not None and id(leg.slot) not in call.slots and leg.slot.type == TYPE_IN:
            # His part was closed (Cancelled when another answered) while his
            # leg stayed up; now bridged: he takes part again.
            old = leg.slot
            old.live_legs -= 1
            leg.slot = self._incoming_slot(call, old.ext, out)
            leg.slot.legs.append(leg)
            leg.slot.live_legs += 1
        return out + self._take_over(call, leg, ev.other_leg_answered_us or ev.timestamp_us, ev.timestamp_us)

    def _redirected_to(self, call: _Call, number: str) -> _Slot | None:
        """The part of the extension whose phone redirected the caller (302) to ``number``."""
        if not call.redirects or not number:
            return None  # normalizing costs: only once a phone redirected
        return call.redirects.get(self._phone(number))

    def _on_joining_bridge(self, call: _Call, ev: ChannelEvent) -> list[PlanfixCommand]:
        """A channel we did not follow bridged itself to ``call``'s caller.

        A mod_fifo member rung for the queue, not for a caller (strategy
        enterprise): which caller he gets is decided when he answers, so he
        takes part from this bridge on, as the extension his leg rang.  A
        consumer waiting off-hook (``fifo ... out wait``) likewise for every
        caller after the first (whose call his own dissolved into): his phone
        is the extension.  Any other channel that bridges itself to the
        caller (``uuid_bridge <it> <caller>``) joins the same way.
        """
        out: list[PlanfixCommand] = []
        self._end_talker(call, None, ev.timestamp_us, out)
        ext = next((x for x in (ev.dialed_user, ev.user_name) if call.rules.is_ext(x)), "")
        leg = self._join(call, ev.uuid, ext, ev.timestamp_us, out)
        return out + self._take_over(call, leg, ev.timestamp_us, ev.timestamp_us)

    def _end_talker(self, call: _Call, next_leg: _Leg | None, now_us: int, out: list[PlanfixCommand]) -> None:
        """The caller is bridged elsewhere: the current talker's part ends now."""
        previous = call.winner
        if previous is None or previous is next_leg or previous.slot is None:
            return
        if next_leg is not None and next_leg.slot is previous.slot:
            return  # another device of the same extension: one part
        if id(previous.slot) in call.slots:
            out.append(self._completed_success(call, previous.slot, previous, now_us, final=False))

    def _on_pickup(self, call: _Call, picker: _Call, ev: ChannelEvent) -> list[PlanfixCommand]:
        """``picker``'s own channel was bridged to ``call``'s A leg.

        That is how FreeSWITCH carries out ``intercept``/``pickup``: the
        phone that picks up dials in (its own inbound call), the rung leg
        ends PICKED_OFF, and the bridge is on the picker's channel.  The
        picker's call dissolves into the caller's one as a joined leg.
        """
        del self._calls[picker.uuid]
        for uuid in picker.legs:
            self._owner.pop(uuid, None)
        out: list[PlanfixCommand] = []
        for slot in list(picker.slots.values()):
            out.append(self._completed(picker, slot, CANCELLED))
        leg = self._join(call, picker.uuid, picker.caller_ext, ev.timestamp_us, out)
        return out + self._take_over(call, leg, ev.timestamp_us, ev.timestamp_us)

    def _join(self, call: _Call, uuid: str, ext: str, now_us: int, out: list[PlanfixCommand]) -> _Leg:
        """A channel first seen bridged into ``call`` becomes one of its legs."""
        previous = self._owner.get(uuid)
        if previous is not None:  # still a leg of the consult call
            previous.legs.pop(uuid, None)
        slot = None
        if ext and not call.caller_ext:
            slot = self._incoming_slot(call, ext, out)
        leg = _Leg(uuid, slot, joined_us=now_us)
        call.legs[uuid] = leg
        self._owner[uuid] = call
        if slot is not None:
            slot.legs.append(leg)
            slot.live_legs += 1
        return leg

    def _take_over(self, call: _Call, leg: _Leg, answered_us: int, now_us: int) -> list[PlanfixCommand]:
        out: list[PlanfixCommand] = []
        previous = call.winner
        self._end_talker(call, leg, now_us, out)
        call.winner = leg
        leg.answered_us = answered_us
        slot = leg.slot
        if slot is None:
            return out  # an internal call nobody is shown, or a transfer outside
        slot.last_failed_leg = None
        if previous is None or previous.slot is not slot:
            out.append(self._command(call, slot, "ACCEPTED"))
        for other in list(call.slots.values()):
            if other is not slot:
                out.append(self._completed(call, other, CANCELLED))
        return out

    @staticmethod
    def _on_record_stop(call: _Call, ev: ChannelEvent) -> None:
        if ev.record_file_path:
            call.recording_path = ev.record_file_path
        if ev.record_ms >= 0:
            call.record_ms = max(call.record_ms, ev.record_ms)

    # -- closing --------------------------------------------------------------

    def _finish(self, call: _Call, end_us: int, disposition: str, a_cause: str) -> list[PlanfixCommand]:
        """The A leg is gone: every slot still open gets its COMPLETED."""
        out: list[PlanfixCommand] = []
        winner = call.winner
        for slot in list(call.slots.values()):
            if winner is not None and slot is winner.slot:
                out.append(self._completed_success(call, slot, winner, end_us, final=True))
            elif slot.type == TYPE_IN:
                # Voicemail answering is not an employee answering: still
                # Missed, with the caller's message as its recording.
                vm = call.voicemail_path
                out.append(self._completed(call, slot, MISSED, is_recorded=bool(vm), recording_path=vm or None))
            elif slot.last_failed_leg is not None:
                failed = slot.last_failed_leg
                status = outgoing_status(failed.cause, failed.sip_term_status, disposition, a_cause)
                out.append(self._completed(call, slot, status))
            elif call.click_to_call and not slot.legs:
                # The manager's own leg failed (busy, no answer, hung up)
                # before the client was rung: the manager did not take it.
                out.append(self._completed(call, slot, NO_ANSWER))
            else:
                # The far leg's own end has not arrived yet: the A leg's
                # originate_disposition still names the outcome.
                out.append(self._completed(call, slot, outgoing_status("", "", disposition, a_cause)))
        self._forget(call)
        return out

    def _forget(self, call: _Call) -> None:
        self._calls.pop(call.uuid, None)
        for uuid in call.legs:
            self._owner.pop(uuid, None)
        finished = self._finished
        limit = self._settings.finished_memory
        if limit:
            finished[call.uuid] = None
            while len(finished) > limit:
                del finished[next(iter(finished))]

    def _completed_success(
        self, call: _Call, slot: _Slot, leg: _Leg | None, end_us: int, final: bool
    ) -> PlanfixCommand:
        """``Success`` with the leg's own talk time; the recording only on the final one."""
        assert leg is not None
        duration = _talk_seconds(leg, end_us)
        recorded = final and (call.record_ms > 0 or (call.record_ms < 0 and bool(call.recording_path)))
        path = call.recording_path if recorded and call.recording_path else None
        return self._completed(call, slot, SUCCESS, duration=duration, is_recorded=recorded, recording_path=path)

    def _completed(
        self,
        call: _Call,
        slot: _Slot,
        status: str,
        duration: int = 0,
        is_recorded: bool = False,
        recording_path: str | None = None,
    ) -> PlanfixCommand:
        del call.slots[id(slot)]
        command = self._command(call, slot, "COMPLETED", recording_path)
        fields = command.fields
        fields["duration"] = str(duration)
        fields["is_recorded"] = "1" if is_recorded else "0"
        fields["status"] = status
        for name, value in call.data.items():
            fields["data_" + name] = value
        return command

    # -- helpers --------------------------------------------------------------

    @staticmethod
    def _open_slot(call: _Call, type_: str, ext: str, phone: str, diversion: str) -> _Slot:
        slot = _Slot(type_, ext, phone, diversion)
        call.slots[id(slot)] = slot
        return slot

    def _command(self, call: _Call, slot: _Slot, event: str, recording_path: str | None = None) -> PlanfixCommand:
        return PlanfixCommand(
            tenant=call.tenant,
            node=self._settings.node,
            unmatched="" if call.tenant else call.seen,
            call_id=call.uuid,
            fields={
                "cmd": "event",
                "type": slot.type,
                "event": event,
                "phone": slot.phone,
                "diversion": slot.diversion,
                "ext": slot.ext,
                "callid": call.uuid,
            },
            recording_path=recording_path,
        )

    @staticmethod
    def _leg_ext(call: _Call, ev: ChannelEvent) -> tuple[str, bool]:
        """(the extension a B leg is for, whether it is his forward); "" for a leg to the outside.

        A leg rung as ``user/<ext>`` is that user's, whatever his directory
        dial-string sends it to (unconditional forwarding to a mobile).  A
        leg to elsewhere that names the extension it forwards (our tag, or
        the Diversion header it sends) is his, except on his own call (an
        extension's outbound call may carry his Diversion to the carrier).
        """
        if call.rules.is_ext(ev.dialed_user):
            return ev.dialed_user, False
        if call.rules.is_ext(ev.forwarded_from) and ev.forwarded_from != call.caller_ext:
            return ev.forwarded_from, True
        if call.rules.is_ext(ev.destination_number):
            return ev.destination_number, False
        return "", False

    def _phone(self, raw: str) -> str:
        if not raw:
            return ""
        return sanitize(self._normalize(raw), 64)


class _Rules:
    """One tenant's (or the config's) extension pattern and internal-call rule."""

    __slots__ = ("_ext_re", "report_internal_calls")

    def __init__(self, extension_pattern: str, report_internal_calls: bool) -> None:
        self._ext_re = re.compile(extension_pattern)
        self.report_internal_calls = report_internal_calls

    def is_ext(self, value: str) -> bool:
        return bool(value) and self._ext_re.search(value) is not None


def _talk_seconds(leg: _Leg, end_us: int) -> int:
    """Seconds ``leg`` talked in this call.

    A rung leg: its ``billsec``, else answer-to-``end_us``.  A joined leg
    (attended-transfer target, picker) answered before it joined, so its
    billsec includes the consult or the dialling: count from the join,
    rounded (bridge and hangup stamps are a few ms off the answer's),
    never above billsec.
    """
    end = leg.end_us or end_us
    if leg.joined_us:
        seconds = max(0, round((end - leg.joined_us) / 1_000_000)) if end > leg.joined_us else 0
        return min(seconds, leg.billsec) if leg.billsec >= 0 else seconds
    if leg.billsec >= 0:
        return leg.billsec
    if leg.answered_us and end > leg.answered_us:
        return (end - leg.answered_us) // 1_000_000
    return 0


# Causes (Hangup-Cause / originate_disposition) -> outgoing status.
_BUSY_CAUSES = frozenset({"USER_BUSY"})
_NO_ANSWER_CAUSES = frozenset({
    "NO_ANSWER", "NO_USER_RESPONSE", "ORIGINATOR_CANCEL", "ALLOTTED_TIMEOUT",
    "PROGRESS_TIMEOUT", "RECOVERY_ON_TIMER_EXPIRE", "LOSE_RACE",
})
_NOT_ALLOWED_CAUSES = frozenset({
    "CALL_REJECTED", "OUTGOING_CALL_BARRED", "INCOMING_CALL_BARRED",
    "BEARERCAPABILITY_NOTAUTH", "FACILITY_REJECTED",
})
# Values that say nothing about a failure.
_NO_INFO = frozenset({"", "SUCCESS", "NORMAL_CLEARING", "NONE", "failure"})


def outgoing_status(b_cause: str, sip_term_status: str, disposition: str, a_cause: str) -> str:
    """Status of an outgoing call nobody answered.

    The SIP final code of the failed leg is the most precise fact; then that
    leg's cause; then the A leg's ``originate_disposition`` (the A leg's own
    cause turns NO_ANSWER into NORMAL_CLEARING); then the A leg's cause.
    ``480`` is NotAvailable by its code, although FreeSWITCH maps it to
    NO_USER_RESPONSE.  Unknown failures are NotAvailable; no information at
    all (a call closed by ``reconcile``) is NoAnswer.
    """
    code = sip_term_status.strip()
    if code.isdigit():
        value = int(code)
        if value in (486, 600, 603):
            return BUSY
        if value in (401, 402, 403, 407, 608):
            return NOT_ALLOWED
        if value in (408, 487):
            return NO_ANSWER
        if 400 <= value < 700:
            return NOT_AVAILABLE
    for cause in (b_cause, disposition, a_cause):
        if cause in _NO_INFO:
            continue
        if cause in _BUSY_CAUSES:
            return BUSY
        if cause in _NO_ANSWER_CAUSES:
            return NO_ANSWER
        if cause in _NOT_ALLOWED_CAUSES:
            return NOT_ALLOWED
        return NOT_AVAILABLE
    return NO_ANSWER


def _show_rows(text: str) -> list[dict]:
    try:
        reply = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not a JSON show reply: {text[:80]!r}") from exc
    if not isinstance(reply, dict) or "row_count" not in reply:
        raise ValueError(f"not a JSON show reply: {text[:80]!r}")
    rows = reply.get("rows") or []
    if not isinstance(rows, list):
        raise ValueError("show reply: 'rows' is not a list")
    for row in rows:
        if not isinstance(row, dict):
            raise ValueError("show reply: a row is not an object")
    return rows


def listed_channels(show_channels_json: str) -> list[str]:
    """The channel UUIDs of a ``show channels as json`` listing, in its order.

    A hung-up channel stays listed, with its last state and callstate
    (``CS_EXECUTE``, ``ACTIVE``), until its reporting is done: mod_json_cdr
    holds it there while it retries the CDR's post (for the whole retries x
    delay while fsbridge is down).  The caller asks ``uuid_exists`` of each
    (``false`` for such a channel) and passes those to ``without_channels``.
    Raises ValueError as ``live_uuids_from_show_json``."""
    return [u for u in (_row_str(row, "uuid") for row in _show_rows(show_channels_json)) if u]


def without_channels(show_channels_json: str, gone: set[str]) -> str:
    """The listing without the rows of the ``gone`` channels (see ``listed_channels``)."""
    if not gone:
        return show_channels_json
    rows = [row for row in _show_rows(show_channels_json) if _row_str(row, "uuid") not in gone]
    return json.dumps({"row_count": len(rows), "rows": rows})


def _row_str(row: dict, key: str, limit: int = 64) -> str:
    value = row.get(key)
    return sanitize(value, limit) if isinstance(value, str) else ""


def adoption_events(show_channels_json: str, now_us: int,
                    answered_us: Mapping[str, int] | None = None) -> list[ChannelEvent]:
    """The events a ``show channels as json`` listing implies, A legs first.

    A row whose ``call_uuid`` is its own (or empty) and that is inbound is a
    call's A leg: CHANNEL_CREATE with its caller (``cid_num``) and the
    number dialled (``dest``).  An outbound row whose ``call_uuid`` names
    another live row is a leg that call rings: CHANNEL_CREATE naming it as
    originator, ``dest`` its extension.  Such a leg in callstate ACTIVE has
    answered, and FreeSWITCH answers a rung leg only when it is bridged
    with the caller: CHANNEL_BRIDGE on the A leg.  The listing carries no
    channel variables, so legs known only by a variable (mod_callcenter
    agents, our click-to-call tag) cannot be adopted.  Creation times come
    from ``created_epoch`` (seconds); the bridge is stamped ``now_us``, its
    answer ``answered_us[leg]`` where known (the listing has no answer
    time: without it, the talk is counted from now when the caller hangs up
    before the leg's own end, with its billsec, arrives).
    """
    rows, a_legs, legs = _adoptable(show_channels_json)
    answered_us = answered_us or {}
    events: list[ChannelEvent] = []
    bridges: list[ChannelEvent] = []
    for uuid, row in a_legs.items():
        events.append(ChannelEvent(
            name="CHANNEL_CREATE", uuid=uuid, call_uuid=uuid, direction="inbound",
            caller_number=_row_str(row, "cid_num"), destination_number=_row_str(row, "dest"),
            timestamp_us=_epoch_us(row, now_us), domains=_row_domains(row),
        ))
    for uuid, row in legs.items():
        call_uuid = _row_str(row, "call_uuid")
        events.append(ChannelEvent(
            name="CHANNEL_CREATE", uuid=uuid, call_uuid=call_uuid, direction="outbound",
            caller_number=_row_str(row, "cid_num"), destination_number=_row_str(row, "dest"),
            other_leg_uuid=call_uuid, other_type="originator", timestamp_us=_epoch_us(row, now_us),
            domains=_row_domains(row),
        ))
        if _row_str(row, "callstate", 16) == "ACTIVE":
            bridges.append(ChannelEvent(
                name="CHANNEL_BRIDGE", uuid=call_uuid, bridge_a_uuid=call_uuid, bridge_b_uuid=uuid,
                timestamp_us=now_us, other_leg_answered_us=answered_us.get(uuid, 0),
            ))
    return events + bridges


def answered_legs(show_channels_json: str) -> list[tuple[str, str]]:
    """(leg, its call's A leg) for every leg the listing shows answered
    (the CHANNEL_BRIDGEs of ``adoption_events``)."""
    _, _, legs = _adoptable(show_channels_json)
    return [(uuid, _row_str(row, "call_uuid")) for uuid, row in legs.items()
            if _row_str(row, "callstate", 16) == "ACTIVE"]


def answered_us_from_dump(dump_json: str) -> int:
    """When a channel answered, from ``uuid_dump <uuid> json`` (0: not known).
    JSON, not the text dump: its values are not escaped, so a caller's name
    could forge a line there."""
    try:
        headers = json.loads(dump_json)
    except ValueError:
        return 0
    value = headers.get("Caller-Channel-Answered-Time") if isinstance(headers, dict) else None
    return int(value) if isinstance(value, str) and value.isdigit() and len(value) <= 19 else 0


def _adoptable(show_channels_json: str) -> tuple[list[dict], dict[str, dict], dict[str, dict]]:
    """The listing's rows, its calls' A legs and the legs they ring (see adoption_events)."""
    rows = _show_rows(show_channels_json)
    by_uuid = {_row_str(row, "uuid"): row for row in rows if _row_str(row, "uuid")}
    a_legs = {uuid: row for uuid, row in by_uuid.items()
              if _row_str(row, "direction", 16) == "inbound" and _row_str(row, "call_uuid") in ("", uuid)}
    legs = {uuid: row for uuid, row in by_uuid.items()
            if _row_str(row, "direction", 16) == "outbound" and _row_str(row, "call_uuid") != uuid
            and _row_str(row, "call_uuid") in a_legs}
    return rows, a_legs, legs


def _row_domains(row: dict) -> tuple[str, ...]:
    # The listing's presence_id (user@domain) is its only tenant fact.
    return (domain_of_presence(_row_str(row, "presence_id", 256)),)


def _epoch_us(row: dict, default_us: int) -> int:
    raw = _row_str(row, "created_epoch", 16)
    return int(raw) * 1_000_000 if raw.isdigit() else default_us


def live_uuids_from_show_json(text: str) -> set[str]:
    """Channel UUIDs alive in ``show calls as json`` / ``show channels as json``.

    Both give ``{"row_count": N, "rows": [...]}`` (``{"row_count":0}`` when
    idle); rows carry ``uuid``, ``call_uuid`` and, for calls, ``b_uuid``.
    Raises ValueError when the text is not such a reply (``-ERR ...``).
    A hung-up channel may still be listed: see ``listed_channels``.
    """
    live: set[str] = set()
    for row in _show_rows(text):
        for key in ("uuid", "call_uuid", "b_uuid"):
            value = row.get(key)
            if isinstance(value, str) and value:
                live.add(value)
    return live
