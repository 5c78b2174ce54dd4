"""The durable outbox against the fake PlanFix over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time

import gevent
import pytest

from fsbridge import outbox as outbox_mod
from fsbridge.outbox import Outbox, OutboxError
from fsbridge.planfix import Credentials, DeliveryResult, Outcome, PlanfixClient
from tests.conftest import REPO
from fsbridge.fakes.planfix import FakePlanfix
from tests.outbox_helpers import Cmd, assert_each_once_in_call_order, call_commands, key, many_calls


@pytest.fixture
def fake():
    with FakePlanfix() as server:
        yield server


class Creds:
    """Credentials that a test can change, like `setup` does."""

    def __init__(self, url: str, token: str):
        self.current: Credentials | None = Credentials(url, token)

    def __call__(self) -> Credentials | None:
        return self.current


@pytest.fixture
def make_outbox(tmp_path, fake):
    made: list[Outbox] = []

    def make(creds=None, read_timeout=2.0, **kw) -> Outbox:
        kw = {"min_backoff_s": 0.02, "max_backoff_s": 0.1, "rescan_interval_s": 0.1} | kw
        client = PlanfixClient(creds or Creds(fake.url, fake.token), connect_timeout=0.5, read_timeout=read_timeout,
                               pool_size=kw.get("max_concurrency") or kw.get("concurrency", 16))
        box = Outbox(str(tmp_path / "outbox.sqlite3"), client, **kw)
        made.append(box)
        return box

    yield make
    for box in made:
        if box._dispatcher is not None:
            box.stop(drain_timeout=1)


def wait_until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        gevent.sleep(0.01)


def drained(box: Outbox, timeout: float = 5.0) -> None:
    wait_until(lambda: box.stats()["depth"] == 0 and box.stats()["in_flight"] == 0, timeout, f"outbox to drain ({box.stats()})")


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/tel/api"


def test_delivers_with_token_in_order_and_forgets_delivered_rows(fake, make_outbox, tmp_path):
    box = make_outbox()
    cmds = many_calls(3, 4)
    box.put(cmds)
    assert box.stats()["depth"] == 12
    assert len(outbox_mod.list_entries(box.db_path)) == 12  # durable before anything was sent
    box.start()
    drained(box)
    assert_each_once_in_call_order(fake.delivered, cmds)
    assert all(f["planfix_token"] == fake.token for f in fake.delivered)
    # Deleted in a batch, DELETE_BATCH_S after delivery; seen by another process then.
    wait_until(lambda: outbox_mod.list_entries(box.db_path) == [], timeout=2, what="delivered rows deleted")
    stats = box.stats()
    assert stats["kept_aside"] == 0 and stats["oldest_pending_age_s"] is None
    assert stats["last_success_at"] and abs(stats["last_success_at"] - time.time()) < 5
    fake.assert_no_violations()


def test_rows_delivered_meanwhile_are_deleted_in_the_next_puts_commit(fake, make_outbox, monkeypatch):
    monkeypatch.setattr(outbox_mod, "DELETE_BATCH_S", 60.0)  # the batch's own commit never comes in time
    box = make_outbox()
    box.start()
    box.put(call_commands("c1", 2))
    wait_until(lambda: len(fake.delivered) == 2, what="both delivered")
    assert len(outbox_mod.list_entries(box.db_path)) == 2  # their DELETE still to come
    statements: list[str] = []
    box._conn.set_trace_callback(statements.append)
    box.put(call_commands("c2", 1))
    assert [e.call_id for e in outbox_mod.list_entries(box.db_path)] == ["c2"]  # another process sees them gone
    assert statements.count("COMMIT") == 1  # in the put's own transaction
    assert box.stats()["depth"] == 1


def test_put_while_running_and_record_command(fake, make_outbox):
    box = make_outbox()
    box.start()
    box.put(call_commands("c1", 3))
    box.put([Cmd("c1", {"cmd": "record", "callid": "c1", "record_link": "https://pbx.example.com/r/c1.mp3"})])
    drained(box)
    assert [f.get("event", f["cmd"]) for f in fake.delivered] == ["INCOMING", "ACCEPTED", "COMPLETED", "record"]
    fake.assert_no_violations()


def test_401_is_kept_until_credentials_change_and_wake(fake, make_outbox):
    creds = Creds(fake.url, "wrong-token-0000000000")
    box = make_outbox(creds, min_backoff_s=5, max_backoff_s=5)  # only wake() can bring them back quickly
    cmds = many_calls(2, 3)
    box.put(cmds)
    box.start()
    fake.wait_for(2)  # the head of each call tried once, refused
    gevent.sleep(0.1)
    assert box.stats()["depth"] == 6 and box.stats()["kept_aside"] == 0
    assert "401" in box.stats()["last_error"]
    assert [e.attempts for e in box.list_entries()[:2]] == [1, 1]
    creds.current = Credentials(fake.url, fake.token)
    box.wake()
    drained(box, timeout=3)
    assert_each_once_in_call_order(fake.delivered, cmds)


def test_400_is_kept_aside_with_the_reply_and_the_call_continues(fake, make_outbox):
    fake.decide = lambda form: 400 if form.get("event") == "ACCEPTED" else None
    box = make_outbox()
    box.put(call_commands("c1", 3))
    box.start()
    drained(box)
    assert [f["event"] for f in fake.delivered] == ["INCOMING", "COMPLETED"]
    assert len(fake.requests) == 3  # the rejected one was not retried
    assert box.stats()["kept_aside"] == 1
    (kept,) = box.list_entries()
    assert kept.kept_aside and kept.kept_reason == "rejected" and kept.fields["event"] == "ACCEPTED"
    assert "Invalid parameters" in kept.reply and kept.attempts == 1


def test_503_then_recovery(fake, make_outbox):
    fake.fail_next(3, 503)
    box = make_outbox()
    cmds = call_commands("c1", 3)
    box.put(cmds)
    box.start()
    drained(box)
    assert len(fake.requests) == 6
    assert_each_once_in_call_order(fake.delivered, cmds)


def test_timeouts_garbage_and_dropped_connections_are_retried(fake, make_outbox):
    fake.script("hang", "garbage", "close")
    box = make_outbox(read_timeout=0.2)
    cmds = call_commands("c1", 2)
    box.put(cmds)
    box.start()
    drained(box)
    assert [r.outcome for r in fake.received] == ["hang", "garbage", "close", "ok", "ok"]
    assert_each_once_in_call_order(fake.delivered, cmds)


def test_planfix_down_for_a_while_then_back(fake, make_outbox):
    creds = Creds(dead_url(), fake.token)  # connection refused
    box = make_outbox(creds)
    first = many_calls(10, 2, prefix="early")
    box.put(first)
    box.start()
    gevent.sleep(0.3)
    fake.failure = 503  # now it answers, badly
    creds.current = Credentials(fake.url, fake.token)
    late = many_calls(10, 2, prefix="late")
    box.put(late)
    gevent.sleep(0.3)
    assert box.stats()["depth"] == 40 and box.stats()["oldest_pending_age_s"] >= 0.5
    fake.failure = None  # back; no wake(): backoff alone brings everything
    drained(box)
    assert_each_once_in_call_order(fake.delivered, first + late)
    fake.assert_no_violations()


def test_concurrency_across_calls_with_per_call_order(fake, make_outbox):
    fake.delay = 0.1
    box = make_outbox(concurrency=16)
    cmds = many_calls(40, 5)  # 200 commands
    box.put(cmds)
    started = time.monotonic()
    box.start()
    drained(box, timeout=15)
    elapsed = time.monotonic() - started
    # 200 requests x 100 ms / 16 = 1.25 s ideal; 40 calls of 5 in waves of 16 need >= 1.5 s.
    assert 1.2 <= elapsed < 3.0, elapsed
    assert fake.max_in_flight <= 16
    assert fake.max_in_flight >= 12  # really parallel
    assert_each_once_in_call_order(fake.delivered, cmds)
    assert len({r.client_port for r in fake.received}) <= 16 + 4  # connections reused


def test_max_age_keeps_aside_and_retry_puts_back(fake, make_outbox):
    fake.failure = 503
    box = make_outbox(max_age_s=0.3)
    cmds = call_commands("c1", 2)
    box.put(cmds)
    box.start()
    wait_until(lambda: box.stats()["kept_aside"] == 2, what="both kept aside")
    stats = box.stats()
    assert stats["depth"] == 0 and stats["oldest_pending_age_s"] is None
    kept = box.list_entries()
    assert [e.kept_reason for e in kept] == ["max_age", "max_age"]
    assert all("503" in e.last_error and e.attempts >= 1 for e in kept)
    assert box.list_entries(include_kept_aside=False) == []
    fake.failure = None
    assert box.retry_kept_aside() == 2
    drained(box)
    assert box.stats()["kept_aside"] == 0
    assert_each_once_in_call_order(fake.delivered, cmds)
    assert box.list_entries() == []


def test_cli_retry_from_another_connection_reaches_the_running_service(fake, make_outbox):
    fake.script(400)
    box = make_outbox()
    box.put(call_commands("c1", 1))
    box.start()
    wait_until(lambda: box.stats()["kept_aside"] == 1)
    listing = outbox_mod.cli_list(box.db_path)
    assert listing.startswith("pending: 0, kept aside: 1")
    assert "kept=rejected" in listing and "Invalid parameters" in listing and "callid=c1" in listing
    assert outbox_mod.cli_retry(box.db_path).startswith("1 kept-aside command(s) put back")
    # The running outbox notices the other connection's change within rescan_interval_s.
    wait_until(lambda: outbox_mod.list_entries(box.db_path) == [], what="requeued command delivered")
    assert len(fake.delivered) == 1
    assert box.stats()["kept_aside"] == 0 and box.stats()["depth"] == 0
    assert outbox_mod.cli_list(box.db_path) == "pending: 0, kept aside: 0"


def test_cli_on_a_missing_database(tmp_path):
    path = str(tmp_path / "none.sqlite3")
    assert "nothing was ever queued" in outbox_mod.cli_list(path)
    assert outbox_mod.cli_retry(path).startswith("0 kept-aside")
    assert not (tmp_path / "none.sqlite3").exists()


def test_restart_resumes_pending_in_order_once(fake, make_outbox):
    first = make_outbox()
    cmds = many_calls(5, 3)
    first.put(cmds)
    first.stop(drain_timeout=1)  # never started: nothing sent
    assert fake.requests == []
    second = make_outbox()
    assert second.stats()["depth"] == 15
    second.start()
    drained(second)
    assert_each_once_in_call_order(fake.delivered, cmds)


def test_stop_lets_the_in_flight_request_finish(fake, make_outbox):
    fake.delay = 0.3
    box = make_outbox()
    box.put(call_commands("c1", 2))
    box.start()
    fake.wait_for(1)
    box.stop(drain_timeout=2)
    assert len(fake.delivered) == 1 and len(fake.requests) == 1  # no new request after stop
    left = outbox_mod.list_entries(box.db_path)
    assert [e.fields["event"] for e in left] == ["COMPLETED"]


def test_put_validates_commands(make_outbox):
    box = make_outbox()
    with pytest.raises(ValueError):
        box.put([Cmd("", {"cmd": "event"})])
    with pytest.raises(ValueError):
        box.put([Cmd("c1", {"cmd": "event", "planfix_token": "x"})])
    with pytest.raises(ValueError):
        box.put([Cmd("c1", {"cmd": "event", "duration": 5})])
    assert box.stats()["depth"] == 0


def test_full_disk_raises_a_clear_error_and_keeps_the_database_sound(make_outbox):
    box = make_outbox()
    box.put(call_commands("c1", 3))
    # Simulate a full disk: SQLite answers SQLITE_FULL exactly as on ENOSPC.
    pages = box._conn.execute("PRAGMA page_count").fetchone()[0]
    box._conn.execute(f"PRAGMA max_page_count={pages}")
    big = [Cmd(f"c{i}", dict(call_commands(f"c{i}", 1)[0].fields, phone="7" * 2000)) for i in range(200)]
    with pytest.raises(OutboxError, match="cannot queue 200"):
        box.put(big)
    stats = box.stats()
    assert stats["depth"] == 3 and "full" in stats["storage_error"]
    conn = sqlite3.connect(box.db_path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 3  # the failed batch left nothing
    conn.close()


def test_sigkill_mid_queue_then_restart_loses_nothing_and_resends_nothing_answered(fake, tmp_path):
    db = str(tmp_path / "outbox.sqlite3")
    expected = many_calls(30, 4)
    fake.delay = 0.005

    def worker(*extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.outbox_worker", db, fake.url, fake.token, "--concurrency", "8", *extra],
            cwd=REPO, stdout=subprocess.PIPE, text=True,
        )

    proc = worker("--put", "30", "4")
    try:
        fake.wait_for(40, timeout=20, delivered=True)
        # Freeze PlanFix: new requests hang unanswered, so once the answered
        # ones have been settled the process is killed mid-queue with
        # requests in flight (which, unanswered, may be sent again).
        fake.hang_seconds = 3
        fake.failure = "hang"
        answered = -1
        while answered != len(fake.delivered):
            answered = len(fake.delivered)
            gevent.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = len(fake.delivered)
    assert before < len(expected), "the worker finished before it could be killed"
    fake.failure = None
    proc = worker()
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "drained" in out
    assert_each_once_in_call_order(fake.delivered, expected)
    fake.assert_no_violations()
    assert outbox_mod.list_entries(db) == []
    assert len(set(map(key, fake.requests))) == len(expected)


def test_first_success_after_an_outage_retries_waiting_calls_at_once(fake, make_outbox):
    fake.failure = 503
    box = make_outbox(min_backoff_s=5, max_backoff_s=5)  # without the recovery wake: 2.5 s or more
    stuck = call_commands("stuck-1", 2) + call_commands("stuck-2", 2)
    box.put(stuck)
    box.start()
    fake.wait_for(2)
    fake.failure = None
    started = time.monotonic()
    fresh = call_commands("fresh", 1)
    box.put(fresh)
    drained(box, timeout=3)
    assert time.monotonic() - started < 1.5
    assert_each_once_in_call_order(fake.delivered, stuck + fresh)


def test_an_unexpected_client_error_is_a_retry_not_a_crash(fake, make_outbox):
    box = make_outbox()
    real_send = box.client.send
    calls = []

    def flaky_send(fields):
        calls.append(fields)
        if len(calls) == 1:
            raise RuntimeError("bug")
        return real_send(fields)

    box.client.send = flaky_send
    cmds = call_commands("c1", 2)
    box.put(cmds)
    box.start()
    drained(box)
    assert len(calls) == 3
    assert_each_once_in_call_order(fake.delivered, cmds)


def test_database_file_is_private(make_outbox):
    box = make_outbox()
    assert stat.S_IMODE(os.stat(box.db_path).st_mode) == 0o600


def test_requeued_command_goes_back_by_id_but_never_before_the_one_in_flight(fake, make_outbox):
    fake.script(400)  # INCOMING (seq 0) is rejected and kept aside
    fake.delay = 0.2
    box = make_outbox()
    box.put(call_commands("c1", 3))
    box.start()
    wait_until(lambda: box.stats()["kept_aside"] == 1)
    fake.wait_for(2)  # ACCEPTED (seq 1) is in flight now
    assert box.retry_kept_aside() == 1
    drained(box)
    assert [int(f["diversion"]) for f in fake.delivered] == [1, 0, 2]


def test_in_flight_grows_while_planfix_answers_and_halves_on_503(fake, make_outbox):
    fake.delay = 0.05
    box = make_outbox(concurrency=2, max_concurrency=32)
    cmds = many_calls(64, 3)
    box.put(cmds)
    box.start()
    drained(box, timeout=20)
    assert fake.max_in_flight > 8, fake.max_in_flight  # grew beyond the start of 2
    assert fake.max_in_flight <= 32
    grown = box.limiter.limit
    fake.failure = 503
    box.put(many_calls(4, 1, prefix="late"))
    wait_until(lambda: box.limiter.limit < grown, what="limit to shrink")
    assert box.limiter.limit >= grown // 2 - 1  # halved at most once per cooldown, not collapsed
    assert_each_once_in_call_order(fake.delivered, cmds)


def test_rows_stored_before_a_restart_are_read_from_the_database_when_sent(fake, make_outbox, tmp_path):
    # Only ids are held for what an earlier process stored: what is sent is what the row holds then.
    first = Outbox(str(tmp_path / "outbox.sqlite3"), client=None)
    first.put(call_commands("c1", 1))
    first.stop(drain_timeout=0)
    with sqlite3.connect(tmp_path / "outbox.sqlite3") as conn:
        fields = dict(call_commands("c1", 1)[0].fields, phone="79990000000")
        conn.execute("UPDATE outbox SET fields=? WHERE id=1", (json.dumps(fields),))
    box = make_outbox()
    assert list(box._calls["c1"].entries) == [1] and not box._fresh
    box.start()
    drained(box)
    assert fake.delivered[0]["phone"] == "79990000000"
    box.stop()
    with sqlite3.connect(tmp_path / "outbox.sqlite3") as conn:
        assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0


def selects_of(box: Outbox) -> list[str]:
    """Every SELECT the outbox's connection runs from now on."""
    seen: list[str] = []
    box._conn.set_trace_callback(lambda sql: seen.append(sql) if sql.lstrip().upper().startswith("SELECT") else None)
    return seen


