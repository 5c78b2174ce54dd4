"""Durable outbox: every `event`/`record` for PlanFix goes through SQLite first.

Guarantees
- `put()` returns only after the commands are committed (one transaction per
  batch).  A row leaves the table only after PlanFix answered 200.
- Per-call order: a call's next command is sent only after the previous one
  was delivered or kept aside.  Different calls go out in parallel, up to
  an adaptive limit (`fsbridge.core.limiter`): from `concurrency` it grows while
  PlanFix answers and every slot is busy, up to `max_concurrency`, and halves
  on 429/5xx/timeouts/connection errors.
- Failures (5xx, timeouts, connection errors, 401, not configured yet) are
  retried with capped exponential backoff and jitter.  A command still
  undeliverable `max_age_s` after it was queued is *kept aside* with its last
  error (after at least one attempt), never dropped.  A 400 is kept aside at
  once with PlanFix's reply: resending the same request cannot help.
- Outage: after OUTAGE_AFTER_FAILURES failures in a row (no 200 or 400
  between), PlanFix is probed with one call at a time, the probes backing
  off from min_backoff_s to OUTAGE_PROBE_MAX_S; every other call waits until
  a probe is answered (then all are retried at once) or wake().  Without it
  every pending call retries on its own schedule, and a long outage's
  backlog (pending / ~225 s attempts a second, all of them after a restart)
  takes up to a core: the other tenants of the process wait (`make bench`).
- Kept aside does not block the call: its next command is sent.  PlanFix
  rejecting, say, an INCOMING (a bad phone) must not leave the call's
  COMPLETED stuck forever; the later command is judged on its own.  The
  price: after `retry_kept_aside()` the old command arrives after its
  successors (the only case where per-call order can be broken, by the
  operator's choice).
- Restart: all pending rows are loaded in id order and resumed, once.

Duplicates: delivered rows are deleted in batches: with the next put()'s
commit, or DELETE_BATCH_S (50 ms) after the first of them when nothing is
put meanwhile, so the window is the time between PlanFix sending 200 and
that commit, at most ~50 ms: a crash exactly there resends those commands.  The PlanFix client may also resend a request whose
kept-alive connection closed under it (see `fsbridge.planfix`).  PlanFix
events are idempotent enough for that (same callid/event).  Nothing can
close that window completely without PlanFix supporting idempotency keys.

Durability: WAL with synchronous=NORMAL.  A commit is in the WAL (OS page
cache) before `put()` returns, which survives a process crash or kill -9 —
the failure this outbox is about.  Only a power loss / kernel crash can lose
the last commits; paying an fsync per batch (FULL) would cap throughput for
that rarer case.  WAL also lets `fsbridge outbox` read and requeue from a
second process while the service runs.  Copying the WAL back into the
database (a checkpoint, with its fsyncs) runs in a native thread, not in a
put()'s COMMIT (`fsbridge.sqlitedb.WalCheckpointer`).

Memory: only the ids of pending rows are held, of MEMORY_WINDOW_CALLS calls
at most (about 0.1 kB a row); a row's fields, age and attempts are read when
it is sent.  A backlog beyond that window (an outage of hours) stays on
disk only: from the first row that did not fit, every row is left there and
read back in id order as the calls in memory are delivered, so per-call
order holds and memory does not grow with the backlog.  The exception,
bounded: up to FRESH_ROWS rows this process stored keep their fields until
their first attempt, which then needs no SELECT (at a steady rate, every
row; a row stored while that many wait is read back like the others).

Threading: the service is gevent; all in-memory state is touched by
greenlets between yields, and the one SQLite connection is guarded by a lock
so the class also works from plain threads (tests, CLI).
"""

from __future__ import annotations

import collections
import heapq
import json
import logging
import os
import random
import sqlite3
import threading
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import gevent
import gevent.event
import gevent.pool

from fsbridge import calls, metrics, opencalls
from fsbridge.later import Later
from fsbridge.core.limiter import AdaptiveLimit
from fsbridge.sqlitedb import WalCheckpointer, open_private
from fsbridge.planfix import DeliveryResult, Outcome, PlanfixClient

log = logging.getLogger(__name__)

