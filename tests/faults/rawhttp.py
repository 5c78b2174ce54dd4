"""Raw HTTP to the service from any loopback source address.

The wrong-token limiter counts per client address; a test can pose as many
clients by binding to 127.0.0.x (all of 127/8 is loopback on Linux).
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass

FORM = "application/x-www-form-urlencoded"


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes

    def json(self):
        return json.loads(self.body)


def request(port: int, method: str, path: str, body: bytes | None = None, content_type: str | None = FORM,
            source: str = "127.0.0.1", headers: dict[str, str] | None = None, timeout: float = 10.0) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    try:
        all_headers = dict(headers or {})
        if content_type:
            all_headers["Content-Type"] = content_type
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        data = response.read()
        return Answer(response.status, response.getheader("Content-Type", ""), data)
    finally:
        conn.close()


def healthz_served(port: int) -> bool:
    """The public /healthz answered with its JSON: 200, or 503 while the
    service is still connecting to FreeSWITCH (either way the port serves)."""
    answer = request(port, "GET", "/healthz")
    return answer.status in (200, 503) and "status" in answer.json()
