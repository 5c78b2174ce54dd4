"""PlanFix telephony API client: `contact`, `event`, `record`, `ping`.

geventhttpclient's connection pool and C response parser (gevent-native:
a fifth of the CPU per request of requests/urllib3, measured by `make
bench`), kept-alive connections in a pool sized for the outbox's in-flight
ceiling, form-urlencoded POSTs to the *current* PlanFix URL: the credentials
are read through a callable on every request, so a `setup` from PlanFix
takes effect at once without rebuilding anything.

The request itself is written here, not by geventhttpclient's HTTPClient:
every POST is the same request line and headers with another body, so the
head is built once per PlanFix URL and the form encoding skips the values
that need no escaping (most of them: ids, numbers, event names).  That
halves the client's CPU per request (the outbox sends thousands a second).

`send()` never raises for a PlanFix or network problem: it classifies the
answer into a `DeliveryResult` so the outbox can decide what to do
(delivered / rejected / unauthorized / retry / not_configured).  `contact()`
and `ping()` are interactive: they raise `PlanfixError` subclasses instead.
"""

from __future__ import annotations

import enum
import hmac
import json
import logging
import re
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable

import gevent
import gevent.monkey
from geventhttpclient.connectionpool import ConnectionPool, SSLConnectionPool
from geventhttpclient.response import HTTPConnectionClosed, HTTPParseError, HTTPSocketPoolResponse

from fsbridge import planfix_address
from fsbridge.planfix_address import AddressPolicy

log = logging.getLogger(__name__)

USER_AGENT = "fsbridge"
FORM_TYPE = "application/x-www-form-urlencoded"
# Longest reply body kept in a DeliveryResult / error message (a proxy's HTML
# error page can be large; the start is enough to tell what it was).
REPLY_EXCERPT = 500
# A wrong token fails every request; one ERROR line per this many seconds
# is loud enough without flooding the log with one line per queued command.
UNAUTHORIZED_LOG_INTERVAL_S = 60.0
# What urllib's quote_plus leaves as it is (letters, digits, "_.-~"): such a
# form name or value is sent unchanged, without the call.
_PLAIN = re.compile(r"[A-Za-z0-9_.~-]*").fullmatch
# A request-target and a Host header: visible ASCII only, nothing that could
# end the request line or start another header.
_VISIBLE = re.compile(r"[\x21-\x7e]+").fullmatch


@dataclass(frozen=True)
class Credentials:
    """Where PlanFix listens and the key it expects (from `setup` or the config)."""

    url: str
    token: str = field(repr=False)  # never in logs or reprs

    def __repr__(self) -> str:
        return f"Credentials(url={self.url!r}, token={mask_secret(self.token)!r})"


class Outcome(enum.Enum):
    DELIVERED = "delivered"  # 200: PlanFix has it
    REJECTED = "rejected"  # 400: PlanFix refused this very request; resending will not help
    UNAUTHORIZED = "unauthorized"  # 401: our planfix_token is wrong; keep it until credentials change
    RETRY = "retry"  # 5xx, other statuses, timeouts, connection errors, garbage replies
    NOT_CONFIGURED = "not_configured"  # no PlanFix URL/token yet (waiting for `setup`)


@dataclass(frozen=True)
class DeliveryResult:
    outcome: Outcome
    status: int | None = None  # HTTP status, None when no answer came
    reply: Any = None  # the parsed JSON reply, or the raw text excerpt when not JSON
    error: str = ""  # human-readable reason when not delivered

    @property
    def delivered(self) -> bool:
        return self.outcome is Outcome.DELIVERED


@dataclass(frozen=True)
class Contact:
    name: str
    responsible: str | None  # the responsible employee's extension, None when PlanFix has none


class PlanfixError(Exception):
    """`contact` or `ping` did not get a usable answer."""


class PlanfixNotConfigured(PlanfixError):
    pass


class PlanfixUnauthorized(PlanfixError):
    pass


class PlanfixRejected(PlanfixError):
    pass


class PlanfixUnavailable(PlanfixError):
    """Timeout, connection error, 5xx or a reply that is not PlanFix JSON."""


def mask_secret(secret: str) -> str:
    """Enough of a secret to tell two apart, never enough to use it."""
    if not secret:
        return "(empty)"
    if len(secret) < 12:
        return f"***({len(secret)} chars)"
    return f"{secret[:4]}…{secret[-2:]}({len(secret)} chars)"


