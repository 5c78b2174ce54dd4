"""Caller lookup for the FreeSWITCH dialplan: PlanFix `contact`, behind a cache and a deadline.

FreeSWITCH asks ``GET /dialplan/contact?phone=...&callid=...`` (mod_curl, see
``dialplan/fsbridge-inbound.xml``) while the caller is ringing.  The answer
must never hold the call up, so:

* a hard deadline (``[dialplan] deadline``, 1.5 s): when PlanFix has not
  answered by then the answer is ``unknown`` and the PlanFix request goes on
  in the background, filling the cache for the next call;
* one PlanFix request per number at a time: callers asking for a number
  already being fetched wait for that same request (coalescing);
* a bounded LRU cache: ``cache_ttl`` for found contacts, the shorter
  ``cache_ttl_not_found`` for "no such contact", and a few seconds only for
  PlanFix failures (so an outage does not become one request per call, but
  the first call after PlanFix is back finds the name again).  An expired
  "found" entry is still better than nothing: if the refresh misses the
  deadline the stale name is answered.

Answer format (``text/plain; charset=utf-8``, one line, no trailing newline,
always the same three keys in the same order)::

    status=found;name=Ivanov Ivan;responsible=103
    status=found;name=Ivanov Ivan;responsible=
    status=not_found;name=;responsible=
    status=unknown;name=;responsible=       (deadline passed / PlanFix failing)
    status=internal;name=;responsible=      (an internal extension: not looked up)

so the XML dialplan splits it with one regex condition
(:data:`ANSWER_REGEX`) and no script.  Names are reduced to letters, digits,
spaces and ``. - ( ) ’``: FreeSWITCH expands ``${...}`` in ``set`` data a
second time, so a CRM field must never carry ``$``, braces, ``;`` or quotes
into the dialplan.  ``responsible`` is present only when it matches the
extension pattern.  Bad input (``phone`` missing, empty, over 32 characters,
non-phone characters; a malformed ``callid``) is HTTP 400 with the body
``error=<reason>``, which the dialplan regex does not match: it routes as
unknown.

The service (lead) serves :func:`create_lookup_app` on ``[dialplan] listen``
and hands the same :class:`ContactLookup` to makeCall, which shows the
client's name to the manager via :meth:`ContactLookup.contact_name_for`.
"""

from __future__ import annotations

import collections
import logging
import re
import socket
import time
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import gevent
import gevent.event
import gevent.lock
from flask import Flask, Response, request
from gevent.pywsgi import WSGIHandler, WSGIServer
from werkzeug.exceptions import HTTPException

from fsbridge.core.phone import clean_dial_number, looks_like_extension, normalize_phone

log = logging.getLogger(__name__)

__all__ = [
    "ANSWER_REGEX",
    "CONTACT_PATH",
    "DEFAULT_LISTEN",
    "ContactLike",
    "ContactLookup",
    "LookupResult",
    "LookupSettings",
    "NoDelayWSGIServer",
    "create_lookup_app",
    "format_answer",
    "safe_display_name",
]

# The lookup reveals client names by phone number: loopback only by default.
DEFAULT_LISTEN = "127.0.0.1:8081"
CONTACT_PATH = "/dialplan/contact"
# What the dialplan's regex condition matches; group 1 status, 2 name, 3 responsible.
ANSWER_REGEX = r"^status=(found|not_found|unknown|internal);name=([^;]*);responsible=([^;]*)$"

MAX_PHONE_INPUT = 32  # same bound as makeCall's `to`
MAX_NAME_LENGTH = 80  # SIP display names longer than this get cut by phones anyway
_CALLID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
# The tenant facts the dialplan passes (may be empty: ${domain_name} unset).
_DOMAIN = re.compile(r"[A-Za-z0-9._-]{0,253}")
_DID = re.compile(r"\+?[0-9]{0,20}")
# Safe in a dial string and in a SIP user part, whatever extension_pattern allows.
_SAFE_EXTENSION = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_NAME_KEEP_PUNCTUATION = frozenset(" .-()’")


class ContactLike(Protocol):
    """What ``fetch_contact`` returns (``fsbridge.planfix.Contact`` fits)."""

    name: str
    responsible: Any  # PlanFix sends a number; str or int accepted


# fetch_contact(phone, callid, timeout) -> contact or None (not found); raises on PlanFix failure.
FetchContact = Callable[[str, "str | None", float], "ContactLike | None"]


