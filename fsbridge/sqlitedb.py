"""Opening the service's SQLite files one way: private, WAL, a set sync level."""

from __future__ import annotations

import os
import sqlite3


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