def _excerpt(text: str) -> str:
    text = text.strip()
    return text if len(text) <= REPLY_EXCERPT else text[:REPLY_EXCERPT] + "…"


def _classify(status: int, headers: Any, text: str, creds: Credentials) -> DeliveryResult:
    try:
        # The spec promises JSON; an empty body on 200 is taken as `{}`
        # (the spec's own table shows a bare "200 OK" for several commands).
        reply: Any = json.loads(text) if text.strip() else {}
        is_json = True
    except ValueError:
        reply, is_json = _excerpt(text), False
    if status == 200:
        if is_json:
            return DeliveryResult(Outcome.DELIVERED, status, reply)
        # A 200 that is not JSON is not PlanFix (a captive proxy, a web
        # server's default page): resending is safer than losing the call.
        return DeliveryResult(Outcome.RETRY, status, reply, f"200 with a non-JSON reply from {creds.url}: {reply!r}")
    if status == 400:
        return DeliveryResult(Outcome.REJECTED, status, reply, f"PlanFix rejected the request: {reply!r}")
    if status == 401:
        return DeliveryResult(Outcome.UNAUTHORIZED, status, reply, f"PlanFix at {creds.url} refused our planfix_token (401): {reply!r}")
    if 300 <= status < 400:
        where = headers.get("Location", "?")
        return DeliveryResult(Outcome.RETRY, status, reply, f"{creds.url} redirects to {where}: set the final URL in [planfix] url")
    return DeliveryResult(Outcome.RETRY, status, reply, f"HTTP {status} from {creds.url}: {reply!r}")


# The real poll(): the liveness check of an idle kept-alive connection
# asks with a zero timeout, which cannot block, and gevent's select()
# costs ~8 us of Python per call against ~1 for the system call.  poll,
# not select: select() refuses descriptors above 1023, and a cloud PBX
# process holds thousands of connections.
_poll = gevent.monkey.get_original("select", "poll")
_POLLIN = gevent.monkey.get_original("select", "POLLIN")


def _readable_now(fd: int) -> bool:
    poller = _poll()
    poller.register(fd, _POLLIN)  # hang-ups and errors are reported whatever is asked
    return bool(poller.poll(0))


class _ResolvingPool:
    """Mixin: connect only to addresses the address policy allows (checked at
    every connection, so DNS rebinding does not help), and tell the caller
    whether the connection it gets was used before."""

    address_policy: AddressPolicy | None = None

    def _resolve(self):  # overrides geventhttpclient's ConnectionPool._resolve
        # AddressRefused is a ValueError: _post reports it as a retry.
        return planfix_address.resolve(self._connection_host, self._connection_port, self.address_policy)

    def _create_socket(self):
        sock = super()._create_socket()
        self._fresh.add(id(sock))
        return sock

    def _is_socket_alive(self, sock) -> bool:  # overrides geventhttpclient's, same test
        # Readable while idle: PlanFix closed it (EOF) or sent what nobody asked for.
        try:
            fd = -1 if sock is None else sock.fileno()
            return fd >= 0 and not _readable_now(fd)
        except (OSError, ValueError):
            return False

    def take(self) -> tuple[Any, bool]:
        """A connection (blocks while all are in use) and whether it was kept alive from before."""
        sock = self.get_socket()
        fresh = id(sock) in self._fresh
        self._fresh.discard(id(sock))
        return sock, not fresh

    def __init__(self, *args, **kwargs):
        self._fresh: set[int] = set()
        super().__init__(*args, **kwargs)


class _Pool(_ResolvingPool, ConnectionPool):
    pass


class _TLSPool(_ResolvingPool, SSLConnectionPool):
    pass


@dataclass(frozen=True)
class _Target:
    """Where one PlanFix URL points: the connection pool key and the request head."""

    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent in the request line
    host_header: str
    head: bytes = field(repr=False)  # request line and headers, up to the Content-Length value


def _target(url: str) -> _Target:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"PlanFix URL {url!r}: scheme must be http or https")
    host = parts.hostname
    if not host:
        raise ValueError(f"PlanFix URL {url!r}: no host")
    default = 443 if scheme == "https" else 80
    port = parts.port or default
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == default else f"{shown}:{port}"
    if not _VISIBLE(path) or not _VISIBLE(host_header):
        raise ValueError(f"PlanFix URL {url!r}: spaces or control characters in the host or path")
    head = (f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: {USER_AGENT}\r\n"
            f"Content-Type: {FORM_TYPE}\r\nContent-Length: ").encode("ascii")
    return _Target(scheme, host, port, path, host_header, head)


