"""Test-wide set-up.

The service is a gevent program, so the test process is patched the same
way before anything imports sockets or threads: in-process tests of gevent
components then behave as in production, and the fakes (written with plain
threads and sockets) run as greenlets beside them.
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
# ../shared beside the checkout; FSBRIDGE_SHARED overrides (e.g. in CI).
SHARED = pathlib.Path(os.environ.get("FSBRIDGE_SHARED", REPO.parent / "shared"))
TRACES = SHARED / "esl-traces"


@pytest.fixture(scope="session")
def traces_dir() -> pathlib.Path:
    if not TRACES.is_dir():
        pytest.fail(f"ESL traces not found at {TRACES} (set FSBRIDGE_SHARED)")
    return TRACES
