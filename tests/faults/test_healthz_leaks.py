"""Issue 14, attack 3: the public /healthz must not read internal servers back.

PlanFix (the fake) answers a delivery with an HTML error page; the
public /healthz must show neither the marker nor any address, URL or the
Core-UUID, while the loopback dialplan listener shows the detail; after the
next successful delivery last_error is empty again.
"""

from __future__ import annotations

from tests.faults.conftest import replay_calls, wait_all_delivered, wait_connected
from tests.faults.rawhttp import request

MARKER = "502 Bad Gateway"  # the fake's "garbage" reply: 200 with an HTML error page


def _strings(value, path=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(value, str):
        yield path, value


def test_public_healthz_shows_status_and_counts_only(service, fs, pf, traces_dir):
    svc = service()
    wait_connected(svc, fs)
    pf.fail_next(10_000, "garbage")  # until the test lets PlanFix recover
    wanted = replay_calls(fs, traces_dir, ["01-inbound-single-answer"])
    svc.wait_health(lambda h: MARKER in (h["outbox"]["last_error"] or ""))  # detailed view (loopback)

    public = request(svc.port, "GET", "/healthz")
    assert public.status == 200
    text = public.body.decode()
    for leak in (MARKER, "127.0.0.1", str(pf.port), str(fs.port), "http://", svc.health()["freeswitch"]["core_uuid"]):
        assert leak not in text, (leak, text)
    assert {path for path, _ in _strings(public.json())} <= {".status", ".version"}

    with pf._cond:  # PlanFix answers normally again
        pf._script.clear()
    wait_all_delivered(svc, pf, wanted)
    svc.wait_health(lambda h: not h["outbox"]["last_error"])