def _quote(text: str) -> str:
    return text if _PLAIN(text) else urllib.parse.quote_plus(text)


def _form(fields: dict[str, str], token: str | None) -> bytes:
    """``urlencode(fields + {planfix_token})``, byte for byte, for str -> str fields;
    ``token`` is the encoded ``planfix_token=...`` part."""
    try:
        # One join checks that every name is a str and one match whether any
        # needs escaping (ours never do); values are matched one by one.
        names_plain = _PLAIN("".join(fields))
        parts = [f"{name}={value if _PLAIN(value) else urllib.parse.quote_plus(value)}"
                 for name, value in fields.items()]
    except TypeError:
        for name, value in fields.items():
            if not isinstance(name, str):
                raise TypeError(f"PlanFix form field name {name!r}: must be str") from None
            if not isinstance(value, str):
                raise TypeError(f"PlanFix form field {name!r}: value must be str, got {type(value).__name__}") from None
        raise
    if not names_plain:
        parts = [f"{_quote(name)}={_quote(value)}" for name, value in fields.items()]
    if token is not None:
        parts.append(token)
    return "&".join(parts).encode("ascii")


class PlanfixClient:
    """Form POSTs over kept-alive geventhttpclient connections, one pool per PlanFix origin.

    A reused connection that the server closed while idle is noticed only
    when the request is on the wire.  Then the request is sent once more on
    a fresh connection, whether or not PlanFix may have seen it: a duplicate
    `event` is possible (PlanFix treats the same callid/event as the same
    event; the outbox is at-least-once in any case), a lost one is not.
    """

    def __init__(
        self,
        credentials: Callable[[], Credentials | None],
        connect_timeout: float = 3.0,
        read_timeout: float = 10.0,
        pool_size: int = 16,
        address_policy: AddressPolicy | None = None,
    ):
        self._credentials = credentials
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        # >= the outbox's in-flight ceiling, + room for contact/ping: every
        # delivery greenlet keeps its own kept-alive connection.
        self.pool_size = max(1, pool_size) + 4
        # None (unit tests): connect anywhere.
        self.address_policy = address_policy
        self._pools: dict[tuple[str, str, int], _ResolvingPool] = {}
        # The last URL's target and the last token's form part: a PlanFix
        # address or token changes only with `setup`, not per request.
        self._last_target: tuple[str, _Target] | None = None
        self._last_token: tuple[str, str] | None = None
        self._next_unauthorized_log = 0.0
        self._unauthorized_unlogged = 0

    def close(self) -> None:
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()

    def _pool_for(self, target: _Target) -> _ResolvingPool:
        key = (target.scheme, target.host, target.port)
        pool = self._pools.get(key)
        if pool is None:
            # A new PlanFix address (setup): connections to the old one go.
            self.close()
            # Ours resolves through the address policy and, for https,
            # verifies the certificate and host name (CERT_REQUIRED,
            # check_hostname) like requests.
            pool_class = _TLSPool if target.scheme == "https" else _Pool
            pool = pool_class(target.host, target.port, target.host, target.port, size=self.pool_size,
                              connection_timeout=self.connect_timeout, network_timeout=self.read_timeout)
            pool.address_policy = self.address_policy
            self._pools[key] = pool
        return pool

    def _target_for(self, url: str) -> _Target:
        last = self._last_target
        if last is not None and last[0] == url:
            return last[1]
        target = _target(url)  # ValueError for a URL we cannot use
        self._last_target = (url, target)
        return target

    def _token_part(self, token: str) -> str:
        last = self._last_token
        if last is None or last[0] != token:
            last = self._last_token = (token, "planfix_token=" + _quote(token))
        return last[1]

    # ---- the low level ----------------------------------------------
    def _post(self, fields: dict[str, str], timeout: float | None) -> tuple[DeliveryResult, Credentials | None]:
        if "planfix_token" in fields:
            raise ValueError("fields must not carry planfix_token: the client adds the current one")
        creds = self._credentials()
        configured = creds is not None and bool(creds.url) and bool(creds.token)
        # Encoded (and so checked) even when nothing is sent: a bad field is a bug, found at once.
        data = _form(fields, self._token_part(creds.token) if configured else None)
        if not configured:
            return DeliveryResult(Outcome.NOT_CONFIGURED, error="PlanFix URL/token not configured yet (waiting for setup)"), None
        try:
            target = self._target_for(creds.url)
        except ValueError as exc:
            return DeliveryResult(Outcome.RETRY, error=str(exc)), creds
        # One deadline for the whole exchange: the caller's (the dialplan
        # lookup), else connect + read; the socket timeouts bound each phase.
        limit = timeout if timeout is not None else self.connect_timeout + self.read_timeout
        deadline = gevent.Timeout(limit)
        deadline.start()
        try:
            status, headers, text = self._exchange(target, data)
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise  # someone else's timeout
            return DeliveryResult(Outcome.RETRY, error=f"no answer from {creds.url} within {limit}s"), creds
        except socket.timeout as exc:
            return DeliveryResult(Outcome.RETRY, error=f"timeout talking to {creds.url}: {exc.__class__.__name__}"), creds
        except (OSError, HTTPParseError, RuntimeError, ValueError) as exc:
            return DeliveryResult(Outcome.RETRY, error=f"cannot reach {creds.url}: {exc.__class__.__name__}: {exc}"), creds
        finally:
            deadline.close()
        return _classify(status, headers, text, creds), creds

    def _exchange(self, target: _Target, data: bytes) -> tuple[int, Any, str]:
        pool = self._pool_for(target)
        request = target.head + b"%d\r\n\r\n" % len(data) + data
        while True:
            sock, reused = pool.take()
            try:
                try:
                    # send(), not sendall(): gevent's sendall asks the socket
                    # for its buffer size first, a system call per request;
                    # a request (~0.5 kB) always fits in one send.
                    sent = sock.send(request)
                    if sent < len(request):
                        sock.sendall(request[sent:])
                except BaseException:
                    pool.release_socket(sock)
                    raise
                # From here the response returns or closes the connection itself.
                response = HTTPSocketPoolResponse(sock, pool, method="POST")
                try:
                    text = response.read().decode("utf-8", "replace")
                finally:
                    response.release()
                return response.status_code, response, text
            except (HTTPConnectionClosed, ConnectionResetError, BrokenPipeError):
                # A kept-alive connection closed under us: again on another
                # one (see the class docstring); a fresh one failing is an answer.
                if not reused:
                    raise

    # ---- commands -----------------------------------------------------
    def send(self, fields: dict[str, str]) -> DeliveryResult:
        """One `event`/`record` (or any command) with the current token; never raises for PlanFix trouble."""
        result, _ = self._post(fields, None)
        if result.outcome is Outcome.UNAUTHORIZED:
            self._log_unauthorized(result)
        elif result.outcome is Outcome.REJECTED:
            log.warning("PlanFix rejected %s (kept aside): %r", _describe(fields), result.reply)
        elif result.outcome is Outcome.RETRY:
            log.warning("PlanFix delivery of %s failed, will retry: %s", _describe(fields), result.error)
        return result

    def _log_unauthorized(self, result: DeliveryResult) -> None:
        """Loud: nothing reaches PlanFix until an admin fixes the token; but rate-limited."""
        now = time.monotonic()
        if now < self._next_unauthorized_log:
            self._unauthorized_unlogged += 1
            return
        more = f" ({self._unauthorized_unlogged} more 401s since the last report)" if self._unauthorized_unlogged else ""
        self._next_unauthorized_log = now + UNAUTHORIZED_LOG_INTERVAL_S
        self._unauthorized_unlogged = 0
        log.error("%s%s; requests are kept and retried: fix [planfix] token or switch the integration on again in PlanFix", result.error, more)

    def _ask(self, fields: dict[str, str], timeout: float | None) -> Any:
        result, _ = self._post(fields, timeout)
        if result.delivered:
            return result.reply
        if result.outcome is Outcome.NOT_CONFIGURED:
            raise PlanfixNotConfigured(result.error)
        if result.outcome is Outcome.UNAUTHORIZED:
            self._log_unauthorized(result)
            raise PlanfixUnauthorized(result.error)
        if result.outcome is Outcome.REJECTED:
            raise PlanfixRejected(result.error)
        raise PlanfixUnavailable(result.error)

    def contact(self, phone: str, callid: str | None = None, timeout: float | None = None) -> Contact | None:
        """The client's name and responsible extension; None when PlanFix knows no such contact.

        Raises PlanfixError (a subclass says which) when PlanFix did not answer usefully,
        so a caller can tell "unknown number" (cache it) from "PlanFix failed" (don't).
        """
        if not phone:
            raise ValueError("contact: phone must not be empty")
        fields = {"cmd": "contact", "phone": phone}
        if callid:
            fields["callid"] = callid
        reply = self._ask(fields, timeout)
        if not isinstance(reply, dict):
            raise PlanfixUnavailable(f"contact: reply is not a JSON object: {reply!r}")
        name = reply.get("contact_name")
        # The spec does not say how "not found" looks; an answer without a
        # name (`{}`, `{"contact_name": ""}`, null) is the only sensible reading.
        if not isinstance(name, str) or not name.strip():
            return None
        return Contact(name=name.strip(), responsible=_extension(reply.get("responsible")))

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """PlanFix's view of us: {"pbxToken": ..., "pbxUrl": ...}."""
        reply = self._ask({"cmd": "ping"}, timeout)
        if not isinstance(reply, dict):
            raise PlanfixUnavailable(f"ping: reply is not a JSON object: {reply!r}")
        return reply


