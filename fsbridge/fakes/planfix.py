"""A fake PlanFix telephony endpoint on loopback, strict like the real one.

It speaks the PBX -> PlanFix half of `telephony-api.en.md` (`contact`,
`event`, `record`, `ping`) over real HTTP, so the client, the outbox and the
whole service can be tested with real sockets, timeouts and connection reuse.

Strictness is the point: every request is checked against the spec and any
deviation is answered 400 `{"error": "Invalid parameters"}` *and* recorded in
`.violations`, so a test can assert that nothing invalid was ever sent
(`fake.assert_no_violations()`).

Usage::

    with FakePlanfix() as fake:
        client = PlanfixClient(lambda: Credentials(fake.url, fake.token))
        fake.contacts["79101234567"] = {"contact_name": "Ivanov", "responsible": 103}
        fake.script(503, 503)          # the next two requests fail with 503
        fake.failure = "close"         # then every request: connection dropped
        fake.delay = 0.1               # every answer comes 100 ms late
        fake.wait_for(3, timeout=2)    # block until 3 requests arrived

Behaviours (for `.script(...)`, `.failure` and the return of `.decide`):
    None / "ok"  answer normally (200, or 400/401 for invalid requests)
    an int       answer with that HTTP status and a JSON error body
                 (400 -> Invalid parameters, 401 -> Invalid token, else Server error)
    "garbage"    200 with an HTML body that is not JSON (a proxy's error page)
    "hang"       never answer (until `hang_seconds` pass or the fake stops):
                 the client's read timeout must fire
    "close"      drop the connection without any answer

Order of precedence for one request: `.decide(form)` (if set and it returns
something other than None), then the next scripted behaviour, then
`.failure`, then normal processing.

`contact` for an unknown number: the spec does not say what PlanFix answers.
The fake answers 200 with `{}` (no `contact_name`), which is how an empty
search result most plausibly looks; the client treats a 200 without a
non-empty `contact_name` as "not found".  `contact_not_found_reply` changes it.

The fake is written with plain threads and sockets; in the gevent-patched
test process they are greenlets, in an unpatched process real threads.

Lean mode (``FakePlanfix(lean=True)``, the benchmark's): a bare keep-alive
HTTP/1.1 loop instead of ``http.server``, so thousands of requests a second
cost the fake little.  It checks the token (401 otherwise) and answers every
other request 200 ``{}`` after ``delay``; it validates nothing else and
records only ``arrivals``: (callid, event, time.monotonic()) per request.
``failure = "hang"`` makes it a PlanFix that takes connections and answers
nothing (each request is held until the client gives up, ``hang_seconds``
pass or the fake stops).  Scripts, other failures, ``decide`` and
``received`` are strict mode's only.
"""

from __future__ import annotations

import collections
import json
import re
import secrets
import select
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

PATH = "/tel/api"

EVENT_TYPES = {"in", "out"}
EVENT_NAMES = {"INCOMING", "OUTGOING", "ACCEPTED", "COMPLETED"}
STATUSES = {
    "in": {"Success", "Missed", "Cancelled"},
    "out": {"Success", "Busy", "NoAnswer", "NotAvailable", "NotAllowed"},
}
# Fields the spec allows only together with COMPLETED.
COMPLETED_ONLY = {"duration", "is_recorded", "status", "record_link"}
EVENT_FIELDS = {"cmd", "type", "event", "phone", "diversion", "ext", "callid", "planfix_token"} | COMPLETED_ONLY
CONTACT_FIELDS = {"cmd", "phone", "callid", "planfix_token"}
RECORD_FIELDS = {"cmd", "callid", "is_temp", "record_link", "planfix_token"}
PING_FIELDS = {"cmd", "planfix_token"}

INVALID_PARAMETERS = {"error": "Invalid parameters"}
INVALID_TOKEN = {"error": "Invalid token"}


@dataclass
class Received:
    """One request as the fake saw it, and how it was answered."""

    form: dict[str, str]
    status: int | None = None  # HTTP status answered; None: none (yet, or hang / close)
    # "ok" only for a real PlanFix 200 (what `delivered` counts); else
    # "garbage", "hang", "close", "error" (scripted status) or None (in progress).
    outcome: str | None = None
    client_port: int = 0  # the client's source port: equal ports = a reused connection
    at: float = field(default_factory=time.monotonic)


