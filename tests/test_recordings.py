"""Recordings: is_recorded / record_link on COMPLETED, signed links served over
real HTTP (Range, 403, 404), MP3 conversion with the real lame, retention.

The recording paths and call UUIDs come from the traces' RECORD_STOP events;
a real WAV is written where that path maps under a temporary directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import stat
import struct
import wave
from dataclasses import dataclass
from urllib.parse import urlsplit

import gevent
import gevent.queue
import pytest
import requests
from flask import Flask
from gevent.pywsgi import WSGIServer

from fsbridge.recordings import (
    KEY_FILE,
    Mp3Converter,
    RecordingSettings,
    Recordings,
    check_settings,
    register_routes,
)
from fsbridge.core.tracker import CallTracker, PlanfixCommand, TrackerSettings
from fsbridge.core.wire import FrameParser, parse_event_plain
from tests.traces import channel_events, read_trace

FS_DIR = "/usr/local/freeswitch/recordings"  # what the traced FreeSWITCH used


@dataclass(frozen=True, slots=True)
class Command:
    """Same shape as tracker.PlanfixCommand (recordings depends only on the shape)."""

    call_id: str
    fields: dict[str, str]
    recording_path: str | None = None


def traced_recording(traces_dir, name: str) -> tuple[str, str]:
    """(Unique-ID, Record-File-Path) of the trace's RECORD_STOP."""
    parser = FrameParser()
    found = []
    for frame in parser.feed(read_trace(traces_dir / f"{name}.plain.txt")):
        if frame.content_type != "text/event-plain":
            continue
        headers, _ = parse_event_plain(frame.body)
        if headers.get("Event-Name") == "RECORD_STOP":
            found.append((headers.get("Unique-ID"), headers.get("Record-File-Path")))
    assert len(found) == 1, found
    return found[0]


