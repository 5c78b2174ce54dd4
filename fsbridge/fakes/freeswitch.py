"""A fake FreeSWITCH Event Socket server speaking the real wire protocol.

Every byte it sends is either copied from real FreeSWITCH 1.10.12 captures
(greeting, replies, api bodies, disconnect notice, event frames; the api
bodies it answers by default come from ``captures/`` beside this module, the
call captures from the caller) or built in exactly their layout
(BACKGROUND_JOB for our own bgapi).  It is shared by the test suite, the
benchmark and ``fsbridge demo``.  It runs on 127.0.0.1, an ephemeral port, with plain threads and
sockets (greenlets under the test conftest's monkey patching).

Trace helpers (reused by other tests)
-------------------------------------
``CAPTURES``
    The directory of the captures packaged with the fake (api bodies).
``read_trace(path) -> bytes``
    A capture's bytes, ``.gz`` decompressed; ``X.txt`` falls back to
    ``X.txt.gz`` (the repo keeps the large captures gzipped).
``split_frames(data) -> list[RawFrame]``
    Cut a byte stream into frames by ``Content-Length``; each
    ``RawFrame(raw, headers, body)`` keeps its exact bytes in ``raw``.
``trace_events(path) -> list[TraceEvent]``
    The ``text/event-plain`` frames of a trace, in order (cached), as
    ``TraceEvent(name, subclass, raw, body)``: ``raw`` is the exact frame
    (outer headers and body) to send, ``body`` the event's plain body,
    ``name`` its Event-Name, ``subclass`` the decoded Event-Subclass or "".
``events_of(data) -> list[TraceEvent]``
    The same for any byte stream (e.g. a capture rewritten in memory).
``trace_api_bodies(path) -> list[bytes]``
    The ``api/response`` bodies of a trace, in order.
``event_frame(headers, body=b"", encode=True) -> bytes``
    A ``text/event-plain`` frame in FreeSWITCH's layout.  Values are
    percent-encoded like FreeSWITCH (so ``"a\\nB: c"`` becomes
    ``a%0AB%3A%20c``); ``encode=False`` sends values (str or bytes)
    verbatim, for hostile-content tests.
``rewrite_event(event, replace=None, add_headers=None, body=None) -> bytes``
    A trace event with values replaced (plain text, e.g. a UUID -> ours),
    headers added and/or its body replaced; both Content-Lengths
    recomputed.  For click-to-call hooks that make a trace match our own
    originate.
``DISCONNECT_NOTICE``
    The exact ``text/disconnect-notice`` frame FreeSWITCH sends.

The server: ``FakeFreeSwitch(password="ClueCon", core_uuid=None)``
-----------------------------------------------------------------
``start() -> self``, ``stop()``, ``restart(down_for=0.0, core_uuid=None)``
(same port, new Core-UUID), context manager.  ``host``, ``port``,
``core_uuid``, ``password`` (assignable at any time).

Commands: ``auth``, ``event plain|json|xml NAMES`` (accumulates, ``ALL``,
``CUSTOM sub::class``), ``noevents``, ``filter H V`` / ``filter delete``,
``api CMD``, ``bgapi CMD`` (honours a ``Job-UUID:`` header line), ``exit``;
anything else ``-ERR command not found``.  Only plain-format subscribers
receive events.

* ``commands``: every command block received (text without the final blank
  line, e.g. ``"bgapi status\\nJob-UUID: 1234"``), in order, across all
  connections.  ``wait_for_command(prefix, timeout=2.0) -> str``,
  ``clear_commands()``.
* ``set_api(command, body)``: body is str/bytes or ``callable(command) ->
  str|bytes``; the exact api command text is the key.  Defaults: ``status``,
  ``version``, ``show channels as json``, ``show calls as json`` (idle),
  from traces 91/92; ``global_getvar core_uuid``; ``uuid_kill`` -> ``-ERR No
  such channel!``; ``uuid_exists <uuid>`` -> ``true`` when the
  ``show channels as json`` answer names it, else ``false``; ``sofia_contact [profile/]<user>[@domain]`` -> a contact
  for users in ``registered`` (default 101-103), else
  ``error/user_not_registered`` as mod_sofia answers; anything else ``-ERR <verb> Command not found!`` (96).
  ``use_active_calls()`` switches the two json listings to trace 90.
* ``set_bgapi_result(prefix, body)``: BACKGROUND_JOB body for bgapi
  commands starting with ``prefix`` (str/bytes or ``callable(command)``).
  Default: ``+OK <origination_uuid or a new uuid>\\n`` for originate, else
  the api body of the same command.
* ``on_command(prefix, fn)``: after replying to a command starting with
  ``prefix`` call ``fn(command, headers, job_uuid)``; its return (as for
  ``replay``: TraceEvents and/or bytes, or None) is sent to subscribed
  connections, paced by ``rate`` given to ``on_command``.  For a bgapi the
  frames REPLACE the automatic BACKGROUND_JOB (a click-to-call rewrite
  returns the trace's own, rewritten).
* ``replay(events, rate=None) -> ReplayJob`` (``.wait(timeout)``): send
  frames now (``events``: a trace file name/path, or a list of TraceEvents
  and/or ``bytes`` -- one frame or a whole rewritten capture, of which only
  the event frames are sent); ``replay_on_subscribe(events, rate=None)``: send them to each
  connection right after its first ``event`` command.  Only events the
  connection subscribed to and passing its filters are sent, like
  FreeSWITCH.  ``rate`` = events per second, None = all at once.
* Faults: ``inject(raw)`` (bytes to every authenticated connection),
  ``drop(reset=False)`` (close every connection abruptly; ``reset`` sends
  RST), ``disconnect()`` (disconnect notice, then close), ``silent = True``
  (accept, record, never answer -- not even a greeting for new
  connections).
* Counters: ``accepted`` (TCP connections), ``authenticated``,
  ``subscribed`` (successful ``event`` commands); ``wait_until(predicate,
  timeout)``.

Also: ``wait_until(predicate, timeout=2.0) -> bool`` (module function).
"""

