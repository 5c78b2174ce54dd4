"""Call legs PlanFix was told about and not yet told the end of, on disk.

The tracker keeps its state in memory.  If the process itself dies (kill -9,
a crash, a power cut of the VM) during a call, the new process never saw the
call start, so FreeSWITCH's later events for it are foreign, and PlanFix would
keep a pop-up open forever.  This registry remembers every INCOMING/OUTGOING
the service queued (and whether the leg was ACCEPTED) until its COMPLETED is
queued; what a *previous* process left behind is closed by the service once
FreeSWITCH says the call is gone.

Where: the ``open_legs`` table of each tenant's outbox database, written by
``Outbox.put`` in the same transaction as the requests themselves
(``write_legs``): a call's start is on disk exactly when its INCOMING is,
and one commit per read of events serves both (they were two databases and
two commits).  ``OpenCalls`` reads every tenant's table at start; a
registry of an older fsbridge (``open-calls.sqlite3``, one file for all
tenants) is moved into the tenants' databases by ``migrate_legacy``.

Such a call is finished from FreeSWITCH's CDR when fsbridge receives it
(fsbridge/core/cdr.py; ``[cdr]``); the registry keeps it open for ``[cdr] wait``
seconds after FreeSWITCH no longer lists it.  Without a CDR, the status of
the close is a best effort, since the real end was not seen: an accepted leg ends ``Success`` (duration unknown: 0), an incoming
leg never accepted ``Missed``, an outgoing one ``NoAnswer``.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from typing import Callable, Iterable, Protocol, Sequence

log = logging.getLogger(__name__)

START_EVENTS = ("INCOMING", "OUTGOING")
LEGACY_FILENAME = "open-calls.sqlite3"

# In each tenant's outbox database (fsbridge.outbox creates it).
SCHEMA = """
CREATE TABLE IF NOT EXISTS open_legs (
    call_id  TEXT NOT NULL,
    ext      TEXT NOT NULL,
    fields   TEXT NOT NULL,               -- the start command's fields (JSON)
    accepted INTEGER NOT NULL DEFAULT 0,
    tenant   TEXT NOT NULL DEFAULT '',
    node     TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (call_id, ext)
);
"""

# (call_id, fields JSON, accepted, tenant, node)
LegRow = tuple[str, str, int, str, str]


class OpenCallsError(Exception):
    """The registry could not be read or written."""


class LegSource(Protocol):
    """A database holding an ``open_legs`` table (a tenant's outbox)."""

    def open_legs(self, call_ids: Sequence[str] | None = None) -> list[LegRow]: ...

    def add_open_legs(self, rows: list) -> None: ...


def write_legs(conn: sqlite3.Connection, commands: Sequence, texts: Sequence[str]) -> None:
    """Note the starts, answers and ends among ``commands`` (their fields
    encoded as ``texts``) in the caller's transaction."""
    starts, accepts, ends = [], [], []
    for command, text in zip(commands, texts):
        fields = command.fields
        if fields["cmd"] != "event":
            continue
        event = fields.get("event")
        if event in START_EVENTS:
            starts.append((command.call_id, fields.get("ext", ""), text,
                           getattr(command, "tenant", ""), getattr(command, "node", "")))
        elif event == "ACCEPTED":
            accepts.append((command.call_id, fields.get("ext", "")))
        elif event == "COMPLETED":
            ends.append((command.call_id, fields.get("ext", "")))
    if starts:
        conn.executemany(
            "INSERT OR REPLACE INTO open_legs (call_id, ext, fields, tenant, node) VALUES (?, ?, ?, ?, ?)", starts)
    if accepts:
        conn.executemany("UPDATE open_legs SET accepted = 1 WHERE call_id = ? AND ext = ?", accepts)
    if ends:
        conn.executemany("DELETE FROM open_legs WHERE call_id = ? AND ext = ?", ends)


def read_legs(conn: sqlite3.Connection, call_ids: Sequence[str] | None = None) -> list[LegRow]:
    """Every open leg (or those of ``call_ids``), in the order they were stored."""
    query = "SELECT call_id, fields, accepted, tenant, node FROM open_legs"
    if call_ids is None:
        return conn.execute(query + " ORDER BY rowid").fetchall()
    rows: list[LegRow] = []
    ids = list(call_ids)
    for at in range(0, len(ids), 500):  # SQLite's bound on parameters
        chunk = ids[at:at + 500]
        rows += conn.execute(query + f" WHERE call_id IN ({','.join('?' * len(chunk))}) ORDER BY rowid",
                             chunk).fetchall()
    return rows


def insert_legs(conn: sqlite3.Connection, rows: Iterable[tuple]) -> None:
    """(call_id, ext, fields, accepted, tenant, node) rows, kept where already there."""
    conn.executemany("INSERT OR IGNORE INTO open_legs (call_id, ext, fields, accepted, tenant, node)"
                     " VALUES (?, ?, ?, ?, ?, ?)", rows)


def migrate_legacy(storage_dir: str, place: Callable[[str], LegSource | None]) -> int:
    """Move the open legs of an older fsbridge's ``open-calls.sqlite3`` into
    the tenants' databases, then remove that file.

    ``place(tenant)``: that tenant's database ("": a
    registry from before tenants), None for a tenant no longer configured:
    its legs are dropped, as an older fsbridge closed them with nothing sent
    (its calls' requests have no PlanFix to go to).  Idempotent (INSERT OR
    IGNORE): a crash midway moves the rest at the next start.  Returns the
    legs moved.  Raises OpenCallsError.
    """
    path = os.path.join(storage_dir, LEGACY_FILENAME)
    if not os.path.exists(path):
        return 0
    try:
        db = sqlite3.connect(path)
        try:
            columns = {row[1] for row in db.execute("PRAGMA table_info(open_legs)")}
            if not columns:
                rows = []
            else:
                # A registry from before tenants and nodes has neither column.
                tenant = "tenant" if "tenant" in columns else "''"
                node = "node" if "node" in columns else "''"
                rows = db.execute(f"SELECT call_id, ext, fields, accepted, {tenant}, {node} FROM open_legs"
                                  " ORDER BY rowid").fetchall()
        finally:
            db.close()
        by_tenant: dict[str, list] = {}
        for row in rows:
            by_tenant.setdefault(row[4], []).append(row)
        moved = dropped = 0
        for tenant, legs in by_tenant.items():
            target = place(tenant)
            if target is None:
                dropped += len(legs)
                continue
            target.add_open_legs(legs)
            moved += len(legs)
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(path + suffix)
            except FileNotFoundError:
                pass
    except (OSError, sqlite3.Error) as exc:
        raise OpenCallsError(f"cannot move the open calls of {path} into the outboxes: {exc}") from None
    if rows:
        log.info("%s: %d open call legs moved into the tenants' outbox databases%s", path, moved,
                 f"; {dropped} of tenants no longer configured dropped" if dropped else "")
    return moved


class OpenCalls:
    """What earlier processes left open, from every tenant's database."""

    def __init__(self, sources: Iterable[LegSource] = ()) -> None:
        self._sources: list[LegSource] = []
        # When each inherited call was first seen gone from FreeSWITCH.
        self._gone_since: dict[str, float] = {}
        # What an earlier process left open, read once per source.
        self.inherited: dict[str, list[tuple[dict[str, str], bool]]] = {}
        # call_id -> (node, tenant) of every inherited call.
        self.owners: dict[str, tuple[str, str]] = {}
        for source in sources:
            self.add_source(source)

    def add_source(self, source: LegSource, skip: Callable[[str], bool] | None = None) -> None:
        """Read what an earlier process left open in ``source`` (at start, or
        a tenant added by a reload); ``skip``: calls followed live."""
        self._sources.append(source)
        known = set(self.inherited)  # still inherited from before (a tenant removed and added back)
        self._inherit(source, None, lambda call_id: call_id in known or (skip is not None and skip(call_id)))

    def remove_source(self, source: LegSource) -> None:
        """A tenant no longer served (its outbox closed)."""
        if source in self._sources:
            self._sources.remove(source)

    def _inherit(self, source: LegSource, call_ids: Sequence[str] | None,
                 skip: Callable[[str], bool] | None = None) -> None:
        try:
            for call_id, fields, accepted, tenant, node in source.open_legs(call_ids):
                if skip is not None and skip(call_id):
                    continue
                self.inherited.setdefault(call_id, []).append((json.loads(fields), bool(accepted)))
                self.owners.setdefault(call_id, (node, tenant))
        except (ValueError, sqlite3.Error) as exc:
            raise OpenCallsError(f"cannot read the open calls: {exc}") from None

    def take_back(self, call_ids: Iterable[str]) -> None:
        """Calls this process followed and lost (they ended during an ESL
        gap) become inherited: closed from their CDR or by ``close_inherited``."""
        ids = [call_id for call_id in call_ids if call_id not in self.inherited]
        if not ids:
            return
        for source in self._sources:
            try:
                self._inherit(source, ids)
            except OpenCallsError as exc:  # that tenant's calls stay as they are
                log.error("%s", exc)

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
        fields) pairs; the caller queues them (storing a COMPLETED
        forgets its leg, ``write_legs``).  ``owns``: only the calls of
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