def test_a_row_stored_by_this_process_is_sent_without_reading_it_back(fake, make_outbox):
    # At a steady rate every request is sent from memory: no SELECT per request.
    box = make_outbox()
    cmds = many_calls(10, 3)
    box.put(cmds)
    selects = selects_of(box)
    box.start()
    drained(box)
    box.stop()
    assert_each_once_in_call_order(fake.delivered, cmds)
    assert not [sql for sql in selects if "FROM outbox WHERE id=" in sql]
    assert not box._fresh  # each entry goes with its first attempt


def test_rows_beyond_the_fresh_bound_and_retries_are_read_from_the_database(fake, make_outbox, tmp_path, monkeypatch):
    monkeypatch.setattr(outbox_mod, "FRESH_ROWS", 2)
    box = make_outbox()
    cmds = call_commands("c1", 4)
    box.put(cmds)
    assert sorted(box._fresh) == [1, 2]  # the memory stays bounded: the rest is on disk only
    with sqlite3.connect(tmp_path / "outbox.sqlite3") as conn:
        conn.execute("UPDATE outbox SET fields=? WHERE id=4", (json.dumps(dict(cmds[3].fields, phone="79990000000")),))
    fake.fail_next(1, 503)  # the first attempt of row 1 fails: its retry reads the row
    selects = selects_of(box)
    box.start()
    drained(box)
    box.stop()
    assert [f["diversion"] for f in fake.delivered] == ["0", "1", "2", "3"]
    assert fake.delivered[3]["phone"] == "79990000000"  # row 4 as the database holds it
    reads = [sql for sql in selects if "FROM outbox WHERE id=" in sql]
    assert len(reads) == 3  # row 1's retry, rows 3 and 4


