"""Process faults: SIGKILL during delivery and during `setup`'s write, a full
disk under storage.dir, SIGTERM with requests in flight."""

from __future__ import annotations

import http.client
import os
import sqlite3
import subprocess
import threading
import time
import uuid

import pytest

from fsbridge.state import SettingsStore
from fsbridge.fakes.planfix import FakePlanfix
from tests.faults.conftest import (
    assert_clean_log, duplicates, replay_calls, wait_all_delivered, wait_connected,
)
from tests.faults.rawhttp import request

CALLS = ["01-inbound-single-answer", "02-inbound-ring-group", "03-inbound-hunt-sequential",
         "05a-outbound-answer", "05f-outbound-noanswer-timeout", "06a-click-to-call-answer"]


def total(wanted) -> int:
    return sum(len(forms) for forms in wanted.values())


def test_sigkill_during_delivery_loses_nothing(service, fs, pf, traces_dir, tmp_path):
    pf.delay = 0.15  # deliveries are slow, so the kill lands while several are in flight
    svc = service(workdir=tmp_path / "svc")
    wait_connected(svc, fs)
    wanted = replay_calls(fs, traces_dir, CALLS)
    svc.wait_health(lambda h: h["outbox"]["depth"] + len(pf.delivered) >= total(wanted))
    pf.wait_for(len(wanted) + 2, delivered=True)  # some answered, most not yet
    svc.kill()
    assert len(pf.delivered) < total(wanted)
    pf.delay = 0
    again = service(workdir=tmp_path / "svc")  # same storage dir
    wait_all_delivered(again, pf, wanted)
    # At-least-once: only a request in flight at the kill may come twice (one per call at most).
    assert duplicates(pf) <= len(wanted)
    pf.assert_no_violations()
    again.wait_health(lambda h: h["outbox"]["depth"] == 0)
    assert_clean_log(again)


def test_sigkill_right_after_setup_keeps_the_setting(service, fs, pf, traces_dir, tmp_path):
    with FakePlanfix() as new_planfix:
        svc = service(workdir=tmp_path / "svc")
        answer = request(svc.port, "POST", "/planfix", (
            f"cmd=setup&token={svc.token}&planfix_url={new_planfix.url}&planfix_token={new_planfix.token}").encode())
        assert answer.status == 200, answer.body
        svc.kill()
        # The restarted service's config still names the old PlanFix: the stored setting must win.
        again = service(workdir=tmp_path / "svc")
        wait_connected(again, fs)
        wanted = replay_calls(fs, traces_dir, CALLS[:2])
        wait_all_delivered(again, new_planfix, wanted)
        assert not pf.requests
        new_planfix.assert_no_violations()


def test_sigkill_during_setup_writes_never_corrupts(service, fs, pf, tmp_path):
    """Kill the process while `setup` rewrites the settings again and again:
    afterwards the file holds one complete setting, old or new."""
    urls = [f"http://127.0.0.1:{port}/tel/api" for port in (40001, 40002)]
    tokens = [uuid.uuid4().hex, uuid.uuid4().hex]
    for round_ in range(2):
        svc = service(workdir=tmp_path / "svc")
        stop = threading.Event()
        answered = []

        def hammer():
            n = 0
            while not stop.is_set():
                try:
                    answered.append(request(svc.port, "POST", "/planfix", (
                        f"cmd=setup&token={svc.token}&planfix_url={urls[n % 2]}&planfix_token={tokens[n % 2]}"
                    ).encode(), timeout=2).status)
                except (OSError, http.client.HTTPException):  # the kill cut the answer off
                    return
                n += 1

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.3 + 0.1 * round_)
        svc.kill()
        stop.set()
        for thread in threads:
            thread.join(5)
        assert 200 in answered
        stored = SettingsStore(svc.storage / "planfix-settings.json").load()
        assert (stored.url, stored.token) in set(zip(urls, tokens))
        # No temporary file of an interrupted write is left where the next start could mistake it.
        assert sorted(p for p in os.listdir(svc.storage) if p.startswith("planfix-settings")) == [
            "planfix-settings.json"]
    again = service(workdir=tmp_path / "svc")
    assert again.health()["planfix_configured"]
    assert_clean_log(again)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (the tests run as root); skipped where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(path) -> None:
    """Write until ENOSPC."""
    # Unbuffered: a buffered file would hold the bytes of the failed write and
    # raise ENOSPC again when the `with` closes (flushes) it.
    with open(path, "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
                os.fsync(filler.fileno())
        except OSError:
            pass
    # Small leftovers too (tmpfs rounds to pages).
    for n in range(1000):
        try:
            with open(f"{path}.{n}", "wb", buffering=0) as small:
                small.write(b"\0" * 4096)
        except OSError:
            break


def test_full_disk_is_reported_and_recovers(service, fs, pf, traces_dir, tiny_disk):
    svc = service({"storage": {"dir": str(tiny_disk / "state")}})
    wait_connected(svc, fs)
    first = replay_calls(fs, traces_dir, CALLS[:1])
    wait_all_delivered(svc, pf, first)
    fill(tiny_disk / "filler")
    wanted = replay_calls(fs, traces_dir, CALLS[1:])
    health = svc.wait_health(lambda h: h["storage_error"])
    assert health["status"] == "degraded"
    assert "cannot store PlanFix requests" in svc.log() and "disk is full" in svc.log()
    for name in os.listdir(tiny_disk):
        if name.startswith("filler"):
            os.unlink(tiny_disk / name)
    wait_all_delivered(svc, pf, wanted)
    health = svc.wait_health(lambda h: not h["storage_error"] and h["outbox"]["depth"] == 0)
    assert health["status"] == "ok"
    pf.assert_no_violations()
    assert svc.stop() == 0
    assert "storage works again" in svc.log()
    # No corruption: every SQLite database under storage.dir checks clean.
    for name in os.listdir(tiny_disk / "state"):
        if name.endswith(".sqlite3"):
            with sqlite3.connect(tiny_disk / "state" / name) as db:
                assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)], name
    assert_clean_log(svc)


