"""International numbers over real SIP: dialled with their +, never as Russian ones (issue 14)."""

from __future__ import annotations

import re

import pytest

from tests.live.lab import messages
from tests.live.test_live import brief, carrier_uas, events, phone_dials, wait, wait_calls_done


@pytest.mark.parametrize("dialled,sent", [
    ("+441632960123", "+441632960123"),  # UK drama range: goes out as dialled
    ("+88212345678", "+88212345678"),  # the number the old route turned into 7 821 234 5678
    ("89101234567", "79101234567"),  # Russian national form: still the Russian route
])
def test_outbound_route_sends_international_numbers_with_their_plus(live, dialled, sent):
    carrier = carrier_uas(live, "uas-answer-wait-bye")
    assert wait(phone_dials(live, "102", dialled)) == 0
    wait_calls_done(live, 1)
    # What the carrier was asked to ring: the request line of its INVITE.
    assert re.search(rf"^INVITE sip:{re.escape(sent)}@", messages(carrier), flags=re.M), messages(carrier)[:2000]
    assert brief(live) == [("OUTGOING", "102", ""), ("ACCEPTED", "102", ""), ("COMPLETED", "102", "Success")]
    assert {r["phone"] for r in events(live)} == {sent.lstrip("+")}
