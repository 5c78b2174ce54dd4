"""The HTTP servers' defences against connection floods (issue 14).

gevent's pywsgi server, as used before, gave every accepted connection a
slot in a 1,000-greenlet pool and never timed a socket out: 1,000 idle TCP
connections took the public port down.  :class:`GuardedWSGIServer` instead:

* times every phase of a request: the request line (``request_line_timeout``
  from the first byte wait on a new connection), the headers
  (``header_timeout``), the body (``body_timeout``, a total, so a client
  trickling one byte a second gains nothing), the wait for the next request on
  a kept-alive connection (``keepalive_timeout``) and the TLS handshake
  (``tls_handshake_timeout``); a phase that runs out closes the connection;
* counts connections per client address (IPv6 per /64) and in total; a
  connection beyond ``max_per_address`` is closed at once, and at
  ``max_connections`` the oldest connection that is only *waiting* (no
  request in progress) is closed to make room, so new clients are never
  queued behind idle ones;
* refuses a request carrying both ``Content-Length`` and
  ``Transfer-Encoding`` (request smuggling) with 400;
* logs malformed requests and refused connections in a summary line at most
  once a minute instead of one ERROR line each.

:func:`raise_nofile_limit` lifts the soft open-files limit to the hard one
(the service calls it at start): thousands of sockets need thousands of fds.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import resource
import socket
import time
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.pool
from gevent.pywsgi import WSGIHandler, WSGIServer

log = logging.getLogger("fsbridge.http")

__all__ = ["GuardSettings", "GuardedWSGIServer", "GuardedHandler", "address_key", "raise_nofile_limit"]

# One summary line per this many seconds for each kind of noise.
SUMMARY_INTERVAL_S = 60.0


@dataclass(frozen=True)
class GuardSettings:
    """Connection limits of one listener (``[server]`` keys of the same names)."""

    request_line_timeout: float = 10.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 15.0
    tls_handshake_timeout: float = 10.0
    max_connections: int = 10_000
    max_per_address: int = 64

    @classmethod
    def from_config(cls, cfg: Any) -> "GuardSettings":
        s = cfg.server
        return cls(
            request_line_timeout=s.request_line_timeout,
            header_timeout=s.header_timeout,
            body_timeout=s.body_timeout,
            keepalive_timeout=s.keepalive_timeout,
            tls_handshake_timeout=s.tls_handshake_timeout,
            max_connections=s.max_connections,
            max_per_address=s.max_connections_per_address,
        )


def address_key(address: str | None) -> str:
    """The unit a limit counts: an IPv4 address, an IPv6 /64 (one host owns a whole prefix)."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def raise_nofile_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE raised to the hard limit; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, exc)
    return soft, hard


class _Summary:
    """Counts an event; logs the first at once, then one summary line per interval."""

    def __init__(self, what: str, level: int = logging.WARNING):
        self.what, self.level = what, level
        self._next = 0.0
        self._unlogged = 0

    def note(self, detail: str) -> None:
        now = time.monotonic()
        if now < self._next:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more since the last report)" if self._unlogged else ""
        log.log(self.level, "%s: %s%s", self.what, detail, more)
        self._unlogged = 0
        self._next = now + SUMMARY_INTERVAL_S


class _PhaseExpired(Exception):
    """A request phase ran out of time (never leaves this module)."""


class _DeadlineInput:
    """``wsgi.input`` with one deadline for the whole body.

    At the deadline the socket is shut down, so the read returns short and
    the application sees a disconnected client (werkzeug: 400), no traceback.
    """

    def __init__(self, inner: Any, deadline: float, sock: Any):
        self._inner, self._deadline, self._sock = inner, deadline, sock

    def _call(self, name: str, *args: Any) -> Any:
        remaining = self._deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise _PhaseExpired
            with gevent.Timeout(remaining, _PhaseExpired):
                return getattr(self._inner, name)(*args)
        except _PhaseExpired:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return b"" if name in ("read", "readline") else []

    def read(self, length: int | None = None) -> bytes:
        return self._call("read", length)

    def readline(self, size: int | None = None) -> bytes:
        return self._call("readline", size)

    def readlines(self, hint: Any = None) -> list[bytes]:
        return self._call("readlines", hint)

    def __iter__(self):
        while True:
            line = self.readline()
            if not line:
                return
            yield line

    def _discard(self) -> None:
        self._call("_discard")


