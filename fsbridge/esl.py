"""The inbound Event Socket connection to FreeSWITCH.

Built on greenswitch's ``InboundESL`` (one instance per TCP connection), with
its sharp edges replaced:

* the reader receives raw bytes in large chunks and frames them with
  :class:`fsbridge.core.wire.FrameParser` (``Content-Length`` framing), and plain
  event headers are decoded per line by :func:`fsbridge.core.wire.parse_event_plain`
  -- never greenswitch's whole-block unquote, which lets a caller name with
  ``%0A`` forge headers;
* every command has a timeout; a command that gets no answer means the
  connection is dead, so it is torn down and reconnected;
* a supervisor greenlet reconnects with exponential backoff and jitter after
  refusals, timeouts, drops (with or without ``text/disconnect-notice``),
  FreeSWITCH restarts and wrong passwords (retried slowly, state
  ``auth_failed``);
* a watchdog probes with ``api status`` when no byte arrived for
  ``idle_timeout`` seconds (FreeSWITCH sends HEARTBEAT every 20 s, and
  HEARTBEAT is always subscribed for exactly this reason).

Events are handed to ``on_event(headers, body)`` in the reader greenlet, in
the order FreeSWITCH sent them.  Handlers MUST NOT block (no HTTP, no
sleeping, no ESL commands waiting for a reply -- a command's reply is read
by this very greenlet): parse, update in-memory state, hand work to a queue.
An exception from a handler is logged and the reader carries on.

Usage::

    conn = EslConnection("127.0.0.1", 8021, "ClueCon",
                         events=["CHANNEL_CREATE", ..., "BACKGROUND_JOB"],
                         on_event=handle, on_connected=reconcile)
    conn.start()
    job_uuid = conn.bgapi("originate ...", job_uuid=str(uuid.uuid4()))
    conn.stop()
"""

from __future__ import annotations

import logging
import random
import re
import time
from typing import Callable

import gevent
import gevent.event
import gevent.lock
import gevent.socket as gsocket
from greenswitch.esl import InboundESL

from fsbridge.core.wire import EventHeaders, Frame, FrameParser, ProtocolError, encode_command, parse_event_plain

log = logging.getLogger("fsbridge.esl")

# States reported by EslConnection.state (and passed to on_state).
CONNECTING = "connecting"
CONNECTED = "connected"
AUTH_FAILED = "auth_failed"
DISCONNECTED = "disconnected"
STOPPED = "stopped"

# Always subscribed: HEARTBEAT keeps bytes flowing every 20 s so the idle
# watchdog only probes a connection that really went quiet.
ALWAYS_SUBSCRIBED = ("HEARTBEAT",)

# One recv() per wake-up; large so a burst of events costs few syscalls.
# Read into one reused buffer: recv(256 kB) allocates 256 kB per call, which
# glibc maps and unmaps (mmap, mremap to the bytes read, munmap: ~23 us and
# a page fault per 4 kB touched, on every event at a low rate).
RECV_BYTES = 256 * 1024
# Longest the reader keeps the loop during a burst of events before it lets
# the other greenlets run (see receive_events): the most a request read waits
# to be stored, and the most an HTTP request or a delivery waits.
READER_SLICE_S = 0.05
# First reconnect delay (capped by max_backoff); doubles per failed attempt.
BASE_BACKOFF = 0.5
# Event names and CUSTOM subclasses as FreeSWITCH spells them
# (CHANNEL_CREATE, sofia::register, conference::maintenance).
_EVENT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_:.\-]{0,127}$")
# A Job-UUID we send ourselves: a UUID or similar plain token.
_JOB_UUID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-]{0,63}$")

EventHandler = Callable[[EventHeaders, bytes], None]


class EslError(Exception):
    """Base of every error raised by this module."""


class EslNotConnected(EslError):
    """No authenticated connection to FreeSWITCH right now (or it just died)."""


class EslTimeout(EslError):
    """FreeSWITCH did not answer in time; the connection is being replaced."""


class EslCommandError(EslError):
    """FreeSWITCH answered ``-ERR ...``; the message is FreeSWITCH's text."""


class EslAuthError(EslError):
    """FreeSWITCH rejected the Event Socket password."""


def _describe(command: str) -> str:
    """A command for logs: ``api status``, ``bgapi originate`` -- never arguments
    (``auth`` carries the password, originate a customer's number)."""
    words = command.split(" ", 2)
    if words[0] in ("api", "bgapi") and len(words) > 1:
        return f"{words[0]} {words[1]}"
    return words[0]


