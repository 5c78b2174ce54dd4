"""The FreeSWITCH nodes one process follows: per node an ESL connection and a call tracker.

``[freeswitch]`` is one node; ``[freeswitch.NAME]`` sections are several.
Each node connects, reconnects and reconciles on its own: its calls are
tracked apart (keyed by node and UUID), its ``show channels`` listing closes
and adopts only its own calls, and the open-calls registry remembers which
node a call was on.  The ESL reader greenlet only parses, runs the pure
tracker and hands the commands to the service (``emit``): it never blocks.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from typing import Callable

import gevent

from fsbridge import metrics
from fsbridge.core import cdr, events, tracker
from fsbridge.config import Config, NodeConfig
from fsbridge.esl import EslCommandError, EslConnection
from fsbridge.gaps import Gaps, GapsError
from fsbridge.opencalls import OpenCalls
from fsbridge.core.tenancy import TenantMap

log = logging.getLogger("fsbridge.nodes")

_USER_DIAL_STRING = re.compile(r"user/\{ext\}(@[A-Za-z0-9_.-]+)?")
_CHANNEL_ID = re.compile(r"[A-Za-z0-9-]{1,64}")


def sofia_contact_query(dial_string: str, ext: str) -> str | None:
    """``sofia_contact <ext>[@domain]`` for a ``user/{ext}[@domain]`` dial string, else None."""
    found = _USER_DIAL_STRING.fullmatch(dial_string)
    if found is None:
        return None
    return f"sofia_contact {ext}{found.group(1) or ''}"


def registration_problem(ext: str, reply: str) -> str | None:
    """What ``sofia_contact`` says about ``ext``: None if it has a contact.

    mod_sofia answers ``error/user_not_registered`` both for a user the
    directory does not have and for one with no registration (originate
    would fail with SUBSCRIBER_ABSENT / USER_NOT_REGISTERED, capture 95).
    """
    reply = reply.strip()
    if reply and not reply.startswith("error/"):
        return None
    return (f"from: extension {ext} is unknown to FreeSWITCH or not registered "
            f"({reply or 'no contact'}); nothing was dialled")


class Node:
    """One FreeSWITCH: its Event Socket, its calls, its reconciliation."""

    def __init__(self, cfg: Config, node: NodeConfig, tenants: TenantMap, normalize: Callable[[str], str],
                 open_calls: OpenCalls, emit: Callable[[list], None], flush: Callable[[], None],
                 gaps: Gaps | None = None) -> None:
        self.cfg = cfg
        self.name = node.name
        # What the registry and the commands call this node ("" for the one
        # [freeswitch]: registries written before nodes existed say so too).
        self.key = "" if node.implicit else node.name
        self.open_calls = open_calls
        # When this node was out of sight, and calls it had then (fsbridge/gaps.py).
        self.gaps = gaps
        self.unseen = cdr.UnseenCalls()
        self._reload_held()
        self.core_uuid = ""
        self._was_connected = False
        self._emit = emit
        self._flush = flush
        self._multi_tenant = tenants.single is None
        self.tracker = tracker.CallTracker(tracker.TrackerSettings(
            extension_pattern=cfg.calls.extension_pattern,
            report_internal_calls=cfg.calls.report_internal_calls,
            max_open_calls=cfg.calls.max_open_calls,
            normalize_phone=normalize,
            click_to_call_diversion=cfg.click_to_call.client_caller_id,
            tenants=tenants,
            node=self.key,
        ))
        self._channel_event = functools.partial(events.channel_event, tenants=self._multi_tenant,
                                                wants=self.tracker.wants)
        section = node.section
        self._where = "[freeswitch]" if node.implicit else f"[freeswitch.{node.name}]"
        self.esl = EslConnection(
            section.host,
            section.port,
            section.password,
            list(events.SUBSCRIBED_EVENTS),
            on_event=self._on_event,
            on_state=self._on_esl_state,
            on_connected=self._on_connected,
            connect_timeout=section.connect_timeout,
            command_timeout=section.command_timeout,
            max_backoff=section.max_backoff,
            idle_timeout=section.idle_timeout,
        )
        # The first node also takes inherited calls of nodes no longer
        # configured (e.g. a registry from before [freeswitch.NAME]).
        self.other_keys: frozenset[str] | None = None

    def owns(self, call_id: str) -> bool:
        """An inherited call was on this node."""
        key = self.open_calls.owner(call_id)[0]
        return key == self.key or (self.other_keys is not None and key not in self.other_keys)

    # -- the event path (runs in the ESL reader greenlet: must not block) ----

    def _on_event(self, headers, body: bytes) -> None:
        name = headers.get("Event-Name") or ""
        counts = metrics.EVENT_COUNTS
        counted = name or "?"
        counts[counted] = counts.get(counted, 0) + 1
        # The name read once: channel_event would look it up again.
        event = self._channel_event(headers, body, name=name)
        if event is None:
            return
        if event.name == "BACKGROUND_JOB":
            self._log_job(event)
        commands = self.tracker.feed(event)
        if commands:
            self._emit(commands)

    def _log_job(self, event) -> None:
        outcome = event.job_body.strip()
        if outcome.startswith("+OK"):
            log.info("job %s: FreeSWITCH answered %s", event.job_uuid, outcome)
        else:
            log.warning("job %s: FreeSWITCH failed it: %s", event.job_uuid, outcome or "(empty)")

    # -- connection life -------------------------------------------------------

    def _on_esl_state(self, state: str, detail: str) -> None:
        if self._was_connected and state != "connected":
            self._note_gap("alive")  # the last moment this node was seen
        self._was_connected = state == "connected"
        # esl.py logs connects and every failed attempt; here the one hint
        # that names the admin's config file.
        if state == "auth_failed":
            log.error("FreeSWITCH refused the password: check %s password in %s", self._where, self.cfg.path)

    def _on_connected(self, core_uuid: str) -> None:
        """After every (re)connect: close calls that ended while we were away."""
        self.core_uuid = core_uuid
        self._was_connected = True
        self._note_gap("connected")
        self.reconcile()

    def _note_gap(self, what: str) -> None:
        if self.gaps is None:
            return
        try:
            if what == "connected":
                gap = self.gaps.connected(self.key, time.time())
                if gap:
                    log.info("FreeSWITCH %s was out of sight for %.1fs: calls that began and ended meanwhile "
                             "are reported from their CDRs", self.name, gap[1] - gap[0])
            else:
                self.gaps.alive(self.key, time.time())
        except GapsError as exc:
            log.warning("%s", exc)

    def reconcile(self, adopt: bool = True) -> bool:
        """Square the calls we know on this node with its list of live channels.

        Close every call that ended unseen: while the connection was down
        (the tracker's open calls) or before this process started (calls an
        earlier process reported).  Then (``adopt``) take up the live calls
        we do not track: begun during the gap, or before this process
        started; those are then reported from FreeSWITCH's own events to
        their real end.  Returns False when FreeSWITCH could not be asked."""
        try:
            listing = self._without_hung_up(self.esl.api("show channels as json"))
            live = tracker.live_uuids_from_show_json(listing)
        except Exception as exc:  # noqa: BLE001 - logged; retried at the next connect
            log.warning("could not reconcile open calls with FreeSWITCH %s: %s", self.name, exc)
            return False
        now = time.time()
        now_us = int(now * 1_000_000)
        wait = self.cfg.cdr.wait if self.cfg.cdr.secret else 0.0
        if wait:
            # Their CDRs are on the way: finished from those, or blind after `wait`.
            self._flush()  # their legs must be in the registry to be taken back
            lost = self.tracker.forget_gone(live)
            self.open_calls.take_back(lost)
            commands = []
            if lost:
                log.info("reconcile: %d calls ended while fsbridge could not see them; "
                         "waiting up to %gs for their CDRs", len(lost), wait)
        else:
            commands = self.tracker.reconcile(live, now_us)
        closed = self.open_calls.close_inherited(live, now, wait, owns=self.owns)
        commands += [self.inherited_command(call_id, fields) for call_id, fields in closed]
        if wait and closed:
            log.warning("reconcile: no CDR within %gs for %d calls: closed without their real end "
                        "(check mod_json_cdr's url and cred)", wait, len({c for c, _ in closed}))
        elif commands:
            log.info("reconcile: %d calls ended while fsbridge could not see them",
                     len({c.call_id for c in commands}))
        released: list[str] = []  # adopted calls whose rung legs' CDRs were held
        if adopt:
            answer_times = self._answer_times(listing)
            adopted = self.tracker.adopt(listing, now_us, answer_times)
            if adopted:
                # Followed from now on: their end comes with real events.
                self.open_calls.forget_inherited({c.call_id for c in adopted})
                log.info("reconcile: %d live calls taken up (%d answer times from uuid_dump)",
                         len({c.call_id for c in adopted}), len(answer_times))
            commands += adopted
            for call_id in {c.call_id for c in adopted}:
                # legs that rang and ended in the gap, whose CDRs came before the connect
                legs = self.unseen.pop_legs(call_id)
                for leg in legs:
                    create, hangup = cdr.leg_events(leg)
                    if create and hangup and not leg.answer_us:
                        commands += self.tracker.late_leg(create, hangup)
                if legs:
                    released.append(call_id)
        if commands:
            self._emit(commands)
        if released:
            self._flush()  # their late legs' parts are stored before their CDRs go
            for call_id in released:
                self._release_held(call_id)
        return True

    def _release_held(self, call_id: str) -> None:
        try:
            if self.gaps is not None:
                self.gaps.release(call_id)
        except GapsError as exc:
            log.warning("%s", exc)

    def _answer_times(self, listing: str) -> dict[str, int]:
        """When the answered legs of calls to be adopted answered (the listing
        does not say): ``uuid_dump``, one per such leg."""
        times: dict[str, int] = {}
        for leg, a_leg in tracker.answered_legs(listing):
            if self.tracker.tracks(a_leg) or not _CHANNEL_ID.fullmatch(leg):
                continue
            try:
                answered = tracker.answered_us_from_dump(self.esl.api(f"uuid_dump {leg} json"))
            except Exception as exc:  # noqa: BLE001 - counted from now instead, as before
                log.warning("reconcile: no answer time for channel %s: %s", leg, exc)
                continue
            if answered:
                times[leg] = answered
        return times

    def _without_hung_up(self, listing: str) -> str:
        """The listing without channels that have hung up and are only still
        being reported (a CDR post being retried): ``uuid_exists`` says false."""
        # Only a plain id goes into the command (the listing is FreeSWITCH's own,
        # but a dialplan may set origination_uuid to anything).
        gone = {uuid for uuid in tracker.listed_channels(listing)
                if _CHANNEL_ID.fullmatch(uuid) and self.esl.api(f"uuid_exists {uuid}").strip() == "false"}
        if gone:
            log.info("reconcile: %d listed channels have hung up (their CDRs are being posted)", len(gone))
        return tracker.without_channels(listing, gone)

    def inherited_command(self, call_id: str, fields: dict, path: str | None = None) -> tracker.PlanfixCommand:
        """A command finishing a call an earlier process reported: to its own tenant."""
        _node, tenant = self.open_calls.owner(call_id)
        return tracker.PlanfixCommand(call_id, fields, path, tenant=tenant, node=self.key)

    def watch_inherited(self, stopping) -> None:
        """Calls inherited from an earlier process that are still up end
        without events we can use, and those waiting for a CDR have a
        deadline: look again every minute (sooner for a short [cdr] wait)."""
        period = min(60.0, max(1.0, self.cfg.cdr.wait / 4)) if self.cfg.cdr.secret else 60.0
        while not stopping.wait(period):
            if any(self.owns(c) for c in self.open_calls.inherited) and self.esl.state == "connected":
                self.reconcile(adopt=False)

    def finish_from_cdr(self, facts: cdr.CdrFacts) -> str | None:
        """The CDR's call, if this node's: "completed"/"ignored: ..."; None if not ours.
        Raises cdr.CdrRetry while the call's events may still be lost."""
        if self.tracker.tracks(facts.uuid):
            if self.esl.state != "connected":
                # Its events are lost; the reconnect hands the call over: until then, retry.
                raise cdr.CdrRetry("fsbridge is reconnecting to FreeSWITCH; post it again")
            return "ignored: the call is followed live"  # its events give the end
        if facts.uuid not in self.open_calls.inherited or not self.owns(facts.uuid):
            return None
        legs = self.open_calls.pop_inherited(facts.uuid)
        commands = [self.inherited_command(facts.uuid, fields, path) for fields, path in cdr.completions(legs, facts)]
        log.info("cdr: call %s finished from its CDR (%s)", facts.uuid,
                 ", ".join(c.fields["ext"] + " " + c.fields.get("status", c.fields["event"]) for c in commands))
        self._emit(commands)
        return "completed"

    def follows(self, call_id: str) -> bool:
        """The call is followed live here, or an earlier process's left to finish."""
        return self.tracker.tracks(call_id) or (call_id in self.open_calls.inherited and self.owns(call_id))

    def unseen_cdr(self, facts: cdr.CdrFacts, now: float) -> str:
        """A CDR of a call neither followed nor inherited: held to be reported
        if the call lies wholly in a gap of this node's (nobody saw it), else
        ignored (it was seen live, or predates fsbridge)."""
        call_id = facts.parent_uuid or facts.uuid
        if self.gaps is None:
            return "ignored: no open call"
        try:
            if self.gaps.reported(call_id):
                return "ignored: reported from its CDRs already"
            seen = not self.gaps.in_gap(self.key, facts.created_us / 1e6, facts.end_us / 1e6,
                                        self.esl.state == "connected", now)
        except GapsError as exc:
            raise cdr.CdrRetry(str(exc)) from None
        if seen and not (facts.parent_uuid and self.unseen.holds(call_id)):
            return "ignored: no open call"  # seen live (and finished), or before fsbridge ran
        try:
            # On disk before the 200: mod_json_cdr never posts it again.
            self.gaps.hold(self.key, call_id, facts.uuid, cdr.facts_to_json(facts), now)
        except GapsError as exc:
            raise cdr.CdrRetry(str(exc)) from None
        self.unseen.add(facts, now)
        return "held: the call began and ended unseen; reported once its legs' CDRs are in"

    def _reload_held(self) -> None:
        """The CDRs an earlier process held for this node (it was stopped or
        killed before their calls were reported): held again, their waits
        counted from when they came."""
        if self.gaps is None:
            return
        try:
            held = self.gaps.held(self.key)
        except GapsError as exc:
            log.warning("%s", exc)
            return
        for text, at in held:
            try:
                self.unseen.add(cdr.facts_from_json(text), at)
            except cdr.CdrError as exc:
                log.warning("a held CDR of FreeSWITCH %s cannot be read, skipped: %s", self.name, exc)
        if held:
            log.info("cdr: %d CDRs of calls FreeSWITCH %s had while fsbridge could not see it "
                     "are held again", len(held), self.name)

    def late_leg_cdr(self, facts: cdr.CdrFacts, now: float) -> str:
        """The CDR of a leg a call followed here rang: a leg that rang and
        ended unseen (during the gap before the call was adopted) gets its
        part now; any other is ignored (its events were seen)."""
        try:
            unseen = self.gaps is not None and not facts.answer_us and self.gaps.in_gap(
                self.key, facts.created_us / 1e6, facts.end_us / 1e6, self.esl.state == "connected", now)
        except GapsError as exc:
            raise cdr.CdrRetry(str(exc)) from None
        create, hangup = cdr.leg_events(facts)
        commands = self.tracker.late_leg(create, hangup) if unseen and create and hangup else []
        if not commands:
            return "ignored: a leg of a call fsbridge follows"
        log.info("cdr: call %s: leg %s rang and ended while fsbridge could not see it (%s)", facts.parent_uuid,
                 facts.uuid, ", ".join(c.fields["ext"] + " " + c.fields.get("status", c.fields["event"])
                                       for c in commands))
        self._emit(commands)
        return "completed: a leg rung unseen"

    def report_unseen(self, now: float) -> int:
        """Report the unseen calls whose CDRs are in; how many."""
        ready = self.unseen.ready(now)
        for a, legs in ready:
            commands = [tracker.PlanfixCommand(c.call_id, c.fields, c.recording_path, tenant=c.tenant,
                                               node=self.key, unmatched=c.unmatched)
                        for c in self.tracker.replay(cdr.call_events(a, legs))]
            log.info("cdr: call %s began and ended while fsbridge could not see it: reported from %d CDRs (%s)",
                     a.uuid, 1 + len(legs),
                     ", ".join(c.fields["ext"] + " " + c.fields.get("status", c.fields["event"]) for c in commands)
                     or "nothing to report")
            if commands:
                self._emit(commands)
        if ready:
            self._flush()  # one commit for them all, before their held CDRs are let go
        for a, _ in ready:
            try:
                if self.gaps is not None:
                    self.gaps.mark_reported(a.uuid, now)
            except GapsError as exc:
                log.warning("%s", exc)
        return len(ready)

    def watch_gaps(self, stopping) -> None:
        """Once a second: note this node seen while connected; report the unseen calls whose CDRs are in."""
        while not stopping.wait(1.0):
            if self.esl.state == "connected":
                self._note_gap("alive")
            if len(self.unseen):
                self.report_unseen(time.time())

    # -- click-to-call ---------------------------------------------------------

    def registration(self, ext: str, dial_string: str) -> str | None:
        """Why ``ext`` cannot be rung on this node (unknown, not registered), or None.

        Only for ``user/{ext}[@domain]`` dial strings: another dial string (a
        gateway, loopback) has no registration to ask about.  A FreeSWITCH
        without mod_sofia's API answers -ERR: the check is skipped rather
        than refusing every call.  Raises EslNotConnected/EslTimeout.
        """
        query = sofia_contact_query(dial_string, ext)
        if query is None:
            return None
        try:
            reply = self.esl.api(query)
        except EslCommandError as exc:
            log.warning("cannot check extension %s before makeCall (%s): dialling anyway", ext, exc)
            return None
        return registration_problem(ext, reply)

    def health(self) -> dict:
        return {**self.esl.health(), "open_calls": self.tracker.open_calls()}


def pick_node(nodes: list[Node], ext: str, dial_string: str) -> tuple[Node | None, str | None]:
    """The node to ring ``ext`` on, and the problem if none can: the node where
    the phone is registered (each connected node is asked at once)."""
    if len(nodes) == 1:
        return nodes[0], nodes[0].registration(ext, dial_string)
    connected = [n for n in nodes if n.esl.state == "connected"]
    if not connected:
        return None, None
    if sofia_contact_query(dial_string, ext) is None:
        return connected[0], None  # nothing to ask: any node dials a gateway
    asks = [gevent.spawn(n.registration, ext, dial_string) for n in connected]
    gevent.joinall(asks)
    problem = None
    for node, ask in zip(connected, asks):
        if ask.successful() and ask.value is None:
            return node, None
        if ask.successful():
            problem = problem or ask.value
    return None, problem or f"from: extension {ext} is not registered on any FreeSWITCH node; nothing was dialled"