class InvalidRequest(Exception):
    """The request breaks the spec; the message says how."""


def _is_link(value: str) -> bool:
    parsed = urllib.parse.urlsplit(value)
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)


def validate(form: dict[str, str]) -> None:
    """Raise InvalidRequest unless `form` (token excluded) is a valid PBX -> PlanFix request."""
    cmd = form.get("cmd")

    def require(*names: str) -> None:
        for name in names:
            if not form.get(name):
                raise InvalidRequest(f"{cmd}: {name} missing or empty")

    def only(allowed: set[str], extra_prefix: str | None = None) -> None:
        for name in form:
            if name not in allowed and not (extra_prefix and name.startswith(extra_prefix) and len(name) > len(extra_prefix)):
                raise InvalidRequest(f"{cmd}: unknown field {name!r}")

    if cmd == "ping":
        only(PING_FIELDS)
    elif cmd == "contact":
        only(CONTACT_FIELDS)
        require("phone")
    elif cmd == "record":
        only(RECORD_FIELDS)
        require("callid", "record_link")
        if not _is_link(form["record_link"]):
            raise InvalidRequest(f"record: record_link {form['record_link']!r} is not an http(s) link")
        if "is_temp" in form and form["is_temp"] not in ("0", "1"):
            raise InvalidRequest(f"record: is_temp {form['is_temp']!r} is not 0/1")
    elif cmd == "event":
        only(EVENT_FIELDS, extra_prefix="data_")
        require("type", "event", "phone", "ext", "callid")
        kind, name = form["type"], form["event"]
        if kind not in EVENT_TYPES:
            raise InvalidRequest(f"event: type {kind!r} is not in/out")
        if name not in EVENT_NAMES:
            raise InvalidRequest(f"event: event {name!r} unknown")
        if name == "COMPLETED":
            require("duration", "is_recorded", "status")
            if not form["duration"].isascii() or not form["duration"].isdigit():
                raise InvalidRequest(f"event: duration {form['duration']!r} is not a non-negative integer")
            if form["is_recorded"] not in ("0", "1"):
                raise InvalidRequest(f"event: is_recorded {form['is_recorded']!r} is not 0/1")
            if form["status"] not in STATUSES[kind]:
                raise InvalidRequest(f"event: status {form['status']!r} is not valid for type={kind}")
            if "record_link" in form and not _is_link(form["record_link"]):
                raise InvalidRequest(f"event: record_link {form['record_link']!r} is not an http(s) link")
        else:
            extra = sorted(n for n in form if n in COMPLETED_ONLY or n.startswith("data_"))
            if extra:
                raise InvalidRequest(f"event: {', '.join(extra)} only allowed with COMPLETED, got {name}")
    else:
        raise InvalidRequest(f"unknown cmd {cmd!r}")


_LEAN_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
_LEAN_401_BODY = json.dumps(INVALID_TOKEN).encode()
_LEAN_401 = (b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
             % len(_LEAN_401_BODY) + _LEAN_401_BODY)
_CONTENT_LENGTH = re.compile(rb"\ncontent-length: *(\d+)")