class _Session(InboundESL):
    """One TCP connection: greenswitch's InboundESL with our reader and send.

    greenswitch's attributes keep their meaning (``sock``, ``connected``,
    ``_commands_sent`` as the FIFO of replies awaited,
    ``_auth_request_event``); its line reader, its event queue greenlet and
    its timeout-less ``send`` are not used.
    """

    def __init__(self, host: str, port: int, password: str, connect_timeout: float,
                 on_event: EventHandler) -> None:
        super().__init__(host, port, password, timeout=connect_timeout)
        self._on_event = on_event
        self._parser = FrameParser()
        self._send_lock = gevent.lock.Semaphore()
        self.closed = gevent.event.Event()
        self.close_reason = ""
        self.last_rx = time.monotonic()
        self.core_uuid = ""
        self.sock = None
        self._exiting = False  # we said `exit`: the disconnect notice is expected
        # Called once, from whichever greenlet noticed the end, so the state
        # turns "disconnected" at once rather than when the supervisor wakes.
        self.on_close: Callable[[_Session, str], None] | None = None

    # -- connecting ---------------------------------------------------------

    def connect(self) -> None:
        """TCP connect, wait for the greeting, authenticate.

        Raises OSError/EslTimeout/EslNotConnected for network trouble and
        EslAuthError for a wrong password.
        """
        self.sock = gsocket.create_connection((self.host, self.port), timeout=self.timeout)
        # From here on the reader blocks freely; every wait has its own timeout.
        self.sock.settimeout(None)
        self.connected = True
        self._receive_events_greenlet = gevent.spawn(self.receive_events)
        if not self._auth_request_event.wait(self.timeout):
            self.close("no auth/request greeting within %.1fs" % self.timeout)
            raise EslTimeout(f"FreeSWITCH accepted the connection but sent no greeting within {self.timeout:g}s")
        if self.closed.is_set():
            raise EslNotConnected(f"connection closed before authentication: {self.close_reason}")

    def authenticate(self, timeout: float | None = None) -> None:  # type: ignore[override]
        try:
            self.command(f"auth {self.password}", timeout=timeout if timeout is not None else self.timeout)
        except EslCommandError as exc:
            self.close("authentication rejected")
            raise EslAuthError(str(exc)) from None

    # -- reading ------------------------------------------------------------

    def receive_events(self) -> None:
        """The reader: raw recv -> FrameParser -> dispatch, until the socket ends."""
        sock = self.sock
        feed = self._parser.feed
        buffer = memoryview(bytearray(RECV_BYTES))
        reason = "FreeSWITCH closed the connection"
        slice_start = time.monotonic()
        try:
            while True:
                size = sock.recv_into(buffer)
                if not size:
                    break
                self.last_rx = time.monotonic()
                for frame in feed(buffer[:size]):  # copied by the parser
                    self.handle_event(frame)
                    if self.closed.is_set():
                        return
                    # gevent's recv returns at once while data is waiting:
                    # without a yield, a burst would keep every other greenlet
                    # (the flusher that stores the PlanFix requests read,
                    # delivery, the HTTP endpoints) waiting until FreeSWITCH
                    # pauses.  Every READER_SLICE_S, not every read or event:
                    # reading keeps most of the core while a burst lasts, and
                    # one commit takes many events.
                    now = time.monotonic()
                    if now - slice_start >= READER_SLICE_S:
                        gevent.sleep(0)
                        if self.closed.is_set():
                            return
                        slice_start = time.monotonic()
        except ProtocolError as exc:
            log.error("ESL protocol error from FreeSWITCH, dropping the connection: %s", exc)
            reason = f"protocol error: {exc}"
        except OSError as exc:
            reason = f"socket error: {exc}"
        except gevent.GreenletExit:
            reason = "reader stopped"
        self.close(reason)

    def handle_event(self, frame: Frame) -> None:  # type: ignore[override]
        content_type = frame.content_type
        if content_type == "text/event-plain":
            headers, body = parse_event_plain(frame.body)
            if not self.core_uuid:
                self.core_uuid = headers.get("Core-UUID", "") or ""
            try:
                self._on_event(headers, body)
            except Exception:  # a handler bug must not stop event intake
                log.exception("ESL event handler failed on %s", headers.get("Event-Name"))
        elif content_type in ("command/reply", "api/response"):
            if not self._commands_sent:
                log.warning("ESL reply nobody waited for, ignored: %s", content_type)
                return
            self._commands_sent.pop(0).set(frame)
        elif content_type == "auth/request":
            self._auth_request_event.set()
        elif content_type == "text/disconnect-notice":
            if frame.headers.get("Content-Disposition") == "linger":
                return  # outbound sockets only; harmless here
            if not self._exiting:
                log.warning("FreeSWITCH sent a disconnect notice")
            self.close("FreeSWITCH sent a disconnect notice")
        elif content_type == "text/rude-rejection":
            log.error("FreeSWITCH rejected the connection (ACL?): %s",
                      frame.body.decode("utf-8", "replace").strip())
            self.close("rude rejection (check event_socket.conf.xml apply-inbound-acl)")
        else:
            log.debug("ignoring ESL frame of type %r", content_type)

    # -- writing ------------------------------------------------------------

    def command(self, command: str, headers: dict[str, str] | None = None,
                timeout: float = 5.0) -> Frame:
        """Send one command and wait for its reply (FIFO, as ESL answers).

        ``-ERR`` in ``Reply-Text`` or at the start of an api body raises
        EslCommandError; no reply within ``timeout`` closes this connection
        and raises EslTimeout.
        """
        data = encode_command(command, headers)  # refuses CR/LF before anything is sent
        if not self.connected or self.closed.is_set():
            raise EslNotConnected("not connected to FreeSWITCH")
        pending = gevent.event.AsyncResult()
        # One deadline covers the lock, the send (a FreeSWITCH that stopped
        # reading fills the socket buffer) and the reply.
        deadline = gevent.Timeout(timeout)
        deadline.start()
        try:
            # Appending and sending under one lock keeps the FIFO in wire order.
            with self._send_lock:
                self._commands_sent.append(pending)
                self.sock.sendall(data)
            frame: Frame = pending.get()
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            what = _describe(command)
            self.close(f"no reply to {what!r} within {timeout:g}s")
            raise EslTimeout(f"FreeSWITCH did not answer {what!r} within {timeout:g}s") from None
        except OSError as exc:
            self.close(f"send failed: {exc}")
            raise EslNotConnected(f"connection lost while sending: {exc}") from None
        finally:
            deadline.close()
        if frame.content_type == "api/response":
            if frame.body.startswith((b"-ERR", b"-USAGE")):
                raise EslCommandError(frame.body.decode("utf-8", "replace").strip())
        else:
            reply = frame.headers.get("Reply-Text", "")
            if reply.startswith("-ERR"):
                raise EslCommandError(reply)
        return frame

    def send(self, data: str):  # type: ignore[override]
        """greenswitch's entry point, kept working but with a timeout."""
        return self.command(data, timeout=self.timeout)

    # -- closing ------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Drop the connection; every waiting command gets EslNotConnected."""
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.connected = False
        self._run = False
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(gsocket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        waiting, self._commands_sent = self._commands_sent, []
        for pending in waiting:
            pending.set_exception(EslNotConnected(f"connection lost: {reason}"))
        self._auth_request_event.set()  # wakes connect() if still waiting
        self.closed.set()
        if self.on_close is not None:
            self.on_close(self, reason)

    def stop(self) -> None:  # type: ignore[override]
        """Say ``exit`` if possible, then close."""
        if self.connected and not self.closed.is_set():
            self._exiting = True
            try:
                self.command("exit", timeout=min(self.timeout, 1.0))
            except EslError:
                pass
        self.close("stopped")


class EslConnection:
    """A supervised inbound ESL connection that always comes back.

    ``events`` are the plain event names to subscribe (CUSTOM subclasses as
    extra names after ``CUSTOM``); HEARTBEAT is added if missing.  The
    caller includes BACKGROUND_JOB if it uses bgapi results.

    Callbacks, all called from this connection's greenlets and all required
    to return quickly:

    * ``on_event(headers, body)`` for each ``text/event-plain`` frame;
    * ``on_state(state, detail)`` whenever ``state`` changes;
    * ``on_connected(core_uuid)`` after auth and subscription succeeded on a
      new connection (``core_uuid`` may be ``""`` if FreeSWITCH did not say);
      a changed value means FreeSWITCH restarted.  It runs in the supervisor
      greenlet, not the reader, so it may call :meth:`api` (e.g. ``show
      calls as json`` to reconcile open calls); the idle watchdog waits
      meanwhile.  Events subscribed to may already have reached
      ``on_event`` before it is called.
    """

    def __init__(
        self,
        host: str,
        port: int,
        password: str,
        events: list[str],
        on_event: EventHandler,
        on_state: Callable[[str, str], None] | None = None,
        on_connected: Callable[[str], None] | None = None,
        connect_timeout: float = 5.0,
        command_timeout: float = 5.0,
        max_backoff: float = 30.0,
        idle_timeout: float = 60.0,
    ) -> None:
        names = list(events)
        for name in names:
            if not isinstance(name, str) or not _EVENT_NAME.match(name):
                raise ValueError(f"invalid ESL event name: {name!r}")
        for name in ALWAYS_SUBSCRIBED:
            if name not in names and "ALL" not in names:
                names.insert(0, name)
        for label, value in (("connect_timeout", connect_timeout), ("command_timeout", command_timeout),
                             ("max_backoff", max_backoff), ("idle_timeout", idle_timeout)):
            if not value > 0:
                raise ValueError(f"{label} must be > 0, got {value!r}")
        self.host = host
        self.port = port
        self.password = password
        self.events: tuple[str, ...] = tuple(names)
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.max_backoff = max_backoff
        self.idle_timeout = idle_timeout
        self._on_event = on_event
        self._on_state = on_state
        self._on_connected = on_connected
        self._state = DISCONNECTED
        self._detail = "not started"
        self._session: _Session | None = None
        self._supervisor: gevent.Greenlet | None = None
        self._stopping = gevent.event.Event()
        self._core_uuid = ""
        self.connections = 0  # successful connections so far (for health and tests)

    # -- public surface -----------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def detail(self) -> str:
        """Why the connection is in its state (last error, for logs and /healthz)."""
        return self._detail

    @property
    def core_uuid(self) -> str:
        """Core-UUID of the FreeSWITCH last connected to ("" if unknown)."""
        session = self._session
        if session is not None and session.core_uuid:
            return session.core_uuid
        return self._core_uuid

    @property
    def connected(self) -> bool:
        return self._state == CONNECTED

    def health(self) -> dict[str, object]:
        """For /healthz: state, why, Core-UUID and connection count (no password)."""
        return {
            "state": self._state,
            "detail": self._detail,
            "core_uuid": self.core_uuid,
            "connections": self.connections,
        }

    def start(self) -> None:
        if self._supervisor is not None:
            raise RuntimeError("EslConnection already started")
        self._stopping.clear()
        self._supervisor = gevent.spawn(self._supervise)

    def stop(self, timeout: float = 2.0) -> None:
        """Close cleanly (``exit``) and stop reconnecting."""
        self._stopping.set()
        session = self._session
        if session is not None:
            session.stop()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and supervisor is not gevent.getcurrent():
            # Wherever it waits (connect, greeting, backoff, watchdog), a kill
            # ends it at once; _open closes a half-made connection on the way out.
            supervisor.kill(block=True, timeout=timeout)
        self._set_state(STOPPED, "stopped")

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block the calling greenlet until connected (True) or timeout (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.connected:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            gevent.sleep(0.01)
        return True

    def api(self, command: str, timeout: float | None = None) -> str:
        """Run ``api <command>`` and return the response body.

        Raises EslNotConnected, EslTimeout (connection then replaced),
        EslCommandError for a ``-ERR`` answer, ValueError for a line break
        in ``command``.
        """
        frame = self._live_session(command).command(f"api {command}", timeout=self._timeout(timeout))
        return frame.body.decode("utf-8", "replace")

    def bgapi(self, command: str, job_uuid: str | None = None, timeout: float | None = None) -> str:
        """Run ``bgapi <command>`` and return its Job-UUID.

        With ``job_uuid`` the UUID is chosen by us (sent as a ``Job-UUID:``
        header line), so BACKGROUND_JOB can be matched even if it arrives
        before this call returns.  The result comes later as a
        BACKGROUND_JOB event to ``on_event``.
        """
        headers = None
        if job_uuid is not None:
            if not _JOB_UUID.match(job_uuid):
                raise ValueError(f"invalid Job-UUID {job_uuid!r}")
            headers = {"Job-UUID": job_uuid}
        encode_command(f"bgapi {command}", headers)  # validate before checking the connection
        frame = self._live_session(command).command(f"bgapi {command}", headers, timeout=self._timeout(timeout))
        answered = frame.headers.get("Job-UUID")
        if not answered:
            reply = frame.headers.get("Reply-Text", "")
            answered = reply.rsplit(" ", 1)[-1] if reply.startswith("+OK Job-UUID:") else ""
        if not answered:
            raise EslCommandError(f"bgapi reply without Job-UUID: {frame.headers.get('Reply-Text', '')!r}")
        return answered

    # -- internals ----------------------------------------------------------

    def _timeout(self, timeout: float | None) -> float:
        return self.command_timeout if timeout is None else timeout

    def _live_session(self, command: str) -> _Session:
        encode_command(command)  # a line break is a caller bug whatever the connection state
        session = self._session
        if session is None or self._state != CONNECTED or session.closed.is_set():
            raise EslNotConnected(f"not connected to FreeSWITCH ({self._state}: {self._detail})")
        return session

    def _set_state(self, state: str, detail: str) -> None:
        self._detail = detail
        if state == self._state:
            return
        self._state = state
        if self._on_state is not None:
            try:
                self._on_state(state, detail)
            except Exception:
                log.exception("ESL on_state callback failed")

    def _backoff(self, attempt: int, slow: bool) -> float:
        """Exponential backoff with jitter; a wrong password waits the maximum."""
        ceiling = self.max_backoff if slow else min(self.max_backoff, BASE_BACKOFF * (2 ** min(attempt, 30)))
        # Equal jitter: never zero (no hammering), never in lockstep with other clients.
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _supervise(self) -> None:
        attempt = 0
        where = f"{self.host}:{self.port}"
        while not self._stopping.is_set():
            if self._state != AUTH_FAILED:
                self._set_state(CONNECTING, f"connecting to {where}")
            slow = False
            try:
                session = self._open(where)
            except EslAuthError as exc:
                slow = True
                log.error("FreeSWITCH at %s rejected the ESL password (%s): check [freeswitch] password "
                          "and event_socket.conf.xml; retrying slowly", where, exc)
                self._set_state(AUTH_FAILED, "wrong ESL password")
            except (OSError, EslError) as exc:
                detail = f"cannot connect to FreeSWITCH at {where}: {exc}"
                log.warning("%s; waiting for FreeSWITCH", detail)
                self._set_state(DISCONNECTED, detail)
            else:
                attempt = 0
                self._watch(session)
                if self._stopping.is_set():
                    break
                detail = f"connection to {where} lost: {session.close_reason}"
                log.warning("%s; reconnecting", detail)
                self._set_state(DISCONNECTED, detail)
            delay = self._backoff(attempt, slow)
            attempt += 1
            if self._stopping.wait(delay):
                break

    def _open(self, where: str) -> _Session:
        session = _Session(self.host, self.port, self.password, self.connect_timeout, self._on_event)
        try:
            session.connect()
            session.authenticate(self.command_timeout)
            session.command("event plain " + " ".join(self.events), timeout=self.command_timeout)
            try:
                # Core-UUID changes when FreeSWITCH restarts; the greeting
                # does not carry it, the core variable does.
                session.core_uuid = session.command("api global_getvar core_uuid",
                                                    timeout=self.command_timeout).body.decode(
                    "utf-8", "replace").strip()
            except EslCommandError:
                pass  # unknown here: learnt from the first event instead
        except BaseException:
            session.close("set-up failed")
            raise
        if self._stopping.is_set():
            session.stop()
            raise EslNotConnected("stopping")
        self._session = session
        session.on_close = self._session_closed
        if session.core_uuid:
            if self._core_uuid and session.core_uuid != self._core_uuid:
                log.warning("FreeSWITCH restarted (Core-UUID %s -> %s)", self._core_uuid, session.core_uuid)
            self._core_uuid = session.core_uuid
        self.connections += 1
        log.info("connected to FreeSWITCH at %s (Core-UUID %s), events: %s",
                 where, session.core_uuid or "unknown", " ".join(self.events))
        self._set_state(CONNECTED, f"connected to {where}")
        if self._on_connected is not None:
            try:
                self._on_connected(session.core_uuid)
            except Exception:
                log.exception("ESL on_connected callback failed")
        return session

    def _session_closed(self, session: _Session, reason: str) -> None:
        if session is self._session and not self._stopping.is_set():
            self._set_state(DISCONNECTED, f"connection lost: {reason}")

    def _watch(self, session: _Session) -> None:
        """Wait until the connection ends; probe it when it has gone quiet."""
        interval = min(self.idle_timeout / 4, 1.0)
        while not session.closed.wait(interval):
            if self._stopping.is_set():
                return
            if time.monotonic() - session.last_rx < self.idle_timeout:
                continue
            log.info("no data from FreeSWITCH for %.1fs, probing with 'api status'", self.idle_timeout)
            try:
                session.command("api status", timeout=self.command_timeout)
            except EslCommandError:
                pass  # an answer, even -ERR, proves the connection is alive
            except EslError as exc:
                log.warning("FreeSWITCH did not answer the probe: %s", exc)
                session.close(f"idle probe failed: {exc}")