@dataclass(frozen=True, slots=True)
class LookupSettings:
    """Everything the lookup needs, from ``[dialplan]``, ``[phone]`` and ``[calls]``."""

    deadline: float = 1.5  # [dialplan] deadline
    cache_ttl: float = 300.0  # [dialplan] cache_ttl
    cache_ttl_not_found: float = 60.0  # [dialplan] cache_ttl_not_found
    cache_ttl_failure: float = 5.0  # [dialplan] cache_ttl_failure
    cache_size: int = 10000  # [dialplan] cache_size
    max_concurrent_fetches: int = 8  # [dialplan] max_concurrent_lookups
    # Numbers waiting for a PlanFix answer at most; beyond, new numbers are
    # answered "unknown" at once (PlanFix hanging must not pile up greenlets).
    max_pending_fetches: int = 256
    fetch_timeout: float = 10.0  # the whole background PlanFix request: [planfix] read_timeout
    region: str = "RU"  # [phone] default_region
    phone_format: str = "digits"  # [phone] format
    extension_pattern: str = r"^\d{2,6}$"  # [calls] extension_pattern

    @classmethod
    def from_config(cls, cfg: Any) -> "LookupSettings":
        """From a loaded ``fsbridge.config.Config``; keys the schema lacks keep these defaults."""
        dialplan, defaults = cfg.dialplan, cls()

        def key(name: str, attr: str) -> Any:
            return getattr(dialplan, name, getattr(defaults, attr))

        return cls(
            deadline=key("deadline", "deadline"),
            cache_ttl=key("cache_ttl", "cache_ttl"),
            cache_ttl_not_found=key("cache_ttl_not_found", "cache_ttl_not_found"),
            cache_ttl_failure=key("cache_ttl_failure", "cache_ttl_failure"),
            cache_size=key("cache_size", "cache_size"),
            max_concurrent_fetches=key("max_concurrent_lookups", "max_concurrent_fetches"),
            fetch_timeout=cfg.planfix.read_timeout,
            region=cfg.phone.default_region,
            phone_format=cfg.phone.format,
            extension_pattern=cfg.calls.extension_pattern,
        )


@dataclass(frozen=True, slots=True)
class LookupResult:
    status: str  # found | not_found | unknown | internal
    name: str = ""
    responsible: str = ""

    @property
    def found(self) -> bool:
        return self.status == "found"


UNKNOWN = LookupResult("unknown")
NOT_FOUND = LookupResult("not_found")
INTERNAL = LookupResult("internal")


def format_answer(result: LookupResult) -> str:
    """The one-line body the dialplan matches with :data:`ANSWER_REGEX`."""
    return f"status={result.status};name={result.name};responsible={result.responsible}"


def safe_display_name(raw: Any) -> str:
    """A CRM name made harmless for FreeSWITCH variables and SIP display names.

    Letters (any script), digits and ``space . - ( )`` stay; an apostrophe
    becomes ``’`` (O'Brien stays readable); everything else (``$ { } ; , | '
    " \\``, control characters, ...) becomes a space; runs of spaces collapse;
    at most :data:`MAX_NAME_LENGTH` characters.
    """
    if not isinstance(raw, str):
        return ""
    out = []
    for ch in unicodedata.normalize("NFC", raw):
        if ch == "'":
            out.append("’")
        elif ch in _NAME_KEEP_PUNCTUATION or (ch.isalnum() and ch.isprintable()):
            out.append(ch)
        else:
            out.append(" ")
    return " ".join("".join(out).split())[:MAX_NAME_LENGTH].strip()


@dataclass(slots=True)
class _Entry:
    result: LookupResult | None  # None: PlanFix failed
    expires_at: float