OUTBOX_FILENAME = "outbox.sqlite3"
# 2: the open-calls registry's table (fsbridge.opencalls) joined the outbox.
SCHEMA_VERSION = 2
# How often a running outbox looks whether another process (the CLI's
# `--retry`) changed the database: a cheap `PRAGMA data_version` read.
RESCAN_INTERVAL_S = 2.0
BUSY_TIMEOUT_MS = 5000
# After an outage, the first 200 retries every call in backoff at once instead
# of leaving them to wait up to max_backoff; at most this often, so one
# request PlanFix keeps failing on cannot be hammered by others' successes.
RECOVERY_WAKE_INTERVAL_S = 5.0
# PlanFix failing this many requests in a row is down: probed, not stormed
# (see "Outage").  Above the initial in-flight limit, so that the requests
# in flight when one PlanFix answer fails do not count as an outage.
OUTAGE_AFTER_FAILURES = 20
# Longest wait between two probes: PlanFix back is noticed within this.
OUTAGE_PROBE_MAX_S = 30.0
# Delivered rows are deleted together, this long after the first of them:
# one commit for every ~30 requests at 600 requests/s instead of one each.
# A crash in between resends those (see "Duplicates").
DELETE_BATCH_S = 0.05
# Workers with no call left wait this long for the dispatcher's next one,
# at most PARKED_WORKERS of them: at a low rate every request would
# otherwise start a greenlet, whose frame stack CPython 3.11 maps, faults
# in and unmaps each time (see fsbridge.later).
PARKED_WORKERS = 16
PARKED_IDLE_S = 30.0
# Rows just stored keep their fields in memory, this many per outbox at
# most, so that sending them needs no SELECT: at a steady rate every row
# is sent from here.  Bounded in count (~1 kB each): a backlog beyond it is
# read from disk as before (see "Memory").
FRESH_ROWS = 256
# Calls whose pending ids are held in memory (~0.3 kB each); the rest of a
# backlog waits on disk (see "Memory").  Far above max_in_flight: the
# dispatcher always has calls to send.
MEMORY_WINDOW_CALLS = 10_000
# While rows wait on disk, how often the window is topped up once it is
# below half full.
REFILL_INTERVAL_S = 0.2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,  -- global order; per-call order = id order
    call_id       TEXT NOT NULL,
    fields        TEXT NOT NULL,      -- JSON object of form fields, without planfix_token
    created_at    REAL NOT NULL,      -- unix time it was queued
    age_from      REAL NOT NULL,      -- unix time max_age counts from (reset by retry_kept_aside)
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    kept_aside_at REAL,               -- NULL while pending
    kept_reason   TEXT,               -- 'rejected' (400) or 'max_age'
    reply         TEXT                -- PlanFix's reply when rejected
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(kept_aside_at, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
""" + opencalls.SCHEMA


# A row's fields as stored: compact UTF-8 JSON.  One encoder for all: json.dumps
# with options builds a new one per call.
_to_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class _Backoff(Exception):
    """The row to send could not be read: the call backs off."""


class OutboxError(Exception):
    """The outbox database cannot take the commands (disk full, I/O error, corrupt file)."""


class Command(Protocol):
    call_id: str
    fields: dict[str, str]


def db_path_for(storage_dir: str) -> str:
    return os.path.join(storage_dir, OUTBOX_FILENAME)


@dataclass(slots=True)
class _Attempt:
    """One pending row as read from the database when it is sent."""

    id: int
    fields: dict[str, str]
    age_from: float
    attempts: int
    last_error: str = ""
    text: str = ""  # the fields as stored (JSON): what the sent log keeps


def _ids() -> array:
    return array("q")


@dataclass(slots=True)
class _CallQueue:
    call_id: str
    # Pending row ids in id order, unboxed: a call's three ids cost 96 bytes
    # in two allocations, against 188 in five as a list of ints (a deque
    # would be ~600).  A backlog of 100,000 calls is that many of these.
    entries: array = field(default_factory=_ids)
    # idle: waiting for nothing (in `ready` or about to be); active: a worker
    # owns it; waiting: in backoff until `due` (monotonic).
    state: str = "idle"
    due: float = 0.0
    in_flight: bool = False  # entries[0] is being sent


@dataclass(frozen=True)
class OutboxEntry:
    """One row as `fsbridge outbox` shows it."""

    id: int
    call_id: str
    fields: dict[str, str]
    created_at: float
    attempts: int
    last_error: str | None
    kept_aside_at: float | None
    kept_reason: str | None
    reply: str | None

    @property
    def kept_aside(self) -> bool:
        return self.kept_aside_at is not None


def _connect(db_path: str) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so one put() is
    # exactly one transaction.
    conn = open_private(db_path, "NORMAL", BUSY_TIMEOUT_MS / 1000)  # NORMAL: see the module docstring
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        conn.close()
        raise OutboxError(f"outbox {db_path}: schema version {version} is newer than this fsbridge ({SCHEMA_VERSION})")
    if version < SCHEMA_VERSION:  # a current file is only read: the CLI must not contend for writes
        conn.executescript(_SCHEMA)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    return conn


def _open(db_path: str) -> sqlite3.Connection:
    try:
        return _connect(db_path)
    except (sqlite3.Error, OSError) as exc:
        raise OutboxError(f"outbox database {db_path}: {exc}") from exc


class Outbox:
    def __init__(
        self,
        db_path: str,
        client: PlanfixClient | Any,
        concurrency: int = 16,
        max_age_s: float = 7 * 86400,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 300.0,
        rescan_interval_s: float = RESCAN_INTERVAL_S,
        max_concurrency: int | None = None,
        name: str = "default",
    ):
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if max_concurrency is not None and max_concurrency < concurrency:
            raise ValueError("max_concurrency must be >= concurrency")
        if not 0 < min_backoff_s <= max_backoff_s:
            raise ValueError("need 0 < min_backoff_s <= max_backoff_s")
        self.db_path = db_path
        self.name = name  # the tenant (PlanFix account) it delivers to: a metrics label
        self.client = client
        self.concurrency = concurrency
        # One limit per PlanFix account: each tenant has its own outbox.
        self.limiter = AdaptiveLimit(concurrency, max_concurrency or concurrency)
        self.max_age_s = max_age_s
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.rescan_interval_s = rescan_interval_s
        self._db_lock = threading.RLock()
        self._conn = _open(db_path)
        # WAL checkpoints (two fsyncs) in a native thread, not inside a put()'s COMMIT.
        self._checkpointer = WalCheckpointer(self._conn, db_path)
        self._calls: dict[str, _CallQueue] = {}
        self._ready: collections.deque[str] = collections.deque()
        self._delayed: list[tuple[float, str]] = []  # heap of (due, call_id)
        self._undeleted: set[int] = set()  # delivered, DELETE not committed yet (batched, or it failed)
        # Row id -> (fields, text, age_from) of rows stored by this process and not sent yet.
        self._fresh: dict[int, tuple[dict[str, str], str, float]] = {}
        # Idle workers, each waiting for the call the dispatcher hands it.
        self._parked: list[gevent.event.AsyncResult] = []
        self._deleter = Later(self._flush_delivered, DELETE_BATCH_S)
        self._depth = 0
        self.window_calls = MEMORY_WINDOW_CALLS
        # The first pending row left on disk (None: all are in memory); every
        # pending row from there on is on disk only, _spilled of them.
        self._spill_from: int | None = None
        self._spilled = 0
        self._refiller: gevent.Greenlet | None = None
        self._kept_aside = 0
        self._last_success_at: float | None = None
        self._last_error = ""
        self._storage_error = ""
        self._kick = gevent.event.Event()
        self._workers = gevent.pool.Group()  # for stop(): join/kill
        # Counted by hand: a finished greenlet leaves the Group only in a later
        # hub callback, so len(Group) lags and would stall the dispatcher.
        self._active = 0
        self._dispatcher: gevent.Greenlet | None = None
        self._stopping = False
        self._data_version = 0
        self._failed_since_success = False
        self._next_recovery_wake = 0.0
        # Outage (see the module docstring): failures in a row; while probing,
        # when the next probe may start (inf: one is in flight) and its call.
        self._failures_in_row = 0
        self._probe_at: float | None = None
        self._probe_call: str | None = None
        self._probe_failures = 0
        self._load()

    # ---- database helpers --------------------------------------------
    def _write(self, sql: str, params: Iterable[Any] = ()) -> None:
        with self._db_lock:
            self._conn.execute(sql, tuple(params))

    def _load(self) -> None:
        """What is pending, in id order, into the in-memory index (start-up and
        rescans), up to the window; rows from _spill_from on are _refill's."""
        added = 0
        with self._db_lock:
            # Iterated, not fetched: a restart after a long outage has a backlog of ~100,000.
            for row_id, call_id in self._conn.execute(
                "SELECT id, call_id FROM outbox WHERE kept_aside_at IS NULL AND id < ? ORDER BY id",
                (self._spill_from if self._spill_from is not None else 1 << 62,),
            ):
                known = self._calls.get(call_id)
                # A call's list is short: no set of every pending id (~60 bytes each) is kept.
                if (known is not None and row_id in known.entries) or row_id in self._undeleted:
                    continue
                if known is None and len(self._calls) >= self.window_calls and self._spill_from is None:
                    # The rest of the backlog stays on disk.
                    self._spill_at(row_id, self._conn.execute(
                        "SELECT COUNT(*) FROM outbox WHERE kept_aside_at IS NULL AND id >= ?", (row_id,)).fetchone()[0])
                    break
                self._index(call_id, row_id, in_order=True)
                added += 1
            self._kept_aside = self._conn.execute("SELECT COUNT(*) FROM outbox WHERE kept_aside_at IS NOT NULL").fetchone()[0]
            last = self._conn.execute("SELECT value FROM meta WHERE key='last_success_at'").fetchone()
            self._data_version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if last and self._last_success_at is None:
            self._last_success_at = float(last[0])
        if added:
            log.info("outbox: %d pending command(s) loaded from %s", added, self.db_path)
            self._kick.set()

    def _spill_at(self, row_id: int, count: int) -> None:
        """From row_id on, the ``count`` pending rows stay on disk."""
        self._spill_from = row_id
        self._spilled = count
        log.info("outbox %s: %d calls in memory; the rest of the backlog (%d commands) is read from disk "
                 "as they are delivered", self.name, len(self._calls), self._spilled)
        if self._refiller is None:
            self._refiller = gevent.spawn(self._refill_loop)

    def _refill_loop(self) -> None:
        try:
            while self._spill_from is not None and not self._stopping:
                gevent.sleep(REFILL_INTERVAL_S)
                if len(self._calls) < self.window_calls // 2:
                    try:
                        self._refill()
                    except sqlite3.Error as exc:  # the rows stay on disk; tried again next time
                        log.warning("outbox: reading the backlog from %s: %s", self.db_path, exc)
        finally:
            self._refiller = None

    def _refill(self) -> None:
        """The next rows left on disk, in id order, until the window is full again."""
        added = 0
        with self._db_lock:
            rows = self._conn.execute(
                "SELECT id, call_id FROM outbox WHERE kept_aside_at IS NULL AND id >= ? ORDER BY id LIMIT ?",
                (self._spill_from, self.window_calls),
            ).fetchall()
        for row_id, call_id in rows:
            if call_id not in self._calls and len(self._calls) >= self.window_calls:
                self._spill_from = row_id
                break
            self._index(call_id, row_id)  # after every row of its call in memory: those are older
            self._spilled -= 1
            added += 1
        else:
            if len(rows) < self.window_calls:
                # The disk caught up (put() adds nothing in between: no yield since the query).
                self._spill_from, self._spilled = None, 0
            elif rows:
                self._spill_from = rows[-1][0] + 1
        if added:
            self._kick.set()

    def _index(self, call_id: str, row_id: int, in_order: bool = False) -> None:
        q = self._calls.get(call_id)
        if q is None:
            q = self._calls[call_id] = _CallQueue(call_id)
        if in_order and q.entries and q.entries[-1] > row_id:
            # A requeued old row: place it by id, but never before the one in flight.
            pos = len(q.entries)
            while pos > (1 if q.in_flight else 0) and q.entries[pos - 1] > row_id:
                pos -= 1
            q.entries.insert(pos, row_id)
        else:
            q.entries.append(row_id)
        self._depth += 1
        if q.state == "idle":  # ready/active/waiting calls pick the new entry up themselves
            self._ready.append(q.call_id)
            q.state = "ready"

    # ---- producer side -------------------------------------------------
    def put(self, commands: Iterable[Command]) -> None:
        """Queue commands durably: one transaction, committed before return. Raises OutboxError.

        The same transaction notes the calls' starts and ends in the
        open-calls registry's table (``fsbridge.opencalls.write_legs``)."""
        batch, texts = [], []
        for cmd in commands:
            if not isinstance(cmd.call_id, str) or not cmd.call_id:
                raise ValueError(f"outbox: command without call_id: {cmd!r}")
            if not isinstance(cmd.fields, dict) or not cmd.fields.get("cmd"):
                raise ValueError(f"outbox: command fields must be a dict with 'cmd': {cmd!r}")
            if "planfix_token" in cmd.fields:
                raise ValueError("outbox: fields must not carry planfix_token (the client adds the current one)")
            try:  # a join raises TypeError on anything but str: one C loop instead of a test per field
                "".join(cmd.fields), "".join(cmd.fields.values())
            except TypeError:
                raise ValueError(f"outbox: every field must be str -> str: {cmd.fields!r}") from None
            batch.append(cmd)
            texts.append(_to_json(cmd.fields))
        if not batch:
            return
        now = time.time()
        entries = []
        # Rows delivered since the last delete go in this commit too: at a
        # steady rate no delete needs a commit of its own (see "Duplicates").
        delivered = sorted(self._undeleted)
        with self._db_lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                for cmd, fields in zip(batch, texts):
                    cur = self._conn.execute(
                        "INSERT INTO outbox(call_id, fields, created_at, age_from) VALUES (?, ?, ?, ?)",
                        (cmd.call_id, fields, now, now),
                    )
                    entries.append((cmd.call_id, cur.lastrowid))
                opencalls.write_legs(self._conn, batch, texts)
                if delivered:
                    self._delete_rows(delivered)
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # no transaction left to roll back: SQLite already did
                self._storage_error = f"{exc.__class__.__name__}: {exc}"
                raise OutboxError(f"outbox {self.db_path}: cannot queue {len(batch)} command(s): {exc}") from exc
        self._storage_error = ""
        self._undeleted.difference_update(delivered)
        self._checkpointer.note_write()
        if self._spill_from is None and len(self._calls) >= self.window_calls and any(
                call_id not in self._calls for call_id, _ in entries):
            self._spill_at(entries[0][1], len(entries))  # this batch and what follows stay on disk
        elif self._spill_from is not None:
            self._spilled += len(entries)
        if self._spill_from is not None:
            return  # read back in id order by _refill
        fresh = self._fresh
        for (call_id, row_id), cmd, text in zip(entries, batch, texts):
            if len(fresh) < FRESH_ROWS:
                fresh[row_id] = (dict(cmd.fields), text, now)
            self._index(call_id, row_id)
        if self._probe_at is not None:
            self._kick.set()  # the dispatcher picks the probe
        elif self._active < self.limiter.limit and self._dispatcher is not None and not self._stopping:
            # Started here, not by waking the dispatcher: one greenlet switch
            # less per request at a low rate.  At the limit a worker finishing
            # its call takes the new ones.
            self._start_ready(time.monotonic())

    def open_legs(self, call_ids=None) -> list:
        """The open-calls registry's rows in this database (``fsbridge.opencalls.read_legs``)."""
        with self._db_lock:
            return opencalls.read_legs(self._conn, call_ids)

    def add_open_legs(self, rows: list) -> None:
        """Registry rows moved in from an older fsbridge's file (``opencalls.migrate_legacy``): one transaction."""
        with self._db_lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                opencalls.insert_legs(self._conn, rows)
                self._conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    # ---- delivery --------------------------------------------------------
    def start(self) -> None:
        if self._dispatcher is None:
            self._stopping = False
            self._dispatcher = gevent.spawn(self._dispatch_loop)

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Stop sending: let in-flight requests finish (up to drain_timeout), then close."""
        self._stopping = True
        self._kick.set()
        while self._parked:
            self._parked.pop().set(None)
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=1.0)
            self._dispatcher.kill()
            self._dispatcher = None
        if not self._workers.join(timeout=drain_timeout):
            # Killed mid-request: those rows stay pending and are resent on restart.
            log.warning("outbox: %d request(s) still in flight after %.1fs, abandoning", len(self._workers), drain_timeout)
            self._workers.kill(block=True, timeout=1.0)
        self._deleter.kill()
        if self._refiller is not None:
            self._refiller.kill()
        self._flush_delivered()
        self._checkpointer.close()
        with self._db_lock:
            try:
                self._conn.close()
            except sqlite3.Error as exc:
                log.warning("outbox: closing %s: %s", self.db_path, exc)

    def wake(self) -> None:
        """Credentials changed: every call in backoff is retried now."""
        self._end_outage()
        for q in self._calls.values():
            if q.state == "waiting":
                q.state = "ready"
                self._ready.append(q.call_id)
        self._delayed.clear()
        self._kick.set()

    def _dispatch_loop(self) -> None:
        while not self._stopping:
            try:
                self._dispatch()
            except Exception:  # keep delivering whatever went wrong; never spin
                log.exception("outbox: dispatcher error")
                gevent.sleep(1.0)

    def _dispatch(self) -> None:
        next_rescan = time.monotonic() + self.rescan_interval_s
        while not self._stopping:
            self._kick.clear()
            now = time.monotonic()
            while self._delayed and self._delayed[0][0] <= now:
                due, call_id = heapq.heappop(self._delayed)
                q = self._calls.get(call_id)
                if q is not None and q.state == "waiting" and q.due == due:
                    q.state = "ready"
                    self._ready.append(call_id)
            self._start_ready(now)
            if now >= next_rescan:
                next_rescan = now + self.rescan_interval_s
                self._rescan_if_changed()
            wait = next_rescan - now
            if self._delayed:
                wait = min(wait, self._delayed[0][0] - now)
            if self._probe_at is not None and self._ready and not self._active:  # else _worker_done kicks
                wait = min(wait, self._probe_at - now)
            self._kick.wait(max(wait, 0.0))

    def _start_ready(self, now: float) -> None:
        """Ready calls to workers (a parked one, else a new one) while there is room."""
        while self._ready and self._active < self._room(now):
            q = self._calls.get(self._ready.popleft())
            if q is None or q.state != "ready":
                continue
            if self._probe_at is not None:  # PlanFix down: this call is the probe
                self._probe_call, self._probe_at = q.call_id, float("inf")
            q.state = "active"
            self._active += 1
            if self._parked:
                self._parked.pop().set(q)
            else:
                self._workers.spawn(self._work, q)

    def _room(self, now: float) -> int:
        """How many calls may be in flight: the adaptive limit, or one probe while PlanFix is down."""
        if self._probe_at is None:
            return self.limiter.limit
        return 1 if now >= self._probe_at else 0

    def _note_answer(self) -> None:
        """PlanFix answered (200 or 400): it is up."""
        self._failures_in_row = 0
        if self._probe_at is not None:
            log.info("outbox %s: PlanFix answers again after %d failed probe(s)", self.name, self._probe_failures)
            self._end_outage()

    def _end_outage(self) -> None:
        self._failures_in_row = 0
        self._probe_at = self._probe_call = None
        self._probe_failures = 0
        self._kick.set()

    def _note_failure(self, q: _CallQueue, error: str) -> None:
        """An attempt failed: count it; enough in a row start probing, a failed probe waits longer."""
        self._failures_in_row += 1
        if self._probe_at is None:
            if self._failures_in_row < OUTAGE_AFTER_FAILURES:
                return
            log.warning("outbox %s: %d PlanFix requests failed in a row (%s): one request at a time "
                        "until PlanFix answers", self.name, self._failures_in_row, error)
        elif q.call_id == self._probe_call:
            self._probe_failures += 1
        else:
            return  # in flight before probing began
        backoff = min(OUTAGE_PROBE_MAX_S, self.max_backoff_s, self.min_backoff_s * 2 ** min(self._probe_failures, 30))
        self._probe_at = time.monotonic() + backoff * random.uniform(0.5, 1.0)
        self._probe_call = None

    def _rescan_if_changed(self) -> None:
        """Pick up rows another process requeued (`fsbridge outbox --retry`)."""
        try:
            with self._db_lock:
                version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if version != self._data_version:
                self._load()
        except sqlite3.Error as exc:
            log.warning("outbox: rescanning %s: %s", self.db_path, exc)

    def _work(self, q: _CallQueue | None) -> None:
        """A worker: delivers one call, then the next ready one while there is
        room, then parks for the next call it is handed (see _park).

        Taking the next call here instead of ending spares a greenlet and a
        dispatcher wake-up per call; workers are started (or unparked) only
        when more may be in flight than are running (and the dispatcher picks
        the probe)."""
        while q is not None:
            try:
                self._deliver(q)
            except BaseException:  # killed by stop(): no next call
                self._worker_done(q, take_next=False)
                raise
            q = self._worker_done(q, take_next=True)
            if q is None:
                q = self._park()

    def _park(self) -> _CallQueue | None:
        """Wait for the dispatcher to hand this worker a call; None: end instead."""
        if self._stopping or len(self._parked) >= PARKED_WORKERS:
            return None
        handed = gevent.event.AsyncResult()
        self._parked.append(handed)
        handed.wait(PARKED_IDLE_S)
        if not handed.ready():  # idle too long: gone, unless handed a call meanwhile
            self._parked.remove(handed)
            return None
        return handed.value  # None from stop()

    def _deliver(self, q: _CallQueue) -> None:
        """Send the call's commands in order until it is empty, in backoff or stopping."""
        try:
            while q.entries and not self._stopping:
                entry = self._read_row(q)
                if entry is None:
                    continue  # gone from the database (or unreadable): nothing to send
                q.in_flight = True
                try:
                    result = self.client.send(entry.fields)
                except Exception as exc:  # a bug must not kill delivery nor spin: treat as a failure
                    log.exception("outbox: sending command %d failed unexpectedly", entry.id)
                    result = DeliveryResult(Outcome.RETRY, error=f"internal error: {exc!r}")
                finally:
                    q.in_flight = False
                if not self._settle(q, entry, result):
                    return  # in backoff; the dispatcher brings it back
        except _Backoff:
            return

    def _read_row(self, q: _CallQueue) -> _Attempt | None:
        row_id = q.entries[0]
        # First attempt of a row stored here: as stored, never tried (a retry reads the row).
        fresh = self._fresh.pop(row_id, None)
        if fresh is not None:
            return _Attempt(row_id, fresh[0], fresh[2], 0, "", fresh[1])
        try:
            with self._db_lock:
                row = self._conn.execute(
                    "SELECT fields, age_from, attempts, last_error FROM outbox WHERE id=? AND kept_aside_at IS NULL", (row_id,)
                ).fetchone()
        except sqlite3.Error as exc:
            # Left in line; the call backs off like a failed delivery.
            self._storage_error = f"{exc.__class__.__name__}: {exc}"
            log.error("outbox: cannot read command %d: %s", row_id, exc)
            self._back_off(q, 1)
            raise _Backoff from None
        if row is None:
            self._drop(q, row_id)
            return None
        return _Attempt(row_id, json.loads(row[0]), row[1], row[2], row[3] or "", row[0])

    def _worker_done(self, q: _CallQueue, take_next: bool) -> _CallQueue | None:
        """The worker is done with ``q``; returns the ready call it goes on with, if any."""
        self._active -= 1
        if q.call_id == self._probe_call and self._probe_at == float("inf"):
            self._probe_at, self._probe_call = time.monotonic(), None  # the probe sent nothing: another one
        if q.state == "active":
            if q.entries:
                q.state = "idle"
                if not self._stopping:
                    q.state = "ready"
                    self._ready.append(q.call_id)
            else:
                del self._calls[q.call_id]
        # While probing the dispatcher picks each call (one at a time).
        while take_next and self._ready and self._probe_at is None and not self._stopping \
                and self._active < self.limiter.limit:
            nxt = self._calls.get(self._ready.popleft())
            if nxt is None or nxt.state != "ready":
                continue
            nxt.state = "active"
            self._active += 1
            return nxt
        if self._ready or self._probe_at is not None:
            self._kick.set()  # the dispatcher starts what this worker may not
        return None

    def _drop(self, q: _CallQueue, row_id: int) -> None:
        del q.entries[0]
        self._depth -= 1

    def _pace(self, result: DeliveryResult) -> None:
        """Tell the limiter how PlanFix is doing."""
        if result.outcome is Outcome.NOT_CONFIGURED:
            return
        status = result.status
        if result.outcome is Outcome.RETRY and (status is None or status == 429 or status >= 500):
            self.limiter.overload()
        else:
            before = self.limiter.limit
            self.limiter.success(self._active)
            if self.limiter.limit > before:
                self._kick.set()  # room for one more call in flight

    def _settle(self, q: _CallQueue, entry: _Attempt, result: DeliveryResult) -> bool:
        """Record the outcome of one attempt; False when the call must back off."""
        self._pace(result)
        if result.outcome in (Outcome.DELIVERED, Outcome.REJECTED):
            self._note_answer()
        else:
            self._note_failure(q, result.error)
        if result.outcome is Outcome.DELIVERED:
            # age_from is the storing time (or the manual retry of a kept-aside row).
            metrics.delivered(entry.age_from, self.name)
            calls.record_sent(q.call_id, entry.text)
            self._drop(q, entry.id)
            now = time.time()
            self._last_success_at = now
            self._last_error = ""  # /healthz must not show a failure that is over
            if self._failed_since_success:
                self._failed_since_success = False
                if self._delayed and time.monotonic() >= self._next_recovery_wake:
                    self._next_recovery_wake = time.monotonic() + RECOVERY_WAKE_INTERVAL_S
                    log.info("outbox: PlanFix answers again, retrying %d waiting call(s) now", len(self._delayed))
                    self.wake()
            # PlanFix has it: never sent again from this process; the DELETE
            # comes in the next batch (a crash before it resends it).
            self._undeleted.add(entry.id)
            self._deleter.request()
            return True
        if result.outcome is Outcome.REJECTED:
            entry.attempts += 1
            self._drop(q, entry.id)
            self._keep_aside(entry, "rejected", result.error, result.reply)
            return True
        entry.attempts += 1
        entry.last_error = result.error
        self._last_error = result.error
        self._failed_since_success = True
        if time.time() - entry.age_from > self.max_age_s:
            self._drop(q, entry.id)
            log.error("outbox: command %d (%s) undeliverable for over %.0fs, kept aside: %s", entry.id, q.call_id, self.max_age_s, result.error)
            self._keep_aside(entry, "max_age", result.error, result.reply)
            return True
        try:
            self._write("UPDATE outbox SET attempts=?, last_error=? WHERE id=?", (entry.attempts, entry.last_error, entry.id))
        except sqlite3.Error as exc:  # bookkeeping only; the row itself is safe
            log.warning("outbox: recording attempt of command %d: %s", entry.id, exc)
        self._back_off(q, entry.attempts)
        return False

    def _back_off(self, q: _CallQueue, attempts: int) -> None:
        backoff = min(self.max_backoff_s, self.min_backoff_s * 2 ** min(attempts - 1, 30))
        # Jitter in [50%, 100%]: calls failing together do not retry together.
        q.due = time.monotonic() + backoff * random.uniform(0.5, 1.0)
        q.state = "waiting"
        heapq.heappush(self._delayed, (q.due, q.call_id))

    def _keep_aside(self, entry: _Attempt, reason: str, error: str, reply: Any) -> None:
        reply_text = reply if isinstance(reply, str) or reply is None else json.dumps(reply, ensure_ascii=False)
        try:
            self._write(
                "UPDATE outbox SET kept_aside_at=?, kept_reason=?, last_error=?, reply=?, attempts=? WHERE id=?",
                (time.time(), reason, error, reply_text, entry.attempts, entry.id),
            )
        except sqlite3.Error as exc:
            # The row stays pending on disk: a restart retries it, which is the safe side.
            self._storage_error = f"{exc.__class__.__name__}: {exc}"
            log.error("outbox: cannot mark command %d kept aside: %s", entry.id, exc)
        self._kept_aside += 1

    def _rollback(self) -> None:
        try:
            with self._db_lock:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # nothing to roll back

    def _flush_delivered(self) -> None:
        """Delete every delivered row not deleted yet: one transaction."""
        if not self._undeleted:
            return
        ids = sorted(self._undeleted)
        try:
            with self._db_lock:
                self._conn.execute("BEGIN")
                self._delete_rows(ids)
                self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            # Retried with the next delivery (a restart before that resends them).
            self._storage_error = f"{exc.__class__.__name__}: {exc}"
            log.error("outbox: cannot remove %d delivered command(s): %s", len(ids), exc)
        else:
            self._undeleted.difference_update(ids)
            self._checkpointer.note_write()

    def _delete_rows(self, ids: list[int]) -> None:
        """In the caller's transaction: delivered rows go, and when the last delivery was."""
        self._conn.executemany("DELETE FROM outbox WHERE id=?", [(i,) for i in ids])
        if self._last_success_at is not None:
            self._conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('last_success_at', ?)",
                               (repr(self._last_success_at),))

    # ---- observation and operator actions --------------------------------
    def depth(self) -> int:
        """Rows still in the table: pending (in memory or left on disk), or delivered
        and awaiting the batched DELETE (a kill now would resend those).  No
        database read: for the event path."""
        return self._depth + self._spilled + len(self._undeleted)

    def stats(self) -> dict[str, Any]:
        now = time.time()
        oldest = None
        if self._depth:
            try:
                with self._db_lock:
                    # Pending rows in id order (the outbox_pending index): the first is the oldest.
                    row = self._conn.execute(
                        "SELECT created_at FROM outbox WHERE kept_aside_at IS NULL ORDER BY id LIMIT 1"
                    ).fetchone()
                oldest = row[0] if row else None
            except sqlite3.Error as exc:
                log.warning("outbox: reading the oldest pending command: %s", exc)
        return {
            "depth": self.depth(),
            "oldest_pending_age_s": None if oldest is None else round(max(0.0, now - oldest), 3),
            "last_success_at": self._last_success_at,
            "kept_aside": self._kept_aside,
            "in_flight": self._active,
            "in_flight_limit": self.limiter.limit,
            "last_error": self._last_error,
            "storage_error": self._storage_error,
        }

    def list_entries(self, include_kept_aside: bool = True) -> list[OutboxEntry]:
        """What is pending or kept aside; delivered rows awaiting their batched DELETE are not."""
        with self._db_lock:
            entries = _list(self._conn, include_kept_aside)
        return [e for e in entries if e.id not in self._undeleted]

    def retry_kept_aside(self) -> int:
        """Put every kept-aside command back in line (max_age counts from now); returns how many."""
        with self._db_lock:
            count = _requeue(self._conn)
        self._load()
        return count


