"""Issue 14, attacks 4 and 5: toll fraud through makeCall, international numbers dialled as Russian.

Against the real service with the default [click_to_call] policy: every
number class of the issue is refused with 400 and a detail, and never reaches
FreeSWITCH; a flood from one extension is cut at the per-extension rate;
international numbers an admin allows go out in E.164 with their '+'.
"""

from __future__ import annotations

from tests.faults.conftest import wait_connected
from tests.faults.rawhttp import request

HOSTILE = ["+7 809 123 45 67", "+8821234567", "+1 900 555 1234", "112", "*0101", "**101", "*98", "#21#"]


def _call(svc, to: str, ext: str = "101"):
    body = f"cmd=makeCall&token={svc.token}&from={ext}&to={to}".replace("+", "%2B").replace("#", "%23").encode()
    return request(svc.port, "POST", "/planfix", body)


def _originates(fs) -> list[str]:
    return [c for c in fs.commands if c.startswith("bgapi originate")]


def test_toll_fraud_numbers_are_refused_and_a_flood_is_limited(service, fs):
    svc = service(settings={"click_to_call": {"calls_per_extension_per_minute": "5"}})
    wait_connected(svc, fs)
    for to in HOSTILE:
        answer = _call(svc, to)
        assert answer.status == 400, (to, answer.body)
        assert answer.json()["error"] == "Invalid parameters" and answer.json()["detail"], to
    assert _originates(fs) == []

    statuses = [_call(svc, "+79101234567", ext="102").status for _ in range(20)]
    assert statuses.count(200) == 5 and statuses.count(400) == 15, statuses
    assert "per 60s from 102" in _call(svc, "+79101234567", ext="102").json()["detail"]
    assert _call(svc, "+79101234567", ext="103").status == 200  # another extension still calls
    assert "refused" in svc.log()


def test_allowed_international_numbers_keep_their_plus(service, fs):
    svc = service(settings={"click_to_call": {"allowed_countries": "RU GB", "allow_prefixes": "+882"}})
    wait_connected(svc, fs)
    for to, dialled in (("+44 20 7946 0000", " +442079460000 XML"), ("+882 1234 5678", " +88212345678 XML"),
                        ("+7 910 123-45-67", " 79101234567 XML")):
        answer = _call(svc, to)
        assert answer.status == 200, (to, answer.body)
        line = fs.wait_for_command("bgapi originate {origination_uuid=" + answer.json()["callid"])
        assert dialled in line, line
