"""Test-wide set-up.

The service is a gevent program, so the test process is patched the same
way before anything imports sockets or threads: in-process tests of gevent
components then behave as in production, and the fakes (written with plain
threads and sockets) run as greenlets beside them.
"""

from gevent import monkey

monkey.patch_all()

import pathlib  # noqa: E402
from typing import Iterator  # noqa: E402

import pytest  # noqa: E402

from fsbridge.fakes.freeswitch import FakeFreeSwitch  # noqa: E402

# The real FreeSWITCH captures the suite replays: part of the repo (and the
# sdist), so a clone runs its tests with nothing beside it.
REPO = pathlib.Path(__file__).resolve().parent.parent
TRACES = REPO / "tests" / "data" / "esl"


@pytest.fixture(scope="session")
def traces_dir() -> pathlib.Path:
    return TRACES


@pytest.fixture
def fake() -> Iterator[FakeFreeSwitch]:
    """A started fake FreeSWITCH, stopped after the test."""
    server = FakeFreeSwitch().start()
    yield server
    server.stop()
