"""fsbridge.esl against the fake FreeSWITCH over real sockets.

Timeouts are tenths of a second so every fault (refusal, wrong password,
drop, restart, silence, garbage) is exercised end to end in a few seconds.
"""

from __future__ import annotations

import logging
import socket
import time

import gevent
import pytest

from fsbridge import esl
from fsbridge.esl import EslCommandError, EslConnection, EslNotConnected, EslTimeout
from fsbridge.fakes.freeswitch import (
    FakeFreeSwitch,
    event_frame,
    trace_api_bodies,
    trace_events,
    wait_until,
)
from tests.conftest import TRACES

EVENTS = ["CHANNEL_CREATE", "CHANNEL_HANGUP_COMPLETE", "BACKGROUND_JOB"]
FAST = dict(connect_timeout=0.3, command_timeout=0.3, max_backoff=0.05, idle_timeout=30.0)


def wait_for(predicate, timeout: float = 3.0) -> bool:
    return wait_until(predicate, timeout)


class Recorder:
    """Everything the connection reported through its callbacks."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.states: list[tuple[str, str]] = []
        self.connected: list[str] = []

    def on_event(self, headers, body) -> None:
        self.events.append((headers, body))
        if headers.get("Unique-ID") == "boom":
            raise RuntimeError("handler bug")

    def names(self) -> list[str]:
        return [h.get("Event-Name") for h, _ in self.events]

    def on_state(self, state, detail) -> None:
        self.states.append((state, detail))


@pytest.fixture
def connect():
    made: list[EslConnection] = []

    def make(port: int, password: str = "ClueCon", events=EVENTS, start=True, **options):
        rec = Recorder()
        conn = EslConnection("127.0.0.1", port, password, list(events), on_event=rec.on_event,
                             on_state=rec.on_state, on_connected=rec.connected.append, **{**FAST, **options})
        made.append(conn)
        if start:
            conn.start()
        return conn, rec

    yield make
    for conn in made:
        conn.stop()


def hostile(fake, **values) -> bytes:
    headers = {"Event-Name": "CHANNEL_CREATE", "Core-UUID": fake.core_uuid, "Unique-ID": "real-uuid"}
    headers.update(values)
    return event_frame(headers)


def sentinel(fake, n: int) -> bytes:
    return event_frame({"Event-Name": "CHANNEL_HANGUP_COMPLETE", "Unique-ID": f"sentinel-{n}"})


def got_sentinel(rec, n: int) -> bool:
    return any(h.get("Unique-ID") == f"sentinel-{n}" for h, _ in rec.events)


# -- connecting -------------------------------------------------------------


def test_connects_authenticates_and_subscribes_to_exactly_the_given_events(fake, connect):
    conn, rec = connect(fake.port)
    assert conn.wait_connected(2)
    assert fake.commands == [
        "auth ClueCon",
        "event plain HEARTBEAT CHANNEL_CREATE CHANNEL_HANGUP_COMPLETE BACKGROUND_JOB",
        "api global_getvar core_uuid",
    ]
    assert rec.connected == [fake.core_uuid] and conn.core_uuid == fake.core_uuid
    assert [s for s, _ in rec.states] == ["connecting", "connected"]
    assert conn.health() == {"state": "connected", "detail": f"connected to 127.0.0.1:{fake.port}",
                             "core_uuid": fake.core_uuid, "connections": 1}
    conn.stop()
    assert fake.commands[-1] == "exit" and conn.state == "stopped"
    accepted = fake.accepted
    gevent.sleep(0.2)
    assert fake.accepted == accepted  # stopped means no reconnect


def test_refuses_bad_configuration():
    with pytest.raises(ValueError, match="event name"):
        EslConnection("127.0.0.1", 1, "pw", ["CHANNEL_CREATE\nauth x"], on_event=print)
    with pytest.raises(ValueError, match="command_timeout"):
        EslConnection("127.0.0.1", 1, "pw", [], on_event=print, command_timeout=0)


def test_commands_before_connecting_raise_not_connected(connect):
    conn, _ = connect(1, start=False)
    with pytest.raises(EslNotConnected):
        conn.api("status")
    with pytest.raises(EslNotConnected):
        conn.bgapi("status")


# -- events -----------------------------------------------------------------


def test_trace_events_arrive_in_order_with_headers_decoded_per_line(fake, connect):
    events = trace_events(TRACES / "06a-click-to-call-answer.plain.txt")
    conn, rec = connect(fake.port)
    assert conn.wait_connected(2)
    fake.replay(TRACES / "06a-click-to-call-answer.plain.txt").wait()
    wanted = [e for e in events if e.name in ("HEARTBEAT", *EVENTS)]
    assert wait_for(lambda: len(rec.events) == len(wanted))
    assert rec.names() == [e.name for e in wanted]
    job_headers, job_body = next((h, b) for h, b in rec.events if h.get("Event-Name") == "BACKGROUND_JOB")
    assert job_body == b"+OK 987741d5-a8ae-4322-a9eb-1a87a1af80df\n"
    assert job_headers.get("Content-Length") == str(len(job_body))
    first = rec.events[0][0]
    assert first.get("Channel-Name").startswith("sofia/internal/101@127.0.0.1")  # %40 decoded


def test_encoded_newline_in_caller_name_cannot_forge_a_header(fake, connect):
    conn, rec = connect(fake.port)
    assert conn.wait_connected(2)
    fake.inject(hostile(fake, **{"Caller-Caller-ID-Name": "Evil\nUnique-ID: forged\nCall-Direction: outbound"}))
    assert wait_for(lambda: rec.events)
    headers, _ = rec.events[0]
    assert headers.get("Unique-ID") == "real-uuid"
    assert headers.get("Call-Direction") is None
    assert headers.get("Caller-Caller-ID-Name") == "Evil\nUnique-ID: forged\nCall-Direction: outbound"


def test_events_read_earlier_keep_their_bytes_when_later_reads_reuse_the_buffer(fake, connect):
    # The reader receives into one reused buffer; what it hands on must be
    # a copy, or each read would overwrite the events kept from before.
    conn, rec = connect(fake.port)
    assert conn.wait_connected(2)
    for n in range(1, 4):
        fake.inject(sentinel(fake, n))  # one read each
        assert wait_for(lambda: got_sentinel(rec, n))
    assert [h.get("Unique-ID") for h, _ in rec.events] == ["sentinel-1", "sentinel-2", "sentinel-3"]


def test_a_failing_handler_does_not_stop_the_reader(fake, connect, caplog):
    conn, rec = connect(fake.port)
    assert conn.wait_connected(2)
    fake.inject(hostile(fake, **{"Unique-ID": "boom"}) + sentinel(fake, 1))
    assert wait_for(lambda: got_sentinel(rec, 1))
    assert "handler bug" in caplog.text and conn.connections == 1


def test_a_burst_of_events_leaves_other_greenlets_their_turn(fake):
    """gevent's recv returns at once while data waits: the reader yields every
    READER_SLICE_S all the same, so the flusher, delivery and HTTP run during a
    burst, not only after it."""
    n_events = 4_000
    handled: list[int] = []
    ticks: list[int] = []

    def slow_handler(headers, body):
        handled.append(1)
        end = time.perf_counter() + 0.0002  # a handler's CPU: the burst takes ~0.8 s
        while time.perf_counter() < end:
            pass

    conn = EslConnection("127.0.0.1", fake.port, "ClueCon", EVENTS, on_event=slow_handler, **FAST)
    conn.start()
    try:
        assert conn.wait_connected(2)

        def ticker():
            while len(handled) < n_events:
                ticks.append(len(handled))
                gevent.sleep(0)

        runner = gevent.spawn(ticker)
        fake.inject(b"".join(sentinel(fake, n) for n in range(n_events)))
        assert wait_for(lambda: len(handled) == n_events, 10)
        runner.join(1)
    finally:
        conn.stop()
    turns_during = {n for n in ticks if 0 < n < n_events}
    assert len(turns_during) >= 5  # ~0.8 s of reading, a turn every 50 ms


# -- commands ---------------------------------------------------------------


def test_api_returns_the_body_and_raises_on_err(fake, connect, traces_dir):
    conn, _ = connect(fake.port)
    assert conn.wait_connected(2)
    assert conn.api("status") == trace_api_bodies(traces_dir / "92-api-status-version.raw.txt")[0].decode()
    with pytest.raises(EslCommandError, match="nosuchcommand Command not found!"):
        conn.api("nosuchcommand")
    fake.set_api("originate", "-USAGE: <call url> <exten>|&<application_name>(<app_args>)\n")
    with pytest.raises(EslCommandError, match="USAGE"):
        conn.api("originate")
    sent = len(fake.commands)
    with pytest.raises(ValueError):
        conn.api("status\n\nbgapi originate user/1 &park")
    with pytest.raises(ValueError):
        conn.bgapi("status", job_uuid="x\nEvil: 1")
    gevent.sleep(0.05)
    assert len(fake.commands) == sent  # nothing reached FreeSWITCH
    assert conn.connected  # an error reply does not kill the connection


def test_bgapi_sends_our_job_uuid_and_the_result_arrives_as_background_job(fake, connect):
    conn, rec = connect(fake.port)
    assert conn.wait_connected(2)
    command = "originate {origination_uuid=0a2c1d3e-0000-4000-8000-000000000001}user/101 79101234567 XML default"
    job = conn.bgapi(command, job_uuid="5d1c7a52-1111-4222-8333-444455556666")
    assert job == "5d1c7a52-1111-4222-8333-444455556666"
    assert fake.commands[-1] == f"bgapi {command}\nJob-UUID: {job}"
    assert wait_for(lambda: rec.events)
    headers, body = rec.events[-1]
    assert (headers.get("Event-Name"), headers.get("Job-UUID")) == ("BACKGROUND_JOB", job)
    assert body == b"+OK 0a2c1d3e-0000-4000-8000-000000000001\n"
    fake.set_bgapi_result("originate", "-ERR USER_BUSY\n")
    other = conn.bgapi("originate user/102 &park")
    assert other and other != job
    assert wait_for(lambda: len(rec.events) == 2)
    assert rec.events[-1][0].get("Job-UUID") == other and rec.events[-1][1] == b"-ERR USER_BUSY\n"


def test_replies_are_matched_in_order_across_greenlets(fake, connect):
    conn, _ = connect(fake.port)
    assert conn.wait_connected(2)
    fake.set_api("echo a", "a")
    fake.set_api("echo b", "b")
    jobs = [gevent.spawn(conn.api, f"echo {'ab'[i % 2]}") for i in range(20)]
    gevent.joinall(jobs, timeout=2)
    assert [j.value for j in jobs] == ["ab"[i % 2] for i in range(20)]


# -- faults -----------------------------------------------------------------


def test_wrong_password_is_auth_failed_then_connects_when_fixed(fake, connect, caplog):
    fake.password = "S3cret"
    with caplog.at_level(logging.ERROR, logger="fsbridge.esl"):
        conn, rec = connect(fake.port)
        assert wait_for(lambda: conn.state == "auth_failed")
        assert wait_for(lambda: fake.accepted >= 2)  # retried
    assert "rejected the ESL password" in caplog.text
    assert "ClueCon" not in caplog.text  # the password is never logged
    assert not fake.wait_until(lambda: conn.state != "auth_failed", 0.1)  # stays visible while retrying
    fake.password = "ClueCon"
    assert wait_for(lambda: conn.connected)
    assert rec.connected == [fake.core_uuid]


def test_refused_connection_then_freeswitch_comes_up(connect):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conn, rec = connect(port)
    assert wait_for(lambda: conn.state == "disconnected" and "cannot connect" in conn.detail)
    late = FakeFreeSwitch()
    late.port = port
    late.start()
    try:
        assert wait_for(lambda: conn.connected)
        assert rec.connected == [late.core_uuid]
    finally:
        conn.stop()
        late.stop()


@pytest.mark.parametrize("fault", ["drop", "reset", "disconnect-notice"])
def test_dropped_connection_reconnects(fake, connect, fault):
    conn, rec = connect(fake.port)
    assert conn.wait_connected(2)
    if fault == "disconnect-notice":
        fake.disconnect()
    else:
        fake.drop(reset=fault == "reset")
    assert wait_for(lambda: fake.authenticated == 2 and conn.connected)
    assert rec.connected == [fake.core_uuid, fake.core_uuid]
    assert "disconnected" in [s for s, _ in rec.states]
    fake.inject(sentinel(fake, 1))
    assert wait_for(lambda: got_sentinel(rec, 1))


def test_restart_with_new_core_uuid_calls_on_connected_again(fake, connect):
    conn, rec = connect(fake.port)
    assert conn.wait_connected(2)
    first = fake.core_uuid
    fake.restart(down_for=0.1)
    assert wait_for(lambda: len(rec.connected) == 2)
    assert rec.connected == [first, fake.core_uuid] and first != fake.core_uuid
    assert conn.core_uuid == fake.core_uuid


def test_pending_command_fails_fast_when_the_connection_drops(fake, connect):
    conn, _ = connect(fake.port, command_timeout=5.0)
    assert conn.wait_connected(2)
    fake.silent = True
    started = time.monotonic()
    job = gevent.spawn(conn.api, "status")
    gevent.sleep(0.05)
    fake.drop()
    job.join(2)
    assert isinstance(job.exception, EslNotConnected)
    assert time.monotonic() - started < 1.0


def test_silent_freeswitch_times_out_commands_and_is_replaced(fake, connect):
    conn, rec = connect(fake.port)
    assert conn.wait_connected(2)
    fake.silent = True
    started = time.monotonic()
    with pytest.raises(EslTimeout):
        conn.api("status", timeout=0.2)
    assert 0.2 <= time.monotonic() - started < 1.0
    assert not conn.connected
    with pytest.raises(EslNotConnected):
        conn.api("status")
    # New connections get no greeting while silent: connect times out, retries.
    assert wait_for(lambda: fake.accepted >= 3)
    assert not conn.connected
    fake.silent = False
    assert wait_for(lambda: conn.connected)
    assert conn.api("version").startswith("FreeSWITCH Version")


def test_idle_watchdog_probes_a_quiet_connection(fake, connect):
    conn, _ = connect(fake.port, idle_timeout=0.1)
    assert conn.wait_connected(2)
    fake.wait_for_command("api status", timeout=1.0)
    assert conn.connected and conn.connections == 1  # it answered: kept
    fake.silent = True
    assert wait_for(lambda: not conn.connected)
    fake.silent = False
    assert wait_for(lambda: conn.connected and conn.connections == 2)


# -- hostile bytes ----------------------------------------------------------


def test_hostile_values_are_delivered_without_harm(fake, connect):
    conn, rec = connect(fake.port)
    assert conn.wait_connected(2)
    fake.inject(hostile(fake, **{"Caller-Caller-ID-Name": "a\x00b"}))
    fake.inject(event_frame({"Event-Name": "CHANNEL_CREATE", "Unique-ID": "raw-utf8",
                             "Caller-Caller-ID-Name": b"\xff\xfe\xc3(bad"}, encode=False))
    fake.inject(hostile(fake, **{"Caller-Caller-ID-Name": b"%C3%28 \xff"}))
    fake.inject(hostile(fake, **{"Caller-Caller-ID-Number": "7" * 10_000}))
    fake.inject(sentinel(fake, 1))
    assert wait_for(lambda: got_sentinel(rec, 1))
    names = [h.get("Caller-Caller-ID-Name") for h, _ in rec.events[:3]]
    assert names[0] == "a\x00b"
    assert "\ufffd" in names[1] and rec.events[1][0].get("Unique-ID") == "raw-utf8"
    assert "\ufffd" in names[2]
    assert rec.events[3][0].get("Caller-Caller-ID-Number") == "7" * 10_000
    assert conn.connections == 1


def test_truncated_frame_then_drop_recovers(fake, connect):
    conn, rec = connect(fake.port)
    assert conn.wait_connected(2)
    frame = sentinel(fake, 1)
    fake.inject(frame[: len(frame) // 2])  # FreeSWITCH died mid-frame
    gevent.sleep(0.05)
    fake.drop()
    assert wait_for(lambda: conn.connections == 2 and conn.connected)
    fake.inject(sentinel(fake, 2))
    assert wait_for(lambda: got_sentinel(rec, 2))
    assert not got_sentinel(rec, 1)  # half a frame is never delivered


@pytest.mark.parametrize("garbage", [
    b"Content-Type: text/event-plain\nContent-Length: 999999999999\n\n",
    b"Content-Type: text/event-plain\nContent-Length: -5\n\n",
    b"Content-Type: text/event-plain\nContent-Length: lots\n\n",
    b"x" * (2 * 1024 * 1024),  # a header block that never ends
])
def test_protocol_errors_drop_the_connection_and_reconnect(fake, connect, garbage, caplog):
    conn, rec = connect(fake.port)
    assert conn.wait_connected(2)
    fake.inject(garbage)
    assert wait_for(lambda: conn.connections == 2 and conn.connected)
    assert "protocol error" in caplog.text
    fake.inject(sentinel(fake, 1))
    assert wait_for(lambda: got_sentinel(rec, 1))


def test_content_length_shorter_than_the_body_does_not_kill_the_reader(fake, connect):
    conn, rec = connect(fake.port)
    assert conn.wait_connected(2)
    body = b"Event-Name: CHANNEL_CREATE\nUnique-ID: liar\nCaller-Caller-ID-Name: long%20name\n\n"
    fake.inject(b"Content-Length: 20\nContent-Type: text/event-plain\n\n" + body)
    fake.inject(sentinel(fake, 1))
    assert wait_for(lambda: got_sentinel(rec, 1))
    assert conn.connections == 1 and conn.connected


def test_backoff_grows_with_jitter_and_caps():
    conn = EslConnection("127.0.0.1", 1, "pw", [], on_event=print, max_backoff=4.0)
    first = [conn._backoff(0, slow=False) for _ in range(50)]
    later = [conn._backoff(10, slow=False) for _ in range(50)]
    slow = [conn._backoff(0, slow=True) for _ in range(50)]
    assert all(esl.BASE_BACKOFF / 2 <= d <= esl.BASE_BACKOFF for d in first)
    assert all(2.0 <= d <= 4.0 for d in later) and len(set(later)) > 1
    assert all(2.0 <= d <= 4.0 for d in slow)


def test_on_connected_may_query_freeswitch_to_reconcile(fake):
    """The lead reconciles open calls from on_connected with `show calls as json`."""
    fake.use_active_calls()
    listings: list[str] = []
    conn = EslConnection("127.0.0.1", fake.port, "ClueCon", EVENTS, on_event=lambda h, b: None,
                         on_connected=lambda core_uuid: listings.append(conn.api("show calls as json")), **FAST)
    conn.start()
    try:
        assert wait_for(lambda: listings)
        assert '"row_count":1' in listings[0]
        fake.drop()
        assert wait_for(lambda: len(listings) == 2)
    finally:
        conn.stop()