class GuardedHandler(WSGIHandler):
    """pywsgi's handler with per-phase deadlines and quiet client errors."""

    server: "GuardedWSGIServer"

    def handle(self) -> None:
        self._requests_done = 0
        super().handle()

    def read_requestline(self) -> str:
        s = self.server.guard
        first = self._requests_done == 0
        self.server._set_idle(self, True)
        try:
            # Waiting for the first byte is idleness (this connection may be
            # closed to make room); on a new connection the whole request
            # line must come within request_line_timeout of the accept, on a
            # kept-alive one the first byte within keepalive_timeout.
            with gevent.Timeout(s.request_line_timeout if first else s.keepalive_timeout, _PhaseExpired):
                if not self.rfile.peek(1):
                    return ""
                self.server._set_idle(self, False)
                if first:
                    return super().read_requestline()
            with gevent.Timeout(s.request_line_timeout, _PhaseExpired):
                return super().read_requestline()
        except _PhaseExpired:
            self.server.timeouts.note(f"{self.client_address[0]}: no request line in time; closed")
            return ""
        finally:
            self.server._set_idle(self, False)
            self._requests_done += 1

    def MessageClass(self, *args: Any) -> Any:  # noqa: N802 - pywsgi's name
        headers = super().MessageClass(*args)
        # Seen here, before pywsgi drops Content-Length in favour of chunking.
        self._length_and_encoding = "content-length" in headers and "transfer-encoding" in headers
        return headers

    def read_request(self, raw_requestline: str) -> bool:
        try:
            with gevent.Timeout(self.server.guard.header_timeout, _PhaseExpired):
                ok = super().read_request(raw_requestline)
        except _PhaseExpired:
            raise ValueError("headers not complete in time") from None
        if ok and getattr(self, "_length_and_encoding", False):
            # pywsgi would drop Content-Length and read chunks; a proxy in
            # front may have done the opposite: refuse the ambiguity.
            raise ValueError("both Content-Length and Transfer-Encoding")
        if ok and self.headers.get("transfer-encoding", "chunked").lower() != "chunked":
            raise ValueError("unsupported Transfer-Encoding")
        return ok

    def get_environ(self) -> dict[str, Any]:
        env = super().get_environ()
        guarded = _DeadlineInput(self.wsgi_input, time.monotonic() + self.server.guard.body_timeout, self.socket)
        if env.get("wsgi.input") is self.wsgi_input:
            env["wsgi.input"] = guarded
        self.wsgi_input = guarded  # handle_one_response discards the rest through it
        return env

    def _handle_client_error(self, ex: BaseException):
        # A client's garbage is not our error: no traceback, one summary line.
        self.server.malformed.note(f"{self.client_address[0]}: {str(ex)[:120] or type(ex).__name__}")
        self.close_connection = True
        return super()._handle_client_error(ValueError("malformed request"))

    def log_error(self, msg: str, *args: Any) -> None:
        pass  # reported by _handle_client_error's summary

    def handle_error(self, t, v, tb) -> None:
        # Errors inside the application are logged by the app itself (Flask
        # error handlers); what remains here is the socket going away.
        if isinstance(v, (OSError, _PhaseExpired)):
            self.close_connection = True
            return
        super().handle_error(t, v, tb)


class GuardedWSGIServer(WSGIServer):
    """gevent's WSGI server with connection caps, deadlines and TCP_NODELAY.

    Nagle's algorithm is off on every connection: pywsgi sends headers and
    body in two writes, and with Nagle a kept-alive client waits ~40 ms per
    answer for the delayed ACK.
    """

    handler_class = GuardedHandler

    def __init__(self, listener: Any, application: Any, guard: GuardSettings | None = None, **kwargs: Any):
        kwargs.setdefault("log", None)
        # Unbounded pool: the caps below bound it, and a pool lets
        # stop(timeout) wait for requests in flight.
        kwargs.setdefault("spawn", gevent.pool.Pool())
        super().__init__(listener, application, **kwargs)
        self.guard = guard or GuardSettings()
        self.per_address: collections.Counter[str] = collections.Counter()
        self.open_connections = 0
        self._idle: collections.OrderedDict[int, gevent.Greenlet] = collections.OrderedDict()
        self.refused = _Summary("connections refused")
        self.timeouts = _Summary("connections timed out", logging.INFO)
        self.malformed = _Summary("malformed requests", logging.INFO)

    def _set_idle(self, handler: GuardedHandler, idle: bool) -> None:
        key = id(handler)
        if idle:
            self._idle[key] = gevent.getcurrent()
        else:
            self._idle.pop(key, None)

    def do_handle(self, sock: Any, address: Any) -> None:
        key = address_key(address[0] if isinstance(address, tuple) and address else None)
        if self.per_address[key] >= self.guard.max_per_address:
            self.refused.note(f"{key} has {self.per_address[key]} connections open (max_connections_per_address)")
            sock.close()
            return
        if self.open_connections >= self.guard.max_connections and not self._evict_idle():
            self.refused.note(f"{self.open_connections} connections open (max_connections)")
            sock.close()
            return
        self.per_address[key] += 1
        self.open_connections += 1
        try:
            super().do_handle(sock, address, key)
        except BaseException:
            self._release(key)
            raise

    def _evict_idle(self) -> bool:
        """Close the longest-waiting idle connection; False when none is idle."""
        while self._idle:
            _, greenlet = self._idle.popitem(last=False)
            if not greenlet.dead:
                greenlet.kill(block=False)
                self.timeouts.note("at max_connections: closed the longest idle connection")
                return True
        return False

    def _release(self, key: str) -> None:
        self.open_connections -= 1
        self.per_address[key] -= 1
        if self.per_address[key] <= 0:
            del self.per_address[key]

    def handle(self, sock: Any, address: Any, key: str = "") -> None:  # type: ignore[override]
        try:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # not TCP: nothing to tune
                pass
            super().handle(sock, address)
        finally:
            self._release(key)

    def wrap_socket_and_handle(self, client_socket: Any, address: Any, key: str = "") -> Any:
        try:
            with gevent.Timeout(self.guard.tls_handshake_timeout, _PhaseExpired):
                ssl_socket = self.wrap_socket(client_socket, **self.ssl_args)
        except _PhaseExpired:
            self.timeouts.note(f"{address[0]}: TLS handshake not done in time; closed")
            client_socket.close()
            self._release(key)
            return None
        except (OSError, ValueError) as exc:
            self.malformed.note(f"{address[0]}: TLS handshake failed: {exc}")
            client_socket.close()
            self._release(key)
            return None
        try:
            return self.handle(ssl_socket, address, key)
        finally:
            ssl_socket.close()
