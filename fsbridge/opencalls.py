"""Call legs PlanFix was told about and not yet told the end of, on disk.

The tracker keeps its state in memory.  If the process itself dies (kill -9,
a crash, a power cut of the VM) during a call, the new process never saw the
call start, so FreeSWITCH's later events for it are foreign, and PlanFix would
keep a pop-up open forever.  This registry remembers every INCOMING/OUTGOING
the service queued (and whether the leg was ACCEPTED) until its COMPLETED is
queued; what a *previous* process left behind is closed by the service once
FreeSWITCH says the call is gone.

Such a call is finished from FreeSWITCH's CDR when fsbridge receives it
(fsbridge/cdr.py; ``[cdr]``); the registry keeps it open for ``[cdr] wait``
seconds after FreeSWITCH no longer lists it.  Without a CDR, the status of
the close is a best effort, since the real end was not seen: an accepted leg ends ``Success`` (duration unknown: 0), an incoming
leg never accepted ``Missed``, an outgoing one ``NoAnswer``.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Callable, Iterable

from fsbridge.sqlitedb import WalCheckpointer, open_private

START_EVENTS = ("INCOMING", "OUTGOING")


class OpenCallsError(Exception):
    """The registry could not be read or written."""


class OpenCalls:
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            # NORMAL: durable across a process crash, which is the point.
            self._db = open_private(path, "NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS open_legs ("
                " call_id TEXT NOT NULL, ext TEXT NOT NULL, fields TEXT NOT NULL,"
                " accepted INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (call_id, ext))"
            )
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(open_legs)")}
            # Cloud PBX (a registry written before tenants and nodes has neither:
            # its calls are the one tenant's, on the one node).
            for column in ("tenant", "node"):
                if column not in columns:
                    self._db.execute(f"ALTER TABLE open_legs ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
        except (OSError, sqlite3.Error) as exc:
            raise OpenCallsError(f"cannot open {path}: {exc}") from None
        # Written with every batch of call starts and ends: checkpoints off the event loop.
        self._checkpointer = WalCheckpointer(self._db, path)
        # When each inherited call was first seen gone from FreeSWITCH.
        self._gone_since: dict[str, float] = {}
        # What an earlier process left open, read once at start.
        self.inherited: dict[str, list[tuple[dict[str, str], bool]]] = {}
        # call_id -> (node, tenant) of every inherited call.
        self.owners: dict[str, tuple[str, str]] = {}
        for call_id, fields, accepted, tenant, node in self._db.execute(
            "SELECT call_id, fields, accepted, tenant, node FROM open_legs ORDER BY rowid"
        ):
            self.inherited.setdefault(call_id, []).append((json.loads(fields), bool(accepted)))
            self.owners.setdefault(call_id, (node, tenant))

    def record(self, commands: Iterable) -> None:
        """Note the starts, answers and ends among commands being queued."""
        rows_start, rows_accept, rows_end = [], [], []
        for command in commands:
            fields = command.fields
            if fields.get("cmd") != "event":
                continue
            key = (command.call_id, fields.get("ext", ""))
            event = fields.get("event")
            if event in START_EVENTS:
                rows_start.append((*key, json.dumps(fields), getattr(command, "tenant", ""),
                                   getattr(command, "node", "")))
            elif event == "ACCEPTED":
                rows_accept.append(key)
            elif event == "COMPLETED":
                rows_end.append(key)
        if not (rows_start or rows_accept or rows_end):
            return
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT OR REPLACE INTO open_legs (call_id, ext, fields, tenant, node) VALUES (?, ?, ?, ?, ?)",
                    rows_start
                )
                self._db.executemany(
                    "UPDATE open_legs SET accepted = 1 WHERE call_id = ? AND ext = ?", rows_accept
                )
                self._db.executemany("DELETE FROM open_legs WHERE call_id = ? AND ext = ?", rows_end)
        except sqlite3.Error as exc:
            raise OpenCallsError(f"cannot write {self.path}: {exc}") from None
        self._checkpointer.note_write()

    def take_back(self, call_ids: Iterable[str]) -> None:
        """Calls this process followed and lost (they ended during an ESL
        gap) become inherited: closed from their CDR or by ``close_inherited``."""
        for call_id in call_ids:
            rows = self._db.execute(
                "SELECT fields, accepted, tenant, node FROM open_legs WHERE call_id = ? ORDER BY rowid", (call_id,)
            ).fetchall()
            if rows:
                self.inherited[call_id] = [(json.loads(fields), bool(accepted)) for fields, accepted, _, _ in rows]
                self.owners[call_id] = (rows[0][3], rows[0][2])

    def pop_inherited(self, call_id: str) -> list[tuple[dict[str, str], bool]] | None:
        """The legs of an inherited call, which the caller now finishes itself."""
        self._gone_since.pop(call_id, None)
        return self.inherited.pop(call_id, None)

    def owner(self, call_id: str) -> tuple[str, str]:
        """(node, tenant) of an inherited call ("" for a registry from before tenants)."""
        return self.owners.get(call_id, ("", ""))

    def close_inherited(
        self, live_call_uuids: set[str], now: float = 0.0, wait: float = 0.0,
        owns: Callable[[str], bool] | None = None,
    ) -> list[tuple[str, dict[str, str]]]:
        """COMPLETED fields for inherited calls FreeSWITCH no longer has.

        With ``wait`` (``[cdr] wait``) a call is closed only once it has been
        gone that many seconds (``now`` is the caller's clock): until then
        its CDR may still arrive (``pop_inherited``).  Returns (call_id,
        fields) pairs; the caller queues them (and passes them to
        ``record``, which forgets the legs).  ``owns``: only the calls of
        one FreeSWITCH (``live_call_uuids`` is its listing); None: all.
        """
        closing: list[tuple[str, dict[str, str]]] = []
        for call_id in list(self.inherited):
            if owns is not None and not owns(call_id):
                continue  # another FreeSWITCH's call: its own listing decides
            if call_id in live_call_uuids:
                self._gone_since.pop(call_id, None)
                continue
            since = self._gone_since.setdefault(call_id, now)
            if now - since < wait:
                continue
            del self._gone_since[call_id]
            for start, accepted in self.inherited.pop(call_id):
                fields = {k: v for k, v in start.items() if k != "event"}
                if accepted:
                    status = "Success"
                else:
                    status = "Missed" if start.get("type") == "in" else "NoAnswer"
                fields.update(event="COMPLETED", duration="0", is_recorded="0", status=status)
                closing.append((call_id, fields))
        return closing

    def forget_inherited(self, call_ids: set[str]) -> None:
        """These inherited calls are tracked again (adopted live): their
        COMPLETED will come from real events, not from ``close_inherited``."""
        for call_id in call_ids:
            self.pop_inherited(call_id)

    def close(self) -> None:
        self._checkpointer.close()
        self._db.close()
