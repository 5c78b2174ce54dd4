"""Calls in progress: ``GET /calls`` on the lookup listener and ``fsbridge calls``.

"Why did this call not reach PlanFix?" can be answered while the call is
up: for each open call its callid, direction, client number, each leg
(UUID, extension, state) and the PlanFix events already sent (PlanFix
answered 200) and still pending in the outbox.

* ``view(calls, sent, pending)``: pure -- the tracker's open calls (read
  only, via ``CallTracker.open_call_list()``) plus what was sent and what
  waits, as JSON-ready dicts.
* ``SENT``: the last ``SENT_KEPT`` delivered PlanFix commands, numbered;
  the outbox adds each one as PlanFix accepts it (``record_sent``).
  ``GET /calls/sent?after=N`` returns those after N (``fsbridge calls
  --follow`` polls it).
* ``register_routes(app, tracker, outbox)`` adds both routes to the lookup
  listener (``[dialplan] listen``, loopback only -- config refuses anything
  else), so call details never leave the host.
* ``cli(listen, follow, out)``: the ``fsbridge calls -c FILE`` command.
"""

from __future__ import annotations

import collections
import itertools
import json
import sys
import time
from typing import Any, Callable, Iterable, TextIO

import requests
from flask import Flask, jsonify, request

SENT_KEPT = 2000  # delivered commands remembered for /calls and --follow
FOLLOW_POLL_S = 0.5


class SentLog:
    """A numbered ring of the PlanFix commands PlanFix accepted, newest last.

    ``add`` runs for every delivered request: one tuple appended, no lock
    and no copy (a deque's append and a list() of it are atomic in CPython).
    A command is kept as the JSON text the outbox stored (never carrying
    planfix_token, which put() refuses): ~0.4 kB against ~1.9 kB as a dict,
    so a full ring is ~0.8 MB instead of ~3.7.  The readers (GET /calls,
    --follow), which are rare, decode it."""

    def __init__(self, size: int = SENT_KEPT) -> None:
        self._items: collections.deque[tuple[int, float, str, str]] = collections.deque(maxlen=size)
        self._seq = itertools.count(1)

    def add(self, call_id: str, fields_json: str) -> None:
        self._items.append((next(self._seq), time.time(), call_id, fields_json))

    def after(self, seq: int) -> list[dict[str, Any]]:
        return [{"seq": n, "at": at, "callid": call_id, "fields": json.loads(text)}
                for n, at, call_id, text in list(self._items) if n > seq]

    def for_call(self, call_id: str) -> list[dict[str, str]]:
        return [json.loads(text) for _, _, owner, text in list(self._items) if owner == call_id]


SENT = SentLog()


def record_sent(call_id: str, fields_json: str) -> None:
    """``fields_json``: the command's fields as the outbox stored them (a JSON object)."""
    SENT.add(call_id, fields_json)


def _leg_state(call: Any, leg: Any) -> str:
    if leg.ended:
        return f"ended ({leg.cause or 'no cause'})"
    if call.winner is leg:
        return "answered"
    if leg.slot is not None and all(slot is not leg.slot for slot in call.slots.values()):
        return "cancelled"  # its COMPLETED is sent; FreeSWITCH is still hanging it up
    return "ringing"


def view(calls: Iterable[Any], sent: SentLog, pending: dict[str, list[dict[str, str]]]) -> list[dict[str, Any]]:
    """The open calls as dicts: what ``GET /calls`` answers."""
    out = []
    for call in calls:
        legs = []
        for leg in call.legs.values():
            legs.append({
                "uuid": leg.uuid,
                "ext": leg.slot.ext if leg.slot is not None else "",
                "state": _leg_state(call, leg),
            })
        if call.click_to_call:
            direction = "click-to-call"
        elif call.caller_ext:
            direction = "out"
        else:
            direction = "in"
        client = call.phone or next((s.phone for s in call.slots.values() if s.phone), "")
        out.append({
            "callid": call.uuid,
            "direction": direction,
            "client": client,
            "did": call.diversion,
            "manager_ext": call.caller_ext,
            "tenant": call.tenant,
            "extensions": [{"ext": s.ext, "type": s.type, "live_legs": s.live_legs} for s in call.slots.values()],
            "legs": legs,
            "sent": sent.for_call(call.uuid),
            "pending": pending.get(call.uuid, []),
        })
    return out


