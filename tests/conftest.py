"""Test-wide set-up.

The service is a gevent program, so the test process is patched the same
way before anything imports sockets or threads: in-process tests of gevent
components then behave as in production, and the fakes (written with plain
threads and sockets) run as greenlets beside them.
"""

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import signal  # noqa: E402
from typing import Iterator  # noqa: E402

import pytest  # noqa: E402

from fsbridge import logs  # noqa: E402
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


# --- no process outlives the suite ------------------------------------------------
# Every fixture that starts a process stops it in its teardown, pass or fail.
# This is the net under them: at the end of the session every process still
# descended from pytest is killed, listed, and the run fails.


def _descendants(root: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live (not zombie) processes below ``root``, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            parents[int(entry)] = int(ppid)
    found, frontier = [], {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
        found.extend(frontier)
    out = []
    for pid in found:
        try:
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmdline = "?"
        out.append((pid, cmdline.strip()))
    return out


def pytest_sessionfinish(session, exitstatus):
    leftovers = _descendants(os.getpid())
    for pid, _ in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if leftovers:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"  pid {pid}: {cmd}" for pid, cmd in leftovers]
        message = "processes left running by the tests (now killed):\n" + "\n".join(lines)
        if reporter is not None:
            reporter.write_line(message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs the CLI in-process (logs.setup) leaves no handler on
    pytest's captured stderr behind for later tests, or for the exit flush."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    if logs._handler is not None and logs._handler not in handlers:  # noqa: SLF001
        root.removeHandler(logs._handler)  # noqa: SLF001
        logs._handler = None  # noqa: SLF001
    root.setLevel(level)
