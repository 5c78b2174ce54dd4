"""Logging an admin can read: format, per-logger levels, floods summarised, hints.

``setup(log_cfg, config_path)`` installs one handler on standard error:

* ``[log] format = text`` (``TIME LEVEL logger: message``) or ``json``
  (one object a line: ``time``, ``level``, ``logger``, ``message``,
  ``exc``).  Under journald (``JOURNAL_STREAM`` set, as systemd does) no
  time is written: journald stamps every line itself.
* ``[log] level`` for everything, ``[log] levels = fsbridge.esl=debug,
  fsbridge.web=warning`` per logger (``parse_levels``).
* :class:`RepeatFilter`: an identical message (same logger, level and text)
  is written the first time, then at most once per ``window`` seconds as
  ``... (repeated N times in the last M s)``; what is still pending is
  written at exit.  FreeSWITCH down for an hour (a retry every 15-30 s) writes
  13 lines instead of 160, a flood of wrong tokens or malformed requests
  likewise.  DEBUG is never summarised (asked for, so shown in full).
* :class:`HintFilter`: appends what to check to messages an admin cannot
  act on alone ("Connection refused" -> is mod_event_socket loaded? which
  [freeswitch] host/port in which file).
* ``refused(address, cmd, status, reason)``: the one line for every refused
  PlanFix request (makeCall, setup, wrong token) with its reason, also
  counted in the metrics.

``reload(log_cfg)`` re-applies the levels (SIGHUP).
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import re
import sys
import time
from typing import Any, Callable

from fsbridge import metrics

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_WINDOW = 300.0  # seconds between two summaries of one message
MAX_TRACKED = 1000  # distinct messages remembered (oldest forgotten first)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"

# Refusals are the HTTP endpoint's news: [log] levels = fsbridge.web=... governs them.
web_log = logging.getLogger("fsbridge.web")
_handler: logging.Handler | None = None
_configured_loggers: set[str] = set()


def parse_levels(raw: str) -> dict[str, str]:
    """``fsbridge.esl=debug, fsbridge.web=warning`` -> {logger: LEVEL}; ValueError if malformed."""
    levels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, level = (s.strip() for s in item.partition("="))
        if not sep or not re.fullmatch(r"[A-Za-z_][\w.]*", name):
            raise ValueError(f"expected LOGGER=LEVEL items separated by commas, got {item!r}")
        if level.upper() not in LEVELS:
            raise ValueError(f"{name}: level must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
        levels[name] = level.upper()
    return levels


class RepeatFilter(logging.Filter):
    """Let an identical message through once per ``window`` seconds, with a count of the rest."""

    def __init__(self, window: float = DEFAULT_WINDOW, clock: Callable[[], float] = time.monotonic,
                 max_tracked: int = MAX_TRACKED) -> None:
        super().__init__()
        self.window = window
        self.clock = clock
        self.max_tracked = max_tracked
        # key -> [window start, suppressed count, last suppressed record]
        self._seen: collections.OrderedDict[tuple, list] = collections.OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO or getattr(record, "_summary", False):
            return True
        key = (record.name, record.levelno, record.getMessage())
        now = self.clock()
        state = self._seen.get(key)
        if state is None:
            self._seen[key] = [now, 0, None]
            if len(self._seen) > self.max_tracked:
                self._seen.popitem(last=False)
            return True
        self._seen.move_to_end(key)
        started, suppressed, _ = state
        if now - started < self.window:
            state[1] += 1
            state[2] = record
            return False
        if suppressed:
            _add_summary(record, suppressed, now - started)
        state[:] = [now, 0, None]
        return True

    def pending(self) -> list[logging.LogRecord]:
        """Summaries of what was held back and not yet reported (written at exit)."""
        out = []
        now = self.clock()
        for state in self._seen.values():
            started, suppressed, record = state
            if suppressed and record is not None:
                _add_summary(record, suppressed, now - started)
                record._summary = True  # type: ignore[attr-defined]
                out.append(record)
                state[:] = [now, 0, None]
        return out


def _add_summary(record: logging.LogRecord, count: int, seconds: float) -> None:
    record.msg = f"{record.getMessage()} (repeated {count} times in the last {seconds:.0f} s)"
    record.args = None


# (pattern in the message, hint) -- {config} is the config file's path.
HINTS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"cannot connect to FreeSWITCH at .*(refused|timed out|No route|unreachable)", re.I),
     "is FreeSWITCH running and mod_event_socket loaded? see [freeswitch] host/port in {config}"),
    (re.compile(r"rejected the ESL password"),
     "the password is in event_socket.conf.xml and [freeswitch] password in {config}"),
    (re.compile(r"PlanFix .*(401|Invalid token)", re.I),
     "PlanFix's key changed? switch the integration off and on in PlanFix (it sends setup again)"),
]


class HintFilter(logging.Filter):
    def __init__(self, config_path: str) -> None:
        super().__init__()
        self.config_path = config_path

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            message = record.getMessage()
            for pattern, hint in HINTS:
                if pattern.search(message):
                    record.msg = f"{message} ({hint.format(config=self.config_path)})"
                    record.args = None
                    break
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, with_time: bool = True) -> None:
        super().__init__()
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {}
        if self.with_time:
            body["time"] = self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}"
        body.update(level=record.levelname, logger=record.name, message=record.getMessage())
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False)


def under_journald(environ: dict[str, str] | None = None) -> bool:
    return bool((os.environ if environ is None else environ).get("JOURNAL_STREAM"))


def make_handler(fmt: str = "text", config_path: str = "", stream=None, environ=None,
                 repeat: RepeatFilter | None = None) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    journald = under_journald(environ)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(with_time=not journald))
    else:
        handler.setFormatter(logging.Formatter(JOURNAL_FORMAT if journald else TEXT_FORMAT))
    # hints first: the summary then carries the hint too
    handler.addFilter(HintFilter(config_path))
    handler.addFilter(repeat or RepeatFilter())
    return handler


def apply_levels(level: str, levels: dict[str, str]) -> None:
    logging.getLogger().setLevel(getattr(logging, level))
    for name in _configured_loggers - set(levels):
        logging.getLogger(name).setLevel(logging.NOTSET)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(getattr(logging, value))
    _configured_loggers.clear()
    _configured_loggers.update(levels)


def setup(log_cfg: Any, config_path: str = "") -> logging.Handler:
    """Install the handler on the root logger from a ``[log]`` section (level, format, levels)."""
    global _handler
    root = logging.getLogger()
    first = _handler is None
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = make_handler(getattr(log_cfg, "format", "text"), config_path)
    root.addHandler(_handler)
    apply_levels(log_cfg.level, getattr(log_cfg, "levels", {}) or {})
    if first:  # a SIGHUP reload installs a new handler; flush() writes whichever is current
        atexit.register(flush)
    return _handler


def reload(log_cfg: Any) -> None:
    apply_levels(log_cfg.level, getattr(log_cfg, "levels", {}) or {})


def flush() -> None:
    """Write the summaries still held back (at exit)."""
    if _handler is None:
        return
    for f in _handler.filters:
        if isinstance(f, RepeatFilter):
            for record in f.pending():
                _handler.handle(record)


def refused(address: str | None, cmd: str | None, status: int, reason: str) -> None:
    """One PlanFix request refused (400/401/413/429...): logged with why, counted."""
    shown = cmd if cmd in ("makeCall", "setup") else "request"
    web_log.warning("%s from %s refused with %d: %s", shown, address, status, reason)
    if cmd == "makeCall":
        metrics.CLICK_TO_CALL.labels(outcome="refused", reason=metrics.refusal_reason(status)).inc()