# ---- used by the CLI, with or without the service running ----------------
def _list(conn: sqlite3.Connection, include_kept_aside: bool) -> list[OutboxEntry]:
    where = "" if include_kept_aside else " WHERE kept_aside_at IS NULL"
    rows = conn.execute(
        "SELECT id, call_id, fields, created_at, attempts, last_error, kept_aside_at, kept_reason, reply"
        f" FROM outbox{where} ORDER BY id"
    ).fetchall()
    return [OutboxEntry(r[0], r[1], json.loads(r[2]), *r[3:]) for r in rows]


def _requeue(conn: sqlite3.Connection) -> int:
    now = time.time()
    cur = conn.execute(
        "UPDATE outbox SET kept_aside_at=NULL, kept_reason=NULL, reply=NULL, attempts=0, age_from=?"
        " WHERE kept_aside_at IS NOT NULL",
        (now,),
    )
    return cur.rowcount


def list_entries(db_path: str, include_kept_aside: bool = True) -> list[OutboxEntry]:
    if not os.path.exists(db_path):
        return []
    conn = _open(db_path)
    try:
        return _list(conn, include_kept_aside)
    except sqlite3.Error as exc:
        raise OutboxError(f"outbox {db_path}: {exc}") from exc
    finally:
        conn.close()