class ContactLookup:
    """The cache, the coalescing and the deadline; shared by the dialplan endpoint and makeCall.

    gevent-cooperative: call it from greenlets.  ``clock`` is injectable so
    tests can age the cache without sleeping.
    """

    def __init__(
        self,
        settings: LookupSettings,
        fetch_contact: FetchContact,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self._fetch_contact = fetch_contact
        self._clock = clock
        self._cache: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._inflight: dict[str, gevent.event.AsyncResult] = {}
        self._fetch_slots = gevent.lock.BoundedSemaphore(settings.max_concurrent_fetches)
        self._counters = collections.Counter()

    # ---- public API -------------------------------------------------
    def normalize(self, raw_phone: str) -> str | None:
        """The number as PlanFix gets it, or None when ``raw_phone`` is not a phone number."""
        if not isinstance(raw_phone, str) or len(raw_phone) > MAX_PHONE_INPUT:
            return None
        cleaned = clean_dial_number(raw_phone, keep_plus=True)
        if cleaned is None or "*" in cleaned or "#" in cleaned:
            return None
        if looks_like_extension(cleaned, self.settings.extension_pattern):
            return cleaned
        return normalize_phone(cleaned, self.settings.region, self.settings.phone_format) or None

    def lookup(self, phone: str, callid: str | None = None, timeout: float | None = None) -> LookupResult:
        """The contact for an already *normalised* ``phone`` within ``timeout`` (default: deadline)."""
        if looks_like_extension(phone, self.settings.extension_pattern):
            self._counters["internal"] += 1
            return INTERNAL
        now = self._clock()
        entry = self._cache.get(phone)
        if entry is not None and entry.expires_at > now:
            self._cache.move_to_end(phone)
            self._counters["hit"] += 1
            return entry.result or UNKNOWN
        self._counters["miss"] += 1
        pending = self._start_fetch(phone, callid)
        wait = self.settings.deadline if timeout is None else timeout
        result: LookupResult | None = None
        if pending is not None:
            if wait > 0:
                pending.wait(wait)  # returns at the deadline without raising
            if pending.ready():
                result = pending.value
            else:
                self._counters["deadline"] += 1
        if result is not None:
            return result
        # Deadline passed or PlanFix failed: an expired name beats "unknown".
        if entry is not None and entry.result is not None and entry.result.found:
            return entry.result
        return UNKNOWN

    def contact_name_for(self, raw_phone: str, callid: str | None = None, timeout: float | None = None) -> str | None:
        """The client's name for click-to-call's caller ID, or None (unknown, not found, not a number)."""
        phone = self.normalize(raw_phone)
        if phone is None:
            return None
        result = self.lookup(phone, callid, timeout)
        return (result.name or None) if result.found else None

    def stats(self) -> dict[str, int]:
        """Counters for /healthz and logs: hit, miss, deadline, fetch_ok, fetch_failed, internal."""
        return {**self._counters, "cached": len(self._cache), "inflight": len(self._inflight)}

    # ---- internals --------------------------------------------------
    def _start_fetch(self, phone: str, callid: str | None) -> gevent.event.AsyncResult | None:
        pending = self._inflight.get(phone)
        if pending is not None:
            self._counters["coalesced"] += 1
            return pending
        # Every number being fetched is a greenlet; when PlanFix hangs they
        # pile up, so beyond a bound new numbers are simply answered unknown.
        if len(self._inflight) >= self.settings.max_pending_fetches:
            self._counters["overloaded"] += 1
            return None
        pending = gevent.event.AsyncResult()
        self._inflight[phone] = pending
        gevent.spawn(self._fetch, phone, callid, pending)
        return pending

    def _fetch(self, phone: str, callid: str | None, pending: gevent.event.AsyncResult) -> None:
        result: LookupResult | None = None
        try:
            with self._fetch_slots:
                contact = self._fetch_contact(phone, callid, self.settings.fetch_timeout)
            result = self._result_from(contact)
            self._counters["fetch_ok"] += 1
        except Exception as exc:  # any PlanFix failure: never let it reach the call
            self._counters["fetch_failed"] += 1
            log.warning("PlanFix contact lookup for %s failed: %s", phone, exc)
        finally:
            self._store(phone, result)
            del self._inflight[phone]
            pending.set(result)

    def _result_from(self, contact: ContactLike | None) -> LookupResult:
        if contact is None:
            return NOT_FOUND
        name = safe_display_name(getattr(contact, "name", ""))
        responsible = getattr(contact, "responsible", None)
        responsible = "" if responsible is None else str(responsible).strip()
        if responsible and not (
            _SAFE_EXTENSION.fullmatch(responsible)
            and looks_like_extension(responsible, self.settings.extension_pattern)
        ):
            log.warning("PlanFix responsible %r is not an extension; ignored", responsible)
            responsible = ""
        if not name and not responsible:
            return NOT_FOUND
        return LookupResult("found", name, responsible)

    def _store(self, phone: str, result: LookupResult | None) -> None:
        s = self.settings
        if result is None:
            ttl = s.cache_ttl_failure
            previous = self._cache.get(phone)
            if previous is not None and previous.result is not None and previous.result.found:
                # Keep the last good name around (expired) so lookup() can still
                # fall back to it; just do not hammer PlanFix for a while.
                self._cache[phone] = _Entry(previous.result, self._clock() + ttl)
                return
        elif result.found:
            ttl = s.cache_ttl
        else:
            ttl = s.cache_ttl_not_found
        if ttl <= 0:
            self._cache.pop(phone, None)
            return
        self._cache[phone] = _Entry(result, self._clock() + ttl)
        self._cache.move_to_end(phone)
        while len(self._cache) > s.cache_size:
            self._cache.popitem(last=False)


def _text(body: str, status: int = 200) -> Response:
    response = Response(body, status=status, mimetype="text/plain")
    response.headers["Cache-Control"] = "no-store"
    return response


def create_lookup_app(
    settings: LookupSettings,
    fetch_contact: FetchContact | None = None,
    *,
    lookup: ContactLookup | None = None,
    select: Callable[[str, str], "ContactLookup | None"] | None = None,
) -> Flask:
    """The dialplan lookup app; serve it on ``[dialplan] listen`` only.

    Pass ``fetch_contact`` (e.g. ``PlanfixClient.contact``) or a ready
    ``lookup`` to share its cache with makeCall; the lookup is reachable as
    ``app.extensions["fsbridge.lookup"]``.  Cloud PBX: ``select(domain,
    did)`` picks the tenant's own lookup from the request's ``domain`` and
    ``did`` (the dialplan passes both); a call no tenant owns is answered
    ``unknown`` (no name, routed as usual) and never asks anyone's PlanFix.
    """
    if (fetch_contact is None) == (lookup is None):
        raise TypeError("pass exactly one of fetch_contact or lookup")
    contacts = lookup or ContactLookup(settings, fetch_contact)  # type: ignore[arg-type]
    app = Flask("fsbridge.lookup")
    app.extensions["fsbridge.lookup"] = contacts

    # No automatic OPTIONS: Flask would answer it 200 text/html, outside the
    # one-line text/plain protocol; it gets the 405 of any other method.
    @app.get(CONTACT_PATH, provide_automatic_options=False)
    def contact() -> Response:
        raw_phone = request.args.get("phone", "")
        callid = request.args.get("callid") or None
        if not raw_phone.strip():
            return _text("error=phone is missing", 400)
        phone = contacts.normalize(raw_phone)
        if phone is None:
            return _text("error=phone is not a phone number", 400)
        if callid is not None and not _CALLID.fullmatch(callid):
            return _text("error=callid is malformed", 400)
        chosen = contacts
        if select is not None:
            domain, did = request.args.get("domain", ""), request.args.get("did", "")
            if not _DOMAIN.fullmatch(domain) or not _DID.fullmatch(did):
                return _text("error=domain or did is malformed", 400)
            chosen = select(domain, did)
            if chosen is None:
                log.debug("dialplan lookup %s: domain %r / DID %r belong to no tenant", phone, domain, did)
                return _text(format_answer(UNKNOWN))
            phone = chosen.normalize(raw_phone) or phone
        result = chosen.lookup(phone, callid)
        log.debug("dialplan lookup %s (callid %s): %s", phone, callid, result.status)
        return _text(format_answer(result))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        # Plain text like every other answer: no HTML error pages towards FreeSWITCH.
        name = (exc.name or "error").lower()
        return _text(f"error={name}", exc.code or 500)

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> Response:
        log.exception("dialplan lookup failed")
        return _text("error=internal error", 500)

    return app


class _ClientErrorHandler(WSGIHandler):
    """pywsgi's handler, without a traceback for a client's malformed request.

    pywsgi answers 400 to any request it cannot parse, but for errors that are
    not ValueError (http.client's "got more than 100 headers") it also prints
    a traceback to stderr: anyone could fill the service log with them.
    """

    def _handle_client_error(self, ex: BaseException):
        if not isinstance(ex, ValueError):
            ex = ValueError(str(ex) or type(ex).__name__)
        return super()._handle_client_error(ex)


class NoDelayWSGIServer(WSGIServer):
    """gevent's WSGI server with Nagle's algorithm off on every connection.

    pywsgi sends the headers and the body in two writes.  On a kept-alive
    connection Nagle then holds the small body back until the client ACKs the
    headers, and the client delays that ACK: about 40 ms per answer instead of
    well under 1 ms.  The lookup sits in the path of every ringing call, so
    serve it with this (the PlanFix endpoint benefits the same way).
    """

    handler_class = _ClientErrorHandler

    def handle(self, sock: socket.socket, address: Any) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not TCP (a Unix socket): nothing to tune
            pass
        super().handle(sock, address)
