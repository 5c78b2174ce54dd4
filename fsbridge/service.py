"""Wires the parts into one gevent process, and the CLI's service commands.

Three flows share the process:

    FreeSWITCH --ESL--> nodes (esl, events, tracker) --> recordings --> accounts (outbox) --> PlanFix
    PlanFix --POST /planfix--> web --> originate --> nodes (esl bgapi) --> FreeSWITCH
    FreeSWITCH dialplan --GET /dialplan/contact--> lookup --> PlanFix (contact)

Everything that blocks runs in its own greenlet; the ESL reader only parses,
runs the pure tracker and hands commands to the outbox (one local SQLite
commit), so a slow PlanFix never stalls event intake.  Cloud PBX: one
account per tenant (``fsbridge.accounts``), one node per FreeSWITCH
(``fsbridge.nodes``); each command goes to its call's tenant only.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import os
import signal
import sys
import time

import gevent
import gevent.event

from fsbridge import __version__, calls, cdr_endpoint, metrics, recordings, reload
from fsbridge.core import cdr, phone
from fsbridge.accounts import Account, account_dir, effective_credentials, make_client, settings_store
from fsbridge.config import Config, TenantConfig, tenant_view
from fsbridge.esl import EslNotConnected, EslTimeout
from fsbridge.gaps import Gaps, GapsError
from fsbridge.httpguard import GuardSettings, GuardedWSGIServer, raise_nofile_limit
from fsbridge.lookup import create_lookup_app
from fsbridge.later import Later
from fsbridge.nodes import Node, pick_node, registration_problem, sofia_contact_query
from fsbridge.opencalls import OpenCalls, OpenCallsError, migrate_legacy
from fsbridge.outbox import OutboxError, cli_list, cli_retry, db_path_for
from fsbridge.planfix import cli_ping
from fsbridge.recordings import RecordingSettings, RecordingsError, check_settings
from fsbridge.core.tenancy import IMPLICIT_TENANT, TenantMap, TenantRules
from fsbridge.web import PLANFIX_PATH, TenantWeb, WebDeps, WebSettings, apply_click_to_call, create_app, register_detailed_health

log = logging.getLogger("fsbridge.service")

__all__ = ["Service", "ServiceError", "registration_problem", "sofia_contact_query", "tenant_map"]

# A call no tenant owns is logged once per domain/DID in this many seconds.
UNROUTED_LOG_INTERVAL_S = 3600.0
_UNROUTED_MEMORY = 10_000
# Commands held for one commit at most.  The ESL reader yields every
# esl.READER_SLICE_S during a burst (before, only once its socket was empty:
# the batch then held a whole burst, measured 12 s, ~90,000 requests, +60 MB
# peak RSS); a slice of a fast burst is still thousands of commands.
MAX_BATCH = 1000


class ServiceError(Exception):
    """The service cannot start (the message says why, for the admin)."""


def tenant_map(cfg: Config, normalize) -> TenantMap:
    """Who owns which domain and DID (one implicit owner without [tenant.*])."""
    if not cfg.multi_tenant:
        return TenantMap([], single=IMPLICIT_TENANT)
    rules = [TenantRules(t.name, t.domains, t.dids, t.calls.extension_pattern, t.calls.report_internal_calls)
             for t in cfg.tenants]
    return TenantMap(rules, normalize_did=normalize)


class Service:
    """One fsbridge process: the nodes, the accounts, the PlanFix endpoint, the lookup."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._stopping = gevent.event.Event()
        # Per tenant, in order: commands its outbox could not store yet (disk
        # full, a damaged file): held in memory and retried, without holding
        # back the tenants whose outboxes store fine.
        self._unsaved: dict[str, list] = {}
        self._retrying: gevent.Greenlet | None = None
        self._batch: list = []  # commands produced since the event greenlet last yielded
        self._flusher = Later(self._flush)  # stores the batch once the reader yields
        self._storage_error = ""
        self._outbox_full: set[str] = set()  # tenants whose outbox is at [outbox] max_depth
        self._unrouted_logged: dict[str, float] = {}
        # Tenants a reload removed whose calls were still up: delivered to
        # until those calls end (their PlanFix sees them finish), then stopped.
        self._retiring: dict[str, Account] = {}
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
        self.multi_tenant = cfg.multi_tenant
        self._normalize = phone.normalizer(cfg.phone.default_region, cfg.phone.format)
        self.tenants = tenant_map(cfg, self._normalize)
        self.accounts: dict[str, Account] = {t.name: Account(cfg, t) for t in cfg.tenants}

        try:
            migrate_legacy(cfg.storage.dir, self._legacy_tenant)
            self.open_calls = OpenCalls(account.outbox for account in self.accounts.values())
        except OpenCallsError as exc:
            raise ServiceError(f"{cfg.path}: [storage] dir: {exc}") from None
        if self.open_calls.inherited:
            log.info("%d calls were open when the service last stopped; they are closed "
                     "once FreeSWITCH confirms they ended", len(self.open_calls.inherited))
        self.gaps = None
        if cfg.cdr.secret:
            try:
                self.gaps = Gaps(os.path.join(cfg.storage.dir, "esl-gaps.sqlite3"))
            except GapsError as exc:
                raise ServiceError(f"{cfg.path}: [storage] dir: {exc}") from None
        self.nodes = [Node(cfg, node, self.tenants, self._normalize, self.open_calls, self._emit, self._flush,
                           gaps=self.gaps)
                      for node in cfg.nodes]
        self.nodes[0].other_keys = frozenset(n.key for n in self.nodes)
        self._nodes_by_name = {n.name: n for n in self.nodes}

        rec_settings = RecordingSettings.from_config(cfg)
        for problem in check_settings(rec_settings):
            log.warning("recordings: %s", problem)
        try:
            self.recordings = recordings.Recordings(
                rec_settings, emit=self._store, pending_call_ids=self._pending_call_ids
            )
        except RecordingsError as exc:
            raise ServiceError(f"{cfg.path}: {exc}") from None

        first = next(iter(self.accounts.values()))
        self.lookup_app = create_lookup_app(first.lookup.settings, lookup=first.lookup,
                                            select=self._select_lookup if self.multi_tenant else None)
        metrics.time_requests(self.lookup_app)
        calls.register_routes(self.lookup_app, self._open_call_list, self._outboxes)
        if cfg.cdr.secret:
            cdr_endpoint.register_route(self.lookup_app, cfg.cdr.secret, cfg.cdr.max_body_bytes, self._on_cdr)

        self._tenant_webs = self._make_tenant_webs(cfg)
        first_web = next(iter(self._tenant_webs.values()))
        self._web_deps = WebDeps(
            originate=self._no_originate,
            settings_store=first.settings_store,
            health=self.health,
            not_connected_errors=(EslNotConnected, EslTimeout),
            credentials=first.credentials if not self.multi_tenant else self._all_credentials,
            tenants=lambda: self._tenant_webs,
        )
        self.app = create_app(first_web.settings, self._web_deps)
        recordings.register_routes(self.app, self.recordings)
        # The detailed /healthz only on the dialplan listener (loopback by default).
        register_detailed_health(self.lookup_app, self._web_deps)

    def _all_credentials(self):
        """For /healthz's planfix_configured: set only when every tenant's PlanFix is known."""
        found = None
        for account in list(self.accounts.values()):
            found = account.credentials()
            if found is None:
                return None
        return found

    @staticmethod
    def _no_originate(command: str, job_uuid: str) -> str:
        raise AssertionError("makeCall goes through a tenant's route_call")

    def _make_tenant_webs(self, cfg: Config) -> dict[str, TenantWeb]:
        return {t.name: TenantWeb(t.name, self._web_settings(cfg, t), self._tenant_deps(t)) for t in cfg.tenants}

    def _web_settings(self, cfg: Config, tenant: TenantConfig) -> WebSettings:
        settings = WebSettings.from_config(tenant_view(cfg, tenant))
        if tenant.implicit:
            return settings
        return dataclasses.replace(settings, originate=dataclasses.replace(settings.originate, tenant=tenant.name))

    def _tenant_deps(self, tenant: TenantConfig) -> WebDeps:
        account = self.accounts[tenant.name]
        return WebDeps(
            originate=self._no_originate,
            settings_store=account.settings_store,
            on_credentials_changed=account.outbox.wake,
            health=self.health,
            not_connected_errors=(EslNotConnected, EslTimeout),
            client_name=account.lookup.contact_name_for,
            normalize_to=functools.partial(
                phone.dial_number,
                region=self.cfg.phone.default_region,
                keep_plus=tenant.click_to_call.keep_plus,
                extension_pattern=tenant.calls.extension_pattern,
            ),
            credentials=account.credentials,
            route_call=functools.partial(self._route_call, tenant.name),
            # A click-to-call's UUID is its A leg: open while a tracker follows it.
            call_active=self._call_active,
            refuse_calls=functools.partial(self._refuse_calls, tenant.name),
        )

    def _account_name(self, tenant: str) -> str:
        """The account a command's (or a registry row's) tenant goes to: "" is
        the one tenant of a config without [tenant.*], nobody's in a cloud PBX."""
        return tenant or ("" if self.multi_tenant else IMPLICIT_TENANT)

    def _legacy_tenant(self, name: str):
        """Where an older fsbridge's open-calls file puts a tenant's legs: its
        outbox, or None (no such tenant now), as the service routes their COMPLETED."""
        account = self.accounts.get(self._account_name(name))
        return account.outbox if account is not None else None

    def _route_call(self, tenant_name: str, ext: str):
        """(why ``ext`` cannot be rung, the originate to use): the tenant's own node, or the
        node where the phone is registered.  ``ext`` was checked by the tenant's extension
        pattern and originate's whitelist before it gets here."""
        tenant = self.cfg.tenant(tenant_name)
        # The dial string makeCall dials now (a reload may have changed it).
        dial_string = self.app.extensions["fsbridge.click_to_call"][tenant_name].settings.originate.dial_string
        candidates = self.nodes
        if tenant is not None and tenant.node:
            candidates = [self._nodes_by_name[tenant.node]]
        node, problem = pick_node(candidates, ext, dial_string)
        if node is None and problem is None:
            raise EslNotConnected("no FreeSWITCH node is connected")
        if node is None:
            return problem, self._no_originate
        return problem, lambda command, job_uuid: node.esl.bgapi(command, job_uuid=job_uuid)

    def _call_active(self, uuid: str) -> bool:
        return any(node.tracker.tracks(uuid) for node in self.nodes)

    def _refuse_calls(self, tenant_name: str) -> str | None:
        return "the PBX's queue for PlanFix is full" if self._check_outbox_bound(tenant_name) else None

    def _select_lookup(self, domain: str, did: str):
        account = self.accounts.get(self.tenants.find(domain=domain, did=did))
        return account.lookup if account is not None else None

    def _open_call_list(self) -> list:
        return [call for node in self.nodes for call in node.tracker.open_call_list()]

    def _outboxes(self) -> list:
        return [account.outbox for account in self.accounts.values()]

    # -- commands: from the trackers to the tenants' outboxes -----------------

    def _emit(self, commands: list) -> None:
        self.recordings.process(commands, self._store)

    def _store(self, commands: list) -> None:
        """Queue commands for PlanFix: stored durably as soon as the current
        greenlet yields (the ESL reader does when its socket is empty, and
        during a burst every esl.READER_SLICE_S), so that all the commands
        read meanwhile share one SQLite commit; at once when MAX_BATCH are
        waiting."""
        self._batch.extend(commands)
        if len(self._batch) >= MAX_BATCH:
            self._flush()  # in this greenlet, in order; a flush already asked for finds what comes next
        else:
            self._flusher.request()

    def _flush(self) -> None:
        """Store the pending batch, in order; on a storage failure keep a
        tenant's commands in memory, in order, and retry until its disk takes them."""
        commands, self._batch = self._batch, []
        if commands:
            self._put(commands)

    def _put(self, commands: list) -> None:
        """One durable write per tenant's outbox (which holds its open-calls
        registry too). A tenant with commands held already gets these behind them (its order)."""
        by_tenant: dict[str, list] = {}
        for command in commands:
            # getattr: a command type that forgot its tenant must be logged, not crash the flusher.
            name = self._account_name(getattr(command, "tenant", ""))
            if name not in self.accounts and name not in self._retiring:
                self._unrouted(command, name)
                continue
            by_tenant.setdefault(name, []).append(command)
        for name, group in by_tenant.items():
            held = self._unsaved.get(name)
            if held is not None:
                held.extend(group)
            elif not self._put_tenant(name, group):
                self._unsaved[name] = list(group)
        if self._unsaved and self._retrying is None:
            self._retrying = gevent.spawn(self._retry_unsaved)

    def _put_tenant(self, name: str, group: list) -> bool:
        account = self.accounts.get(name) or self._retiring.get(name)
        if account is None:  # removed meanwhile, its calls over: nobody to hold them for
            for command in group:
                self._unrouted(command, name)
            return True
        try:
            account.outbox.put(group)
        except OutboxError as exc:
            self._storage_failed(exc)
            return False
        except Exception as exc:  # noqa: BLE001 - a bug must not lose call records: kept, retried, logged
            log.exception("cannot queue %d PlanFix requests of tenant %s", len(group), name)
            self._storage_failed(exc)
            return False
        self._check_outbox_bound(name)
        return True

    def _unrouted(self, command, name: str) -> None:
        """A call no tenant owns (or whose tenant was removed): sent nowhere, never to another
        tenant; logged once per domain/DID per hour."""
        metrics.UNROUTED.inc()
        what = (f"tenant {name} (no longer configured)" if name
                else (getattr(command, "unmatched", "") or "no domain or DID"))
        now = time.monotonic()
        last = self._unrouted_logged.get(what)
        if last is not None and now - last < UNROUTED_LOG_INTERVAL_S:
            return
        if len(self._unrouted_logged) >= _UNROUTED_MEMORY:
            self._unrouted_logged.clear()
        self._unrouted_logged[what] = now
        log.warning("call %s belongs to no tenant (%s): its PlanFix events are sent nowhere; "
                    "add the domain or DID to a [tenant.*] section (said once an hour per domain/DID)",
                    command.call_id, what)

    def _check_outbox_bound(self, tenant_name: str) -> bool:
        """True when the tenant's outbox holds [outbox] max_depth or more; alerts once per crossing.
        Nothing is dropped at the bound: call records keep being stored (see conf/)."""
        account = self.accounts.get(tenant_name)
        if account is None:
            return False
        # depth(), not stats(): this runs for every batch of events stored.
        depth = account.outbox.depth()
        full = depth >= self.cfg.outbox.max_depth
        was_full = tenant_name in self._outbox_full
        whose = "" if account.tenant.implicit else f" of tenant {tenant_name}"
        if full and not was_full:
            log.error("outbox%s holds %d requests for PlanFix ([outbox] max_depth %d): PlanFix has not taken "
                      "them; new click-to-call requests are refused until it does, call records are still kept",
                      whose, depth, self.cfg.outbox.max_depth)
            self._outbox_full.add(tenant_name)
        elif not full and was_full:
            log.info("outbox%s below [outbox] max_depth again (%d requests)", whose, depth)
            self._outbox_full.discard(tenant_name)
        return full

    def _storage_failed(self, exc: Exception) -> None:
        if not self._storage_error:
            log.error("cannot store PlanFix requests under %s: %s (kept in memory, retrying)",
                      self.cfg.storage.dir, exc)
        self._storage_error = str(exc)

    def _retry_unsaved(self) -> None:
        try:
            while self._unsaved and not self._stopping.is_set():
                gevent.sleep(1.0)
                for name in list(self._unsaved):
                    batch = self._unsaved[name]
                    if self._put_tenant(name, batch):
                        del self._unsaved[name]
                        log.info("storage works again: %d held PlanFix requests stored", len(batch))
                if not self._unsaved:
                    self._storage_error = ""
        finally:
            self._retrying = None

    def _pending_call_ids(self) -> set[str]:
        """Calls with requests not yet accepted by PlanFix (one outbox read per retention run)."""
        return {entry.call_id for account in self.accounts.values() for entry in account.outbox.list_entries()}

    def _on_cdr(self, facts: cdr.CdrFacts) -> str:
        """A CDR from mod_json_cdr: finish the inherited call it is the A leg of,
        or hold it (and its legs') to report a call nobody saw."""
        if facts.parent_uuid:  # a leg a call rang
            for node in self.nodes:
                if node.tracker.tracks(facts.parent_uuid):
                    return node.late_leg_cdr(facts, time.time())
            if any(node.follows(facts.parent_uuid) for node in self.nodes):
                return "ignored: a leg of a call fsbridge follows"
            node = self._cdr_node(facts)
            return node.unseen_cdr(facts, time.time()) if node is not None else "ignored: no open call"
        if facts.is_b_leg or facts.call_uuid != facts.uuid:
            return "ignored: not the A leg of a call"
        for node in self.nodes:
            outcome = node.finish_from_cdr(facts)
            if outcome is not None:
                return outcome
        node = self._cdr_node(facts)
        if node is None:
            return "ignored: no open call"  # internal, never reported, or already closed
        return node.unseen_cdr(facts, time.time())

    def _cdr_node(self, facts: cdr.CdrFacts) -> "Node | None":
        """The node whose FreeSWITCH wrote the CDR (its core-uuid)."""
        for node in self.nodes:
            if node.core_uuid and node.core_uuid == facts.core_uuid:
                return node
        if len(self.nodes) == 1:
            return self.nodes[0]
        if any(not node.core_uuid for node in self.nodes):
            raise cdr.CdrRetry("not connected to every FreeSWITCH yet: post it again")
        return None

    # -- tenants: a reload adds, removes or changes them -----------------------

    def apply_tenants(self, new: Config) -> None:
        """Take a reloaded config's [tenant.*] sections: calls in progress stay up.

        Added tenants get their account (outbox started); a removed one's
        token stops working and new calls of its domains go nowhere, but its
        calls in progress are still reported to its PlanFix until they end;
        then it stops delivering (what it could not deliver stays on disk
        and goes out if it is added back).  Changed ones take their new keys,
        domains, DIDs and click-to-call settings.  Open calls keep the tenant
        they began with.
        """
        old_names, new_names = set(self.accounts), {t.name for t in new.tenants}
        for tenant in new.tenants:
            if tenant.name in self.accounts:
                self.accounts[tenant.name].update(tenant)
            elif tenant.name in self._retiring:  # added back before its last call ended
                account = self.accounts[tenant.name] = self._retiring.pop(tenant.name)
                account.update(tenant)
            else:
                account = self.accounts[tenant.name] = Account(new, tenant)
                # What an earlier process left open for it (it was not served at start).
                self.open_calls.add_source(account.outbox, skip=self._call_active)
                account.start()
        self.cfg = dataclasses.replace(self.cfg, tenants=new.tenants)
        self.tenants = tenant_map(self.cfg, self._normalize)
        for node in self.nodes:
            node.tracker.set_tenants(self.tenants)
        self._tenant_webs = self._make_tenant_webs(self.cfg)
        for name in old_names - new_names:
            self._retiring[name] = self.accounts.pop(name)
            self._outbox_full.discard(name)
        self.retire_finished()
        for name in self._retiring:
            log.info("tenant %s removed: its calls in progress are still reported until they end", name)
        if old_names != new_names or old_names:
            log.info("reload: tenants %s", ", ".join(sorted(new_names)))

    def retire_finished(self) -> None:
        """Stop the removed tenants none of whose calls is still up."""
        if not self._retiring:
            return
        busy = {call.tenant for node in self.nodes for call in node.tracker.open_call_list()}
        for name in [n for n in self._retiring if n not in busy]:
            account = self._retiring.pop(name)
            self.open_calls.remove_source(account.outbox)
            pending = account.outbox.stats()["depth"]
            gevent.spawn(account.stop, 2)
            log.warning("tenant %s removed: no call of it is up any more; %d of its PlanFix requests stay in %s "
                        "and are delivered if it is added back", name, pending, account.dir)

    def _retire_loop(self) -> None:
        while not self._stopping.wait(5.0):
            self.retire_finished()

    # -- health ----------------------------------------------------------------

    def health(self) -> dict:
        tenants = {}
        for name, account in list(self.accounts.items()):
            stats = account.stats()
            stats["outbox_full"] = self._check_outbox_bound(name)
            tenants[name] = stats
        boxes = [t["outbox"] for t in tenants.values()]
        outbox_stats = _sum_outboxes(boxes)
        if self._unsaved:
            outbox_stats["unsaved_in_memory"] = sum(len(held) for held in self._unsaved.values())
        nodes = {node.name: node.health() for node in self.nodes}
        all_connected = all(node.esl.state == "connected" for node in self.nodes)
        return {
            "status": "ok" if all_connected and not self._storage_error and not self._outbox_full else "degraded",
            "outbox_full": bool(self._outbox_full),
            "freeswitch": nodes[self.nodes[0].name] if len(self.nodes) == 1 else {
                "state": "connected" if all_connected else "disconnected",
                "connected_nodes": sum(1 for n in self.nodes if n.esl.state == "connected"),
                "connections": sum(int(n.get("connections") or 0) for n in nodes.values()),
            },
            "nodes": nodes,
            "outbox": outbox_stats,
            "tenants": tenants,
            "storage_error": self._storage_error or None,
            "open_calls": sum(node.tracker.open_calls() for node in self.nodes),
            "open_calls_from_before_restart": len(self.open_calls.inherited),
            "dialplan_lookup": _sum_counters([t["lookup"] for t in tenants.values()]),
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
        if self.multi_tenant:
            log.info("serving %d tenants (%s) on %d FreeSWITCH node(s)", len(self.accounts),
                     ", ".join(self.accounts), len(self.nodes))
        for name, account in self.accounts.items():
            if account.credentials() is None:
                whose = "" if account.tenant.implicit else f"tenant {name}: "
                log.warning("%sPlanFix address and token not set yet: waiting for PlanFix's setup "
                            "command (call events are stored meanwhile)", whose)
            account.start()
        self.recordings.start()
        for node in self.nodes:
            node.esl.start()
        cleanup = gevent.spawn(self._cleanup_loop) if cfg.recordings.retention_days else None
        watchers = [gevent.spawn(node.watch_inherited, self._stopping) for node in self.nodes]
        watchers += [gevent.spawn(node.watch_gaps, self._stopping) for node in self.nodes if self.gaps is not None]
        watchers.append(gevent.spawn(self._retire_loop))

        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, self._stopping.set)
        if self.multi_tenant:
            # [click_to_call] is every tenant's default: applied through the tenants.
            reloader = reload.Reloader(cfg, lambda new: None, apply_tenants=self.apply_tenants)
        else:
            reloader = reload.Reloader(cfg, lambda new: apply_click_to_call(self.app, WebSettings.from_config(new)))
        gevent.signal_handler(signal.SIGHUP, reloader.reload)
        # What start-up built (modules, config, the parts) lives as long as the
        # process: moved out of the cyclic GC's sight, so that its full
        # collections scan only what calls create (they paused the event loop
        # 20-24 ms every ~10 s at 200 calls/s before).
        gc.collect()
        gc.freeze()
        self._stopping.wait()
        log.info("stopping: finishing in-flight PlanFix requests")
        public.stop(timeout=3)  # lets a makeCall or setup in progress finish
        lookup.stop(timeout=2)
        for node in self.nodes:
            node.esl.stop()
        gevent.killall(watchers)
        if cleanup is not None:
            cleanup.kill()
        self.recordings.stop(timeout=2)
        self._flusher.kill()
        self._flush()
        if self._unsaved:
            log.error("%d PlanFix requests could not be stored before exit",
                      sum(len(held) for held in self._unsaved.values()))
        stops = [gevent.spawn(account.stop, 5) for account in [*self.accounts.values(), *self._retiring.values()]]
        gevent.joinall(stops)
        self.recordings.close()
        if self.gaps is not None:
            self.gaps.close()
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


