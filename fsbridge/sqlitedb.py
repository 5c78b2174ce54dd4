"""Opening the service's SQLite files one way: private, WAL, a set sync level;
and checkpointing the WAL of the ones written on the event path off that path."""

from __future__ import annotations

import logging
import os
import sqlite3

import gevent

log = logging.getLogger(__name__)

# SQLite checkpoints a WAL by itself inside the COMMIT that takes it past
# wal_autocheckpoint pages (1,000 by default): the pages are copied back into
# the database with an fsync before and after, in the committing thread, which
# in the service is the event loop (measured 5-25 ms on a quiet disk, 400 ms on
# a shared busy one, every event waiting behind it).  WalCheckpointer runs
# those checkpoints in a native thread instead; the writer still checkpoints
# itself past this many pages (~40 MB of WAL), should that one fall behind.
FALLBACK_AUTOCHECKPOINT_PAGES = 10_000
# How long after a write the background checkpoint runs: one per second at
# most under load, none while idle.
CHECKPOINT_DELAY_S = 1.0


def open_private(path: str, synchronous: str, busy_timeout_s: float = 5.0) -> sqlite3.Connection:
    """Open (creating with mode 0600: phone numbers live here) ``path``.

    Autocommit mode (``isolation_level=None``): callers issue BEGIN/COMMIT so
    that one logical write is exactly one transaction.  WAL lets the CLI read
    while the service writes.  ``synchronous``: NORMAL survives a process
    crash (kill -9), FULL also a power cut.
    """
    if synchronous not in ("NORMAL", "FULL"):
        raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
    if not os.path.exists(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


class WalCheckpointer:
    """Checkpoints the WAL of ``conn``'s database in gevent's threadpool.

    ``conn`` keeps only the fallback autocheckpoint.  The owner calls
    ``note_write()`` after each commit; CHECKPOINT_DELAY_S later a PASSIVE
    checkpoint runs on a connection of its own in a native thread (SQLite
    releases the GIL meanwhile), so the fsyncs no longer stop the event loop.
    PASSIVE never takes the write lock nor waits for one: ``conn``'s writers
    go on while it runs.  Durability is unchanged: a commit is in the WAL
    when it returns, whoever copies it into the database later (SQLite also
    checkpoints when the last connection closes).  Once a checkpoint has
    copied back every frame, the next write starts the WAL over, so it stays
    the size a second's writes take (FALLBACK_AUTOCHECKPOINT_PAGES at most).

    From plain threads (tests, the CLI) nothing runs the scheduled greenlet:
    the fallback autocheckpoint does the work, as before.
    """

    def __init__(self, conn: sqlite3.Connection, path: str, delay_s: float = CHECKPOINT_DELAY_S,
                 fallback_pages: int = FALLBACK_AUTOCHECKPOINT_PAGES) -> None:
        conn.execute(f"PRAGMA wal_autocheckpoint={fallback_pages}")
        self.path = path
        self.delay_s = delay_s
        # (busy, frames in the WAL, frames checkpointed) of the last run.
        self.last: tuple[int, int, int] | None = None
        self.runs = 0
        self._conn: sqlite3.Connection | None = None  # opened and used in the threadpool only
        self._scheduled: gevent.Greenlet | None = None
        self._in_thread = False
        self._closed = False
        self._failed = False

    def note_write(self) -> None:
        """A transaction was committed: checkpoint within ``delay_s``."""
        if self._scheduled is None and not self._closed:
            self._scheduled = gevent.spawn_later(self.delay_s, self._run)

    def _run(self) -> None:
        self._in_thread = True
        try:
            self.last = gevent.get_hub().threadpool.apply(self._checkpoint)
            self.runs += 1
            self._failed = False
        except sqlite3.Error as exc:
            # The WAL keeps its frames (nothing is lost); the fallback or the next run checkpoints.
            if not self._failed:
                log.warning("checkpointing %s: %s", self.path, exc)
            self._failed = True
        finally:
            self._in_thread = False
            self._scheduled = None

    def _checkpoint(self) -> tuple[int, int, int]:
        if self._conn is None:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        return tuple(self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())

    def close(self) -> None:
        """Stop checkpointing; a run already in its thread is waited for (it uses the connection)."""
        self._closed = True
        scheduled = self._scheduled
        if scheduled is not None:
            if self._in_thread:
                scheduled.join()
            else:
                scheduled.kill()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