from __future__ import annotations

import gzip
import os
import pathlib
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable
from urllib.parse import quote

from fsbridge.core.wire import parse_event_plain, parse_header_block

CAPTURES = pathlib.Path(__file__).resolve().parent / "captures"

GREETING = b"Content-Type: auth/request\n\n"
DISCONNECT_NOTICE = (
    b"Content-Type: text/disconnect-notice\nContent-Length: 67\n\n"
    b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
)
# The same header values as the captures' FreeSWITCH, so built events look real.
_HOST_HEADERS = {
    "FreeSWITCH-Hostname": "fs-test",
    "FreeSWITCH-Switchname": "fs-test",
    "FreeSWITCH-IPv4": "127.0.0.1",
    "FreeSWITCH-IPv6": "::1",
}
# FreeSWITCH's switch_url_encode leaves these alone (see ``Sat,%2028%20Nov``
# and ``user/999%20%26park`` in the traces).
_SAFE = "/,-_.~"


# -- trace helpers ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RawFrame:
    raw: bytes
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class TraceEvent:
    name: str
    subclass: str
    raw: bytes
    body: bytes


def _trace_path(path: str | os.PathLike) -> pathlib.Path:
    candidate = pathlib.Path(path)
    if not candidate.exists() and candidate.suffix != ".gz":
        gzipped = candidate.with_name(candidate.name + ".gz")
        if gzipped.exists():
            return gzipped
    return candidate


def read_trace(path: str | os.PathLike) -> bytes:
    candidate = _trace_path(path)
    data = candidate.read_bytes()
    return gzip.decompress(data) if candidate.suffix == ".gz" else data


def split_frames(data: bytes) -> list[RawFrame]:
    """Frames of an ESL byte stream, each with its exact bytes."""
    frames: list[RawFrame] = []
    pos = 0
    size = len(data)
    while pos < size:
        while pos < size and data[pos] == 0x0A:
            pos += 1
        if pos >= size:
            break
        end = data.find(b"\n\n", pos)
        if end < 0:
            raise ValueError(f"truncated header block at byte {pos}")
        headers = parse_header_block(data[pos:end], False)
        body_start = end + 2
        length = int(headers.get("Content-Length", "0"))
        if body_start + length > size:
            raise ValueError(f"truncated body at byte {body_start}")
        frames.append(RawFrame(data[pos:body_start + length], headers, data[body_start:body_start + length]))
        pos = body_start + length
    return frames