class FakePlanfix:
    def __init__(self, token: str | None = None, hang_seconds: float = 30.0, lean: bool = False):
        self.lean = lean
        self.arrivals: list[tuple[str, str, float]] = []  # lean mode: (callid, event, monotonic time)
        self._lean_sock: socket.socket | None = None
        self.token = token or secrets.token_hex(16)
        self.contacts: dict[str, dict[str, Any]] = {}
        self.contact_not_found_reply: dict[str, Any] = {}
        self.ping_reply: dict[str, Any] = {"pbxToken": "", "pbxUrl": ""}
        self.delay = 0.0
        self.failure: Any = None
        self.decide: Callable[[dict[str, str]], Any] | None = None
        self.hang_seconds = hang_seconds
        self._script: collections.deque[Any] = collections.deque()
        self._received: list[Received] = []
        self._violations: list[tuple[dict[str, str], str]] = []
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._in_flight = 0
        self.max_in_flight = 0  # most requests being handled at the same time
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- life cycle -------------------------------------------------
    def start(self) -> "FakePlanfix":
        if self.lean:
            return self._start_lean()
        fake = self

        class Handler(_Handler):
            pass

        Handler.fake = fake
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases hung handlers
        if self._lean_sock is not None:
            self._lean_sock.close()
            self._lean_sock = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FakePlanfix":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._lean_sock is not None:
            return self._lean_sock.getsockname()[1]
        assert self._server is not None, "FakePlanfix not started"
        return self._server.server_address[1]

    # ---- lean mode --------------------------------------------------
    def _start_lean(self) -> "FakePlanfix":
        self._stopping.clear()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        self._lean_sock = sock
        threading.Thread(target=self._lean_accept, args=(sock,), daemon=True).start()
        return self

    def _lean_accept(self, sock: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._lean_serve, args=(conn,), daemon=True).start()

    def _lean_serve(self, conn: socket.socket) -> None:
        buf = b""
        token = ("planfix_token=" + urllib.parse.quote_plus(self.token)).encode()
        try:
            while not self._stopping.is_set():
                end = buf.find(b"\r\n\r\n")
                while end < 0:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                    end = buf.find(b"\r\n\r\n")
                found = _CONTENT_LENGTH.search(buf[:end].lower())
                size = end + 4 + (int(found.group(1)) if found else 0)
                while len(buf) < size:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                body, buf = buf[end + 4:size], buf[size:]
                now = time.monotonic()
                form = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
                with self._cond:
                    self._in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self._in_flight)
                self.arrivals.append((form.get("callid", ""), form.get("event", ""), now))
                if self.failure == "hang":
                    return self._lean_hang(conn)
                if self.delay:
                    time.sleep(self.delay)
                with self._cond:
                    self._in_flight -= 1
                # The token is a whole field of the form: compare the exact bytes.
                ok = any(part == token for part in body.split(b"&"))
                conn.sendall(_LEAN_OK if ok else _LEAN_401)
        except OSError:
            return
        finally:
            conn.close()

    def _lean_hang(self, conn: socket.socket) -> None:
        """Answer nothing until the client closes, hang_seconds pass or the fake stops."""
        deadline = time.monotonic() + self.hang_seconds
        while time.monotonic() < deadline and not self._stopping.is_set():
            readable, _, _ = select.select([conn], [], [], 0.2)
            if readable and not conn.recv(65536):
                return  # EOF: the client timed out and closed

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    # ---- behaviour --------------------------------------------------
    def script(self, *behaviours: Any) -> None:
        """Queue behaviours for the next requests, one each, before `.failure` applies."""
        with self._cond:
            self._script.extend(behaviours)

    def fail_next(self, count: int, behaviour: Any = 503) -> None:
        self.script(*([behaviour] * count))

    def _next_behaviour(self, form: dict[str, str]) -> Any:
        if self.decide is not None:
            chosen = self.decide(form)
            if chosen is not None:
                return chosen
        with self._cond:
            if self._script:
                return self._script.popleft()
        return self.failure

    # ---- what was received ------------------------------------------
    @property
    def requests(self) -> list[dict[str, str]]:
        """Every received form (token included), in arrival order."""
        with self._cond:
            return [r.form for r in self._received]

    @property
    def received(self) -> list[Received]:
        with self._cond:
            return list(self._received)

    @property
    def delivered(self) -> list[dict[str, str]]:
        """The forms this fake answered 200, in the order the answers were given."""
        with self._cond:
            return [r.form for r in self._received if r.outcome == "ok"]

    @property
    def violations(self) -> list[tuple[dict[str, str], str]]:
        with self._cond:
            return list(self._violations)

    def assert_no_violations(self) -> None:
        problems = self.violations
        assert not problems, "invalid requests reached PlanFix:\n" + "\n".join(f"{why}: {form}" for form, why in problems)

    def clear(self) -> None:
        with self._cond:
            self._received.clear()
            self._violations.clear()

    def wait_for(self, count: int, timeout: float = 5.0, delivered: bool = False) -> list[dict[str, str]]:
        """Block until `count` requests arrived (or were answered 200); raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout

        def have() -> list[dict[str, str]]:
            rows = self._received if not delivered else [r for r in self._received if r.outcome == "ok"]
            return [r.form for r in rows]

        with self._cond:
            while len(have()) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"FakePlanfix: {len(have())} of {count} {'delivered' if delivered else 'requests'} after {timeout}s")
                self._cond.wait(min(left, 0.05))
            return have()

    def _record(self, form: dict[str, str], violation: str | None, client_port: int = 0) -> Received:
        entry = Received(form, client_port=client_port)
        with self._cond:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            self._received.append(entry)
            if violation:
                self._violations.append((form, violation))
            self._cond.notify_all()
        return entry

    def _answered(self, entry: Received, status: int | None, outcome: str) -> None:
        with self._cond:
            self._in_flight -= 1
            entry.status = status
            entry.outcome = outcome
            self._cond.notify_all()


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 resets connections when an outbox opens 16 at once.
    request_queue_size = 128


class _Handler(BaseHTTPRequestHandler):
    fake: FakePlanfix
    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is exercised

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without NODELAY, Nagle plus
        # the client's delayed ACK adds ~40 ms to every answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
        pass

    def _reply(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _hang(self) -> None:
        """Answer nothing until the client gives up (closes), the fake stops, or hang_seconds pass."""
        deadline = time.monotonic() + self.fake.hang_seconds
        while time.monotonic() < deadline and not self.fake._stopping.is_set():
            readable, _, _ = select.select([self.connection], [], [], 0.05)
            if readable:
                try:
                    if not self.connection.recv(1, socket.MSG_PEEK):
                        return  # EOF: the client timed out and closed
                except OSError:
                    return

    def _refuse(self, status: int, why: str) -> None:
        """A request the fake cannot even parse: recorded as a violation."""
        entry = self.fake._record({}, why)
        self._reply(status, INVALID_PARAMETERS)
        self.fake._answered(entry, status, "rejected")

    def do_GET(self) -> None:  # noqa: N802
        self._refuse(405, f"{self.command} instead of POST")

    do_PUT = do_DELETE = do_PATCH = do_GET  # noqa: N815

    def do_POST(self) -> None:  # noqa: N802
        fake = self.fake
        # Read the body first, whatever follows: an unread body would be
        # taken for the next request on this keep-alive connection.
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if urllib.parse.urlsplit(self.path).path != PATH:
            return self._refuse(404, f"POST to {self.path}, not {PATH}")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            return self._refuse(400, f"Content-Type {ctype!r}, not application/x-www-form-urlencoded")
        try:
            pairs = urllib.parse.parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(raw))
        except (UnicodeDecodeError, ValueError) as exc:
            return self._refuse(400, f"body is not a UTF-8 form: {exc}")
        form = dict(pairs)
        violation = None
        if len(form) != len(pairs):
            violation = "a field appears twice"
        token = form.get("planfix_token", "")
        fields = {k: v for k, v in form.items() if k != "planfix_token"}
        if violation is None:
            try:
                validate(fields)
            except InvalidRequest as exc:
                violation = str(exc)
        entry = fake._record(form, violation, self.client_address[1])

        behaviour = fake._next_behaviour(form)
        if fake.delay:
            time.sleep(fake.delay)
        if behaviour == "hang":
            self._hang()
            self.close_connection = True
            return fake._answered(entry, None, "hang")
        if behaviour == "close":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return fake._answered(entry, None, "close")
        if behaviour == "garbage":
            self._reply(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
            return fake._answered(entry, 200, "garbage")
        if isinstance(behaviour, int) and not isinstance(behaviour, bool):
            body = INVALID_PARAMETERS if behaviour == 400 else INVALID_TOKEN if behaviour == 401 else {"error": "Server error"}
            self._reply(behaviour, body)
            return fake._answered(entry, behaviour, "error")
        if behaviour not in (None, "ok"):
            raise ValueError(f"FakePlanfix: unknown behaviour {behaviour!r}")

        # Normal processing, like PlanFix: the key first, then the parameters.
        if not secrets.compare_digest(token.encode(), fake.token.encode()):
            self._reply(401, INVALID_TOKEN)
            return fake._answered(entry, 401, "unauthorized")
        if violation:
            self._reply(400, INVALID_PARAMETERS)
            return fake._answered(entry, 400, "rejected")
        cmd = fields["cmd"]
        if cmd == "contact":
            reply = fake.contacts.get(fields["phone"], fake.contact_not_found_reply)
        elif cmd == "ping":
            reply = fake.ping_reply
        else:
            reply = {}
        self._reply(200, reply)
        fake._answered(entry, 200, "ok")
