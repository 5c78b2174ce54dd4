"""Issue 14, attack 1 with TLS: a stalled handshake must not hold a slot for ever.

50 connections that never send a ClientHello (plus 50 that send half of
one) are closed within tls_handshake_timeout; a real HTTPS request is served
meanwhile.  Loopback only, a few seconds.
"""

from __future__ import annotations

import socket
import time

import requests

from tests.faults.conftest import wait_connected
from tests.service_proc import self_signed_certificate, unverified

TLS_TIMEOUT = 2.0


def test_stalled_tls_handshakes_are_closed_in_time(tmp_path, service, fs):
    cert, key = self_signed_certificate(tmp_path)
    svc = service(settings={"server": {"certfile": str(cert), "keyfile": str(key),
                                       "tls_handshake_timeout": str(TLS_TIMEOUT)}})
    # Healthy before the stall: /healthz is 503 until the ESL login is done.
    wait_connected(svc, fs)
    socks = []
    try:
        for i in range(100):
            s = socket.create_connection(("127.0.0.1", svc.port), source_address=(f"127.0.3.{1 + i % 4}", 0))
            if i % 2:
                s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
            socks.append(s)
        opened = time.monotonic()
        start = time.monotonic()
        answer = unverified(requests.get, svc.url + "/healthz", timeout=5)
        assert answer.status_code == 200 and time.monotonic() - start < 1.0
        for s in socks:
            s.settimeout(max(0.1, TLS_TIMEOUT + 3 - (time.monotonic() - opened)))
            assert s.recv(1) == b"", "the server must close a stalled handshake"
        assert time.monotonic() - opened < TLS_TIMEOUT + 3
    finally:
        for s in socks:
            s.close()
