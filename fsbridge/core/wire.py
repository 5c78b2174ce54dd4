"""The Event Socket wire format, without sockets.

FreeSWITCH's mod_event_socket sends messages as ``Header: value`` lines, a
blank line, then exactly ``Content-Length`` bytes of body.  A plain event
(``text/event-plain``) carries in that body a second header block whose
values are URL-encoded, and sometimes (BACKGROUND_JOB) a second
``Content-Length`` and body of its own.

Two rules here exist because greenswitch gets them wrong:

* framing is by ``Content-Length`` alone (API bodies often have no trailing
  newline, so the next message starts right after the last byte);
* event headers are split into lines *before* each value is URL-decoded, so
  a caller name carrying ``%0A`` stays inside its own value and can never
  create or overwrite another header.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

# A message larger than this is not something FreeSWITCH sends (the biggest
# real event is a few kB; `show channels as json` on a big box some MB).
MAX_BODY_BYTES = 64 * 1024 * 1024
# A header block without its blank line after this many bytes is garbage.
MAX_HEADER_BYTES = 1024 * 1024


class ProtocolError(Exception):
    """The byte stream does not follow the Event Socket framing."""


@dataclass(slots=True)
class Frame:
    """One Event Socket message: its outer headers and raw body."""

    headers: dict[str, str]
    body: bytes = b""

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def parse_header_block(block: bytes, url_decoded: bool) -> dict[str, str]:
    """Split a header block into a dict, line by line.

    With ``url_decoded`` each value is percent-decoded after the split, as
    FreeSWITCH percent-encodes the values of plain events.  Lines without
    ``": "`` are ignored rather than glued to the previous header.
    """
    # Every frame's outer headers come through here: _decode is inlined (two
    # calls fewer a line, ~0.5 us a frame).
    headers: dict[str, str] = {}
    for line in block.split(b"\n"):
        sep = line.find(b": ")
        if sep <= 0:
            # "Header:" with an empty value is legal; anything else (an
            # empty line too) is noise.
            if line.endswith(b":"):
                headers[line[:-1].decode("utf-8", "replace")] = ""
            continue
        name = line[:sep].decode("utf-8", "replace")
        if name in headers:
            continue  # the first occurrence wins, as in EventHeaders
        value = line[sep + 2:]
        headers[name] = _unquote(value) if url_decoded else value.decode("utf-8", "replace")
    return headers


class EventHeaders:
    """The header block of a plain event, decoded only where it is read.

    A real channel event carries ~200 headers, of which call tracking reads a
    few dozen; decoding all of them would cost more than everything else the
    service does with the event.  Lookups search the raw block for
    ``\nName: ``.  That is exact and safe: FreeSWITCH percent-encodes every
    value, so a raw LF only ever separates headers, and a value carrying
    ``%0A`` cannot forge one.  The first occurrence of a name wins.
    """

    __slots__ = ("_block", "_vars")

    def __init__(self, block: bytes) -> None:
        # A leading LF makes the first header findable like the others.
        self._block = b"\n" + block
        # Where the first "\nvariable_" is (None: not searched yet).  Every
        # variable_<name> is at or after it, so their searches start there:
        # exact whatever the order of the headers, and the channel variables
        # (most of the block, and most lookups) come after the core headers.
        self._vars: int | None = None

    def get(self, name: str, default: str | None = None) -> str | None:
        # The hot path of event intake (~10 lookups per event), so written
        # out flat: a Python call costs about what a search of 300 bytes
        # does.  The needle is built once per name, and nothing is cached per
        # event, since a name is rarely asked twice and a dict costs about
        # what a search of the block does.
        needle = _NEEDLES.get(name)
        if needle is None:
            needle = _needle(name)
        key, variable = needle
        block = self._block
        if variable:
            start = self._vars
            if start is None:
                start = self._vars = block.find(_VARIABLE)
            if start < 0:
                return default
            pos = block.find(key, start)
        else:
            pos = block.find(key)
        while pos >= 0:
            # The byte after the colon decides: a space starts the value, LF
            # or the end means an empty value, anything else is a longer
            # name that merely starts the same ("Name:x" is not a header
            # FreeSWITCH writes), so the search goes on.
            after = pos + len(key)
            if after == len(block):
                return ""
            byte = block[after]
            if byte == 0x20:
                end = block.find(b"\n", after)
                raw = block[after + 1:] if end < 0 else block[after + 1:end]
                if b"%" in raw:  # _unquote, inlined
                    return unquote(raw.decode("utf-8", "replace"), errors="replace")
                return raw.decode("utf-8", "replace")
            if byte == 0x0A:
                return ""
            pos = block.find(key, after)
        return default

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def with_prefix(self, prefix: str) -> dict[str, str]:
        """Every header whose name starts with ``prefix``, name -> value."""
        found: dict[str, str] = {}
        block = self._block
        key = b"\n" + prefix.encode("utf-8")
        start = self._variables_start() if key.startswith(_VARIABLE) else 0
        if start < 0:
            return found
        pos = block.find(key, start)
        while pos >= 0:
            end = block.find(b"\n", pos + 1)
            line = block[pos + 1:] if end < 0 else block[pos + 1:end]
            sep = line.find(b": ")
            if sep > 0:
                name = _decode(line[:sep])
                found.setdefault(name, _unquote(line[sep + 2:]))
            pos = block.find(key, pos + 1)
        return found

    def _variables_start(self) -> int:
        """Where the first channel variable is (-1: none), searched once per event."""
        if self._vars is None:
            self._vars = self._block.find(_VARIABLE)
        return self._vars

    def to_dict(self) -> dict[str, str]:
        """All headers, decoded (for logs and tests, not the hot path)."""
        return parse_header_block(self._block, True)


# Per header name asked for: "\nName:", and whether it is a channel variable
# (searched from the first one on).  Names are a fixed set in the code.
_NEEDLES: dict[str, tuple[bytes, bool]] = {}
_MAX_NEEDLES = 4096  # a bound all the same: names may come from a config
_VARIABLE = b"\nvariable_"


def _needle(name: str) -> tuple[bytes, bool]:
    key = b"\n" + name.encode("utf-8") + b":"
    needle = (key, key.startswith(_VARIABLE))
    if len(_NEEDLES) < _MAX_NEEDLES:
        _NEEDLES[name] = needle
    return needle


def _unquote(raw: bytes) -> str:
    if b"%" in raw:
        return unquote(_decode(raw), errors="replace")
    return _decode(raw)


# The events FreeSWITCH writes without an inner body, by their first line
# (FreeSWITCH writes Event-Name first; CUSTOM events start with their
# Event-Subclass, and go the long way).
_BODYLESS_PREFIX = b"Event-Name: CHANNEL_"
_BODYLESS_LINES = frozenset((b"Event-Name: RECORD_STOP", b"Event-Name: HEARTBEAT"))


def _bodyless(body: bytes) -> bool:
    """The block is an event of a type FreeSWITCH never gives an inner body."""
    end = body.find(b"\n", 0, 80)
    if end < 0:
        return False
    line = body[:end]
    return line.startswith(_BODYLESS_PREFIX) or line in _BODYLESS_LINES


def parse_event_plain(body: bytes) -> tuple[EventHeaders, bytes]:
    """Parse the body of a ``text/event-plain`` frame.

    Returns the event's headers (decoded on access) and the event's own body
    (BACKGROUND_JOB's ``+OK <uuid>``), which follows an inner blank line and
    is sized by the inner ``Content-Length``.
    """
    if body.endswith(b"\n\n") and _bodyless(body):
        # A channel event, RECORD_STOP or HEARTBEAT: FreeSWITCH gives these
        # no inner body (switch_channel_event_set_data adds headers only), so
        # the search below for an inner Content-Length, a scan of all ~9 kB
        # (3 us, ~10% of an event's intake), is skipped.  What the search
        # guards against needs an event FreeSWITCH does not write; whoever
        # could inject one (an ESL client's sendevent) can set any header of
        # it anyway.  A caller cannot: values are percent-encoded, so raw LFs
        # only ever separate headers (see EventHeaders).  The trailing blank
        # line stays in the block: no lookup can match it.
        return EventHeaders(body), b""
    if b"\nContent-Length:" not in body and not body.startswith(b"Content-Length:"):
        # No inner body (an event of another type without one): the whole
        # block is headers, and the search for the blank line is skipped.  Exact: a
        # blank line without an inner Content-Length is not something
        # FreeSWITCH writes (values are percent-encoded, so raw LFs only
        # separate headers), and a header after it was never read anyway
        # when it is the trailing one.  A longer needle scans far faster
        # than "\n\n", which stops at every line.
        return EventHeaders(body.rstrip(b"\n")), b""
    end = body.find(b"\n\n")
    if end < 0:
        return EventHeaders(body.rstrip(b"\n")), b""
    headers = EventHeaders(body[:end])
    rest = body[end + 2:]
    length = headers.get("Content-Length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            n = len(rest)
        rest = rest[:max(n, 0)]
    return headers, rest


class FrameParser:
    """Incremental framer: feed bytes as they arrive, get whole frames out."""

    __slots__ = ("_buf", "_pending")

    def __init__(self) -> None:
        self._buf = bytearray()
        # Headers of a frame whose body has not fully arrived yet.
        self._pending: tuple[dict[str, str], int] | None = None

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        """The whole frames ``data`` completes.  ``data`` is copied in: the
        caller may reuse its buffer (the ESL reader does)."""
        self._buf += data
        frames: list[Frame] = []
        buf = self._buf
        pos = 0
        while True:
            if self._pending is None:
                # Skip stray newlines between frames.
                while pos < len(buf) and buf[pos] == 0x0A:
                    pos += 1
                end = buf.find(b"\n\n", pos)
                if end < 0:
                    if len(buf) - pos > MAX_HEADER_BYTES:
                        raise ProtocolError("header block without end")
                    break
                headers = parse_header_block(bytes(buf[pos:end]), False)
                pos = end + 2
                length_text = headers.get("Content-Length")
                if length_text is None:
                    frames.append(Frame(headers))
                    continue
                try:
                    length = int(length_text)
                except ValueError:
                    raise ProtocolError(f"bad Content-Length {length_text!r}") from None
                if length < 0 or length > MAX_BODY_BYTES:
                    raise ProtocolError(f"Content-Length out of range: {length}")
                self._pending = (headers, length)
            headers, length = self._pending
            if len(buf) - pos < length:
                break
            frames.append(Frame(headers, bytes(buf[pos:pos + length])))
            pos += length
            self._pending = None
        if pos:
            del buf[:pos]
        return frames

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return len(self._buf)


def encode_command(command: str, headers: dict[str, str] | None = None) -> bytes:
    """Encode one command for the socket, refusing embedded line breaks.

    A CR or LF inside a command would end it early and start another one,
    so callers must never be able to get one in.
    """
    lines = [command]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    for line in lines:
        if "\n" in line or "\r" in line:
            raise ValueError("line break inside an Event Socket command")
    return ("\n".join(lines) + "\n\n").encode("utf-8")
