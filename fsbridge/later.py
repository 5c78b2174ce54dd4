"""Work coalesced into one long-lived greenlet: ``Later(fn, delay_s)``.

``request()`` asks for ``fn`` to run once, ``delay_s`` after the first
request since its last run (0: as soon as the current greenlet yields);
every request made meanwhile is served by that one run.  The service
stores the PlanFix requests read and deletes delivered rows this way.

Why not a greenlet spawned per run: on Python 3.11 each new greenlet gets
its own frame stack, which CPython maps and unmaps (mmap/munmap of 16 kB,
page faults on first use) -- a cost paid per batch, which at a low call
rate is per event.  One greenlet waiting on an Event reuses its stack.
"""

from __future__ import annotations

import logging
from typing import Callable

import gevent
import gevent.event

log = logging.getLogger(__name__)


class Later:
    def __init__(self, fn: Callable[[], None], delay_s: float = 0.0) -> None:
        self._fn = fn
        self.delay_s = delay_s
        self._wanted = gevent.event.Event()
        self._greenlet: gevent.Greenlet | None = None

    @property
    def pending(self) -> bool:
        """A run was asked for and has not started yet."""
        return self._wanted.is_set()

    def request(self) -> None:
        if self._wanted.is_set():
            return
        self._wanted.set()
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._loop)

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            if self.delay_s:
                gevent.sleep(self.delay_s)
            # Cleared before the run: a request made while fn runs gets a run of its own.
            self._wanted.clear()
            try:
                self._fn()
            except Exception:  # the next request must still be served
                log.exception("deferred %s failed", getattr(self._fn, "__qualname__", self._fn))

    def kill(self) -> None:
        """No more runs (a pending one is dropped: the owner runs ``fn`` itself if it must)."""
        self._wanted.clear()
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None:
            greenlet.kill()
