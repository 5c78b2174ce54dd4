"""The HTTP endpoint PlanFix calls (``POST /planfix``) and ``GET /healthz``.

``create_app(settings, deps)`` is a Flask application factory: no globals,
everything it talks to is injected (``WebDeps``), so tests build as many
apps as they like and the service serves one with gevent's WSGI server.

Contract with PlanFix (telephony API, commands ``makeCall`` and ``setup``):
form-urlencoded in, JSON out; 200 on success, 400 ``{"error": "Invalid
parameters"}``, 401 ``{"error": "Invalid token"}``.  Where a ``detail`` key
is added it tells the admin what to fix (PlanFix shows the text of a failed
``setup``); ``error`` always stays the spec's text.

Order of checks, and why:
1. method (405) and route (404): nothing to parse;
2. body size (413) and content type (400): needed to read the form at all,
   and they reveal nothing about the token or the commands;
3. the token (401, or 429 after too many failures from one address): before
   anything about ``cmd`` or parameters, so that a caller without the key
   learns nothing about what this endpoint accepts;
4. ``cmd`` and its parameters (400).
Every error is JSON: HTTP errors and unexpected exceptions included (the
latter as a bare 500 with the details only in the log).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from flask import Flask, Response, jsonify, request
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException

from fsbridge import __version__, logs, metrics
from fsbridge.httpguard import address_key
from fsbridge.core.originate import (
    CallPolicy,
    OriginateError,
    OriginateSettings,
    RateLimiter,
    build_originate,
    check_destination,
)
from fsbridge.core.phone import clean_dial_number
from fsbridge.planfix import Credentials
from fsbridge.planfix_address import DEFAULT_ALLOWED_HOSTS, AddressPolicy, check_url, host_of
from fsbridge.state import SettingsError, SettingsStore, validate_planfix_token, validate_planfix_url
from fsbridge.core.tenancy import IMPLICIT_TENANT, match_token

log = logging.getLogger(__name__)

__all__ = ["WebSettings", "WebDeps", "TenantWeb", "AuthFailureLimiter", "create_app", "PLANFIX_PATH", "HEALTH_PATH"]

PLANFIX_PATH = "/planfix"
HEALTH_PATH = "/healthz"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"

# The spec's texts, and the few we need beyond the spec (kept in the same shape).
INVALID_PARAMETERS = "Invalid parameters"
INVALID_TOKEN = "Invalid token"
TOO_MANY_REQUESTS = "Too many requests"
REQUEST_TOO_LARGE = "Request too large"
NOT_CONNECTED = "FreeSWITCH is not connected"
SERVICE_BUSY = "Service unavailable"
INTERNAL_ERROR = "Internal error"
_HTTP_ERROR_TEXT = {
    400: INVALID_PARAMETERS,
    401: INVALID_TOKEN,
    404: "Not found",
    405: "Method not allowed",
    413: REQUEST_TOO_LARGE,
    429: TOO_MANY_REQUESTS,
}

# A makeCall/setup form has 4-5 fields; many more is not PlanFix.
_MAX_FORM_FIELDS = 64
# Health keys whose values must never leave the process, whatever health() returns.
_SECRET_KEY = re.compile(r"token|password|secret|key", re.IGNORECASE)
# Enough of an unknown value to recognise it in a log or an error, never a flood.
_ECHO_LIMIT = 40


@dataclass(frozen=True)
class WebSettings:
    """What the endpoint needs from the config (see the module doc of config keys)."""

    pbx_token: str = field(repr=False)  # [server] token: PlanFix sends it as `token`
    allow_http: bool = False  # [planfix] allow_http: lab mode, setup may store http://, IPs, any host
    allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS  # [planfix] allowed_hosts
    max_body_bytes: int = 16 * 1024  # [server] max_body_bytes
    originate: OriginateSettings = field(default_factory=OriginateSettings)  # [click_to_call] + [calls]
    # [security]: after `auth_failures` wrong tokens within `auth_window_s`
    # from one address, wrong tokens from it get 429 for `auth_block_s`.
    auth_failures: int = 10
    auth_window_s: float = 60.0
    auth_block_s: float = 300.0
    auth_max_addresses: int = 10_000  # bound on the failure table (memory)
    # [click_to_call] destination policy; None: no policy (unit tests of other parts).
    call_policy: CallPolicy | None = field(default_factory=CallPolicy)
    calls_per_extension: int = 10  # [click_to_call] calls_per_extension_per_minute
    calls_total: int = 60  # [click_to_call] calls_per_minute
    max_concurrent_calls: int = 20  # [click_to_call] max_concurrent

    @classmethod
    def from_config(cls, cfg: Any) -> "WebSettings":
        """From a loaded ``fsbridge.config.Config``.

        Keys not (yet) in the config schema fall back to the defaults here:
        ``[server] auth_block``, ``[click_to_call] caller_id_name`` and
        ``caller_id_number``.  Raises ValueError (``originate.InvalidSettings``)
        for values the originate whitelists refuse, e.g. a dial string with ``=``.
        """
        server, c2c = cfg.server, cfg.click_to_call
        optional_server, optional_c2c = server.as_dict(), c2c.as_dict()
        return cls(
            pbx_token=server.token,
            allow_http=cfg.planfix.allow_http,
            allowed_hosts=tuple(cfg.planfix.allowed_hosts),
            max_body_bytes=server.max_body_bytes,
            originate=OriginateSettings(
                dial_string=c2c.dial_string,
                context=c2c.context,
                dialplan=c2c.dialplan,
                timeout_s=c2c.timeout,
                keep_plus=c2c.keep_plus,
                extension_pattern=cfg.calls.extension_pattern,
                caller_id_number=optional_c2c.get("caller_id_number") or None,
                caller_id_name=optional_c2c.get("caller_id_name") or None,
            ),
            auth_failures=server.auth_failures_per_minute,
            auth_window_s=60.0,
            call_policy=CallPolicy(
                default_region=cfg.phone.default_region,
                allowed_countries=tuple(c2c.allowed_countries),
                allow_prefixes=tuple(c2c.allow_prefixes),
                deny_prefixes=tuple(c2c.deny_prefixes),
                keep_plus=c2c.keep_plus,
                extension_pattern=cfg.calls.extension_pattern,
            ),
            calls_per_extension=c2c.calls_per_extension_per_minute,
            calls_total=c2c.calls_per_minute,
            max_concurrent_calls=c2c.max_concurrent,
            auth_block_s=float(optional_server.get("auth_block", cls.auth_block_s)),
        )

    def __post_init__(self) -> None:
        # The service must never run with an empty key: anyone could place calls.
        if not isinstance(self.pbx_token, str) or not self.pbx_token:
            raise ValueError("pbx_token must not be empty")
        if self.max_body_bytes < 256:
            raise ValueError("max_body_bytes must be at least 256")
        if self.auth_failures < 1 or self.auth_window_s <= 0 or self.auth_block_s < 0 or self.auth_max_addresses < 1:
            raise ValueError("rate limit settings must be positive")


def _no_op() -> None:
    return None


@dataclass
class WebDeps:
    """What the endpoint calls, injected by the service (and by tests)."""

    # Sends `bgapi <command>` with a `Job-UUID: <job_uuid>` header line and
    # returns the Job-UUID once FreeSWITCH accepted the job.
    originate: Callable[[str, str], str]
    settings_store: SettingsStore
    on_credentials_changed: Callable[[], None] = _no_op  # e.g. outbox.wake
    health: Callable[[], dict[str, Any]] = dict  # ESL state, outbox stats, ...
    # Exceptions from `originate` that mean "FreeSWITCH unreachable now" -> 503
    # (e.g. esl.EslNotConnected, esl.EslTimeout).  Others are a 500.
    not_connected_errors: tuple[type[BaseException], ...] = ()
    # Name to show on the manager's phone for the client number, or None.
    client_name: Callable[[str], str | None] | None = None
    # makeCall's `to` -> dialable number or None (400); default: phone.clean_dial_number.
    normalize_to: Callable[[str], str | None] | None = None
    # Effective PlanFix credentials (stored or from the config) for /healthz;
    # default: what settings_store holds.
    credentials: Callable[[], Credentials | None] | None = None
    clock: Callable[[], float] = time.monotonic
    # makeCall's (validated) extension -> why FreeSWITCH cannot ring it
    # (unknown, not registered), or None.  Asked before anything is dialled.
    extension_problem: Callable[[str], str | None] | None = None
    # Is this click-to-call (by call UUID) still up?  Counts towards
    # max_concurrent_calls; default: a call counts for its ringing time only.
    call_active: Callable[[str], bool] | None = None
    # A reason to refuse every makeCall now (503), e.g. the outbox is at its bound.
    refuse_calls: Callable[[], str | None] | None = None
    # Cloud PBX: the tenants, by name, read on every request (a reload may
    # change them).  None: one tenant, made of the app's settings and these deps.
    tenants: Callable[[], dict[str, "TenantWeb"]] | None = None
    # makeCall's (validated) extension -> (why it cannot be rung or None, the
    # originate to use): picks the FreeSWITCH node.  None: extension_problem
    # and originate above.
    route_call: Callable[[str], tuple[str | None, Callable[[str, str], str]]] | None = None


@dataclass(frozen=True)
class TenantWeb:
    """One PlanFix account as the endpoint sees it: its key (``settings.pbx_token``),
    its click-to-call settings and what its commands act on (``deps``: its
    stored setup, its FreeSWITCH, its phones).  The app's own settings and
    deps give what is not per account (body size, wrong-token limits, health)."""

    name: str
    settings: WebSettings
    deps: WebDeps


class _TenantCalls:
    """Click-to-call state of one tenant: its live settings, rate limits and calls placed."""

    def __init__(self, tenant: TenantWeb) -> None:
        self.rate = RateLimiter(tenant.settings.calls_per_extension, tenant.settings.calls_total)
        self.placed: collections.OrderedDict[str, float] = collections.OrderedDict()  # call uuid -> when accepted
        self.update(tenant)

    def update(self, tenant: TenantWeb) -> None:
        """Take the tenant's (reloaded) settings: counts made so far stay."""
        self.tenant = tenant
        self.settings = tenant.settings
        self.rate.per_key, self.rate.total = tenant.settings.calls_per_extension, tenant.settings.calls_total
        self.extension = re.compile(tenant.settings.originate.extension_pattern)
        self.normalize_to = tenant.deps.normalize_to or functools.partial(
            clean_dial_number, keep_plus=tenant.settings.originate.keep_plus)


