"""Helpers to replay the real FreeSWITCH captures in ../shared/esl-traces.

* ``read_trace`` / ``event_frames`` / ``channel_events``: the captured bytes,
  framed by ``fsbridge.core.wire.FrameParser`` exactly as the service frames them.
* ``rewrite_click_to_call``: lives in ``fsbridge.fakes.clicktocall`` (the
  demo replays it too), re-exported here.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from fsbridge.core.events import SUBSCRIBED_EVENTS, ChannelEvent, channel_event
from fsbridge.core.wire import EventHeaders, parse_event_plain
from fsbridge.fakes.freeswitch import read_trace  # noqa: F401 - re-exported for the trace tests
# One copy, in the package (fsbridge demo uses it too); re-exported for the tests.
from fsbridge.fakes.clicktocall import encode_frame, frames_of, rewrite_click_to_call  # noqa: F401

EVENT_PLAIN = "text/event-plain"


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
