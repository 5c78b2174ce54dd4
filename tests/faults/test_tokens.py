"""The PBX token against the running service: every wrong form of it is 401
on every command; many wrong tokens from one address are refused (429) and
logged, while PlanFix's valid requests keep passing at full speed."""

from __future__ import annotations

import itertools
import time
import urllib.parse

import pytest

from tests.faults.conftest import assert_clean_log, wait_connected
from tests.faults.rawhttp import request

COMMANDS = ["makeCall", "setup", "ping", "unknown", ""]


def wrong_tokens(token: str) -> dict[str, list[tuple[str, str]] | None]:
    """Token fields to send instead of the right one (None: no token field at all)."""
    return {
        "wrong": [("token", "x" * len(token))],
        "empty": [("token", "")],
        "missing": None,
        "upper-case": [("token", token.upper())],
        "title-case": [("token", token.title())],
        "trailing space": [("token", token + " ")],
        "prefix": [("token", token[:-1])],
        "field name Token": [("Token", token)],
        "twice, one right": [("token", "nope"), ("token", token)],
        "in the query string only": [],
    }


def command_form(cmd: str, svc, pf) -> list[tuple[str, str]]:
    extra = {"makeCall": [("from", "101"), ("to", "79101234567")],
             "setup": [("planfix_url", pf.url), ("planfix_token", pf.token)]}
    return [("cmd", cmd), *extra.get(cmd, [])]


@pytest.fixture
def svc(service, fs):
    svc = service()  # default limit: 10 wrong tokens a minute per address
    wait_connected(svc, fs)
    return svc


def test_every_wrong_token_is_401_on_every_command(svc, fs, pf):
    cases = list(itertools.product(COMMANDS, wrong_tokens(svc.token).items()))
    for number, (cmd, (name, token_fields)) in enumerate(cases):
        # Each case from its own loopback address: none is slowed by the others.
        source = f"127.0.{1 + number // 250}.{1 + number % 250}"
        body = urllib.parse.urlencode(command_form(cmd, svc, pf) + (token_fields or []))
        path = "/planfix?token=" + svc.token if name == "in the query string only" else "/planfix"
        answer = request(svc.port, "POST", path, body.encode(), source=source)
        assert (answer.status, answer.json()) == (401, {"error": "Invalid token"}), (cmd, name, answer)
    # Nothing got through: no call placed, no PlanFix settings stored.
    assert not [c for c in fs.commands if c.startswith("bgapi")]
    assert not (svc.storage / "planfix-settings.json").exists()
    assert_clean_log(svc)


def test_many_wrong_tokens_are_refused_and_logged_without_slowing_valid_ones(svc, fs, pf):
    attacker = "127.0.0.66"
    statuses = []
    for _ in range(30):
        answer = request(svc.port, "POST", "/planfix", b"cmd=makeCall&from=101&to=79101234567&token=guess",
                         source=attacker)
        statuses.append(answer.status)
    assert statuses[:10] == [401] * 10
    assert set(statuses[10:]) == {429}
    assert request(svc.port, "POST", "/planfix", b"cmd=setup&token=guess", source=attacker).json() == {
        "error": "Too many requests"}
    log = svc.log()
    assert "wrong tokens from 127.0.0.66" in log and "429" in log

    # PlanFix's valid requests pass, from the same address and from others, and fast.
    valid = f"cmd=makeCall&from=101&to=79101234567&token={svc.token}".encode()
    for source in (attacker, "127.0.0.1", "127.0.0.67"):
        started = time.monotonic()
        answer = request(svc.port, "POST", "/planfix", valid, source=source)
        elapsed = time.monotonic() - started
        assert answer.status == 200, (source, answer)
        assert elapsed < 0.5, elapsed
        fs.wait_for_command("bgapi originate {origination_uuid=" + answer.json()["callid"])
    # Another address is not punished for the attacker's guesses.
    assert request(svc.port, "POST", "/planfix", b"cmd=makeCall&token=guess", source="127.0.0.68").status == 401
    assert_clean_log(svc)