class _Failures:
    __slots__ = ("times", "blocked_until", "refused")

    def __init__(self) -> None:
        self.times: collections.deque[float] = collections.deque()
        self.blocked_until = 0.0
        self.refused = 0  # wrong tokens answered 429 in the current block


class AuthFailureLimiter:
    """Sliding-window count of wrong tokens per client address.

    After ``limit`` failures within ``window_s`` an address is blocked for
    ``block_s``: its wrong tokens get 429 instead of 401.  A *valid* token is
    never refused (PlanFix's servers may share an address, NAT or proxy, with
    a misconfigured or hostile client; refusing them would break
    click-to-call).  Brute force gains nothing from that: the key is at
    least 16 random characters (config check) and every guess is still
    compared.  IPv6 clients are counted per /64 (one host usually owns the
    whole prefix).  The table holds at most ``max_addresses`` entries, least
    recently failed evicted first, so a flood of addresses costs bounded memory.
    """

    def __init__(self, limit: int, window_s: float, block_s: float, max_addresses: int,
                 clock: Callable[[], float]):
        self.limit, self.window_s, self.block_s = limit, window_s, block_s
        self.max_addresses = max_addresses
        self._clock = clock
        self._table: collections.OrderedDict[str, _Failures] = collections.OrderedDict()
        # Blocked addresses live apart: a flood of new addresses evicts only
        # counting entries, never a block (issue 14).  Bounded the same way,
        # the block ending soonest going first.
        self._blocked: collections.OrderedDict[str, _Failures] = collections.OrderedDict()

    key = staticmethod(address_key)

    def is_blocked(self, address: str | None) -> bool:
        entry = self._blocked.get(self.key(address))
        return entry is not None and entry.blocked_until > self._clock()

    def record_failure(self, address: str | None) -> bool:
        """Count one wrong token; True when the address is (now) blocked."""
        key, now = self.key(address), self._clock()
        blocked = self._blocked.get(key)
        if blocked is not None:
            if blocked.blocked_until > now:
                blocked.refused += 1
                return True
            del self._blocked[key]
            if blocked.refused:
                log.warning("wrong-token block for %s ended; %d more wrong tokens were refused during it",
                            key, blocked.refused)
        entry = self._table.pop(key, None) or _Failures()
        self._table[key] = entry  # most recent at the end
        while len(self._table) > self.max_addresses:
            self._table.popitem(last=False)
        times = entry.times
        times.append(now)
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if len(times) >= self.limit:
            del self._table[key]
            times.clear()
            entry.blocked_until = now + self.block_s
            self._blocked[key] = entry  # block_s is fixed: insertion order is expiry order
            while len(self._blocked) > self.max_addresses:
                self._blocked.popitem(last=False)
            log.warning(
                "%d wrong tokens from %s within %gs: refusing its wrong tokens with 429 for %gs "
                "(valid tokens still pass)", self.limit, key, self.window_s, self.block_s,
            )
        return False

    def __len__(self) -> int:
        return len(self._table) + len(self._blocked)