def _event_name(body: bytes) -> tuple[str, str]:
    headers, _ = parse_event_plain(body)  # lazy: only these two values get decoded
    return headers.get("Event-Name", "") or "", headers.get("Event-Subclass", "") or ""


def events_of(data: bytes) -> list[TraceEvent]:
    """The text/event-plain frames of an ESL byte stream (other frames skipped)."""
    events = []
    for frame in split_frames(data):
        if frame.headers.get("Content-Type") == "text/event-plain":
            name, subclass = _event_name(frame.body)
            events.append(TraceEvent(name, subclass, frame.raw, frame.body))
    return events


@lru_cache(maxsize=32)
def _trace_events_cached(path: str) -> tuple[TraceEvent, ...]:
    return tuple(events_of(read_trace(path)))


def trace_events(path: str | os.PathLike) -> list[TraceEvent]:
    return list(_trace_events_cached(str(_trace_path(path))))


def trace_api_bodies(path: str | os.PathLike) -> list[bytes]:
    return [f.body for f in split_frames(read_trace(path)) if f.headers.get("Content-Type") == "api/response"]


def _encode_value(value: str | bytes) -> bytes:
    return quote(value, safe=_SAFE).encode("ascii")


def _plain_frame(lines: list[bytes], body: bytes) -> bytes:
    """Header lines (no LF) and an event body, framed exactly as FreeSWITCH does."""
    inner = b"".join(line + b"\n" for line in lines)
    if body:
        inner += b"Content-Length: %d\n\n" % len(body) + body
    else:
        inner += b"\n"
    return b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(inner) + inner


def _header_line(name: str, value: str | bytes, encode: bool = True) -> bytes:
    if encode:
        raw = _encode_value(value)
    else:
        raw = value if isinstance(value, bytes) else value.encode("utf-8")
    return name.encode("utf-8") + b": " + raw


def event_frame(headers: dict[str, str | bytes], body: bytes = b"", encode: bool = True) -> bytes:
    """A text/event-plain frame in FreeSWITCH's layout (see trace 93)."""
    return _plain_frame([_header_line(name, value, encode) for name, value in headers.items()], body)


def rewrite_event(event: TraceEvent | bytes, replace: dict[str, str] | None = None,
                  add_headers: dict[str, str] | None = None, body: bytes | None = None) -> bytes:
    """A copy of a plain event frame with values changed and lengths recomputed.

    ``replace`` maps plain text to plain text (UUIDs, numbers) in header
    values -- matched in FreeSWITCH's percent-encoding -- and in the event's
    own body.  ``add_headers`` are appended after the existing headers
    (e.g. ``variable_fsbridge_click_to_call``), ``body`` replaces the
    event's body (a BACKGROUND_JOB result).  With no changes the original
    bytes come back unchanged.
    """
    plain = event.body if isinstance(event, TraceEvent) else split_frames(event)[0].body
    block, _, rest = plain.partition(b"\n\n")
    lines = block.split(b"\n")
    inner_length = next((int(line[16:]) for line in lines if line.startswith(b"Content-Length: ")), 0)
    lines = [line for line in lines if not line.startswith(b"Content-Length: ")]
    inner_body = rest[:inner_length] if body is None else body
    for old, new in (replace or {}).items():
        encoded_old, encoded_new = _encode_value(old), _encode_value(new)
        lines = [line.replace(encoded_old, encoded_new) for line in lines]
        inner_body = inner_body.replace(old.encode("utf-8"), new.encode("utf-8"))
    lines += [_header_line(name, value) for name, value in (add_headers or {}).items()]
    return _plain_frame(lines, inner_body)


