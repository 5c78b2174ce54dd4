"""ESL framing and header decoding against the real captured bytes."""

import gzip

import pytest

from fsbridge.fakes.freeswitch import read_trace
from fsbridge.core.wire import (
    MAX_BODY_BYTES,
    FrameParser,
    ProtocolError,
    encode_command,
    parse_event_plain,
    parse_header_block,
)


def trace_files(traces_dir):
    return sorted(p for p in traces_dir.iterdir() if p.name.endswith((".plain.txt", ".plain.txt.gz", ".raw.txt")))


def test_every_trace_frames_completely_in_any_chunking(traces_dir):
    for path in trace_files(traces_dir):
        data = read_trace(path)
        whole = FrameParser().feed(data)
        assert whole[0].content_type == "auth/request", path.name
        # The transfer commands of 20/21 (*.api.raw.txt) were sent on a second
        # connection that was closed without `exit`: no disconnect notice.
        if not path.name.endswith(".api.raw.txt"):
            assert whole[-1].content_type == "text/disconnect-notice", path.name
        # the same frames come out when bytes arrive in awkward pieces
        parser, pieces = FrameParser(), []
        for i in range(0, len(data), 997):
            pieces.extend(parser.feed(data[i:i + 997]))
        assert parser.buffered == 0
        assert [(f.headers, f.body) for f in pieces] == [(f.headers, f.body) for f in whole], path.name


def test_api_body_without_trailing_newline_is_framed_by_length(traces_dir):
    active = FrameParser().feed((traces_dir / "90-api-show-channels-calls-json-active.raw.txt").read_bytes())
    types = [f.content_type for f in active]
    assert types[2:6] == ["api/response"] * 4 and types[6] == "command/reply"
    # the JSON bodies end at "}" with the next header block right after them
    assert active[2].body.endswith(b'":"public"}]}')
    assert active[3].body.endswith(b"}]}")
    frames = FrameParser().feed((traces_dir / "91-api-show-channels-calls-json-idle.raw.txt").read_bytes())
    bodies = [f.body for f in frames if f.content_type == "api/response"]
    assert bodies[0] == b'{"row_count": 0}\n'


def test_background_job_inner_body(traces_dir):
    frames = FrameParser().feed((traces_dir / "06b-click-to-call-manager-busy.plain.txt").read_bytes())
    jobs = [parse_event_plain(f.body) for f in frames if f.content_type == "text/event-plain"]
    jobs = [(h, b) for h, b in jobs if h.get("Event-Name") == "BACKGROUND_JOB"]
    assert len(jobs) == 1
    headers, body = jobs[0]
    assert body == b"-ERR USER_BUSY\n"
    assert headers.get("Job-UUID") == "dc64883e-10ca-4828-8a78-e036ebc1f4be"
    assert "sofia/internal/101@127.0.0.1:5091" in headers.get("Job-Command-Arg")


def test_values_are_decoded_per_line_so_encoded_newlines_forge_nothing():
    block = (
        b"Event-Name: CHANNEL_CREATE\n"
        b"Caller-Caller-ID-Name: Evil%0AUnique-ID%3A%20forged\n"
        b"Unique-ID: real-uuid\n"
        b"Caller-Caller-ID-Number: %00%FF%FE123\n"
    )
    headers, _ = parse_event_plain(block)
    assert headers.get("Unique-ID") == "real-uuid"
    assert headers.get("Caller-Caller-ID-Name") == "Evil\nUnique-ID: forged"
    assert headers.get("Caller-Caller-ID-Number").endswith("123")
    assert headers.to_dict()["Unique-ID"] == "real-uuid"
    assert parse_header_block(block, True)["Unique-ID"] == "real-uuid"


def test_first_occurrence_wins_and_prefix_lookup():
    headers, _ = parse_event_plain(
        b"Event-Name: X\nvariable_planfix_data_utm_source: site%2Eio\n"
        b"variable_planfix_data_utm_medium: banner\nEvent-Name: Y\n"
    )
    assert headers.get("Event-Name") == "X"
    assert headers.with_prefix("variable_planfix_data_") == {
        "variable_planfix_data_utm_source": "site.io",
        "variable_planfix_data_utm_medium": "banner",
    }
    assert "Missing" not in headers and headers.get("Missing", "d") == "d"


def test_load_trace_event_count(traces_dir):
    data = gzip.decompress((traces_dir / "load-100-calls.plain.txt.gz").read_bytes())
    frames = FrameParser().feed(data)
    assert sum(f.content_type == "text/event-plain" for f in frames) == 6802


@pytest.mark.parametrize("length", [b"-1", b"abc", str(MAX_BODY_BYTES + 1).encode()])
def test_bad_content_length_is_a_protocol_error(length):
    with pytest.raises(ProtocolError):
        FrameParser().feed(b"Content-Type: text/event-plain\nContent-Length: " + length + b"\n\n")


def test_lying_content_length_waits_for_bytes_not_crashes():
    parser = FrameParser()
    assert parser.feed(b"Content-Type: text/event-plain\nContent-Length: 50\n\nEvent-Name: X\n\n") == []
    assert parser.buffered > 0