class _Reject(Exception):
    """Answer the request with ``status`` and ``body`` (raised inside handlers)."""

    def __init__(self, status: int, error: str, detail: str | None = None):
        super().__init__(error)
        self.status, self.error, self.detail = status, error, detail


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    response = jsonify(body)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _error(status: int, error: str, detail: str | None = None) -> Response:
    body: dict[str, Any] = {"error": error}
    if detail:
        body["detail"] = detail
    return _json(status, body)


def _echo(value: str) -> str:
    """A client value made safe to quote in a log line or an error detail."""
    text = value if len(value) <= _ECHO_LIMIT else value[:_ECHO_LIMIT] + "…"
    return repr(text)


def _single(form: MultiDict[str, str], name: str) -> str | None:
    """The one value of ``name``; None when missing or repeated (ambiguous)."""
    values = form.getlist(name)
    return values[0] if len(values) == 1 else None


# Health keys whose own keys are names (tenants, nodes: "monkey" is no key), not fields.
_NAMED = frozenset({"tenants", "nodes"})


def _scrub(value: Any, names: bool = False) -> Any:
    """``value`` with every secret-looking key removed, recursively."""
    if isinstance(value, dict):
        if names:
            return {k: _scrub(v) for k, v in value.items()}
        return {k: _scrub(v, k in _NAMED) for k, v in value.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


def public_health(detail: dict[str, Any]) -> dict[str, Any]:
    """What anyone on the internet may see of ``detail``: ``status`` and numbers.

    No text at all beyond the status word: upstream replies, error messages,
    addresses, URLs and the Core-UUID are strings, and strings stay on the
    loopback listener (``register_detailed_health``).  Nested dicts keep only
    their integer and boolean values (counts, flags).  Per-tenant and
    per-node figures stay there too: a provider's customer list is nobody's business.
    """
    out: dict[str, Any] = {}
    for key, value in detail.items():
        if key in _NAMED:
            continue
        if key in ("status", "version", "health_error") and isinstance(value, str):  # our own words
            out[key] = value
        elif isinstance(value, dict):
            counts = public_health({k: v for k, v in value.items() if k not in ("status", "version")})
            if counts:
                out[key] = counts
        elif isinstance(value, (bool, int, float)) and "port" not in key:
            out[key] = value
    return out


def health_body(deps: WebDeps, detailed: bool) -> tuple[dict[str, Any], int]:
    """The /healthz answer: (body, HTTP status).  The status code comes from
    what the service reports, never from what is shown."""
    body: dict[str, Any] = {"version": __version__}
    status = 200
    try:
        creds = deps.credentials() if deps.credentials is not None else deps.settings_store.load()
        body["planfix_configured"] = creds is not None
    except SettingsError as exc:
        body["planfix_configured"] = False
        body["planfix_settings_error"] = str(exc)
    try:
        body.update(_scrub(dict(deps.health())))
    except Exception:
        log.exception("health check failed")
        body["health_error"] = "health check failed; see the log"
    # Monitors (curl -f, load balancers) read the code, not the body.
    if body.get("status") != "ok":
        status = 503
    if "freeswitch" in body and isinstance(body["freeswitch"], dict):
        body["freeswitch"].setdefault("connected", body["freeswitch"].get("state") == "connected")
    return (body if detailed else public_health(body)), status


def register_detailed_health(app: Flask, deps: WebDeps) -> None:
    """The full /healthz (errors, addresses, Core-UUID) on a loopback-only app."""

    @app.get(HEALTH_PATH, provide_automatic_options=False)
    def healthz_detailed() -> Response:
        body, status = health_body(deps, detailed=True)
        return _json(status, body)


# [click_to_call] keys a SIGHUP applies to a running service (the rest of the
# section shapes number normalisation or the tracker: those need a restart).
LIVE_CLICK_TO_CALL_KEYS = frozenset({
    "allowed_countries", "allow_prefixes", "deny_prefixes", "calls_per_extension_per_minute",
    "calls_per_minute", "max_concurrent", "caller_id_name", "caller_id_number", "dial_string",
    "context", "dialplan", "timeout",
})


def apply_click_to_call(app: Flask, new: WebSettings, tenant: str = IMPLICIT_TENANT) -> None:
    """Hand a reloaded config's click-to-call policy, limits and originate settings
    to the running app; the next makeCall uses them.  Counts made so far stay."""
    live = app.extensions["fsbridge.click_to_call"][tenant]
    old = live.settings
    live.settings = dataclasses.replace(
        old, call_policy=new.call_policy, originate=new.originate, calls_per_extension=new.calls_per_extension,
        calls_total=new.calls_total, max_concurrent_calls=new.max_concurrent_calls,
    )
    live.rate.per_key, live.rate.total = new.calls_per_extension, new.calls_total


def create_app(settings: WebSettings, deps: WebDeps) -> Flask:
    """The PlanFix-facing Flask app; the limiter is ``app.extensions["fsbridge.auth_limiter"]``."""
    app = Flask("fsbridge.web")
    # Werkzeug refuses a larger Content-Length up front and stops reading a
    # chunked body at this many bytes.  It would then parse the *truncated*
    # body, so read_form asks for one byte more than allowed and refuses the
    # request itself when that byte arrives.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes + 1
    app.json.sort_keys = False  # type: ignore[attr-defined]

    limiter = AuthFailureLimiter(settings.auth_failures, settings.auth_window_s, settings.auth_block_s,
                                 settings.auth_max_addresses, deps.clock)
    app.extensions["fsbridge.auth_limiter"] = limiter
    single = {IMPLICIT_TENANT: TenantWeb(IMPLICIT_TENANT, settings, deps)}
    # What SIGHUP may change while calls are up (apply_click_to_call, a
    # reloaded tenant list): the handlers read each tenant's state from here.
    states: dict[str, _TenantCalls] = {}
    app.extensions["fsbridge.click_to_call"] = states
    known_tokens: list[tuple[str, bytes]] = []
    known_from: dict[str, TenantWeb] = {}

    def tenants() -> dict[str, TenantWeb]:
        nonlocal known_from
        current = deps.tenants() if deps.tenants is not None else single
        if current is not known_from:
            # The tenant list changed (start, reload): new state for new
            # tenants, counts kept for the others, none for removed ones.
            for name in list(states):
                if name not in current:
                    del states[name]
            for name, tenant in current.items():
                if name in states:
                    if states[name].tenant is not tenant:
                        states[name].update(tenant)
                else:
                    states[name] = _TenantCalls(tenant)
            known_tokens[:] = [(name, t.settings.pbx_token.encode("utf-8")) for name, t in current.items()]
            known_from = current
        return current

    tenants()

    def concurrent_calls(state: _TenantCalls, now: float) -> int:
        # A call counts while the manager's phone may still ring, and after
        # that while FreeSWITCH still has it (when the service can tell).
        ringing = state.settings.originate.timeout_s + 5
        call_active = state.tenant.deps.call_active
        for call_uuid, at in list(state.placed.items()):
            if now - at > ringing and (call_active is None or not call_active(call_uuid)):
                del state.placed[call_uuid]
        return len(state.placed)

    def refuse_call(ext: str, to: str, reason: str) -> None:
        # logs.refused (in the handler) logs the refusal once; this adds what was dialled.
        log.debug("makeCall from %s refused: %s -> %s: %s", request.remote_addr, ext, _echo(to), reason)
        raise _Reject(400, INVALID_PARAMETERS, reason)

    def authenticate(form: MultiDict[str, str]) -> TenantWeb:
        """The tenant whose key the request carries (401/429 otherwise)."""
        address = request.remote_addr
        tokens = form.getlist("token")
        current = tenants()
        # compare_digest against every tenant's key, no early exit (match_token).
        # A repeated `token` is refused whatever its values (no "any of them matches").
        name = match_token(tokens[0], known_tokens) if len(tokens) == 1 else None
        if name is not None:
            return current[name]
        if limiter.record_failure(address):
            raise _Reject(429, TOO_MANY_REQUESTS)
        log.debug("wrong token from %s (cmd %s)", address, _echo(form.get("cmd", "")))
        raise _Reject(401, INVALID_TOKEN)

    def read_form() -> MultiDict[str, str]:
        if request.mimetype != FORM_CONTENT_TYPE:
            raise _Reject(400, INVALID_PARAMETERS, f"Content-Type must be {FORM_CONTENT_TYPE}")
        body = request.get_data(cache=True)  # a Content-Length over the limit raises 413 here
        if len(body) > settings.max_body_bytes:
            raise _Reject(413, REQUEST_TOO_LARGE)
        form = request.form  # parsed from the cached body
        if sum(len(values) for values in form.listvalues()) > _MAX_FORM_FIELDS:
            raise _Reject(413, REQUEST_TOO_LARGE, f"more than {_MAX_FORM_FIELDS} form fields")
        return form

    address_policy = AddressPolicy(settings.allowed_hosts, lab_mode=settings.allow_http)

    def current_credentials(tenant_deps: WebDeps) -> Credentials | None:
        try:
            if tenant_deps.credentials is not None:
                return tenant_deps.credentials()
            return tenant_deps.settings_store.load()
        except SettingsError:
            return None

    def setup(tenant: TenantWeb, form: MultiDict[str, str]) -> Response:
        """Stores this tenant's PlanFix address and key, and nobody else's."""
        tdeps = tenant.deps
        who = request.remote_addr if tenant.name == IMPLICIT_TENANT else f"{request.remote_addr} (tenant {tenant.name})"
        url, token = _single(form, "planfix_url"), _single(form, "planfix_token")
        try:
            if url is None:
                raise ValueError("planfix_url is missing (or sent more than once)")
            if token is None:
                raise ValueError("planfix_token is missing (or sent more than once)")
            url = validate_planfix_url(url, settings.allow_http)
            check_url(url, address_policy)
            token = validate_planfix_token(token)
        except ValueError as exc:
            log.warning("setup from %s refused: %s", who, exc)
            raise _Reject(400, INVALID_PARAMETERS, str(exc)) from None
        previous = current_credentials(tdeps)
        try:
            tdeps.settings_store.save(Credentials(url=url, token=token))
        except SettingsError as exc:
            log.error("setup from %s: %s", who, exc)
            raise _Reject(500, INTERNAL_ERROR,
                          "the PBX could not store the PlanFix settings; see the fsbridge log") from None
        # Hosts only: a query string may carry secrets.
        if previous is not None and host_of(previous.url) != host_of(url):
            log.warning("setup from %s: PlanFix address changed from %s to %s", who,
                        host_of(previous.url), host_of(url))
        log.info("setup from %s: PlanFix host set to %s", who, host_of(url))
        try:
            tdeps.on_credentials_changed()
        except Exception:  # stored durably already; the outbox picks them up on its next try
            log.exception("notifying the outbox of new PlanFix settings failed")
        return _json(200, {"status": "ok"})

    def lookup_client_name(tdeps: WebDeps, number: str) -> str | None:
        if tdeps.client_name is None:
            return None
        try:
            return tdeps.client_name(number)
        except Exception:  # a name is a nicety; the call goes ahead without it
            log.warning("client name lookup for %s failed", number, exc_info=True)
            return None

    def make_call(tenant: TenantWeb, form: MultiDict[str, str]) -> Response:
        """Rings one of this tenant's own extensions (its dial string names its domain)."""
        state = states[tenant.name]
        tdeps = tenant.deps
        ext, raw_to = _single(form, "from"), _single(form, "to")
        if ext is None or not state.extension.fullmatch(ext):
            raise _Reject(400, INVALID_PARAMETERS,
                          f"from must be one extension matching {state.settings.originate.extension_pattern}")
        number = state.normalize_to(raw_to) if raw_to is not None else None
        if not number:
            raise _Reject(400, INVALID_PARAMETERS,
                          "to must be one phone number: digits, '*', '#', optional leading '+', "
                          "at most 32 characters (spaces, dashes, dots, parentheses are ignored)")
        busy = tdeps.refuse_calls() if tdeps.refuse_calls is not None else None
        if busy:
            log.debug("makeCall from %s refused (503): %s", request.remote_addr, busy)
            raise _Reject(503, SERVICE_BUSY, busy)
        keep_plus = None
        current = state.settings
        if current.call_policy is not None:
            verdict = check_destination(clean_dial_number(raw_to, keep_plus=True) or "", current.call_policy)
            if verdict.dial is None:
                refuse_call(ext, raw_to, verdict.reason)
            number, keep_plus = verdict.dial, True
            now = deps.clock()
            if concurrent_calls(state, now) >= current.max_concurrent_calls:
                refuse_call(ext, raw_to, f"{current.max_concurrent_calls} click-to-call calls are already "
                                         "under way ([click_to_call] max_concurrent)")
            too_many = state.rate.allow(ext, now)
            if too_many:
                refuse_call(ext, raw_to, too_many)
        call_uuid, request_id = str(uuid.uuid4()), str(uuid.uuid4())
        try:
            command = build_originate(ext, number, call_uuid=call_uuid, request_id=request_id,
                                      client_name=lookup_client_name(tdeps, number), settings=current.originate,
                                      keep_plus=keep_plus)
        except OriginateError as exc:
            # normalize_to let through something the builder's whitelist refuses.
            log.debug("makeCall from %s refused: %s", request.remote_addr, exc)
            raise _Reject(400, INVALID_PARAMETERS, str(exc)) from None
        originate = tdeps.originate
        try:
            if tdeps.route_call is not None:
                problem, originate = tdeps.route_call(ext)
            else:
                problem = tdeps.extension_problem(ext) if tdeps.extension_problem else None
        except deps.not_connected_errors as exc:
            log.warning("makeCall %s: FreeSWITCH unavailable: %s", ext, exc)
            raise _Reject(503, NOT_CONNECTED) from None
        if problem:
            log.debug("makeCall from %s refused: %s", request.remote_addr, problem)
            raise _Reject(400, INVALID_PARAMETERS, problem)
        try:
            job_uuid = originate(command, request_id)
        except deps.not_connected_errors as exc:
            log.warning("makeCall %s -> %s (call %s): FreeSWITCH unavailable: %s", ext, number, call_uuid, exc)
            raise _Reject(503, NOT_CONNECTED) from None
        state.placed[call_uuid] = deps.clock()
        log.info("makeCall from %s%s: %s -> %s, call %s, job %s", request.remote_addr,
                 "" if tenant.name == IMPLICIT_TENANT else f" (tenant {tenant.name})", ext, number,
                 call_uuid, job_uuid)
        metrics.CLICK_TO_CALL.labels(outcome="accepted", reason="").inc()
        return _json(200, {"callid": call_uuid})

    commands: dict[str, Callable[[TenantWeb, MultiDict[str, str]], Response]] = {"setup": setup, "makeCall": make_call}

    @app.post(PLANFIX_PATH, provide_automatic_options=False)
    def planfix() -> Response:
        try:
            form = read_form()
            tenant = authenticate(form)
            cmd = _single(form, "cmd")
            handler = commands.get(cmd or "")
            if handler is None:
                shown = _echo(cmd) if cmd is not None else "missing"
                raise _Reject(400, INVALID_PARAMETERS, f"unknown cmd {shown}; expected makeCall or setup")
            return handler(tenant, form)
        except _Reject as rejected:
            logs.refused(request.remote_addr, _single(request.form, "cmd") if rejected.status != 413 else None,
                         rejected.status, rejected.detail or rejected.error)
            return _error(rejected.status, rejected.error, rejected.detail)

    @app.get(HEALTH_PATH, provide_automatic_options=False)
    def healthz() -> Response:
        # The public listener: status and counts only (see public_health).
        body, status = health_body(deps, detailed=False)
        return _json(status, body)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        headers = {}
        if code == 405:
            allowed = exc.get_response().headers.get("Allow")
            if allowed:
                headers["Allow"] = allowed
        response = _json(code, {"error": _HTTP_ERROR_TEXT.get(code, exc.name or "Error")}, headers)
        return response

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _error(500, INTERNAL_ERROR)

    return app