def _sum_outboxes(boxes: list[dict]) -> dict:
    """All tenants' outboxes as one (the figures of the one tenant, without tenants)."""
    if len(boxes) == 1:
        return dict(boxes[0])
    ages = [b["oldest_pending_age_s"] for b in boxes if b.get("oldest_pending_age_s") is not None]
    successes = [b["last_success_at"] for b in boxes if b.get("last_success_at")]
    return {
        "depth": sum(b["depth"] for b in boxes),
        "oldest_pending_age_s": max(ages) if ages else None,
        "last_success_at": max(successes) if successes else None,
        "kept_aside": sum(b["kept_aside"] for b in boxes),
        "in_flight": sum(b["in_flight"] for b in boxes),
        "in_flight_limit": sum(b["in_flight_limit"] for b in boxes),
        "last_error": next((b["last_error"] for b in boxes if b.get("last_error")), ""),
        "storage_error": next((b["storage_error"] for b in boxes if b.get("storage_error")), ""),
    }


def _sum_counters(counters: list[dict]) -> dict:
    total: dict = {}
    for counter in counters:
        for key, value in counter.items():
            total[key] = total.get(key, 0) + value
    return total


def preflight_problems(cfg: Config) -> list[str]:
    """What `fsbridge check` finds beyond the INI values themselves: the
    recordings set-up and the settings the endpoint builds from the config."""

    problems = [f"{cfg.path}: {p}" for p in check_settings(RecordingSettings.from_config(cfg))]
    for tenant in cfg.tenants:
        where = "[click_to_call]" if tenant.implicit else f"[tenant.{tenant.name}]"
        try:
            WebSettings.from_config(tenant_view(cfg, tenant))
        except ValueError as exc:
            problems.append(f"{cfg.path}: {where}: {exc}")
    return problems


