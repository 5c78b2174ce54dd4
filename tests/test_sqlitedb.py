"""WAL checkpoints of the event-path databases run in a thread, and the WAL stays bounded."""

from __future__ import annotations

import os

import gevent
from gevent import monkey

from fsbridge.outbox import Outbox
from fsbridge.sqlitedb import WalCheckpointer, open_private
from tests.outbox_helpers import Cmd


def _table(path: str):
    conn = open_private(path, "NORMAL")
    conn.execute("CREATE TABLE t (v TEXT)")
    return conn


def _write(conn, rows: int = 50) -> None:
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO t VALUES (?)", [("x" * 2000,)] * rows)
    conn.execute("COMMIT")


def _wal_frames(conn) -> int:
    # A PASSIVE checkpoint on the writer's connection reports (busy, frames in the WAL, backfilled).
    return conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]


def test_writes_are_checkpointed_in_the_background_not_by_the_writer(tmp_path):
    path = str(tmp_path / "db.sqlite3")
    conn = _table(path)
    ckpt = WalCheckpointer(conn, path, delay_s=0.01)
    for _ in range(60):  # ~1,500 pages: past SQLite's own 1,000-page autocheckpoint
        _write(conn)
        ckpt.note_write()
    assert ckpt.runs == 0  # nothing happens inside the writes
    with gevent.Timeout(10):
        while ckpt.runs == 0:
            gevent.sleep(0.01)
    busy, frames, backfilled = ckpt.last
    assert busy == 0 and frames >= 1500 and backfilled == frames
    # Everything was copied back: the next write starts the WAL over.
    _write(conn, 1)
    assert _wal_frames(conn) < 10
    ckpt.close()
    conn.close()


def test_the_wal_stays_bounded_when_the_background_checkpoint_never_runs(tmp_path):
    path = str(tmp_path / "db.sqlite3")
    conn = _table(path)
    ckpt = WalCheckpointer(conn, path, delay_s=3600, fallback_pages=200)
    for _ in range(40):  # ~2,000 pages written
        _write(conn)
        ckpt.note_write()
    # The writer's own checkpoint past 200 pages: the file never grows much past that.
    assert os.path.getsize(path + "-wal") < 300 * 4096
    ckpt.close()  # the pending run is cancelled
    assert ckpt.runs == 0
    conn.close()


def test_close_waits_for_a_checkpoint_in_its_thread(tmp_path):
    path = str(tmp_path / "db.sqlite3")
    conn = _table(path)
    ckpt = WalCheckpointer(conn, path, delay_s=0)
    checkpoint, thread_sleep = ckpt._checkpoint, monkey.get_original("time", "sleep")

    def slow_checkpoint():  # a checkpoint stuck on a slow disk
        thread_sleep(0.2)
        return checkpoint()

    ckpt._checkpoint = slow_checkpoint
    _write(conn, 500)
    ckpt.note_write()
    with gevent.Timeout(5):
        while not ckpt._in_thread:
            gevent.sleep(0.01)
    ckpt.close()  # does not close the connection under the running checkpoint
    assert ckpt.runs == 1 and ckpt.last[2] == ckpt.last[1]
    conn.close()


def test_outbox_commits_leave_checkpoints_to_the_background(tmp_path):
    box = Outbox(str(tmp_path / "outbox.sqlite3"), client=None)  # never started: nothing is sent
    box._checkpointer.delay_s = 0.01
    box.put([Cmd("call-1", {"cmd": "event", "event": "INCOMING", "x": "y" * 3000}) for _ in range(200)])
    with gevent.Timeout(10):
        while box._checkpointer.runs == 0:
            gevent.sleep(0.01)
    busy, frames, backfilled = box._checkpointer.last
    assert busy == 0 and frames > 0 and backfilled == frames
    box.stop(drain_timeout=0.1)
