"""Wires the parts into one gevent process, and the CLI's service commands.

Three flows share the process:

    FreeSWITCH --ESL--> esl --> events --> tracker --> recordings --> outbox --> PlanFix
    PlanFix --POST /planfix--> web --> originate --> esl (bgapi) --> FreeSWITCH
    FreeSWITCH dialplan --GET /dialplan/contact--> lookup --> PlanFix (contact)

Everything that blocks runs in its own greenlet; the ESL reader only parses,
runs the pure tracker and hands commands to the outbox (one local SQLite
commit), so a slow PlanFix never stalls event intake.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import signal
import sys
import time

import gevent
import gevent.event

from fsbridge import __version__, calls, cdr, events, metrics, outbox, phone, recordings, reload, tracker
from fsbridge.config import Config
from fsbridge.esl import EslCommandError, EslConnection, EslNotConnected, EslTimeout
from fsbridge.httpguard import GuardSettings, GuardedWSGIServer, raise_nofile_limit
from fsbridge.lookup import ContactLookup, LookupSettings, create_lookup_app
from fsbridge.opencalls import OpenCalls, OpenCallsError
from fsbridge.outbox import OutboxError, cli_list, cli_retry, db_path_for
from fsbridge.planfix import Credentials, PlanfixClient, cli_ping
from fsbridge.planfix_address import AddressPolicy
from fsbridge.recordings import RecordingSettings, RecordingsError, check_settings
from fsbridge.state import SettingsError, SettingsStore
from fsbridge.web import PLANFIX_PATH, WebDeps, WebSettings, apply_click_to_call, create_app, register_detailed_health

log = logging.getLogger("fsbridge.service")



_USER_DIAL_STRING = re.compile(r"user/\{ext\}(@[A-Za-z0-9_.-]+)?")


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

class ServiceError(Exception):
    """The service cannot start (the message says why, for the admin)."""



def _settings_store(cfg: Config):
    """Where `setup` keeps PlanFix's address and token."""

    # recheck_s: no stat per PlanFix request; `setup` saves through this
    # store (seen at once), a hand edit of the file within a second.
    return SettingsStore(os.path.join(cfg.storage.dir, "planfix-settings.json"), recheck_s=1.0)


def _make_credentials(cfg: Config, store):
    """PlanFix URL and token: what `setup` stored wins over the config file."""

    def credentials() -> Credentials | None:
        try:
            stored = store.load()
        except SettingsError as exc:
            log.error("%s", exc)
            stored = None
        if stored is not None:
            return stored
        if cfg.planfix.url and cfg.planfix.token:
            return Credentials(cfg.planfix.url, cfg.planfix.token)
        return None

    return credentials


def _make_client(cfg: Config, credentials):

    return PlanfixClient(
        credentials,
        connect_timeout=cfg.planfix.connect_timeout,
        read_timeout=cfg.planfix.read_timeout,
        pool_size=max(cfg.outbox.concurrency, cfg.planfix.max_in_flight),
        address_policy=AddressPolicy.from_config(cfg),
    )