def summary(db_path: str) -> dict[str, Any]:
    """Pending and kept-aside counts and the last delivery, read from disk (the
    service may be running); zeros for an outbox that was never written."""
    if not os.path.exists(db_path):
        return {"pending": 0, "kept_aside": 0, "last_success_at": None, "oldest_pending_at": None}
    conn = _open(db_path)
    try:
        pending, oldest = conn.execute(
            "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE kept_aside_at IS NULL").fetchone()
        kept = conn.execute("SELECT COUNT(*) FROM outbox WHERE kept_aside_at IS NOT NULL").fetchone()[0]
        last = conn.execute("SELECT value FROM meta WHERE key='last_success_at'").fetchone()
    except sqlite3.Error as exc:
        raise OutboxError(f"outbox {db_path}: {exc}") from exc
    finally:
        conn.close()
    return {"pending": pending, "kept_aside": kept, "last_success_at": float(last[0]) if last else None,
            "oldest_pending_at": oldest}


def retry_kept_aside(db_path: str) -> int:
    """Requeue kept-aside commands; a running service picks them up within RESCAN_INTERVAL_S."""
    if not os.path.exists(db_path):
        return 0
    conn = _open(db_path)
    try:
        return _requeue(conn)
    except sqlite3.Error as exc:
        raise OutboxError(f"outbox {db_path}: {exc}") from exc
    finally:
        conn.close()


