"""When fsbridge could not see each FreeSWITCH node, on disk.

A call that begins and ends while fsbridge is stopped or cut off from a
node's Event Socket leaves no events; its CDRs (fsbridge/core/cdr.py) are the
only trace, and fsbridge reports it from them.  A call fsbridge saw live
(or adopted from ``show channels``) must not be reported again from its
CDRs: the test is time.  While a node is connected its ``seen`` moment is
kept up to date (``alive``, about once a second, and at a disconnect); a
(re)connect closes the gap since then (``connected``).  A call lies wholly
in the dark when it started after a gap began and ended before it closed
(``in_gap``); while the node is still not connected the open gap counts up
to now.  A kill -9 leaves ``seen`` up to one beat early: a call that began in
that last second was seen by the dead process and is in the open-calls
registry (finished from its CDR as inherited), which is asked first.

Also remembered: the calls reported from their CDRs (``reported``), so a
CDR posted twice (a spool replayed) is not reported twice; and the CDRs of
such calls while their other legs' CDRs are awaited (``hold``/``held``):
mod_json_cdr got its 200, so a restart must find them here.  All are pruned
after ``KEEP_S``.  Times are the caller's clock, seconds since the epoch
(FreeSWITCH runs on this host: the same clock as its CDRs).
"""

from __future__ import annotations

import sqlite3

from fsbridge.sqlitedb import open_private

KEEP_S = 7 * 86400


class GapsError(Exception):
    """The file could not be read or written."""


class Gaps:
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._db = open_private(path, "NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS seen (node TEXT PRIMARY KEY, at REAL NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS gaps (node TEXT NOT NULL, since REAL NOT NULL,"
                             " until REAL NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS reported (call_id TEXT PRIMARY KEY, at REAL NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS held (uuid TEXT PRIMARY KEY, call_id TEXT NOT NULL,"
                             " node TEXT NOT NULL, facts TEXT NOT NULL, at REAL NOT NULL)")
        except (OSError, sqlite3.Error) as exc:
            raise GapsError(f"cannot open {path}: {exc}") from None

    def _write(self, *statements: tuple[str, tuple]) -> None:
        try:
            with self._db:
                self._db.execute("BEGIN")
                for sql, args in statements:
                    self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise GapsError(f"cannot write {self.path}: {exc}") from None

    def alive(self, node: str, now: float) -> None:
        """``node`` is connected at ``now`` (or was, until now: a disconnect)."""
        self._write(("INSERT OR REPLACE INTO seen (node, at) VALUES (?, ?)", (node, now)))

    def connected(self, node: str, now: float) -> tuple[float, float] | None:
        """``node`` is connected again: the gap since it was last seen, if any."""
        row = self._db.execute("SELECT at FROM seen WHERE node = ?", (node,)).fetchone()
        statements = [("INSERT OR REPLACE INTO seen (node, at) VALUES (?, ?)", (node, now)),
                      ("DELETE FROM gaps WHERE until < ?", (now - KEEP_S,)),
                      ("DELETE FROM reported WHERE at < ?", (now - KEEP_S,)),
                      ("DELETE FROM held WHERE at < ?", (now - KEEP_S,))]
        gap = (row[0], now) if row is not None and row[0] < now else None
        if gap is not None:
            statements.append(("INSERT INTO gaps (node, since, until) VALUES (?, ?, ?)", (node, *gap)))
        self._write(*statements)
        return gap

    def in_gap(self, node: str, start: float, end: float, connected_now: bool, now: float) -> bool:
        """A call from ``start`` to ``end`` lies wholly in one gap of ``node``'s."""
        if not start or end < start:
            return False
        if self._db.execute("SELECT 1 FROM gaps WHERE node = ? AND since < ? AND ? < until LIMIT 1",
                            (node, start, end)).fetchone():
            return True
        if connected_now:
            return False
        row = self._db.execute("SELECT at FROM seen WHERE node = ?", (node,)).fetchone()
        return row is not None and row[0] < start and end <= now

    def reported(self, call_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM reported WHERE call_id = ?", (call_id,)).fetchone() is not None

    def mark_reported(self, call_id: str, now: float) -> None:
        """The call was reported from its CDRs: they are no longer held."""
        self._write(("INSERT OR REPLACE INTO reported (call_id, at) VALUES (?, ?)", (call_id, now)),
                    ("DELETE FROM held WHERE call_id = ?", (call_id,)))

    def hold(self, node: str, call_id: str, uuid: str, facts: str, now: float) -> None:
        """Keep a CDR (``facts``: ``cdr.facts_to_json``) of ``call_id``, a call of ``node``'s
        reported once its legs' CDRs are in, until ``mark_reported`` or ``release``."""
        self._write(("INSERT OR REPLACE INTO held (uuid, call_id, node, facts, at) VALUES (?, ?, ?, ?, ?)",
                     (uuid, call_id, node, facts, now)))

    def held(self, node: str) -> list[tuple[str, float]]:
        """(facts, when it came) of every CDR held for ``node``, oldest first."""
        try:
            return self._db.execute("SELECT facts, at FROM held WHERE node = ? ORDER BY at, rowid",
                                    (node,)).fetchall()
        except sqlite3.Error as exc:
            raise GapsError(f"cannot read {self.path}: {exc}") from None

    def release(self, call_id: str) -> None:
        """Its held CDRs are not needed: the call turned out live (adopted)."""
        self._write(("DELETE FROM held WHERE call_id = ?", (call_id,)))

    def close(self) -> None:
        self._db.close()
