"""The durable callid -> file mapping (SQLite under storage.dir): a request path never becomes a file path."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterable

from fsbridge.sqlitedb import open_private

INDEX_FILE = "recordings.sqlite3"
CONVERTING = "converting"  # MP3 being made; PlanFix has no link yet
READY = "ready"  # the link of `ext` was handed to PlanFix (or is on its way)


@dataclass(frozen=True)
class IndexEntry:
    call_id: str
    wav_name: str | None  # relative to [recordings] dir
    mp3_name: str | None
    state: str
    recorded_at: float  # the file's mtime: when FreeSWITCH closed it
    tenant: str = ""  # whose PlanFix gets its `record` command (cloud PBX; "" before tenants)

    def name_for(self, ext: str) -> str | None:
        return self.mp3_name if ext == "mp3" else self.wav_name


_COLUMNS = "call_id, wav_name, mp3_name, state, recorded_at, tenant"


class RecordingIndex:
    """Durable mapping callid -> file names (relative to the recordings dir).

    Written (synchronous=FULL) before a link leaves for the outbox, so a link
    PlanFix holds always resolves after a crash or power loss.
    """

    def __init__(self, path: str):
        self._db = open_private(path, "FULL")
        self._lock = threading.Lock()
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS recordings ("
            " call_id TEXT PRIMARY KEY,"
            " wav_name TEXT,"
            " mp3_name TEXT,"
            " state TEXT NOT NULL,"
            " recorded_at REAL NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS recordings_age ON recordings (recorded_at)")
        if "tenant" not in {row[1] for row in self._db.execute("PRAGMA table_info(recordings)")}:
            # An index written before tenants: its calls are the one tenant's.
            self._db.execute("ALTER TABLE recordings ADD COLUMN tenant TEXT NOT NULL DEFAULT ''")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _rows(self, sql: str, args: Iterable[Any] = ()) -> list[IndexEntry]:
        with self._lock:
            return [IndexEntry(*row) for row in self._db.execute(sql, tuple(args)).fetchall()]

    def get(self, call_id: str) -> IndexEntry | None:
        rows = self._rows(
            f"SELECT {_COLUMNS} FROM recordings WHERE call_id = ?",
            (call_id,),
        )
        return rows[0] if rows else None

    def put(self, entry: IndexEntry) -> None:
        with self._lock:
            self._db.execute(
                f"INSERT OR REPLACE INTO recordings ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                (entry.call_id, entry.wav_name, entry.mp3_name, entry.state, entry.recorded_at, entry.tenant),
            )

    def delete(self, call_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM recordings WHERE call_id = ?", (call_id,))

    def converting(self) -> list[IndexEntry]:
        return self._rows(
            f"SELECT {_COLUMNS} FROM recordings WHERE state = ? ORDER BY recorded_at",
            (CONVERTING,),
        )

    def ready_before(self, cutoff: float) -> list[IndexEntry]:
        return self._rows(
            f"SELECT {_COLUMNS} FROM recordings WHERE state = ? AND recorded_at < ? ORDER BY recorded_at",
            (READY, cutoff),
        )

    def file_names(self) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT wav_name, mp3_name FROM recordings").fetchall()
        return {name for row in rows for name in row if name}
