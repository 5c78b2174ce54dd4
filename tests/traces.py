"""Helpers to replay the real FreeSWITCH captures in ../shared/esl-traces.

* ``read_trace`` / ``event_frames`` / ``channel_events``: the captured bytes,
  framed by ``fsbridge.wire.FrameParser`` exactly as the service frames them.
* ``rewrite_click_to_call``: the click-to-call captures (06*) were made with
  a hand-written ``bgapi originate`` that carried none of our tags.  This
  rewrites their raw bytes into what FreeSWITCH would have sent for the
  service's own originate command (see the brief's originate contract):
  bytes in, bytes out, so the end-to-end tests can replay the result
  through the fake FreeSWITCH.
"""

from __future__ import annotations

from typing import Iterable, Iterator
from urllib.parse import quote

from fsbridge.events import (
    CLICK_TO_CALL_EXT_VAR,
    CLICK_TO_CALL_PHONE_VAR,
    CLICK_TO_CALL_VAR,
    SUBSCRIBED_EVENTS,
    ChannelEvent,
    channel_event,
)
from fsbridge.wire import EventHeaders, Frame, FrameParser, parse_event_plain
from fsbridge.fakes.freeswitch import read_trace  # noqa: F401 - re-exported for the trace tests

EVENT_PLAIN = "text/event-plain"


def frames_of(raw: bytes) -> list[Frame]:
    parser = FrameParser()
    frames = parser.feed(raw)
    if parser.buffered:
        raise ValueError(f"capture ends inside a frame ({parser.buffered} bytes left)")
    return frames


def event_frames(raw: bytes, names: Iterable[str] | None = SUBSCRIBED_EVENTS) -> Iterator[tuple[EventHeaders, bytes]]:
    """Plain events in capture order, as (headers, body).

    ``names`` keeps only those Event-Names, as a FreeSWITCH subscribed with
    ``event plain <names>`` would deliver them; None keeps every event.
    """
    wanted = None if names is None else frozenset(names)
    for frame in frames_of(raw):
        if frame.content_type != EVENT_PLAIN:
            continue
        headers, body = parse_event_plain(frame.body)
        if wanted is None or headers.get("Event-Name") in wanted:
            yield headers, body


def channel_events(raw: bytes) -> list[ChannelEvent]:
    """The subscribed events of a capture, reduced by ``channel_event``."""
    events = []
    for headers, body in event_frames(raw):
        event = channel_event(headers, body)
        if event is not None:
            events.append(event)
    return events


def encode_frame(headers: dict[str, str], body: bytes) -> bytes:
    """One ESL message: outer headers (Content-Length fixed to the body), blank line, body."""
    if body and "Content-Length" not in headers:
        headers = {"Content-Length": "", **headers}
    lines = [
        f"{name}: {len(body) if name == 'Content-Length' else value}\n" for name, value in headers.items()
    ]
    return "".join(lines).encode("utf-8") + b"\n" + body


def _manager_leg_uuid(frames: list[Frame]) -> str:
    """The leg the bgapi originate created: an outbound channel nobody originated."""
    for frame in frames:
        if frame.content_type != EVENT_PLAIN:
            continue
        headers, _ = parse_event_plain(frame.body)
        if headers.get("Event-Name") not in ("CHANNEL_OUTGOING", "CHANNEL_CREATE"):
            continue
        uuid = headers.get("Unique-ID")
        if (
            headers.get("Call-Direction") == "outbound"
            and headers.get("Channel-Call-UUID") == uuid
            and not headers.get("Other-Leg-Unique-ID")
        ):
            return uuid or ""
    raise ValueError("no click-to-call manager leg in this capture")


def _job_uuid(frames: list[Frame]) -> str:
    for frame in frames:
        if frame.content_type == EVENT_PLAIN:
            headers, _ = parse_event_plain(frame.body)
            if headers.get("Event-Name") == "BACKGROUND_JOB":
                return headers.get("Job-UUID") or ""
        elif frame.headers.get("Job-UUID"):
            return frame.headers["Job-UUID"]
    raise ValueError("no bgapi Job-UUID in this capture")


def rewrite_click_to_call(
    raw: bytes,
    /,
    *,
    manager_uuid: str,
    job_uuid: str,
    request_id: str,
    ext: str,
    phone: str,
    command_arg: str | None = None,
) -> bytes:
    """A click-to-call capture as if the service's originate had made it.

    * the manager leg's UUID becomes ``manager_uuid`` (our origination_uuid)
      and the bgapi Job-UUID becomes ``job_uuid``, everywhere (headers of
      every leg, BACKGROUND_JOB body, the bgapi reply);
    * every manager-leg event that carries ``variable_*`` headers gains
      ``variable_fsbridge_click_to_call`` / ``_ext`` / ``_phone`` and
      ``variable_origination_uuid`` (URL-encoded, as in plain events);
    * ``command_arg``, when given, replaces BACKGROUND_JOB's Job-Command-Arg;
    * each frame's outer Content-Length is recomputed.
    """
    frames = frames_of(raw)
    old_manager = _manager_leg_uuid(frames).encode()
    old_job = _job_uuid(frames).encode()
    new_manager = manager_uuid.encode()
    new_job = job_uuid.encode()
    extra = "".join(
        f"variable_{name}: {quote(value, safe='')}\n"
        for name, value in (
            (CLICK_TO_CALL_VAR, request_id),
            (CLICK_TO_CALL_EXT_VAR, ext),
            (CLICK_TO_CALL_PHONE_VAR, phone),
            ("origination_uuid", manager_uuid),
        )
    ).encode()

    out = bytearray()
    for frame in frames:
        headers = {
            name: value.replace(old_manager.decode(), manager_uuid).replace(old_job.decode(), job_uuid)
            for name, value in frame.headers.items()
        }
        body = frame.body.replace(old_manager, new_manager).replace(old_job, new_job)
        if frame.content_type == EVENT_PLAIN:
            body = _rewrite_event(body, new_manager, extra, command_arg)
        out += encode_frame(headers, body)
    return bytes(out)


def _rewrite_event(body: bytes, manager_uuid: bytes, extra: bytes, command_arg: str | None) -> bytes:
    end = body.find(b"\n\n")
    block, rest = (body, b"") if end < 0 else (body[:end + 1], body[end + 1:])
    lines = block.split(b"\n")
    if command_arg is not None and b"Event-Name: BACKGROUND_JOB" in lines:
        encoded = b"Job-Command-Arg: " + quote(command_arg, safe="").encode()
        lines = [encoded if line.startswith(b"Job-Command-Arg: ") else line for line in lines]
        return b"\n".join(lines) + rest
    if b"Unique-ID: " + manager_uuid not in lines:
        return body
    for index, line in enumerate(lines):
        if line.startswith(b"variable_"):
            # Channel variables are listed together; ours join them.
            lines.insert(index, extra.rstrip(b"\n"))
            return b"\n".join(lines) + rest
    return body