@pytest.mark.parametrize(
    ("result", "overload"),
    [(DeliveryResult(Outcome.RETRY, 429), True), (DeliveryResult(Outcome.RETRY, 502), True),
     (DeliveryResult(Outcome.RETRY, None, error="timeout"), True),
     (DeliveryResult(Outcome.REJECTED, 400), False), (DeliveryResult(Outcome.UNAUTHORIZED, 401), False),
     (DeliveryResult(Outcome.RETRY, 200, error="not JSON"), False), (DeliveryResult(Outcome.NOT_CONFIGURED), False)],
)
def test_which_answers_shrink_the_in_flight_limit(make_outbox, result, overload):
    box = make_outbox(concurrency=8, max_concurrency=64)
    box._pace(result)
    assert box.limiter.limit == (4 if overload else 8)


def test_a_worker_goes_on_with_the_next_ready_call_instead_of_a_greenlet_per_call(tmp_path):
    # One greenlet per call activation (and a dispatcher wake-up each) was a
    # per-request cost at thousands of requests a second: a worker whose
    # call is done takes the next ready one while the limit leaves room.
    in_flight = []

    class Instant:
        def __init__(self):
            self.now = 0
            self.delivered = []

        def send(self, fields):
            self.now += 1
            in_flight.append(self.now)
            gevent.sleep(0.001)  # a real request yields to the hub
            self.now -= 1
            self.delivered.append(fields)
            return DeliveryResult(Outcome.DELIVERED, 200, {})

    client = Instant()
    box = Outbox(str(tmp_path / "outbox.sqlite3"), client, concurrency=4)
    cmds = many_calls(40, 3)
    box.put(cmds)
    spawned = []
    real_spawn = box._workers.spawn
    box._workers.spawn = lambda *a: spawned.append(a) or real_spawn(*a)
    box.start()
    drained(box)
    box.stop(drain_timeout=1)
    assert len(spawned) <= 8  # about one per slot, not one per call (40)
    assert max(in_flight) <= 4  # and never more in flight than the limit
    assert_each_once_in_call_order(client.delivered, cmds)