def ping_planfix(cfg: Config, tenant_name: str | None = None) -> int:
    """Ask PlanFix about our endpoint: the one tenant's, or ``tenant_name``'s (every tenant's when None)."""
    # PlanFix holds our endpoint's address, public_url + /planfix (README step 4).
    pbx_url = cfg.server.public_url + PLANFIX_PATH if cfg.server.public_url else ""
    tenants = [t for t in cfg.tenants if tenant_name in (None, t.name)]
    if not tenants:
        print(f"error: no [tenant.{tenant_name}] in {cfg.path}", file=sys.stderr)
        return 2
    worst = 0
    for tenant in tenants:
        # As the running service reads them; no outbox is opened.
        store = settings_store(account_dir(cfg.storage.dir, tenant))
        client = make_client(cfg, functools.partial(effective_credentials, store, tenant), tenant.name)
        code, text = cli_ping(client, pbx_url, tenant.token)
        print(text if tenant.implicit else f"tenant {tenant.name}: {text}")
        worst = max(worst, code)
    return worst


def outbox_command(cfg: Config, retry: bool, tenant_name: str | None = None) -> int:
    """`fsbridge outbox [--retry]`: the one tenant's outbox, or each tenant's (or ``tenant_name``'s)."""
    tenants = [t for t in cfg.tenants if tenant_name in (None, t.name)]
    if not tenants:
        print(f"error: no [tenant.{tenant_name}] in {cfg.path}", file=sys.stderr)
        return 2
    for tenant in tenants:
        path = db_path_for(account_dir(cfg.storage.dir, tenant))
        if not tenant.implicit:
            print(f"tenant {tenant.name}:")
        try:
            print(cli_retry(path) if retry else cli_list(path))
        except OutboxError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0
