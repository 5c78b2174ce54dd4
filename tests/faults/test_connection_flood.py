"""Issue 14, attack 1: idle and trickling connections must not take the public port down.

5,000 connections (half never send a byte, half trickle a request line one
byte at a time) from 125 loopback addresses (127.0.1.x: Linux routes all of
127/8 to lo), 40 each, under the per-address cap.  While they are open a
valid makeCall and /healthz must answer within 1 s; then the server must
close every one of them within its request-line timeout.  Loopback only;
about 15 s.
"""

from __future__ import annotations

import resource
import selectors
import socket
import time

import pytest

from tests.faults.conftest import wait_connected
from tests.faults.rawhttp import healthz_served, request



CONNECTIONS = 5000
ADDRESSES = 125
REQUEST_LINE_TIMEOUT = 6.0


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"open-files hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _open(port: int, count: int) -> list[socket.socket]:
    socks = []
    for i in range(count):
        s = socket.socket()
        s.bind((f"127.0.1.{1 + i % ADDRESSES}", 0))
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        socks.append(s)
    return socks


def _timed(call) -> tuple[float, object]:
    start = time.monotonic()
    answer = call()
    return time.monotonic() - start, answer


def test_public_port_serves_planfix_through_5000_idle_and_trickling_connections(service, fs):
    _raise_nofile(CONNECTIONS + 2000)
    svc = service(settings={"server": {
        "request_line_timeout": str(REQUEST_LINE_TIMEOUT), "header_timeout": "3",
        "max_connections_per_address": "64", "max_connections": "8000"}})
    wait_connected(svc, fs)
    socks = _open(svc.port, CONNECTIONS)
    opened = time.monotonic()
    try:
        trickling = socks[::2]
        for s in trickling:
            s.send(b"P")
        health_s, health = _timed(lambda: request(svc.port, "GET", "/healthz"))
        call_s, call = _timed(lambda: request(
            svc.port, "POST", "/planfix", f"cmd=makeCall&token={svc.token}&from=101&to=79101234567".encode()))
        assert health.status == 200 and health_s < 1.0, (health_s, health.status)
        assert call.status == 200 and call_s < 1.0, (call_s, call.status, call.body)
        fs.wait_for_command("bgapi originate {origination_uuid=" + call.json()["callid"])

        # Keep trickling (one byte per second) and wait for the server to close all.
        selector = selectors.DefaultSelector()
        for s in socks:
            selector.register(s, selectors.EVENT_READ)
        open_left, last_trickle = set(socks), time.monotonic()
        while open_left and time.monotonic() - opened < REQUEST_LINE_TIMEOUT + 10:
            if time.monotonic() - last_trickle >= 1.0:
                for s in trickling:
                    if s in open_left:
                        try:
                            s.send(b"O")
                        except OSError:
                            pass
                last_trickle = time.monotonic()
            for key, _ in selector.select(timeout=0.2):
                try:
                    data = key.fileobj.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(key.fileobj)
                    open_left.discard(key.fileobj)
        closed_after = time.monotonic() - opened
        assert not open_left, f"{len(open_left)} connections still open after {closed_after:.1f}s"
        assert closed_after < REQUEST_LINE_TIMEOUT + 5, closed_after
        selector.close()
    finally:
        for s in socks:
            s.close()
    # And the port is fine afterwards.
    assert healthz_served(svc.port)


def test_connections_beyond_the_per_address_cap_are_closed_at_once(service):
    svc = service(settings={"server": {"max_connections_per_address": "5"}})
    socks = _open(svc.port, 0)
    try:
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", svc.port), source_address=("127.0.2.1", 0))
            socks.append(s)
        extra = socket.create_connection(("127.0.0.1", svc.port), source_address=("127.0.2.1", 0))
        socks.append(extra)
        extra.settimeout(2)
        start = time.monotonic()
        assert extra.recv(1) == b""  # closed by the server, not left waiting
        assert time.monotonic() - start < 1.5
        # Another address is served normally meanwhile.
        assert healthz_served(svc.port)
    finally:
        for s in socks:
            s.close()
