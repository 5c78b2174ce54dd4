"""Fixtures for the fault suite: the real service process between the fakes.

Every test here talks to `python -m fsbridge run` (tests/service_proc.py)
over real sockets: the fake FreeSWITCH feeds it ESL bytes from the
captures, the fake PlanFix checks every request it sends against the spec.
Timeouts and backoffs are shortened in the config, never by patching code.
"""

from __future__ import annotations

import collections
import time
from typing import Callable, Iterator

import pytest

from fsbridge.fakes.freeswitch import FakeFreeSwitch
from fsbridge.fakes.planfix import FakePlanfix
from tests.service_proc import ServiceProcess
from tests.test_tracker_traces import EXPECTED

# The recording fields depend on files on disk (none exist here): the
# service then reports is_recorded=0 and no link.  Everything else must be
# exactly the tracker's expectation for the capture.
RECORDING_FIELDS = ("is_recorded", "record_link")


def expected_fields(trace: str) -> list[dict[str, str]]:
    """What PlanFix must receive for one capture, in order, without a recording on disk."""
    rows = []
    for fields, _recording in EXPECTED[trace]:
        fields = dict(fields)
        if fields["event"] == "COMPLETED":
            fields["is_recorded"] = "0"
        rows.append(fields)
    return rows


def without_token(form: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in form.items() if k != "planfix_token"}


def delivered_for(pf: FakePlanfix, callid: str) -> list[dict[str, str]]:
    """The forms PlanFix answered 200 for one call, in answer order, duplicates dropped.

    A duplicate can only be an in-flight request repeated after a crash or a
    lost answer (at-least-once); it is removed so order is judged on firsts.
    """
    seen: list[dict[str, str]] = []
    for form in pf.delivered:
        form = without_token(form)
        if form.get("callid") == callid and form not in seen:
            seen.append(form)
    return seen


def replay_calls(fs: FakeFreeSwitch, traces_dir, traces: list[str]) -> dict[str, list[dict[str, str]]]:
    """Run each capture as a fresh call; callid -> the forms PlanFix must get, in order."""
    from tests.faults.calls import expected_with_callid, fresh_call

    wanted = {}
    for trace in traces:
        callid, frames = fresh_call(traces_dir, trace)
        assert fs.replay(frames).wait(10)
        wanted[callid] = expected_with_callid(expected_fields(trace), callid)
    return wanted


def wait_all_delivered(svc: ServiceProcess, pf: FakePlanfix, wanted: dict[str, list[dict[str, str]]],
                       timeout: float = 15.0) -> None:
    """Block until PlanFix answered 200 to exactly `wanted`, call by call in order."""
    deadline = time.monotonic() + timeout
    while any(delivered_for(pf, callid) != forms for callid, forms in wanted.items()):
        assert time.monotonic() < deadline, ({c: delivered_for(pf, c) for c in wanted}, svc.log()[-3000:])
        time.sleep(0.02)


def duplicates(pf: FakePlanfix) -> int:
    counts = collections.Counter(tuple(sorted(without_token(f).items())) for f in pf.delivered)
    return sum(n - 1 for n in counts.values())


def assert_clean_log(svc: ServiceProcess) -> None:
    text = svc.log()
    assert "Traceback" not in text, text[-6000:]


@pytest.fixture
def fs() -> Iterator[FakeFreeSwitch]:
    server = FakeFreeSwitch().start()
    yield server
    server.stop()


@pytest.fixture
def pf() -> Iterator[FakePlanfix]:
    fake = FakePlanfix(hang_seconds=5).start()
    yield fake
    fake.stop()


@pytest.fixture
def service(tmp_path, fs, pf) -> Iterator[Callable[..., ServiceProcess]]:
    """Factory: ``service(settings=None, start=True)``; every process is stopped after the test."""
    started: list[ServiceProcess] = []

    def make(settings: dict[str, dict[str, str]] | None = None, start: bool = True,
             workdir=None) -> ServiceProcess:
        svc = ServiceProcess(workdir or tmp_path / f"svc{len(started)}", fs_port=fs.port,
                             planfix_url=pf.url, planfix_token=pf.token, settings=settings)
        started.append(svc)
        if start:
            svc.start()
        return svc

    try:
        yield make
    finally:
        for svc in started:
            svc.kill()  # a no-op for one already stopped


def wait_connected(svc: ServiceProcess, fs: FakeFreeSwitch, subscriptions: int = 1, timeout: float = 10.0) -> None:
    """The service is logged in and subscribed (events sent before that are lost, as with FreeSWITCH)."""
    assert fs.wait_until(lambda: fs.subscribed >= subscriptions, timeout), svc.log()[-3000:]
    svc.wait_health(lambda h: h["freeswitch"]["state"] == "connected", timeout)
