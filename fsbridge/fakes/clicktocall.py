"""Click-to-call for the fake FreeSWITCH: a capture rewritten for our own originate.

The click-to-call captures (06*) were made with a hand-written ``bgapi
originate`` that carried none of fsbridge's tags.  ``rewrite_click_to_call``
turns their raw bytes into what FreeSWITCH would have sent for the
service's own originate command (our origination_uuid, Job-UUID and
``fsbridge_*`` variables): bytes in, bytes out.  ``originate_answer``
builds the ``FakeFreeSwitch.on_command("bgapi originate", ...)`` hook that
answers each originate with the rewritten capture.  Shared by the tests
and ``fsbridge demo``.
"""

from __future__ import annotations

import re
from typing import Callable
from urllib.parse import quote

from fsbridge.core.events import CLICK_TO_CALL_EXT_VAR, CLICK_TO_CALL_PHONE_VAR, CLICK_TO_CALL_VAR, TENANT_VAR
from fsbridge.core.wire import Frame, FrameParser, parse_event_plain

EVENT_PLAIN = "text/event-plain"
# The {var=value,...} block of our originate command.
_ORIGINATE_VARS = re.compile(r"([a-z_]+)=([^,}]*)")


def frames_of(raw: bytes) -> list[Frame]:
    parser = FrameParser()
    frames = parser.feed(raw)
    if parser.buffered:
        raise ValueError(f"capture ends inside a frame ({parser.buffered} bytes left)")
    return frames


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
    tenant: str | None = None,
) -> bytes:
    """A click-to-call capture as if the service's originate had made it.

    * the manager leg's UUID becomes ``manager_uuid`` (our origination_uuid)
      and the bgapi Job-UUID becomes ``job_uuid``, everywhere (headers of
      every leg, BACKGROUND_JOB body, the bgapi reply);
    * every manager-leg event that carries ``variable_*`` headers gains
      ``variable_fsbridge_click_to_call`` / ``_ext`` / ``_phone`` and
      ``variable_origination_uuid`` (URL-encoded, as in plain events);
    * ``command_arg``, when given, replaces BACKGROUND_JOB's Job-Command-Arg;
    * ``tenant``, when given, is added as ``variable_fsbridge_tenant`` too
      (FreeSWITCH sets every ``{var=...}`` of the originate on the leg);
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
            *(((TENANT_VAR, tenant),) if tenant is not None else ()),
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


def originate_variables(command: str) -> dict[str, str]:
    """The ``{name=value,...}`` variables of a ``bgapi originate`` command."""
    return dict(_ORIGINATE_VARS.findall(command.split("}", 1)[0]))


def originate_answer(raw: bytes, seen: Callable[[dict[str, str]], None] | None = None):
    """An on_command hook answering our ``bgapi originate`` with capture ``raw`` rewritten for it.

    ``seen`` (optional) gets the originate's variables plus ``job_uuid``
    before the answer is built (a test can create the recording file there).
    """

    def answer(command: str, headers: dict[str, str], job_uuid: str | None) -> list[bytes]:
        variables = originate_variables(command)
        if seen is not None:
            seen(dict(variables, job_uuid=job_uuid or ""))
        return [rewrite_click_to_call(
            raw,
            manager_uuid=variables["origination_uuid"],
            job_uuid=job_uuid or "",
            request_id=variables[CLICK_TO_CALL_VAR],
            ext=variables[CLICK_TO_CALL_EXT_VAR],
            phone=variables[CLICK_TO_CALL_PHONE_VAR],
            tenant=variables.get(TENANT_VAR),
        )]

    return answer
