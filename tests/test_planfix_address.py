"""The PlanFix address policy: setup-time URL checks and the connect-time address check."""

from __future__ import annotations

import socket
import threading

import pytest

from fsbridge import planfix_address
from fsbridge.planfix import Credentials, Outcome, PlanfixClient
from fsbridge.planfix_address import AddressPolicy, AddressRefused, check_url, is_ip_literal, resolve

STRICT = AddressPolicy()


@pytest.mark.parametrize("host", ["127.0.0.1", "0x7f000001", "2130706433", "127.1", "0177.0.0.1",
                                  "[::ffff:127.0.0.1]", "::1", "169.254.169.254"])
def test_every_spelling_of_an_address_is_an_ip_literal(host):
    assert is_ip_literal(host)


@pytest.mark.parametrize("url", ["https://acme.planfix.ru/tel/api", "https://a.b.planfix.com/x",
                                 "https://acme.planfix.ua/x"])
def test_account_urls_pass(url):
    check_url(url, STRICT)


@pytest.mark.parametrize("url", ["https://planfix.ru.evil.com/x", "https://xplanfix.ru/x", "https://planfix.ru/x",
                                 "http://acme.planfix.ru/x", "https://0x7f000001/x"])
def test_other_urls_are_refused(url):
    with pytest.raises(AddressRefused):
        check_url(url, STRICT)


def test_lab_mode_accepts_http_and_loopback():
    lab = AddressPolicy(lab_mode=True)
    check_url("http://127.0.0.1:9/x", lab)
    assert resolve("127.0.0.1", 9, lab)


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                                     "::1", "fe80::1", "fd00:ec2::254", "::ffff:127.0.0.1", "224.0.0.1"])
def test_names_resolving_to_internal_addresses_are_refused(monkeypatch, address):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    monkeypatch.setattr(planfix_address.socket, "getaddrinfo",
                        lambda *a, **k: [(family, socket.SOCK_STREAM, 6, "", (address, 443))])
    with pytest.raises(AddressRefused):
        resolve("acme.planfix.ru", 443, STRICT)


def test_public_addresses_pass(monkeypatch):
    monkeypatch.setattr(planfix_address.socket, "getaddrinfo",
                        lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443))])
    assert resolve("acme.planfix.ru", 443, STRICT)[0][4][0] == "93.184.216.34"


def test_client_never_connects_where_the_name_now_resolves_to_loopback(monkeypatch):
    """DNS rebinding: setup saw a PlanFix name; at connect time it points at a local server."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    real = socket.getaddrinfo
    monkeypatch.setattr(planfix_address.socket, "getaddrinfo",
                        lambda host, *a, **k: real("127.0.0.1", *a, **k))
    client = PlanfixClient(lambda: Credentials(f"http://acme.planfix.ru:{port}/tel/api", "pf-key"),
                           connect_timeout=1, read_timeout=1, address_policy=STRICT)
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(_accept(listener)))
    thread.start()
    try:
        result = client.send({"cmd": "event", "event": "INCOMING", "callid": "x"})
        assert result.outcome is Outcome.RETRY
        assert "not a public address" in result.error
    finally:
        thread.join(2)
        listener.close()
        client.close()
    assert accepted == [None]


def _accept(listener):
    try:
        conn, _ = listener.accept()
        conn.close()
        return "connected"
    except OSError:
        return None