def test_a_low_rate_reuses_one_parked_worker_instead_of_a_greenlet_per_request(fake, make_outbox):
    # One call at a time, each stored after the last was delivered: the
    # worker that delivered one waits for the next instead of ending.
    box = make_outbox()
    spawned = []
    real_spawn = box._workers.spawn
    box._workers.spawn = lambda *a: spawned.append(a) or real_spawn(*a)
    box.start()
    for i in range(10):
        box.put(call_commands(f"c{i}", 1))
        drained(box)
    assert len(fake.delivered) == 10
    assert len(spawned) == 1 and len(box._parked) == 1
    box.stop(drain_timeout=1)
    assert not box._parked and len(box._workers) == 0  # stop() ends parked workers at once


def test_a_parked_worker_ends_when_idle_and_parked_ones_are_bounded(fake, make_outbox, monkeypatch):
    monkeypatch.setattr(outbox_mod, "PARKED_IDLE_S", 0.2)
    monkeypatch.setattr(outbox_mod, "PARKED_WORKERS", 3)
    fake.delay = 0.05  # 8 calls in flight together, then all done at once
    box = make_outbox(concurrency=8)
    box.put(many_calls(8, 1))
    box.start()
    drained(box)
    assert len(box._parked) == 3  # the others ended
    wait_until(lambda: not box._parked and len(box._workers) == 0, 3, "idle parked workers to end")
    box.put(call_commands("later", 1))  # a new worker for what comes later
    drained(box)
    assert len(fake.delivered) == 9
    box.stop(drain_timeout=1)