def _reply(text: str, extra: dict[str, str] | None = None) -> bytes:
    lines = ["Content-Type: command/reply", f"Reply-Text: {text}"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def _api_response(body: bytes) -> bytes:
    return b"Content-Type: api/response\nContent-Length: %d\n\n" % len(body) + body


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


@lru_cache(maxsize=1)
def _default_api_bodies() -> dict[str, bytes]:
    status, version = trace_api_bodies(CAPTURES / "92-api-status-version.raw.txt")
    channels_idle, calls_idle = trace_api_bodies(CAPTURES / "91-api-show-channels-calls-json-idle.raw.txt")
    not_found, no_channel = trace_api_bodies(CAPTURES / "96-api-misc-errors.raw.txt")[:2]
    _contact, not_registered = trace_api_bodies(CAPTURES / "97-api-sofia-contact.raw.txt")[:2]
    return {
        "#not-registered": not_registered,
        "status": status,
        "version": version,
        "show channels as json": channels_idle,
        "show calls as json": calls_idle,
        "#not-found-sample": not_found,
        "#no-such-channel": no_channel,
    }


@lru_cache(maxsize=1)
def active_call_bodies() -> dict[str, bytes]:
    """``show channels as json`` / ``show calls as json`` during a call (trace 90)."""
    bodies = trace_api_bodies(CAPTURES / "90-api-show-channels-calls-json-active.raw.txt")
    return {"show channels as json": bodies[0], "show calls as json": bodies[1]}


# -- the server -------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Poll ``predicate`` until true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True



def _matches_event(sub: "_Conn", name: str, subclass: str, body: bytes) -> bool:
    if sub.event_format != "plain" or not sub.events:
        return False
    if "ALL" not in sub.events:
        if name == "CUSTOM":
            if subclass not in sub.events:
                return False
        elif name not in sub.events:
            return False
    if not sub.filters:
        return True
    headers = parse_header_block(body.split(b"\n\n", 1)[0], True)
    for header, wanted in sub.filters:
        value = headers.get(header)
        if value is None:
            continue
        if wanted.startswith("/") and wanted.endswith("/") and len(wanted) > 1:
            if re.search(wanted[1:-1], value):
                return True
        elif value == wanted:
            return True
    return False


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    lock: threading.Lock = field(default_factory=threading.Lock)
    authed: bool = False
    event_format: str = ""
    events: set[str] = field(default_factory=set)
    filters: list[tuple[str, str]] = field(default_factory=list)
    closed: bool = False

    def send(self, data: bytes) -> bool:
        with self.lock:
            if self.closed:
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                self.closed = True
                return False

    def close(self, reset: bool = False) -> None:
        # No lock: shutting the socket down is what wakes a sender blocked on a full buffer.
        self.closed = True
        try:
            if reset:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            else:
                self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _frames(events: Iterable | str | os.PathLike) -> list[TraceEvent]:
    """Events to send: a trace file's, or TraceEvents and byte streams (their event frames)."""
    if isinstance(events, (str, os.PathLike)):
        return trace_events(events)
    frames: list[TraceEvent] = []
    for item in events:
        if isinstance(item, TraceEvent):
            frames.append(item)
        else:
            frames.extend(events_of(bytes(item)))
    return frames


class ReplayJob:
    """Frames being sent in the background; ``wait()`` until all were sent."""

    def __init__(self, server: "FakeFreeSwitch", frames: list, rate: float | None,
                 targets: list[_Conn] | None) -> None:
        self.sent = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(server, frames, rate, targets), daemon=True)
        self._thread.start()

    def _run(self, server, frames, rate, targets) -> None:
        try:
            for frame in frames:
                if server._deliver(frame, targets):
                    self.sent += 1
                if rate:
                    time.sleep(1.0 / rate)
        finally:
            self._done.set()

    def wait(self, timeout: float | None = 5.0) -> bool:
        return self._done.wait(timeout)


