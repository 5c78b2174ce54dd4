"""The fake FreeSWITCH answers with the bytes real FreeSWITCH sent.

A raw-socket client (no ESL library, no fsbridge.esl) replays the commands
of the 9x captures and compares what comes back with the capture.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from fsbridge.core.wire import FrameParser, parse_event_plain, parse_header_block
from fsbridge.fakes.freeswitch import (
    CAPTURES,
    DISCONNECT_NOTICE,
    event_frame,
    read_trace,
    rewrite_event,
    split_frames,
    trace_api_bodies,
    trace_events,
)
from tests.conftest import TRACES


class RawClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        self.received = b""
        self.parser = FrameParser()
        self.frames = []

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def read_frames(self, count: int, timeout: float = 2.0) -> list:
        deadline = time.monotonic() + timeout
        while len(self.frames) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                break
            if not data:
                break
            self.received += data
            self.frames += self.parser.feed(data)
        taken, self.frames = self.frames[:count], self.frames[count:]
        return taken

    def read_until_closed(self, timeout: float = 2.0) -> bytes:
        self.sock.settimeout(timeout)
        while True:
            data = self.sock.recv(65536)
            if not data:
                return self.received
            self.received += data

    def login(self) -> None:
        self.read_frames(1)
        self.send(b"auth ClueCon\n\n")
        assert self.read_frames(1)[0].headers["Reply-Text"] == "+OK accepted"

    def subscribe(self, names: bytes) -> None:
        """Log in and subscribe, as the first two commands."""
        self.login()
        self.send(b"event plain " + names + b"\n\n")
        assert self.read_frames(1)[0].headers["Reply-Text"] == "+OK event listener enabled plain"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client_factory(fake):
    clients = []

    def make() -> RawClient:
        clients.append(RawClient(fake.port))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


@pytest.mark.parametrize("name", [
    "91-api-show-channels-calls-json-idle",
    "92-api-status-version",
    "94-auth-wrongpass",
])
def test_replaying_a_capture_gives_its_exact_bytes(traces_dir, fake, client_factory, name):
    client = client_factory()
    client.send((traces_dir / f"{name}.sent.txt").read_bytes())
    assert client.read_until_closed() == (traces_dir / f"{name}.raw.txt").read_bytes()


def test_active_call_listing_comes_from_trace_90(traces_dir, fake, client_factory):
    fake.use_active_calls()
    client = client_factory()
    client.send(b"auth ClueCon\n\napi show channels as json\n\napi show calls as json\n\nexit\n\n")
    expected = [f.body for f in split_frames(read_trace(traces_dir / "90-api-show-channels-calls-json-active.raw.txt"))
                if f.headers.get("Content-Type") == "api/response"][:2]
    frames = client.read_frames(6)
    assert [f.body for f in frames if f.content_type == "api/response"] == expected


def test_connections_have_nagle_off_like_mod_event_socket(fake, client_factory):
    # With Nagle on, back-to-back event frames would wait for the client's
    # delayed ACK: the benchmark's latency would measure the fake's TCP.
    client_factory().login()
    (conn,) = fake._live()
    assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_unknown_and_unauthenticated_commands(fake, client_factory):
    client = client_factory()
    client.read_frames(1)
    client.send(b"api status\n\n")
    assert client.read_frames(1)[0].headers["Reply-Text"] == "-ERR command not found"
    client.send(b"auth ClueCon\n\nnosuch thing\n\napi uuid_kill 00000000-0000-0000-0000-000000000000\n\n")
    accepted, unknown, kill = client.read_frames(3)
    assert unknown.headers["Reply-Text"] == "-ERR command not found"
    assert kill.body == b"-ERR No such channel!\n"
    assert fake.commands[:2] == ["api status", "auth ClueCon"]


def test_bgapi_reply_and_background_job_match_trace_93(traces_dir, fake, client_factory):
    real = split_frames(read_trace(traces_dir / "93-bgapi-status.raw.txt"))
    real_event_headers = parse_header_block(real[4].body.split(b"\n\n")[0], True)
    client = client_factory()
    client.login()
    client.send(b"event plain BACKGROUND_JOB\n\nbgapi status\nJob-UUID: 11111111-2222-3333-4444-555555555555\n\n")
    subscribed, reply, event = client.read_frames(3)
    assert subscribed.headers == real[2].headers
    assert reply.headers == {"Content-Type": "command/reply",
                             "Reply-Text": "+OK Job-UUID: 11111111-2222-3333-4444-555555555555",
                             "Job-UUID": "11111111-2222-3333-4444-555555555555"}
    headers, body = parse_event_plain(event.body)
    mine = headers.to_dict()
    assert list(mine) == list(real_event_headers)  # same headers, same order
    assert mine["Job-UUID"] == "11111111-2222-3333-4444-555555555555"
    assert mine["Core-UUID"] == fake.core_uuid
    assert body == trace_api_bodies(TRACES / "92-api-status-version.raw.txt")[0]  # `bgapi status` runs `status`
    assert fake.commands[-1] == "bgapi status\nJob-UUID: 11111111-2222-3333-4444-555555555555"


def test_background_job_goes_only_to_subscribers(fake, client_factory):
    fake.set_bgapi_result("originate", "-ERR USER_BUSY\n")
    caller, listener, deaf = client_factory(), client_factory(), client_factory()
    for client in (caller, listener, deaf):
        client.login()
    listener.send(b"event plain BACKGROUND_JOB\n\n")
    deaf.send(b"event plain CHANNEL_CREATE\n\n")
    assert listener.read_frames(1) and deaf.read_frames(1)
    caller.send(b"bgapi originate user/101 &park\n\n")
    job_uuid = caller.read_frames(1)[0].headers["Job-UUID"]
    headers, body = parse_event_plain(listener.read_frames(1)[0].body)
    assert (headers["Job-UUID"], headers["Job-Command-Arg"], body) == (job_uuid, "user/101 &park", b"-ERR USER_BUSY\n")
    assert deaf.read_frames(1, timeout=0.2) == [] and caller.read_frames(1, timeout=0.05) == []


def test_trace_event_extraction_is_exact(traces_dir):
    data = read_trace(traces_dir / "01-inbound-single-answer.plain.txt")
    events = trace_events(TRACES / "01-inbound-single-answer.plain.txt")
    assert len(events) == data.count(b"Content-Type: text/event-plain\n")
    position = 0
    for event in events:  # each raw frame is a contiguous, in-order slice of the capture
        position = data.index(event.raw, position) + len(event.raw)
        assert event.raw.endswith(event.body)
    assert events[0].name == "CHANNEL_STATE"
    load = trace_events(traces_dir / "load-100-calls.plain.txt.gz")
    assert len(load) == 6802
    assert sum(e.name == "CHANNEL_HANGUP_COMPLETE" for e in load) == 200


def test_replay_sends_only_subscribed_events_with_exact_bytes(fake, client_factory):
    events = trace_events(TRACES / "01-inbound-single-answer.plain.txt")
    client = client_factory()
    client.subscribe(b"CHANNEL_CREATE CHANNEL_HANGUP_COMPLETE")
    before = len(client.received)
    wanted = [e for e in events if e.name in ("CHANNEL_CREATE", "CHANNEL_HANGUP_COMPLETE")]
    assert fake.replay(events).wait()
    assert len(client.read_frames(len(wanted))) == len(wanted)
    assert client.received[before:] == b"".join(e.raw for e in wanted)
    # A whole capture as one byte stream: its replies are skipped, its events filtered the same way.
    before = len(client.received)
    assert fake.replay([read_trace(TRACES / "01-inbound-single-answer.plain.txt")]).wait()
    assert len(client.read_frames(len(wanted))) == len(wanted)
    assert client.received[before:] == b"".join(e.raw for e in wanted)


def test_custom_subclass_and_filter(fake, client_factory):
    events = trace_events(TRACES / "05a-outbound-answer.plain.txt")
    custom = client_factory()
    custom.subscribe(b"CUSTOM sofia::register_attempt")
    target = next(e for e in events if e.name == "CHANNEL_CREATE")
    unique_id = parse_event_plain(target.body)[0]["Unique-ID"]
    filtered = client_factory()
    filtered.login()
    filtered.send(b"event plain ALL\n\nfilter Unique-ID " + unique_id.encode() + b"\n\n")
    assert filtered.read_frames(2)[1].headers["Reply-Text"] == f"+OK filter added. [Unique-ID]=[{unique_id}]"
    fake.replay(events).wait()
    got_custom = custom.read_frames(10, timeout=0.3)
    assert [parse_event_plain(f.body)[0]["Event-Subclass"] for f in got_custom] == ["sofia::register_attempt"]
    expected = [e for e in events if parse_event_plain(e.body)[0].get("Unique-ID") == unique_id]
    got = filtered.read_frames(len(expected))
    assert [f.body for f in got] == [e.body for e in expected] and len(expected) > 5


def test_replay_on_subscribe_with_pacing(fake, client_factory):
    heartbeat = event_frame({"Event-Name": "HEARTBEAT", "Core-UUID": fake.core_uuid})
    fake.replay_on_subscribe([heartbeat] * 5, rate=100)
    client = client_factory()
    client.login()
    started = time.monotonic()
    client.send(b"event plain HEARTBEAT\n\n")
    frames = client.read_frames(6)
    assert len(frames) == 6 and time.monotonic() - started >= 0.04


def test_command_hook_replaces_background_job(fake, client_factory):
    seen = []

    def rewrite(command, headers, job_uuid):
        seen.append((command, job_uuid))
        return [event_frame({"Event-Name": "BACKGROUND_JOB", "Job-UUID": job_uuid}, b"+OK rewritten\n")]

    fake.on_command("bgapi originate", rewrite)
    client = client_factory()
    client.login()
    client.send(b"event plain BACKGROUND_JOB\n\nbgapi originate user/101 &park\nJob-UUID: abc\n\n")
    _, reply, event = client.read_frames(3)
    assert reply.headers["Job-UUID"] == "abc" and seen == [("bgapi originate user/101 &park", "abc")]
    assert parse_event_plain(event.body)[1] == b"+OK rewritten\n"
    assert client.read_frames(1, timeout=0.1) == []  # no automatic BACKGROUND_JOB besides


def test_faults_silent_disconnect_restart(fake, client_factory):
    fake.silent = True
    mute = client_factory()
    mute.send(b"auth ClueCon\n\n")
    assert mute.read_frames(1, timeout=0.2) == []
    assert fake.wait_for_command("auth") == "auth ClueCon"
    fake.silent = False
    client = client_factory()
    client.login()
    fake.disconnect()
    assert client.read_until_closed().endswith(DISCONNECT_NOTICE)
    old_port, old_uuid = fake.port, fake.core_uuid
    fake.restart(down_for=0.05)
    assert fake.port == old_port and fake.core_uuid != old_uuid
    again = client_factory()
    again.login()
    again.send(b"api global_getvar core_uuid\n\n")
    assert again.read_frames(1)[0].body == fake.core_uuid.encode()


def test_rewrite_event_keeps_layout_and_recomputes_lengths():
    events = trace_events(TRACES / "06a-click-to-call-answer.plain.txt")
    assert all(rewrite_event(e) == e.raw for e in events)  # identity keeps the captured bytes
    manager = "987741d5-a8ae-4322-a9eb-1a87a1af80df"
    ours = "0a2c1d3e-0000-4000-8000-000000000001"
    job = next(e for e in events if e.name == "BACKGROUND_JOB")
    rewritten = rewrite_event(job, replace={manager: ours}, add_headers={"Job-Owner": "fsbridge test"})
    frame = split_frames(rewritten)[0]
    assert len(frame.body) == int(frame.headers["Content-Length"])
    headers, body = parse_event_plain(frame.body)
    assert body == f"+OK {ours}\n".encode() and headers["Content-Length"] == str(len(body))
    assert headers["Job-Owner"] == "fsbridge test"
    create = next(e for e in events if e.name == "CHANNEL_CREATE")
    headers, _ = parse_event_plain(split_frames(rewrite_event(create, replace={manager: ours}))[0].body)
    assert headers["Unique-ID"] == ours and manager not in headers.to_dict().values()


def test_click_to_call_hook_replays_a_trace_rewritten_to_our_originate(fake, client_factory):
    """The pattern end-to-end tests use: our originate's UUIDs replace the trace's."""
    events = trace_events(TRACES / "06a-click-to-call-answer.plain.txt")
    manager = "987741d5-a8ae-4322-a9eb-1a87a1af80df"

    def rewrite(command, headers, job_uuid):
        ours = re.search(r"origination_uuid=([^,}]+)", command).group(1)
        trace_job = next(parse_event_plain(e.body)[0]["Job-UUID"] for e in events if e.name == "BACKGROUND_JOB")
        return [rewrite_event(e, replace={manager: ours, trace_job: job_uuid}) for e in events]

    fake.on_command("bgapi originate", rewrite)
    client = client_factory()
    client.subscribe(b"CHANNEL_ANSWER BACKGROUND_JOB")
    client.send(b"bgapi originate {origination_uuid=0a2c1d3e-0000-4000-8000-000000000001}user/101 7910 XML default\n"
                b"Job-UUID: 5d1c7a52-1111-4222-8333-444455556666\n\n")
    wanted = [e for e in events if e.name in ("CHANNEL_ANSWER", "BACKGROUND_JOB")]
    frames = client.read_frames(1 + len(wanted))
    parsed = [parse_event_plain(f.body) for f in frames[1:]]
    assert [h["Event-Name"] for h, _ in parsed] == [e.name for e in wanted]
    job_headers, job_body = next(p for p in parsed if p[0]["Event-Name"] == "BACKGROUND_JOB")
    assert job_headers["Job-UUID"] == "5d1c7a52-1111-4222-8333-444455556666"
    assert job_body == b"+OK 0a2c1d3e-0000-4000-8000-000000000001\n"
    assert "0a2c1d3e-0000-4000-8000-000000000001" in {h["Unique-ID"] for h, _ in parsed if "Unique-ID" in h}


def test_captures_packaged_with_the_fake_are_the_repo_captures_byte_for_byte():
    packaged = sorted(CAPTURES.iterdir())
    assert packaged, "the fake's own captures are missing from the package"
    for path in packaged:
        assert path.read_bytes() == (TRACES / path.name).read_bytes(), path.name