def test_sigterm_drains_in_flight_delivery_and_exits_cleanly(service, fs, pf, traces_dir, tmp_path):
    pf.delay = 0.8
    svc = service(workdir=tmp_path / "svc")
    wait_connected(svc, fs)
    wanted = replay_calls(fs, traces_dir, CALLS[:3])
    pf.wait_for(1)  # a delivery is in flight
    started = time.monotonic()
    code = svc.stop(timeout=10)
    elapsed = time.monotonic() - started
    assert code == 0
    assert elapsed < 6, elapsed
    assert [r for r in pf.received if r.outcome == "ok"], "the delivery in flight at SIGTERM was not finished"
    log = svc.log()
    assert "stopping: finishing in-flight PlanFix requests" in log and log.rstrip().endswith("stopped")
    # What was still queued is delivered by the next start, in order, once.
    pf.delay = 0
    again = service(workdir=tmp_path / "svc")
    wait_all_delivered(again, pf, wanted)
    assert duplicates(pf) == 0
    assert_clean_log(again)


def test_sigterm_finishes_an_http_request_in_progress(service, fs, pf):
    pf.delay = 0.8  # makeCall asks PlanFix for the client's name first: the request takes ~0.8 s
    svc = service()
    wait_connected(svc, fs)
    result = {}

    def make_call() -> None:
        try:
            result["answer"] = request(svc.port, "POST", "/planfix",
                                       f"cmd=makeCall&token={svc.token}&from=101&to=79101234567".encode())
        except OSError as exc:
            result["answer"] = exc

    caller = threading.Thread(target=make_call)
    caller.start()
    # SIGTERM only once the service is inside the request (asking PlanFix for
    # the client's name): a connection still in the listen backlog is reset
    # by any server that closes its socket, and proves nothing here.
    assert fs.wait_until(lambda: any(form.get("cmd") == "contact" for form in pf.requests), 5)
    assert svc.stop(timeout=10) == 0
    caller.join(5)
    assert not isinstance(result["answer"], Exception), result["answer"]
    assert result["answer"].status in (200, 503), result["answer"]


def test_sigkill_mid_call_the_restart_completes_the_open_calls(service, fs, pf, traces_dir, tmp_path):
    """Killed while calls ring and talk: the next process learns from FreeSWITCH
    (`show channels as json`: idle) that they ended and sends their COMPLETED."""
    from tests.faults.calls import fresh_call
    from tests.faults.test_freeswitch_faults import MID_CALL, assert_every_leg_completed, first_half

    svc = service(workdir=tmp_path / "svc")
    wait_connected(svc, fs)
    calls = {}
    for trace in MID_CALL:
        callid, frames = fresh_call(traces_dir, trace)
        assert fs.replay(first_half(frames)).wait(10)
        calls[callid] = trace
    svc.wait_health(lambda h: h["open_calls"] == len(MID_CALL) and h["outbox"]["depth"] == 0)
    svc.kill()
    again = service(workdir=tmp_path / "svc")
    assert_every_leg_completed(pf, calls)
    assert f"{len(MID_CALL)} calls were open when the service last stopped" in again.log()
    again.wait_health(lambda h: h["open_calls_from_before_restart"] == 0)
    assert_clean_log(again)