class Service:
    """One fsbridge process: ESL worker, outbox, PlanFix endpoint, lookup."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._stopping = gevent.event.Event()
        self._unsaved: list = []  # commands the outbox could not store yet (disk full)
        self._batch: list = []  # commands produced since the event greenlet last yielded
        self._flusher: gevent.Greenlet | None = None
        self._storage_error = ""
        self._outbox_full = False
        try:
            os.makedirs(cfg.storage.dir, exist_ok=True)
        except OSError as exc:
            raise ServiceError(
                f"{cfg.path}: [storage] dir: cannot create {cfg.storage.dir}: {exc.strerror}"
            ) from None
        if not os.access(cfg.storage.dir, os.W_OK):
            raise ServiceError(f"{cfg.path}: [storage] dir: {cfg.storage.dir} is not writable")
        try:
            self._build()
        except (ValueError, OSError) as exc:
            raise ServiceError(f"{cfg.path}: {exc}") from None

    # -- construction -------------------------------------------------------

    def _build(self) -> None:

        cfg = self.cfg
        self.settings_store = _settings_store(cfg)
        self.credentials = _make_credentials(cfg, self.settings_store)
        self.client = metrics.InstrumentedClient(_make_client(cfg, self.credentials))
        self.outbox = outbox.Outbox(
            outbox.db_path_for(cfg.storage.dir),
            self.client,
            concurrency=cfg.outbox.concurrency,
            max_concurrency=max(cfg.outbox.concurrency, cfg.planfix.max_in_flight),
            max_age_s=cfg.outbox.max_age,
            min_backoff_s=cfg.outbox.min_backoff,
            max_backoff_s=cfg.outbox.max_backoff,
        )
        normalize = functools.partial(
            phone.normalize_phone, region=cfg.phone.default_region, output=cfg.phone.format
        )
        self.tracker = tracker.CallTracker(
            tracker.TrackerSettings(
                extension_pattern=cfg.calls.extension_pattern,
                report_internal_calls=cfg.calls.report_internal_calls,
                max_open_calls=cfg.calls.max_open_calls,
                normalize_phone=normalize,
                click_to_call_diversion=cfg.click_to_call.client_caller_id,
            )
        )
        self._channel_event = events.channel_event
        self._command_type = tracker.PlanfixCommand

        try:
            self.open_calls = OpenCalls(os.path.join(cfg.storage.dir, "open-calls.sqlite3"))
        except OpenCallsError as exc:
            raise ServiceError(f"{cfg.path}: [storage] dir: {exc}") from None
        if self.open_calls.inherited:
            log.info("%d calls were open when the service last stopped; they are closed "
                     "once FreeSWITCH confirms they ended", len(self.open_calls.inherited))
        self._live_uuids = tracker.live_uuids_from_show_json

        rec_settings = RecordingSettings.from_config(cfg)
        for problem in check_settings(rec_settings):
            log.warning("recordings: %s", problem)
        try:
            self.recordings = recordings.Recordings(
                rec_settings, emit=self._store, pending_call_ids=self._pending_call_ids
            )
        except RecordingsError as exc:
            raise ServiceError(f"{cfg.path}: {exc}") from None

        self.lookup = ContactLookup(LookupSettings.from_config(cfg), self.client.contact)
        self.lookup_app = create_lookup_app(self.lookup.settings, lookup=self.lookup)
        metrics.time_requests(self.lookup_app)
        calls.register_routes(self.lookup_app, self.tracker, self.outbox)
        if cfg.cdr.secret:
            cdr.register_route(self.lookup_app, cfg.cdr.secret, cfg.cdr.max_body_bytes, self._on_cdr)

        self.esl = EslConnection(
            cfg.freeswitch.host,
            cfg.freeswitch.port,
            cfg.freeswitch.password,
            list(events.SUBSCRIBED_EVENTS),
            on_event=self._on_event,
            on_state=self._on_esl_state,
            on_connected=self._on_connected,
            connect_timeout=cfg.freeswitch.connect_timeout,
            command_timeout=cfg.freeswitch.command_timeout,
            max_backoff=cfg.freeswitch.max_backoff,
            idle_timeout=cfg.freeswitch.idle_timeout,
        )
        web_settings = WebSettings.from_config(cfg)
        self._web_deps = WebDeps(
            originate=lambda command, job_uuid: self.esl.bgapi(command, job_uuid=job_uuid),
            settings_store=self.settings_store,
            on_credentials_changed=self.outbox.wake,
            health=self.health,
            not_connected_errors=(EslNotConnected, EslTimeout),
            client_name=self.lookup.contact_name_for,
            normalize_to=functools.partial(
                phone.dial_number,
                region=cfg.phone.default_region,
                keep_plus=cfg.click_to_call.keep_plus,
                extension_pattern=cfg.calls.extension_pattern,
            ),
            credentials=self.credentials,
            extension_problem=self._extension_problem,
            # A click-to-call's UUID is its A leg: open while the tracker follows it.
            call_active=self.tracker.tracks,
            refuse_calls=lambda: "the PBX's queue for PlanFix is full" if self._check_outbox_bound() else None,
        )
        self.app = create_app(web_settings, self._web_deps)
        recordings.register_routes(self.app, self.recordings)
        # The detailed /healthz only on the dialplan listener (loopback by default).
        register_detailed_health(self.lookup_app, self._web_deps)

    def _extension_problem(self, ext: str) -> str | None:
        """Ask FreeSWITCH whether the manager's phone can be rung at all.

        ``ext`` was checked by the extension pattern and originate's
        whitelist before it gets here.  Only for ``user/{ext}[@domain]``
        dial strings: another dial string (a gateway, loopback) has no
        registration to ask about.  A FreeSWITCH without mod_sofia's API
        answers -ERR: the check is skipped rather than refusing every call.
        """

        query = sofia_contact_query(self.cfg.click_to_call.dial_string, ext)
        if query is None:
            return None
        try:
            reply = self.esl.api(query)
        except EslCommandError as exc:
            log.warning("cannot check extension %s before makeCall (%s): dialling anyway", ext, exc)
            return None
        return registration_problem(ext, reply)

    # -- the event path (runs in the ESL reader greenlet: must not block) ----

    def _on_event(self, headers, body: bytes) -> None:
        metrics.EVENTS.labels(headers.get("Event-Name") or "?").inc()
        event = self._channel_event(headers, body)
        if event is None:
            return
        if event.name == "BACKGROUND_JOB":
            self._log_job(event)
        commands = self.tracker.feed(event)
        if commands:
            self.recordings.process(commands, self._store)

    def _log_job(self, event) -> None:
        outcome = event.job_body.strip()
        if outcome.startswith("+OK"):
            log.info("job %s: FreeSWITCH answered %s", event.job_uuid, outcome)
        else:
            log.warning("job %s: FreeSWITCH failed it: %s", event.job_uuid, outcome or "(empty)")

    def _store(self, commands: list) -> None:
        """Queue commands for PlanFix: stored durably as soon as the current
        greenlet yields (the ESL reader does at its next recv), so that all
        the commands one socket read produced share one SQLite commit."""
        self._batch.extend(commands)
        if self._flusher is None:
            self._flusher = gevent.spawn(self._flush)

    def _flush(self) -> None:
        """Store the pending batch, in order; on a storage failure keep it in
        memory, in order, and retry until the disk takes it."""
        self._flusher = None
        commands, self._batch = self._batch, []
        if not commands:
            return
        if self._unsaved:
            self._unsaved.extend(commands)
        elif not self._put(commands):
            self._unsaved.extend(commands)
            gevent.spawn(self._retry_unsaved)

    def _put(self, commands: list) -> bool:
        """One durable write to the outbox (and the open-calls registry)."""

        try:
            self.outbox.put(commands)
        except OutboxError as exc:
            self._storage_failed(exc)
            return False
        self._note_open_calls(commands)
        self._check_outbox_bound()
        return True

    def _check_outbox_bound(self) -> bool:
        """True when the outbox holds [outbox] max_depth or more; alerts once per crossing.
        Nothing is dropped at the bound: call records keep being stored (see conf/)."""
        depth = self.outbox.stats()["depth"]
        full = depth >= self.cfg.outbox.max_depth
        if full and not self._outbox_full:
            log.error("outbox holds %d requests for PlanFix ([outbox] max_depth %d): PlanFix has not taken "
                      "them; new click-to-call requests are refused until it does, call records are still kept",
                      depth, self.cfg.outbox.max_depth)
        elif not full and self._outbox_full:
            log.info("outbox below [outbox] max_depth again (%d requests)", depth)
        self._outbox_full = full
        return full

    def _note_open_calls(self, commands: list) -> None:

        try:
            self.open_calls.record(commands)
        except OpenCallsError as exc:  # the requests themselves are stored
            log.error("%s", exc)

    def _storage_failed(self, exc: Exception) -> None:
        if not self._storage_error:
            log.error("cannot store PlanFix requests under %s: %s (kept in memory, retrying)",
                      self.cfg.storage.dir, exc)
        self._storage_error = str(exc)

    def _retry_unsaved(self) -> None:
        while self._unsaved and not self._stopping.is_set():
            gevent.sleep(1.0)
            batch = list(self._unsaved)
            if self._put(batch):
                del self._unsaved[: len(batch)]
                log.info("storage works again: %d held PlanFix requests stored", len(batch))
                self._storage_error = ""

    def _pending_call_ids(self) -> set[str]:
        """Calls with requests not yet accepted by PlanFix (one outbox read per retention run)."""
        return {entry.call_id for entry in self.outbox.list_entries()}

    # -- ESL connection life -------------------------------------------------

    def _on_esl_state(self, state: str, detail: str) -> None:
        # esl.py logs connects and every failed attempt; here the one hint
        # that names the admin's config file.
        if state == "auth_failed":
            log.error("FreeSWITCH refused the password: check [freeswitch] password in %s", self.cfg.path)

    def _on_connected(self, core_uuid: str) -> None:
        """After every (re)connect: close calls that ended while we were away."""
        self._reconcile()

    def _reconcile(self, adopt: bool = True) -> bool:
        """Square the calls we know with FreeSWITCH's list of live channels.

        Close every call that ended unseen: while the connection was down
        (the tracker's open calls) or before this process started (calls an
        earlier process reported).  Then (``adopt``) take up the live calls
        we do not track: begun during the gap, or before this process
        started; those are then reported from FreeSWITCH's own events to
        their real end.  Returns False when FreeSWITCH could not be asked."""
        try:
            listing = self.esl.api("show channels as json")
            live = self._live_uuids(listing)
        except Exception as exc:  # noqa: BLE001 - logged; retried at the next connect
            log.warning("could not reconcile open calls with FreeSWITCH: %s", exc)
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
        closed = self.open_calls.close_inherited(live, now, wait)
        commands += [self._command_type(call_id, fields) for call_id, fields in closed]
        if wait and closed:
            log.warning("reconcile: no CDR within %gs for %d calls: closed without their real end "
                        "(check mod_json_cdr's url and cred)", wait, len({c for c, _ in closed}))
        elif commands:
            log.info("reconcile: %d calls ended while fsbridge could not see them",
                     len({c.call_id for c in commands}))
        if adopt:
            adopted = self.tracker.adopt(listing, now_us)
            if adopted:
                # Followed from now on: their end comes with real events.
                self.open_calls.forget_inherited({c.call_id for c in adopted})
                log.info("reconcile: %d live calls taken up", len({c.call_id for c in adopted}))
            commands += adopted
        if commands:
            self.recordings.process(commands, self._store)
        return True

    def _watch_inherited(self) -> None:
        """Calls inherited from an earlier process that are still up end
        without events we can use, and those waiting for a CDR have a
        deadline: look again every minute (sooner for a short [cdr] wait)."""
        period = min(60.0, max(1.0, self.cfg.cdr.wait / 4)) if self.cfg.cdr.secret else 60.0
        while not self._stopping.wait(period):
            if self.open_calls.inherited and self.esl.state == "connected":
                self._reconcile(adopt=False)

    def _on_cdr(self, facts: cdr.CdrFacts) -> str:
        """A CDR from mod_json_cdr: finish the inherited call it is the A leg of."""
        if facts.is_b_leg or facts.call_uuid != facts.uuid:
            return "ignored: not the A leg of a call"
        if self.tracker.tracks(facts.uuid):
            if self.esl.state != "connected":
                # Its events are lost; the reconnect hands the call over: until then, retry.
                raise cdr.CdrRetry("fsbridge is reconnecting to FreeSWITCH; post it again")
            return "ignored: the call is followed live"  # its events give the end
        legs = self.open_calls.pop_inherited(facts.uuid)
        if not legs:
            return "ignored: no open call"  # internal, never reported, or already closed
        commands = [self._command_type(facts.uuid, fields, path) for fields, path in cdr.completions(legs, facts)]
        log.info("cdr: call %s finished from its CDR (%s)", facts.uuid,
                 ", ".join(c.fields["ext"] + " " + c.fields.get("status", c.fields["event"]) for c in commands))
        self.recordings.process(commands, self._store)
        return "completed"

    # -- health ----------------------------------------------------------------

    def health(self) -> dict:
        outbox_stats = self.outbox.stats()
        if self._unsaved:
            outbox_stats["unsaved_in_memory"] = len(self._unsaved)
        return {
            "status": "ok" if self.esl.state == "connected" and not self._storage_error
            and not self._check_outbox_bound() else "degraded",
            "outbox_full": self._outbox_full,
            "freeswitch": self.esl.health(),
            "outbox": outbox_stats,
            "storage_error": self._storage_error or None,
            "open_calls": self.tracker.open_calls(),
            "open_calls_from_before_restart": len(self.open_calls.inherited),
            "dialplan_lookup": self.lookup.stats(),
            "recordings_converting": self.recordings.pending_conversions(),
        }

    # -- running ------------------------------------------------------------

    def _server(self, listen, app, tls: bool, public: bool = True):

        kwargs = {}
        if tls:
            kwargs = {"certfile": self.cfg.server.certfile, "keyfile": self.cfg.server.keyfile}
        # Timeouts per request phase and connection caps (httpguard): an idle
        # or trickling client can no longer hold a slot PlanFix needs.
        guard = GuardSettings.from_config(self.cfg)
        if not public:
            # The dialplan lookup: every request comes from FreeSWITCH's one
            # address; only the total and the timeouts apply.
            guard = dataclasses.replace(guard, max_per_address=guard.max_connections)
        return GuardedWSGIServer((listen.host, listen.port), app, guard,
                                 error_log=logging.getLogger("fsbridge.http"), **kwargs)

    def run(self) -> int:

        cfg = self.cfg
        soft, _hard = raise_nofile_limit()
        if soft < cfg.server.max_connections + 1000:
            log.warning("open-files limit %d is below [server] max_connections + 1000: raise LimitNOFILE", soft)
        public = self._server(cfg.server.listen, self.app, tls=bool(cfg.server.certfile))
        lookup = self._server(cfg.dialplan.listen, self.lookup_app, tls=False, public=False)
        try:
            public.start()
            lookup.start()
            self.metrics_server = metrics.serve(cfg.metrics.listen, self.health)
        except OSError as exc:
            raise ServiceError(f"cannot listen: {exc.strerror or exc}") from None
        scheme = "https" if cfg.server.certfile else "http"
        log.info("fsbridge %s: PlanFix endpoint %s://%s/planfix, dialplan lookup http://%s/dialplan/contact",
                 __version__, scheme, cfg.server.listen, cfg.dialplan.listen)
        if self.credentials() is None:
            log.warning("PlanFix address and token not set yet: waiting for PlanFix's setup "
                        "command (call events are stored meanwhile)")
        self.outbox.start()
        self.recordings.start()
        self.esl.start()
        cleanup = gevent.spawn(self._cleanup_loop) if cfg.recordings.retention_days else None
        watcher = gevent.spawn(self._watch_inherited)

        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, self._stopping.set)
        reloader = reload.Reloader(cfg, lambda new: apply_click_to_call(self.app, WebSettings.from_config(new)))
        gevent.signal_handler(signal.SIGHUP, reloader.reload)
        self._stopping.wait()
        log.info("stopping: finishing in-flight PlanFix requests")
        public.stop(timeout=3)  # lets a makeCall or setup in progress finish
        lookup.stop(timeout=2)
        self.esl.stop()
        watcher.kill()
        if cleanup is not None:
            cleanup.kill()
        self.recordings.stop(timeout=2)
        self._flush()
        if self._unsaved:
            log.error("%d PlanFix requests could not be stored before exit", len(self._unsaved))
        self.outbox.stop(drain_timeout=5)
        self.recordings.close()
        self.open_calls.close()
        log.info("stopped")
        return 0

    def _cleanup_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                removed = self.recordings.cleanup(time.time())
                if removed:
                    log.info("retention: %d old recordings removed", removed)
            except Exception:  # noqa: BLE001 - keep the service running
                log.exception("retention cleanup failed")
            self._stopping.wait(3600)


def preflight_problems(cfg: Config) -> list[str]:
    """What `fsbridge check` finds beyond the INI values themselves: the
    recordings set-up and the settings the endpoint builds from the config."""

    problems = [f"{cfg.path}: {p}" for p in check_settings(RecordingSettings.from_config(cfg))]
    try:
        WebSettings.from_config(cfg)
    except ValueError as exc:
        problems.append(f"{cfg.path}: [click_to_call]: {exc}")
    return problems


def ping_planfix(cfg: Config) -> int:

    client = _make_client(cfg, _make_credentials(cfg, _settings_store(cfg)))
    # PlanFix holds our endpoint's address, public_url + /planfix (README step 4).
    pbx_url = cfg.server.public_url + PLANFIX_PATH if cfg.server.public_url else ""
    code, text = cli_ping(client, pbx_url, cfg.server.token)
    print(text)
    return code


def outbox_command(cfg: Config, retry: bool) -> int:

    path = db_path_for(cfg.storage.dir)
    try:
        print(cli_retry(path) if retry else cli_list(path))
    except OutboxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