def _pending_by_call(outbox: Any) -> dict[str, list[dict[str, str]]]:
    by_call: dict[str, list[dict[str, str]]] = {}
    for entry in outbox.list_entries(include_kept_aside=True):
        fields = {k: v for k, v in entry.fields.items() if k != "planfix_token"}
        if entry.kept_aside:
            fields["kept_aside"] = entry.kept_reason or "yes"
        by_call.setdefault(entry.call_id, []).append(fields)
    return by_call


def register_routes(app: Flask, open_call_list: Callable[[], list], outboxes: Callable[[], list]) -> None:
    """``open_call_list()``: every node's open calls; ``outboxes()``: every tenant's outbox."""

    @app.get("/calls")
    def open_calls():
        pending: dict[str, list[dict[str, str]]] = {}
        for outbox in outboxes():
            pending.update(_pending_by_call(outbox))
        return jsonify({"calls": view(open_call_list(), SENT, pending)})

    @app.get("/calls/sent")
    def sent_after():
        try:
            after = int(request.args.get("after", "0"))
        except ValueError:
            return jsonify({"error": "after must be a number"}), 400
        items = SENT.after(after)
        return jsonify({"sent": items, "next": items[-1]["seq"] if items else after})


# -- the CLI -----------------------------------------------------------------


def format_event(fields: dict[str, str]) -> str:
    cmd = fields.get("cmd", "?")
    head = f"{fields.get('event', '')} {fields.get('type', '')}" if cmd == "event" else cmd
    # PlanFix's order (JSON transport sorts keys): who, where, then the outcome
    order = {name: i for i, name in enumerate(("phone", "ext", "diversion", "status", "duration", "is_recorded"))}
    names = sorted((k for k in fields if k not in ("cmd", "event", "type", "callid")), key=lambda k: (order.get(k, 99), k))
    rest = " ".join(f"{k}={fields[k]}" for k in names)
    return f"{head.strip()} {rest}".strip()


def format_calls(calls: list[dict[str, Any]]) -> str:
    if not calls:
        return "no calls in progress\n"
    lines = []
    for call in calls:
        lines.append(f"call {call['callid']}  {call['direction']}  client {call['client'] or '?'}"
                     + (f"  did {call['did']}" if call["did"] else "")
                     + (f"  manager {call['manager_ext']}" if call["manager_ext"] else "")
                     + (f"  tenant {call['tenant']}" if call.get("tenant") not in (None, "", "default") else ""))
        for leg in call["legs"]:
            lines.append(f"  leg {leg['uuid']}  ext {leg['ext'] or '-'}  {leg['state']}")
        for fields in call["sent"]:
            lines.append(f"  sent     {format_event(fields)}")
        for fields in call["pending"]:
            lines.append(f"  pending  {format_event(fields)}")
    return "\n".join(lines) + "\n"


def cli(listen: Any, follow: bool = False, out: TextIO = sys.stdout) -> int:
    base = f"http://{listen.host}:{listen.port}"
    try:
        if not follow:
            answer = requests.get(base + "/calls", timeout=5)
            answer.raise_for_status()
            out.write(format_calls(answer.json()["calls"]))
            return 0
        seq = requests.get(base + "/calls/sent", params={"after": 0}, timeout=5).json()["next"]
        out.write(f"following PlanFix events sent by {base} (Ctrl-C stops)\n")
        out.flush()
        while True:
            answer = requests.get(base + "/calls/sent", params={"after": seq}, timeout=5).json()
            for item in answer["sent"]:
                stamp = time.strftime("%H:%M:%S", time.localtime(item["at"]))
                out.write(f"{stamp} {item['callid']} {format_event(item['fields'])}\n")
            out.flush()
            seq = answer["next"]
            time.sleep(FOLLOW_POLL_S)
    except requests.RequestException as exc:
        print(f"error: cannot ask the service at {base} ([dialplan] listen): {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