def _extension(value: Any) -> str | None:
    """`responsible` arrives as a number (103) or maybe a string; anything else means none."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int) and value >= 0:
        return str(value)
    if isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        return value.strip()
    return None


def _describe(fields: dict[str, str]) -> str:
    """A log-friendly name for a command: cmd, event and callid, never the whole form."""
    parts = [fields.get("cmd", "?")]
    if "event" in fields:
        parts.append(fields["event"])
    if "callid" in fields:
        parts.append(f"callid={fields['callid']}")
    return " ".join(parts)


# ---- `fsbridge ping` ------------------------------------------------------
def _normalize_url(url: str) -> str:
    """Compare URLs as PlanFix would use them: case-insensitive scheme/host, default port, trailing slash."""
    parts = urllib.parse.urlsplit(url.strip())
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    port = parts.port
    if (scheme, port) in (("https", 443), ("http", 80)):
        port = None
    netloc = host if port is None else f"{host}:{port}"
    path = parts.path.rstrip("/") or ""
    return urllib.parse.urlunsplit((scheme, netloc, path, parts.query, ""))


def compare_ping(reply: dict[str, Any], public_url: str, pbx_token: str) -> tuple[bool, list[str]]:
    """Does PlanFix hold our PBX address and token?  (ok, human-readable lines)."""
    held_url = reply.get("pbxUrl") if isinstance(reply, dict) else None
    held_token = reply.get("pbxToken") if isinstance(reply, dict) else None
    held_url = held_url if isinstance(held_url, str) else ""
    held_token = held_token if isinstance(held_token, str) else ""
    lines = [
        f"PlanFix holds PBX URL:   {held_url or '(empty)'}",
        f"this service's URL:      {public_url or '(not set: [server] public_url)'}",
    ]
    if not public_url:
        url_ok = False
        lines.append("URL: cannot compare, [server] public_url is not set")
    elif not held_url:
        url_ok = False
        lines.append(f"URL: MISMATCH, PlanFix holds no PBX URL; enter {public_url} in PlanFix's integration settings")
    else:
        url_ok = _normalize_url(held_url) == _normalize_url(public_url)
        lines.append("URL: match" if url_ok else f"URL: MISMATCH, enter {public_url} in PlanFix's integration settings")
    lines.append(f"PlanFix holds PBX token: {mask_secret(held_token)}")
    lines.append(f"this service's token:    {mask_secret(pbx_token)}")
    if not pbx_token:
        token_ok = False
        lines.append("token: cannot compare, [server] token is not set")
    else:
        token_ok = bool(held_token) and hmac.compare_digest(held_token.encode(), pbx_token.encode())
        lines.append("token: match" if token_ok else "token: MISMATCH, enter [server] token in PlanFix's integration settings")
    ok = url_ok and token_ok
    lines.append("OK: PlanFix and this service agree" if ok else "NOT OK: PlanFix's integration settings differ from this service's")
    return ok, lines


def cli_ping(client: PlanfixClient, public_url: str, pbx_token: str) -> tuple[int, str]:
    """`fsbridge ping`: (exit code, text to print). Exit 0 only when URL and token match."""
    try:
        reply = client.ping()
    except PlanfixNotConfigured as exc:
        return 2, f"cannot ping: {exc}; set [planfix] url and token (or switch the integration on in PlanFix)"
    except PlanfixUnauthorized as exc:
        return 1, f"PlanFix refused our planfix_token: {exc}"
    except PlanfixError as exc:
        return 1, f"ping failed: {exc}"
    ok, lines = compare_ping(reply, public_url, pbx_token)
    return (0 if ok else 1), "\n".join(lines)
