"""The guarded WSGI server: keep-alive idle timeout, eviction at max_connections, quiet errors."""

from __future__ import annotations

import socket
import time

import pytest

from fsbridge.httpguard import GuardedWSGIServer, GuardSettings, address_key


def _app(environ, start_response):
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body) + 2))])
    return [b"ok" + body]


@pytest.fixture
def serve():
    servers = []

    def start(**guard) -> int:
        server = GuardedWSGIServer(("127.0.0.1", 0), _app, GuardSettings(**guard))
        server.start()
        servers.append(server)
        return server.server_port

    yield start
    for server in servers:
        server.stop(timeout=1)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while True:
            if sock.recv(4096) == b"":
                return True
    except socket.timeout:
        return False
    except OSError:
        return True


def test_a_kept_alive_connection_is_closed_after_keepalive_timeout(serve):
    port = serve(keepalive_timeout=0.5)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(2)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        assert _closed_within(sock, 3)
        assert 0.3 < time.monotonic() - start < 2


def test_headers_trickled_past_header_timeout_are_cut(serve):
    port = serve(header_timeout=0.5)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        answer = b""
        sock.settimeout(3)
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 400")


def test_at_max_connections_the_longest_idle_one_makes_room(serve):
    port = serve(max_connections=10, max_per_address=100, request_line_timeout=30)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            sock.settimeout(2)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        assert _closed_within(idle[0], 2)  # the oldest idle one
    finally:
        for s in idle:
            s.close()


@pytest.mark.parametrize("address,key", [("192.0.2.1", "192.0.2.1"), ("2001:db8:1:2::5", "2001:db8:1:2::/64"),
                                         ("::ffff:10.0.0.1", "10.0.0.1"), (None, "unknown")])
def test_address_key(address, key):
    assert address_key(address) == key
