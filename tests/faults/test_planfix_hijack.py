"""Issue 14, attack 2: `setup` must not point PlanFix's requests at any address.

Against the real service with [planfix] allow_http = no (production mode):
every hostile URL of the issue is refused with 400 and nothing is stored; a
PlanFix account URL is stored; a change of address is logged at WARNING with
hosts only (no query).  The connect-time check (DNS rebinding) is held by
tests/test_planfix_address.py against a real loopback listener.
"""

from __future__ import annotations

import pytest

from tests.faults.rawhttp import request

HOSTILE = [
    "http://127.0.0.1:8080/x",
    "https://127.0.0.1:8443/x",
    "https://169.254.169.254/latest/meta-data/",
    "https://0x7f000001/x",
    "https://2130706433/x",
    "https://127.1/x",
    "https://[::ffff:127.0.0.1]/x",
    "https://[::1]/x",
    "https://10.0.0.1/x",
    "https://localhost/x",
    "https://evil.example.com/x",
    "https://planfix.ru.evil.example.com/x",
    "https://evilplanfix.ru/x",
    "http://acme.planfix.ru/tel/api",
]


def _setup(svc, url: str, source: str = "127.0.0.1"):
    body = f"cmd=setup&token={svc.token}&planfix_url={url}&planfix_token=pf-key-123".encode()
    return request(svc.port, "POST", "/planfix", body, source=source)


@pytest.fixture
def prod(service):
    return service(settings={"planfix": {"allow_http": "no", "url": "", "token": ""}})


def test_hostile_planfix_urls_are_refused_and_an_account_url_is_stored(prod):
    svc = prod
    for url in HOSTILE:
        answer = _setup(svc, url)
        assert answer.status == 400, (url, answer.body)
        assert answer.json()["error"] == "Invalid parameters"
    assert not (svc.storage / "planfix-settings.json").exists()

    assert _setup(svc, "https://acme.planfix.ru/tel/api").status == 200
    assert "acme.planfix.ru" in (svc.storage / "planfix-settings.json").read_text()

    assert _setup(svc, "https://other.planfix.com/tel/api?secret=s3cr3t").status == 200
    log = svc.log()
    assert "PlanFix address changed from acme.planfix.ru to other.planfix.com" in log
    assert "WARNING" in next(line for line in log.splitlines() if "address changed" in line)
    assert "s3cr3t" not in log