def test_encode_command_refuses_line_breaks():
    assert encode_command("api status") == b"api status\n\n"
    assert encode_command("bgapi status", {"Job-UUID": "u"}) == b"bgapi status\nJob-UUID: u\n\n"
    for bad in ("api status\nexit", "api x\r", ):
        with pytest.raises(ValueError):
            encode_command(bad)
    with pytest.raises(ValueError):
        encode_command("bgapi status", {"Job-UUID": "a\nb"})


def test_empty_values_and_names_that_share_a_prefix():
    headers, _ = parse_event_plain(b"Empty:\nEmptyLong: no\nA: 1\nB: x%20y\nLast:")
    assert headers.get("Empty") == "" and headers.get("EmptyLong") == "no"
    assert headers.get("A") == "1" and headers.get("B") == "x y" and headers.get("Last") == ""
    assert headers.get("Emp") is None and headers.get("Missing") is None


def test_event_without_inner_body_is_all_headers_and_an_inner_body_is_cut_by_its_length():
    headers, body = parse_event_plain(b"Event-Name: CHANNEL_CREATE\nUnique-ID: u-1\nLast: x%0AForged: 1\n\n")
    assert (headers["Event-Name"], headers["Unique-ID"], body) == ("CHANNEL_CREATE", "u-1", b"")
    assert headers["Last"] == "x\nForged: 1" and "Forged" not in headers  # %0A forges nothing
    headers, body = parse_event_plain(b"Event-Name: BACKGROUND_JOB\nContent-Length: 4\n\n+OK\nignored")
    assert (headers["Event-Name"], body) == ("BACKGROUND_JOB", b"+OK\n")
    # A Content-Length header first in the block counts too.
    headers, body = parse_event_plain(b"Content-Length: 2\nEvent-Name: X\n\nokmore")
    assert (headers["Event-Name"], body) == ("X", b"ok")


def test_outer_header_block_keeps_its_rules():
    # parse_header_block decodes each line in place: empty lines and lines
    # without ": " are skipped, "Name:" is an empty value, the first of a
    # name wins, bad UTF-8 is replaced, and only url_decoded values are
    # percent-decoded.
    block = b"Content-Length: 12\n\nnoise\nEmpty:\nContent-Length: 99\nX: a%20b\nY: \xff\n: nameless"
    assert parse_header_block(block, False) == {
        "Content-Length": "12", "Empty": "", "X": "a%20b", "Y": "\ufffd"}
    assert parse_header_block(block, True)["X"] == "a b"


def _exact(block: bytes) -> tuple[dict, bytes]:
    """What a block holds by the format's own rule: headers up to the first
    blank line, then the body its inner Content-Length sizes."""
    end = block.find(b"\n\n")
    head, rest = (block, b"") if end < 0 else (block[:end], block[end + 2:])
    headers = parse_header_block(head, True)
    if "Content-Length" in headers:
        rest = rest[:int(headers["Content-Length"])]
    return headers, rest if "Content-Length" in headers else b""


def test_every_captured_event_parses_as_the_format_says(traces_dir):
    # The shortcut for channel events, RECORD_STOP and HEARTBEAT (no search
    # for an inner Content-Length) gives what the format's rule gives, on
    # every plain event of every capture, BACKGROUND_JOBs and CUSTOMs included.
    seen = set()
    for path in trace_files(traces_dir):
        for frame in FrameParser().feed(read_trace(path)):
            if frame.content_type != "text/event-plain":
                continue
            headers, body = parse_event_plain(frame.body)
            want_headers, want_body = _exact(frame.body)
            assert (headers.to_dict(), body) == (want_headers, want_body), path.name
            for name in ("Event-Name", "Unique-ID", "Caller-Caller-ID-Number", "variable_sip_term_status"):
                assert headers.get(name) == want_headers.get(name), (path.name, name)
            seen.add(want_headers["Event-Name"])
    assert {"CHANNEL_CREATE", "CHANNEL_HANGUP_COMPLETE", "RECORD_STOP", "BACKGROUND_JOB", "CUSTOM"} <= seen


def test_other_events_are_searched_for_a_body_and_a_channel_event_body_overrides_no_header():
    # A BACKGROUND_JOB, an event of another type, or a block that does not
    # end the way FreeSWITCH ends a bodyless event is searched for its body.
    for block, want in ((b"Event-Name: BACKGROUND_JOB\nJob-UUID: j\nContent-Length: 6\n\n+OK x\n\n", b"+OK x\n"),
                        (b"Event-Name: CUSTOM\nContent-Length: 6\n\nA: b\n\n", b"A: b\n\n"),
                        (b"Event-Name: CHANNEL_CREATE\nContent-Length: 6\n\nA: bcd", b"A: bcd")):
        headers, body = parse_event_plain(block)
        assert "A" not in headers and body == want, block
    # A channel event with a body, which FreeSWITCH does not write (only an
    # ESL client's sendevent could, and it sets any header it likes anyway):
    # the body reads as trailing headers that never override a real one.
    headers, body = parse_event_plain(
        b"Event-Name: CHANNEL_CREATE\nUnique-ID: real\nContent-Length: 16\n\nUnique-ID: fake\n\n")
    assert headers["Unique-ID"] == "real" and body == b""