class FakeFreeSwitch:
    def __init__(self, password: str = "ClueCon", core_uuid: str | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.password = password
        self.core_uuid = core_uuid or str(uuid.uuid4())
        self.silent = False
        self.commands: list[str] = []
        self.accepted = 0
        self.authenticated = 0
        self.subscribed = 0
        self._api: dict[str, bytes | Callable[[str], str | bytes]] = {}
        self._bgapi: list[tuple[str, bytes | Callable[[str], str | bytes]]] = []
        self._hooks: list[tuple[str, Callable, float | None]] = []
        self._on_subscribe: list[tuple[list, float | None]] = []
        self._conns: list[_Conn] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._running = False
        self._sequence = 1000
        # Extensions with a SIP registration (`sofia_contact` finds them);
        # the lab's phones by default.
        self.registered: set[str] = {"101", "102", "103"}

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> "FakeFreeSwitch":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(16)
        # Polling accept: closing a socket does not wake a blocked accept() in real threads.
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._running = True
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        self._running = False
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.drop()

    def restart(self, down_for: float = 0.0, core_uuid: str | None = None) -> None:
        """Stop, stay down ``down_for`` seconds, listen again on the same port as a new FreeSWITCH."""
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.core_uuid = core_uuid or str(uuid.uuid4())
        self.start()

    def __enter__(self) -> "FakeFreeSwitch":
        return self.start() if not self._running else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- configuration ------------------------------------------------------

    def set_api(self, command: str, body: str | bytes | Callable[[str], str | bytes]) -> None:
        self._api[command] = body if callable(body) else _as_bytes(body)

    def use_active_calls(self) -> None:
        for command, body in active_call_bodies().items():
            self.set_api(command, body)

    def set_bgapi_result(self, prefix: str, body: str | bytes | Callable[[str], str | bytes]) -> None:
        self._bgapi.insert(0, (prefix, body if callable(body) else _as_bytes(body)))

    def on_command(self, prefix: str, fn: Callable[[str, dict[str, str], str | None], Iterable | None],
                   rate: float | None = None) -> None:
        self._hooks.append((prefix, fn, rate))

    def clear_hooks(self) -> None:
        """Forget every on_command hook (tests sharing one fake between cases)."""
        self._hooks.clear()

    def replay_on_subscribe(self, events: Iterable | str | os.PathLike, rate: float | None = None) -> None:
        self._on_subscribe.append((_frames(events), rate))

    # -- observation --------------------------------------------------------

    def clear_commands(self) -> None:
        with self._lock:
            self.commands.clear()

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
        return wait_until(predicate, timeout)

    def wait_for_command(self, prefix: str, timeout: float = 2.0) -> str:
        found: list[str] = []

        def seen() -> bool:
            with self._lock:
                found[:] = [c for c in self.commands if c.startswith(prefix)]
            return bool(found)

        if not self.wait_until(seen, timeout):
            raise AssertionError(f"no command starting with {prefix!r}; got {self.commands!r}")
        return found[-1]

    # -- sending ------------------------------------------------------------

    def replay(self, events: Iterable | str | os.PathLike, rate: float | None = None) -> ReplayJob:
        return ReplayJob(self, _frames(events), rate, None)

    # -- streaming (the benchmark) --------------------------------------------
    # Raw bytes straight to the subscribed connection: no per-frame parsing or
    # filtering, so the sender can keep up with a service at full speed.  The
    # caller sends only events the connection subscribed to (``wait_subscribed``).

    def wait_subscribed(self, timeout: float = 30.0) -> set[str]:
        """Block until a connection subscribed to plain events; its event names."""
        def found() -> bool:
            return any(c.authed and c.event_format == "plain" and c.events for c in self._live())

        if not self.wait_until(found, timeout):
            raise TimeoutError(f"FakeFreeSwitch: nobody subscribed within {timeout}s")
        return set(next(c for c in self._live() if c.event_format == "plain" and c.events).events)

    def stream(self, raw: bytes) -> bool:
        """Send ``raw`` (whole frames) to every plain subscriber; False if none took it."""
        sent = False
        for conn in self._live():
            if conn.authed and conn.event_format == "plain" and conn.events:
                sent = conn.send(raw) or sent
        return sent

    def drained(self) -> bool:
        """Every byte sent was read by the client: our send queues and its
        receive queues are empty (Linux /proc/net/tcp; True elsewhere)."""
        ports = set()
        for conn in self._live():
            try:
                ports.add(("%04X" % conn.sock.getsockname()[1], "%04X" % conn.sock.getpeername()[1]))
            except OSError:
                continue
        try:
            lines = pathlib.Path("/proc/net/tcp").read_text().splitlines()[1:]
        except OSError:
            return True
        for line in lines:
            parts = line.split()
            pair = (parts[1].split(":")[1], parts[2].split(":")[1])
            if pair in ports or pair[::-1] in ports:
                tx, rx = (int(x, 16) for x in parts[4].split(":"))
                if tx or rx:
                    return False
        return True

    def inject(self, raw: bytes) -> None:
        for conn in self._live():
            if conn.authed:
                conn.send(raw)

    def drop(self, reset: bool = False) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close(reset)

    def disconnect(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.send(DISCONNECT_NOTICE)
            conn.close()

    def _live(self) -> list[_Conn]:
        with self._lock:
            return [c for c in self._conns if not c.closed]

    def _deliver(self, event: TraceEvent, targets: list[_Conn] | None) -> bool:
        delivered = False
        for conn in targets if targets is not None else self._live():
            if conn.authed and _matches_event(conn, event.name, event.subclass, event.body):
                delivered = conn.send(event.raw) or delivered
        return delivered

    # -- the protocol -------------------------------------------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        while self._running and self._listener is listener:
            try:
                sock, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(None)
            # As mod_event_socket does (listener_run sets SWITCH_SO_TCP_NODELAY):
            # with Nagle on, a 9 kB frame waits for the ACK of the previous one,
            # which the client's delayed ACK holds back, so events arrived in
            # 64 kB bursts 5-35 ms late and the benchmark's latency measured that.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock)
            with self._lock:
                self._conns.append(conn)
                self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: _Conn) -> None:
        if not self.silent:
            conn.send(GREETING)
        buf = b""
        try:
            while not conn.closed:
                try:
                    data = conn.sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\n\n" in buf and not conn.closed:
                    block, buf = buf.split(b"\n\n", 1)
                    text = block.replace(b"\r", b"").decode("utf-8", "replace").strip("\n")
                    if not text:
                        continue
                    with self._lock:
                        self.commands.append(text)
                    if not self.silent:
                        self._command(conn, text)
        finally:
            conn.close()
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)

    def _command(self, conn: _Conn, text: str) -> None:
        first, *header_lines = text.split("\n")
        headers = parse_header_block("\n".join(header_lines).encode("utf-8"), False)
        verb, _, rest = first.partition(" ")
        if not conn.authed:
            if verb != "auth":
                conn.send(_reply("-ERR command not found"))
            elif rest == self.password:
                conn.authed = True
                with self._lock:
                    self.authenticated += 1
                conn.send(_reply("+OK accepted"))
            else:
                conn.send(_reply("-ERR invalid") + DISCONNECT_NOTICE)
                conn.close()
            return
        if verb == "event":
            self._subscribe(conn, rest)
        elif verb == "noevents":
            conn.events.clear()
            conn.send(_reply("+OK no longer listening for events"))
        elif verb == "filter":
            self._filter(conn, rest)
        elif verb == "api":
            conn.send(_api_response(self._api_body(rest)))
            self._run_hooks(first, headers, None)
        elif verb == "bgapi":
            self._bgapi_command(conn, first, rest, headers)
        elif verb == "exit":
            conn.send(_reply("+OK bye") + DISCONNECT_NOTICE)
            conn.close()
        else:
            conn.send(_reply("-ERR command not found"))

    def _subscribe(self, conn: _Conn, rest: str) -> None:
        fmt, _, names = rest.partition(" ")
        if fmt not in ("plain", "json", "xml"):
            # FreeSWITCH treats an unknown first word as an event name in plain format.
            fmt, names = "plain", rest
        first_subscription = not conn.event_format
        conn.event_format = conn.event_format or fmt
        conn.events.update(n for n in names.split() if n != "CUSTOM")
        conn.send(_reply(f"+OK event listener enabled {conn.event_format}"))
        with self._lock:
            self.subscribed += 1
        if first_subscription:
            for events, rate in self._on_subscribe:
                ReplayJob(self, events, rate, [conn])

    def _filter(self, conn: _Conn, rest: str) -> None:
        header, _, value = rest.partition(" ")
        if header == "delete":
            conn.filters = [f for f in conn.filters if f[0] != value] if value else []
            conn.send(_reply(f"+OK filter deleted. [{value}]"))
        elif not header or not value:
            conn.send(_reply("-ERR invalid syntax"))
        else:
            conn.filters.append((header, value))
            conn.send(_reply(f"+OK filter added. [{header}]=[{value}]"))

    def _api_body(self, command: str) -> bytes:
        configured = self._api.get(command)
        if configured is not None:
            return _as_bytes(configured(command)) if callable(configured) else configured
        defaults = _default_api_bodies()
        if command in defaults and not command.startswith("#"):
            return defaults[command]
        verb = command.split(" ", 1)[0]
        if command == "global_getvar core_uuid":
            return self.core_uuid.encode("ascii")
        if verb == "uuid_kill":
            return defaults["#no-such-channel"]
        if verb == "uuid_exists":
            # as FreeSWITCH: true for a channel up (the fake's listing names it)
            listing = self._api_body("show channels as json")
            return b"true" if command.partition(" ")[2].encode() in listing else b"false"
        if verb == "sofia_contact":
            return self._sofia_contact(command.partition(" ")[2])
        return f"-ERR {verb} Command not found!\n".encode("utf-8")

    def _sofia_contact(self, arg: str) -> bytes:
        # mod_sofia: [profile/]user[@domain]; the contact of a registered
        # user, else error/user_not_registered (also for unknown users):
        # the shapes of capture 97.
        user = arg.strip().rpartition("/")[2].partition("@")[0]
        if user in self.registered:
            port = 5090 + int(user[-1]) if user[-1].isdigit() else 5060
            return f"sofia/internal/sip:{user}@127.0.0.1:{port}".encode("utf-8")
        return _default_api_bodies()["#not-registered"]

    def _bgapi_result(self, command: str) -> bytes:
        for prefix, body in self._bgapi:
            if command.startswith(prefix):
                return _as_bytes(body(command)) if callable(body) else body
        if command.startswith("originate "):
            found = re.search(r"origination_uuid=([^,}\s]+)", command)
            return f"+OK {found.group(1) if found else uuid.uuid4()}\n".encode("utf-8")
        return self._api_body(command)

    def _bgapi_command(self, conn: _Conn, first: str, command: str, headers: dict[str, str]) -> None:
        job_uuid = headers.get("Job-UUID") or str(uuid.uuid4())
        conn.send(_reply(f"+OK Job-UUID: {job_uuid}", {"Job-UUID": job_uuid}))
        if self._run_hooks(first, headers, job_uuid):
            return
        verb, _, arg = command.partition(" ")
        self._sequence += 1
        now = time.time()
        event = {
            "Event-Name": "BACKGROUND_JOB",
            "Core-UUID": self.core_uuid,
            **_HOST_HEADERS,
            "Event-Date-Local": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
            "Event-Date-GMT": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)),
            "Event-Date-Timestamp": str(int(now * 1_000_000)),
            "Event-Calling-File": "mod_event_socket.c",
            "Event-Calling-Function": "api_exec",
            "Event-Calling-Line-Number": "1572",
            "Event-Sequence": str(self._sequence),
            "Job-UUID": job_uuid,
            "Job-Command": verb,
        }
        if arg:
            event["Job-Command-Arg"] = arg
        for job in events_of(event_frame(event, self._bgapi_result(command))):
            self._deliver(job, None)

    def _run_hooks(self, first: str, headers: dict[str, str], job_uuid: str | None) -> bool:
        """Run the first hook matching the command; True if it produced frames."""
        for prefix, fn, rate in self._hooks:
            if first.startswith(prefix):
                frames = fn(first, headers, job_uuid)
                if frames is None:
                    return False
                ReplayJob(self, _frames(frames), rate, None)
                return True
        return False
