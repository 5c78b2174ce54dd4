"""Issue 14, point 6: request smuggling and log floods on the public port.

* ``Content-Length`` together with ``Transfer-Encoding`` is refused (400);
* 300 malformed requests write a handful of log lines, not one ERROR each;
* a body trickled past ``body_timeout`` closes the connection.
Loopback only, a few seconds.
"""

from __future__ import annotations

import socket
import time

from tests.faults.rawhttp import healthz_served


def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_content_length_with_transfer_encoding_is_refused(service):
    svc = service()
    body = f"cmd=makeCall&token={svc.token}&from=101&to=79101234567".encode()
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    answer = _raw(svc.port, b"POST /planfix HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                  b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    answer = _raw(svc.port, b"POST /planfix HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]


def test_a_flood_of_malformed_requests_is_summarised_in_the_log(service):
    svc = service(settings={"log": {"level": "INFO"}})
    before = len(svc.log().splitlines())
    for i in range(300):
        _raw(svc.port, b"BREW /coffee HTCPCP/1.0 extra words\r\n\r\n" if i % 2 else b"GET / HTTP/1.1\r\nContent-Length: -5\r\n\r\n")
    assert healthz_served(svc.port)
    new_lines = svc.log().splitlines()[before:]
    assert len(new_lines) < 10, new_lines[:20]
    assert not [line for line in new_lines if " ERROR " in line], new_lines[:20]


def test_a_trickled_body_is_cut_at_body_timeout(service):
    svc = service(settings={"server": {"body_timeout": "1.5"}})
    with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as sock:
        sock.sendall(b"POST /planfix HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: 1000\r\n\r\n")
        start = time.monotonic()
        closed = False
        while time.monotonic() - start < 6:
            try:
                sock.sendall(b"a")
                sock.settimeout(0.5)
                if sock.recv(4096) == b"":
                    closed = True
                    break
            except socket.timeout:
                continue
            except OSError:
                closed = True
                break
        elapsed = time.monotonic() - start
    assert closed and elapsed < 4, elapsed
