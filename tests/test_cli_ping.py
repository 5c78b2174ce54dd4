"""`fsbridge ping` with a config as an admin writes it from the sample (README step 4)."""

import pytest

from fsbridge import cli
from fsbridge.fakes.planfix import FakePlanfix
from tests.conftest import REPO

PBX_TOKEN = "0123456789abcdef0123456789abcdef"
PUBLIC_URL = "https://pbx.example.com:8443"


@pytest.fixture
def planfix():
    with FakePlanfix() as fake:
        yield fake


def admin_config(tmp_path, planfix) -> str:
    """The shipped sample with what README tells the admin to fill in."""
    text = (REPO / "conf" / "fsbridge.ini").read_text()
    for old, new in [
        ("\ntoken =\n", f"\ntoken = {PBX_TOKEN}\n"),  # [server] token, the first one
        ("public_url =\n", f"public_url = {PUBLIC_URL}\n"),
        ("\nurl =\n", f"\nurl = {planfix.url}\n"),
        ("\ntoken =\n", f"\ntoken = {planfix.token}\n"),  # [planfix] token
        ("allow_http = no", "allow_http = yes"),  # the fake PlanFix speaks http on loopback
        ("dir = /var/lib/fsbridge", f"dir = {tmp_path / 'state'}"),
    ]:
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / "fsbridge.ini"
    path.write_text(text)
    return str(path)


def test_ping_matches_when_planfix_holds_public_url_plus_planfix(tmp_path, planfix, capsys):
    planfix.ping_reply = {"pbxToken": PBX_TOKEN, "pbxUrl": PUBLIC_URL + "/planfix"}
    assert cli.main(["ping", "-c", admin_config(tmp_path, planfix)]) == 0
    out = capsys.readouterr().out
    assert "URL: match" in out and "token: match" in out and PBX_TOKEN not in out


def test_ping_bare_public_url_is_a_mismatch_naming_the_address_to_enter(tmp_path, planfix, capsys):
    planfix.ping_reply = {"pbxToken": PBX_TOKEN, "pbxUrl": PUBLIC_URL}
    assert cli.main(["ping", "-c", admin_config(tmp_path, planfix)]) == 1
    out = capsys.readouterr().out
    assert f"URL: MISMATCH, enter {PUBLIC_URL}/planfix in PlanFix" in out