def write_wav(path, seconds: float = 0.5, rate: int = 8000) -> bytes:
    """A real stereo 16-bit WAV (as RECORD_STEREO makes), returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = bytearray()
    for i in range(int(seconds * rate)):
        left = int(8000 * math.sin(2 * math.pi * 440 * i / rate))
        right = int(8000 * math.sin(2 * math.pi * 660 * i / rate))
        frames += struct.pack("<hh", left, right)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(frames))
    return path.read_bytes()


def completed(call_id: str, recording_path: str | None, **extra: str) -> Command:
    fields = {
        "cmd": "event", "type": "in", "event": "COMPLETED", "phone": "79101234567",
        "ext": "101", "callid": call_id, "duration": "3", "status": "Success", **extra,
    }
    return Command(call_id, fields, recording_path)


class Site:
    """A real HTTP server on 127.0.0.1:0 serving whichever app is mounted."""

    def __init__(self):
        self.app = None
        self.server = WSGIServer(("127.0.0.1", 0), lambda env, start: self.app(env, start), log=None)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def mount(self, recordings: Recordings) -> None:
        app = Flask("test-recordings")
        register_routes(app, recordings)
        self.app = app


@pytest.fixture
def site():
    s = Site()
    yield s
    s.server.stop()


@pytest.fixture
def lame():
    path = shutil.which("lame")
    if path is None:
        pytest.fail("lame is not on PATH: install the Debian package `lame` (apt-get install lame)")
    return Mp3Converter(path, "lame")


@pytest.fixture
def make(tmp_path, site):
    """Build Recordings over tmp dirs, mounted on the test site."""
    made = []

    def build(**overrides) -> Recordings:
        emit = overrides.pop("emit", None)
        is_delivered = overrides.pop("is_delivered", None)
        pending_call_ids = overrides.pop("pending_call_ids", None)
        converter = overrides.pop("converter", None)
        settings = RecordingSettings(
            dir=str(tmp_path / "recordings"),
            freeswitch_dir=FS_DIR,
            public_url=site.url + "/pbx",  # a prefix, as behind a reverse proxy
            storage_dir=str(tmp_path / "state"),
            **overrides,
        )
        os.makedirs(settings.dir, exist_ok=True)
        rec = Recordings(settings, emit=emit, is_delivered=is_delivered, converter=converter,
                         pending_call_ids=pending_call_ids)
        site.mount(rec)
        made.append(rec)
        return rec

    yield build
    for rec in made:
        rec.close()


def local(tmp_path, fs_path: str):
    """Where the test maps a FreeSWITCH path: [recordings] dir = tmp/recordings."""
    return tmp_path / "recordings" / os.path.relpath(fs_path, FS_DIR)


def fetch(site, link: str, method: str = "GET", **headers) -> requests.Response:
    # The public URL has a /pbx prefix a reverse proxy would strip.
    path = urlsplit(link).path
    assert path.startswith("/pbx/records/")
    return requests.request(method, site.url + path[len("/pbx"):], headers=headers, timeout=5)


@pytest.mark.parametrize(
    "trace, call_uuid",
    [
        ("01-inbound-single-answer", "e84e4329-8051-40a2-9c6c-a3d6cf741ee9"),
        ("05a-outbound-answer", "c85e65ca-d501-4082-99f0-bb3f26a04d64"),
    ],
)
def test_completed_link_downloads_exactly_the_recording(traces_dir, tmp_path, make, site, trace, call_uuid):
    uuid, fs_path = traced_recording(traces_dir, trace)
    assert uuid == call_uuid and fs_path == f"{FS_DIR}/{call_uuid}.wav"
    data = write_wav(local(tmp_path, fs_path))
    rec = make()

    [out] = rec.on_completed(completed(call_uuid, fs_path))

    assert out.call_id == call_uuid
    assert out.fields["is_recorded"] == "1"
    link = out.fields["record_link"]
    assert link.startswith(f"{site.url}/pbx/records/{call_uuid}/") and link.endswith(".wav")
    assert {k: v for k, v in out.fields.items() if k not in ("is_recorded", "record_link")} == completed(
        call_uuid, None
    ).fields
    got = fetch(site, link)
    assert got.status_code == 200
    assert got.content == data
    assert got.headers["Content-Type"] == "audio/wav"
    assert got.headers["Content-Length"] == str(len(data))
    assert got.headers["Accept-Ranges"] == "bytes"
    head = fetch(site, link, "HEAD")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == str(len(data))


def test_range_requests(tmp_path, make, site):
    call = "e84e4329-8051-40a2-9c6c-a3d6cf741ee9"
    data = write_wav(local(tmp_path, f"{FS_DIR}/{call}.wav"))
    link = make().on_completed(completed(call, f"{FS_DIR}/{call}.wav"))[0].fields["record_link"]

    part = fetch(site, link, Range="bytes=100-199")
    assert part.status_code == 206
    assert part.content == data[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    assert part.headers["Content-Length"] == "100"

    tail = fetch(site, link, Range="bytes=-10")
    assert tail.status_code == 206 and tail.content == data[-10:]

    open_ended = fetch(site, link, Range=f"bytes={len(data) - 5}-")
    assert open_ended.status_code == 206 and open_ended.content == data[-5:]

    beyond = fetch(site, link, Range=f"bytes={len(data)}-")
    assert beyond.status_code == 416
    assert beyond.headers["Content-Range"] == f"bytes */{len(data)}"


def test_bad_or_missing_signature_is_403_unknown_call_is_404(tmp_path, make, site):
    call = "c85e65ca-d501-4082-99f0-bb3f26a04d64"
    write_wav(local(tmp_path, f"{FS_DIR}/{call}.wav"))
    rec = make()
    link = rec.on_completed(completed(call, f"{FS_DIR}/{call}.wav"))[0].fields["record_link"]
    signature = link.rsplit("/", 1)[1].split(".")[0]
    base = link.rsplit("/", 1)[0]

    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    assert fetch(site, f"{base}/{flipped}.wav").status_code == 403
    assert fetch(site, f"{base}/{signature}.mp3").status_code == 403  # extension is signed too
    assert fetch(site, f"{base}/.wav").status_code == 403
    assert fetch(site, f"{base}/x").status_code == 403
    assert fetch(site, f"{base}/").status_code == 403
    assert fetch(site, base).status_code == 403
    other = "e84e4329-8051-40a2-9c6c-a3d6cf741ee9"
    assert fetch(site, f"{site.url}/pbx/records/{other}/{signature}.wav").status_code == 403
    assert fetch(site, f"{site.url}/pbx/records/..%2F..%2Fetc/{signature}.wav").status_code in (403, 404)

    # A correctly signed link of a call we never recorded: 404.
    assert fetch(site, rec.link(other, "wav")).status_code == 404
    # The file deleted behind our back: 404, not 500.
    os.unlink(local(tmp_path, f"{FS_DIR}/{call}.wav"))
    assert fetch(site, link).status_code == 404


@pytest.mark.parametrize("content", [None, b""])
def test_missing_or_empty_file_is_not_recorded(tmp_path, make, content):
    call = "e84e4329-8051-40a2-9c6c-a3d6cf741ee9"
    path = local(tmp_path, f"{FS_DIR}/{call}.wav")
    if content is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    [out] = make().on_completed(completed(call, f"{FS_DIR}/{call}.wav", record_link="stale"))
    assert out.fields["is_recorded"] == "0"
    assert "record_link" not in out.fields


def test_unanswered_call_and_other_commands(tmp_path, make):
    rec = make()
    call = "8e5a3b1c-0000-4000-8000-000000000001"
    [missed] = rec.on_completed(completed(call, None, status="Missed"))
    assert missed.fields["is_recorded"] == "0" and "record_link" not in missed.fields
    incoming = Command(call, {"cmd": "event", "event": "INCOMING", "callid": call})
    assert rec.on_completed(incoming) == [incoming]


@pytest.mark.parametrize(
    "fs_path",
    [
        "/etc/passwd",
        f"{FS_DIR}/../../../../etc/passwd",
        f"{FS_DIR}/",
        f"{FS_DIR}/notes.txt",
        "relative/e84e4329-8051-40a2-9c6c-a3d6cf741ee9.wav",
        f"{FS_DIR}-other/e84e4329-8051-40a2-9c6c-a3d6cf741ee9.wav",
    ],
)
def test_paths_outside_the_recordings_dir_are_refused(tmp_path, make, fs_path):
    (tmp_path / "recordings" / "notes.txt").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "recordings" / "notes.txt").write_text("not audio")
    call = "e84e4329-8051-40a2-9c6c-a3d6cf741ee9"
    [out] = make().on_completed(completed(call, fs_path))
    assert out.fields["is_recorded"] == "0" and "record_link" not in out.fields


def test_symlink_out_of_the_dir_is_refused(tmp_path, make):
    secret = tmp_path / "secret.wav"
    write_wav(secret)
    call = "e84e4329-8051-40a2-9c6c-a3d6cf741ee9"
    link_path = local(tmp_path, f"{FS_DIR}/{call}.wav")
    link_path.parent.mkdir(parents=True, exist_ok=True)
    link_path.symlink_to(secret)
    [out] = make().on_completed(completed(call, f"{FS_DIR}/{call}.wav"))
    assert out.fields["is_recorded"] == "0"


def test_bad_callid_is_not_linked(tmp_path, make):
    write_wav(local(tmp_path, f"{FS_DIR}/abc.wav"))
    [out] = make().on_completed(completed("../abc", f"{FS_DIR}/abc.wav"))
    assert out.fields["is_recorded"] == "0"


def test_key_is_private_and_links_survive_a_restart(tmp_path, make, site):
    call = "c85e65ca-d501-4082-99f0-bb3f26a04d64"
    data = write_wav(local(tmp_path, f"{FS_DIR}/{call}.wav"))
    first = make()
    link = first.on_completed(completed(call, f"{FS_DIR}/{call}.wav"))[0].fields["record_link"]
    key_path = tmp_path / "state" / KEY_FILE
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = key_path.read_bytes()
    first.close()

    second = make()  # same storage dir: same key, same index
    assert key_path.read_bytes() == key
    assert second.link(call, "wav") == link
    assert fetch(site, link).content == data
    # The same COMPLETED again (replayed after a reconnect) gives the same link.
    assert second.on_completed(completed(call, f"{FS_DIR}/{call}.wav"))[0].fields["record_link"] == link


def test_other_storage_dir_means_other_links(tmp_path, site):
    links = []
    for name in ("a", "b"):
        settings = RecordingSettings(
            dir=str(tmp_path), freeswitch_dir=FS_DIR, public_url="https://pbx.example.com",
            storage_dir=str(tmp_path / name),
        )
        rec = Recordings(settings)
        links.append(rec.link("c85e65ca-d501-4082-99f0-bb3f26a04d64", "wav"))
        rec.close()
    assert links[0] != links[1]


def collect_emitted():
    emitted: gevent.queue.Queue = gevent.queue.Queue()

    def emit(commands):
        for command in commands:
            emitted.put(command)

    return emitted, emit


def test_mp3_conversion_sends_record_with_mp3_link(traces_dir, tmp_path, make, site, lame):
    call, fs_path = traced_recording(traces_dir, "05a-outbound-answer")
    wav_path = local(tmp_path, fs_path)
    write_wav(wav_path)
    emitted, emit = collect_emitted()
    rec = make(convert="mp3", emit=emit, converter=lame)

    [out] = rec.on_completed(completed(call, fs_path))
    assert out.fields["is_recorded"] == "1"
    assert "record_link" not in out.fields
    rec.start()
    record = emitted.get(timeout=30)

    assert record.call_id == call
    assert set(record.fields) == {"cmd", "callid", "record_link", "is_temp"}
    assert record.fields["cmd"] == "record" and record.fields["callid"] == call
    assert record.fields["is_temp"] == "0"
    link = record.fields["record_link"]
    assert link.endswith(".mp3")
    got = fetch(site, link)
    assert got.status_code == 200
    assert got.headers["Content-Type"] == "audio/mpeg"
    body = got.content
    assert body[:3] == b"ID3" or (body[0] == 0xFF and body[1] & 0xE0 == 0xE0)
    assert got.headers["Content-Length"] == str(len(body))
    assert (wav_path.parent / f"{call}.mp3").read_bytes() == body
    # The original is removed only now that the MP3 is complete; no leftovers.
    assert sorted(p.name for p in wav_path.parent.iterdir()) == [f"{call}.mp3"]
    part = fetch(site, link, Range="bytes=0-1")
    assert part.status_code == 206 and part.content == body[:2]


def test_failed_conversion_falls_back_to_the_wav_link(tmp_path, make, site):
    call = "c85e65ca-d501-4082-99f0-bb3f26a04d64"
    data = write_wav(local(tmp_path, f"{FS_DIR}/{call}.wav"))
    emitted, emit = collect_emitted()
    broken = Mp3Converter(shutil.which("false"), "lame")
    rec = make(convert="mp3", emit=emit, converter=broken)

    [out] = rec.on_completed(completed(call, f"{FS_DIR}/{call}.wav"))
    assert out.fields["is_recorded"] == "1" and "record_link" not in out.fields
    rec.start()
    record = emitted.get(timeout=10)
    assert record.fields["record_link"].endswith(".wav")
    assert fetch(site, record.fields["record_link"]).content == data
    assert not [p for p in (tmp_path / "recordings").iterdir() if p.name.endswith((".part", ".mp3"))]


def test_full_conversion_queue_gives_the_wav_link_at_once(tmp_path, make, lame):
    calls = ["c85e65ca-d501-4082-99f0-bb3f26a04d64", "e84e4329-8051-40a2-9c6c-a3d6cf741ee9"]
    for call in calls:
        write_wav(local(tmp_path, f"{FS_DIR}/{call}.wav"))
    rec = make(convert="mp3", converter=lame, convert_queue_size=1)
    first, second = (rec.on_completed(completed(c, f"{FS_DIR}/{c}.wav"))[0] for c in calls)
    assert "record_link" not in first.fields
    assert second.fields["is_recorded"] == "1" and second.fields["record_link"].endswith(".wav")


def test_conversion_interrupted_by_a_stop_resumes_at_start(tmp_path, make, site, lame):
    call = "e84e4329-8051-40a2-9c6c-a3d6cf741ee9"
    write_wav(local(tmp_path, f"{FS_DIR}/{call}.wav"))
    first = make(convert="mp3", converter=lame)  # never started: the job is only in the index
    assert "record_link" not in first.on_completed(completed(call, f"{FS_DIR}/{call}.wav"))[0].fields
    first.close()

    emitted, emit = collect_emitted()
    second = make(convert="mp3", emit=emit, converter=lame)
    second.start()
    record = emitted.get(timeout=30)
    assert record.fields["callid"] == call and record.fields["record_link"].endswith(".mp3")
    assert fetch(site, record.fields["record_link"]).headers["Content-Type"] == "audio/mpeg"


def test_retention_keeps_undelivered_and_fresh_recordings(tmp_path, make, site):
    day = 86400
    now = 1_800_000_000.0
    delivered_call = "c85e65ca-d501-4082-99f0-bb3f26a04d64"
    pending_call = "e84e4329-8051-40a2-9c6c-a3d6cf741ee9"
    fresh_call = "987741d5-a8ae-4322-a9eb-1a87a1af80df"
    rec_dir = tmp_path / "recordings"
    for call in (delivered_call, pending_call, fresh_call):
        write_wav(rec_dir / f"{call}.wav")
    for call in (delivered_call, pending_call):
        os.utime(rec_dir / f"{call}.wav", (now - 3 * day, now - 3 * day))
    os.utime(rec_dir / f"{fresh_call}.wav", (now - 60, now - 60))
    # Never reported (unanswered, or ended while we were down): no link exists.
    orphan_old = rec_dir / "0a0b0c0d-0000-4000-8000-000000000000.wav"
    orphan_new = rec_dir / "0a0b0c0d-0000-4000-8000-000000000001.wav"
    unrelated = rec_dir / "README.txt"
    for path in (orphan_old, orphan_new, unrelated):
        path.write_bytes(b"x")
    os.utime(orphan_old, (now - 3 * day, now - 3 * day))
    os.utime(unrelated, (now - 3 * day, now - 3 * day))
    os.utime(orphan_new, (now - 60, now - 60))

    rec = make(retention_days=2, is_delivered=lambda call_id: call_id != pending_call)
    links = {
        call: rec.on_completed(completed(call, f"{FS_DIR}/{call}.wav"))[0].fields["record_link"]
        for call in (delivered_call, pending_call, fresh_call)
    }

    assert rec.cleanup(now) == 2
    remaining = sorted(p.name for p in rec_dir.iterdir())
    assert remaining == sorted(
        [f"{pending_call}.wav", f"{fresh_call}.wav", orphan_new.name, unrelated.name]
    )
    assert fetch(site, links[delivered_call]).status_code == 404
    assert fetch(site, links[pending_call]).status_code == 200
    assert fetch(site, links[fresh_call]).status_code == 200
    assert rec.cleanup(now) == 0


def test_retention_asks_for_pending_calls_once_per_run(tmp_path, make):
    """Issue 14: not one whole-outbox listing per recording."""
    day = 86400
    now = 1_800_000_000.0
    calls = [f"c85e65ca-d501-4082-99f0-bb3f26a04d{i:02x}" for i in range(20)]
    rec_dir = tmp_path / "recordings"
    asked = []

    def pending() -> set[str]:
        asked.append(1)
        return {calls[0]}

    rec = make(retention_days=1, pending_call_ids=pending)
    for call in calls:
        write_wav(rec_dir / f"{call}.wav")
        os.utime(rec_dir / f"{call}.wav", (now - 3 * day, now - 3 * day))
        rec.on_completed(completed(call, f"{FS_DIR}/{call}.wav"))
    assert rec.cleanup(now) == 19
    assert len(asked) == 1
    assert sorted(p.name for p in rec_dir.iterdir()) == [f"{calls[0]}.wav"]


def test_retention_zero_keeps_everything(tmp_path, make):
    call = "c85e65ca-d501-4082-99f0-bb3f26a04d64"
    write_wav(local(tmp_path, f"{FS_DIR}/{call}.wav"))
    rec = make(retention_days=0, is_delivered=lambda call_id: True)
    rec.on_completed(completed(call, f"{FS_DIR}/{call}.wav"))
    assert rec.cleanup(1e12) == 0
    assert local(tmp_path, f"{FS_DIR}/{call}.wav").exists()


def test_disabled_without_dir_or_public_url(tmp_path):
    call = "c85e65ca-d501-4082-99f0-bb3f26a04d64"
    write_wav(tmp_path / f"{call}.wav")
    for dir_, url in (("", "https://pbx.example.com"), (str(tmp_path), "")):
        rec = Recordings(RecordingSettings(dir=dir_, freeswitch_dir=str(tmp_path), public_url=url,
                                           storage_dir=str(tmp_path / "state")))
        [out] = rec.on_completed(completed(call, str(tmp_path / f"{call}.wav")))
        assert out.fields["is_recorded"] == "0"
        rec.close()


def test_check_settings_names_the_problems(tmp_path, monkeypatch):
    base = dict(freeswitch_dir=FS_DIR, public_url="https://x", storage_dir=str(tmp_path))
    assert check_settings(RecordingSettings(dir="", **base)) == []
    assert check_settings(RecordingSettings(dir=str(tmp_path), **base)) == []
    [missing] = check_settings(RecordingSettings(dir=str(tmp_path / "nope"), **base))
    assert "not a directory" in missing
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    [no_tool] = check_settings(RecordingSettings(dir=str(tmp_path), convert="mp3", **base))
    assert "apt install lame" in no_tool


def test_dialplan_snippet_names_files_as_the_service_expects(traces_dir, tmp_path, make):
    """The snippet's file name, expanded as FreeSWITCH would, is the traced
    Record-File-Path, and on_completed accepts it."""
    import pathlib
    import re
    import xml.etree.ElementTree as ET

    snippet = pathlib.Path(__file__).resolve().parent.parent / "dialplan" / "fsbridge-record.xml"
    root = ET.parse(snippet).getroot()
    assert root.tag == "include"
    [ext] = root.findall("extension")
    assert ext.get("continue") == "true"  # the caller's own bridge must still run
    actions = [(a.get("application"), a.get("data")) for a in ext.iter("action")]
    assert ("set", "RECORD_STEREO=true") in actions
    assert ("set", "RECORD_ANSWER_REQ=true") in actions
    assert actions[-1][0] == "record_session"
    [target] = [data.split("=", 1)[1] for app, data in actions if app == "set" and data.startswith("fsbridge_record_file=")]
    client_pattern = [c.get("expression") for c in ext.iter("condition") if c.get("field") == "destination_number"][0]
    assert re.fullmatch(client_pattern, "79101234567") and not re.fullmatch(client_pattern, "101")

    for trace in ("01-inbound-single-answer", "05a-outbound-answer", "06a-click-to-call-answer"):
        uuid, fs_path = traced_recording(traces_dir, trace)
        expanded = target.replace("$${recordings_dir}", FS_DIR).replace("${uuid}", uuid)
        assert expanded == fs_path
        write_wav(local(tmp_path, fs_path))
    rec = make()
    for trace in ("01-inbound-single-answer", "05a-outbound-answer", "06a-click-to-call-answer"):
        uuid, fs_path = traced_recording(traces_dir, trace)
        assert rec.on_completed(completed(uuid, fs_path))[0].fields["is_recorded"] == "1"


def test_settings_from_the_config_file(tmp_path):
    from fsbridge import config

    ini = tmp_path / "fsbridge.ini"
    ini.write_text(
        "[server]\ntoken = t0ken-t0ken-t0ken-t0ken\npublic_url = https://pbx.example.com:8080\n"
        f"[storage]\ndir = {tmp_path / 'state'}\n"
        f"[recordings]\ndir = {tmp_path}\nfreeswitch_dir = /var/lib/freeswitch/recordings\n"
        "convert = mp3\nretention_days = 30\n"
    )
    settings = RecordingSettings.from_config(config.load(str(ini)))
    assert (settings.dir, settings.freeswitch_dir, settings.public_url, settings.storage_dir) == (
        str(tmp_path), "/var/lib/freeswitch/recordings", "https://pbx.example.com:8080", str(tmp_path / "state")
    )
    assert (settings.convert, settings.retention_days) == ("mp3", 30)


def test_file_swapped_for_a_symlink_is_not_served(tmp_path, make, site):
    call = "c85e65ca-d501-4082-99f0-bb3f26a04d64"
    path = local(tmp_path, f"{FS_DIR}/{call}.wav")
    write_wav(path)
    link = make().on_completed(completed(call, f"{FS_DIR}/{call}.wav"))[0].fields["record_link"]
    outside = tmp_path / "private.wav"
    write_wav(outside, seconds=0.1)
    path.unlink()
    path.symlink_to(outside)
    assert fetch(site, link).status_code == 404


@pytest.mark.parametrize(
    "trace, call_uuid, file_state",
    [
        ("01-inbound-single-answer", "e84e4329-8051-40a2-9c6c-a3d6cf741ee9", "wav"),
        ("05a-outbound-answer", "c85e65ca-d501-4082-99f0-bb3f26a04d64", "wav"),
        ("01-inbound-single-answer", "e84e4329-8051-40a2-9c6c-a3d6cf741ee9", "missing"),
        ("05a-outbound-answer", "c85e65ca-d501-4082-99f0-bb3f26a04d64", "empty"),
    ],
)
def test_trace_replay_through_the_tracker(traces_dir, tmp_path, make, site, trace, call_uuid, file_state):
    """The real tracker's COMPLETED for the trace, through on_completed."""
    _, fs_path = traced_recording(traces_dir, trace)
    path = local(tmp_path, fs_path)
    data = write_wav(path) if file_state == "wav" else None
    if file_state == "empty":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    rec = make()
    tracker = CallTracker(TrackerSettings())
    out = []
    for event in channel_events(read_trace(traces_dir / f"{trace}.plain.txt")):
        for command in tracker.feed(event):
            out.extend(rec.on_completed(command))

    [done] = [c for c in out if c.fields.get("event") == "COMPLETED"]
    assert done.call_id == call_uuid == done.fields["callid"]
    assert done.fields["status"] == "Success"
    if file_state != "wav":
        assert done.fields["is_recorded"] == "0" and "record_link" not in done.fields
        return
    assert done.fields["is_recorded"] == "1"
    got = fetch(site, done.fields["record_link"])
    assert got.status_code == 200 and got.content == data
    bad = done.fields["record_link"].replace(call_uuid + "/", call_uuid + "/0", 1)
    assert fetch(site, bad).status_code == 403
    part = fetch(site, done.fields["record_link"], Range="bytes=44-143")
    assert part.status_code == 206 and part.content == data[44:144]