def test_a_backlog_beyond_the_memory_window_waits_on_disk_and_keeps_call_order(fake, make_outbox, monkeypatch):
    """Only window_calls calls' ids are held in memory; the rest of a backlog is
    read back from disk in id order as those are delivered: each command once,
    each call in order, also for a call with commands on both sides."""
    monkeypatch.setattr(outbox_mod, "REFILL_INTERVAL_S", 0.01)
    box = make_outbox()
    box.window_calls = 5
    cmds = many_calls(20, 3, prefix="w")  # interleaved: every call has rows in memory and on disk
    for i in range(0, len(cmds), 4):
        box.put(cmds[i:i + 4])
    assert len(box._calls) <= 5 + 4 and box.depth() == 60  # the depth counts what waits on disk
    box.put(call_commands("w-0000", 1, first_seq=3))  # a call in memory gets a command while spilling
    box.start()
    drained(box, timeout=10)
    assert_each_once_in_call_order(fake.delivered, cmds + call_commands("w-0000", 1, first_seq=3))
    assert box._spill_from is None and box.depth() == 0  # caught up: new commands go straight to memory


def test_a_restart_with_a_backlog_beyond_the_window_loads_only_the_window(fake, make_outbox, tmp_path, monkeypatch):
    monkeypatch.setattr(outbox_mod, "MEMORY_WINDOW_CALLS", 4)
    monkeypatch.setattr(outbox_mod, "REFILL_INTERVAL_S", 0.01)
    cmds = many_calls(12, 2, prefix="r")
    first = Outbox(str(tmp_path / "outbox.sqlite3"), client=None)  # never started: stores only
    first.window_calls = 1000
    first.put(cmds)
    first.stop(drain_timeout=0)
    box = make_outbox()
    assert len(box._calls) == 4 and box.depth() == 24
    box.start()
    drained(box, timeout=10)
    assert_each_once_in_call_order(fake.delivered, cmds)