def _fmt_time(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def format_entries(entries: list[OutboxEntry]) -> str:
    pending = [e for e in entries if not e.kept_aside]
    kept = [e for e in entries if e.kept_aside]
    lines = [f"pending: {len(pending)}, kept aside: {len(kept)}"]
    for title, group in (("pending", pending), ("kept aside", kept)):
        if not group:
            continue
        lines.append(f"-- {title} --")
        for e in group:
            what = " ".join(e.fields.get(k, "") for k in ("cmd", "type", "event", "status") if e.fields.get(k))
            line = f"#{e.id} {_fmt_time(e.created_at)} callid={e.call_id} {what} attempts={e.attempts}"
            if e.kept_aside:
                line += f" kept={e.kept_reason} at {_fmt_time(e.kept_aside_at)}"
            if e.last_error:
                line += f" last_error={e.last_error!r}"
            if e.reply:
                line += f" reply={e.reply}"
            lines.append(line)
    return "\n".join(lines)


def cli_list(db_path: str) -> str:
    """`fsbridge outbox -c FILE`: what is pending or kept aside (raises OutboxError)."""
    if not os.path.exists(db_path):
        return f"no outbox database at {db_path} yet: nothing was ever queued"
    return format_entries(list_entries(db_path))


def cli_retry(db_path: str) -> str:
    """`fsbridge outbox -c FILE --retry`: requeue kept-aside commands (raises OutboxError)."""
    count = retry_kept_aside(db_path)
    return (
        f"{count} kept-aside command(s) put back in line"
        + (f"; a running service sends them within {RESCAN_INTERVAL_S:.0f}s" if count else "")
    )