def test_process_puts_completed_before_its_record(tmp_path, make, lame):
    calls = ["c85e65ca-d501-4082-99f0-bb3f26a04d64", "e84e4329-8051-40a2-9c6c-a3d6cf741ee9"]
    for call in calls:
        write_wav(local(tmp_path, f"{FS_DIR}/{call}.wav"))
    outbox: list[tuple[str, str]] = []
    emitted, emit = collect_emitted()

    def emit_to_outbox(commands):
        outbox.extend((c.fields["cmd"], c.call_id) for c in commands)
        emit(commands)

    def put(commands):
        gevent.sleep(0.05)  # an outbox that yields must still come first
        outbox.extend((c.fields.get("event", c.fields["cmd"]), c.call_id) for c in commands)

    rec = make(convert="mp3", emit=emit_to_outbox, converter=lame)
    rec.start()
    incoming = Command(calls[0], {"cmd": "event", "event": "INCOMING", "callid": calls[0]})
    rec.process([incoming] + [completed(c, f"{FS_DIR}/{c}.wav") for c in calls], put)
    for _ in calls:
        emitted.get(timeout=30)
    assert outbox[:3] == [("INCOMING", calls[0]), ("COMPLETED", calls[0]), ("COMPLETED", calls[1])]
    assert sorted(outbox[3:]) == sorted(("record", c) for c in calls)


def test_the_record_command_goes_to_the_calls_tenant_also_after_a_restart(tmp_path, make, site):
    """Cloud PBX: the `record` that follows a conversion carries the COMPLETED's tenant,
    kept in the index, so a conversion resumed by a new process still goes to its PlanFix."""
    call = "e84e4329-8051-40a2-9c6c-a3d6cf741ee9"
    write_wav(local(tmp_path, f"{FS_DIR}/{call}.wav"))
    broken = Mp3Converter(shutil.which("false"), "lame")  # fails at once: the WAV link follows
    first = make(convert="mp3", converter=broken)  # never started: the job is only in the index
    tagged = dataclasses.replace(PlanfixCommand(call, completed(call, None).fields, f"{FS_DIR}/{call}.wav"),
                                 tenant="beta")
    [out] = first.on_completed(tagged)
    assert out.tenant == "beta" and "record_link" not in out.fields
    first.close()
    emitted, emit = collect_emitted()
    second = make(convert="mp3", emit=emit, converter=broken)
    second.start()
    record = emitted.get(timeout=10)
    assert record.fields["cmd"] == "record" and record.tenant == "beta"
