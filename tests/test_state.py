"""state.SettingsStore and the setup value checks."""

import json
import os
import stat

import pytest

from fsbridge.planfix import Credentials
from fsbridge.state import (
    SettingsCorrupt,
    SettingsError,
    SettingsStore,
    validate_planfix_token,
    validate_planfix_url,
)

CREDS = Credentials(url="https://test.planfix.ru/tel/api", token="303cb962ac59075b964b07152d234b70")


def test_missing_file_means_not_configured(tmp_path):
    assert SettingsStore(tmp_path / "s.json").load() is None


def test_save_then_load_survives_a_new_store(tmp_path):
    path = tmp_path / "s.json"
    SettingsStore(path).save(CREDS)
    assert SettingsStore(path).load() == CREDS
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    data = json.loads(path.read_text())
    assert data == {"version": 1, "planfix_url": CREDS.url, "planfix_token": CREDS.token}
    # no temp files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


def test_save_replaces_and_load_sees_the_change(tmp_path):
    store = SettingsStore(tmp_path / "s.json")
    store.save(CREDS)
    assert store.load() == CREDS
    newer = Credentials(url="http://lab.local:8000/tel", token="abc")
    store.save(newer)
    assert store.load() == newer
    # a second store (another process) writing is seen by the first one
    third = Credentials(url="https://other.planfix.com/tel/api", token="zzz")
    SettingsStore(tmp_path / "s.json").save(third)
    assert store.load() == third


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"[]", b'{"version": 2, "planfix_url": "https://a", "planfix_token": "t"}',
     b'{"version": 1, "planfix_url": "ftp://a", "planfix_token": "t"}',
     b'{"version": 1, "planfix_url": "https://a", "planfix_token": 5}',
     b'{"version": 1, "planfix_url": "https://a"}', b"\xff\xfe", b"x" * 70000],
)
def test_corrupt_file_is_reported(tmp_path, content):
    path = tmp_path / "s.json"
    path.write_bytes(content)
    with pytest.raises(SettingsCorrupt) as info:
        SettingsStore(path).load()
    assert str(path) in str(info.value) and "setup" in str(info.value)
    assert path.read_bytes() == content  # never silently replaced by a load


def test_save_over_corrupt_file_keeps_a_copy(tmp_path):
    path = tmp_path / "s.json"
    path.write_bytes(b"garbage")
    store = SettingsStore(path)
    store.save(CREDS)
    assert store.load() == CREDS
    assert (tmp_path / "s.json.corrupt").read_bytes() == b"garbage"


def test_unreadable_file_is_an_error(tmp_path):
    # A directory where the file should be: stat works, reading fails (works as root too).
    path = tmp_path / "s.json"
    path.mkdir()
    with pytest.raises(SettingsError, match="cannot read PlanFix settings"):
        SettingsStore(path).load()


def test_save_into_missing_directory_fails_clearly_and_keeps_old(tmp_path):
    with pytest.raises(SettingsError, match="cannot store PlanFix settings"):
        SettingsStore(tmp_path / "missing" / "s.json").save(CREDS)


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    store = SettingsStore(path)
    store.save(CREDS)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(SettingsError, match="No space left"):
        store.save(Credentials(url="https://new.planfix.ru/tel/api", token="new"))
    monkeypatch.undo()
    assert SettingsStore(path).load() == CREDS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


def test_save_refuses_invalid_values(tmp_path):
    store = SettingsStore(tmp_path / "s.json")
    with pytest.raises(ValueError):
        store.save(Credentials(url="https://a/x", token="has space"))
    assert store.load() is None


@pytest.mark.parametrize(
    "url,allow_http,message",
    [
        ("", False, "empty"),
        ("test.planfix.ru/tel/api", False, "https://"),
        ("http://test.planfix.ru/tel/api", False, "allow_http"),
        ("ftp://test.planfix.ru/", True, "https://"),
        ("https:///tel/api", False, "no host"),
        ("https://user:pw@test.planfix.ru/", False, "user name or password"),
        ("https://test.planfix.ru/tel api", False, "spaces"),
        ("https://test.planfix.ru/a\nb", False, "control"),
        ("https://test.planfix.ru:99999/", False, "not a valid URL"),
        ("https://test.planfix.ru/#x", False, "fragment"),
        ("https://test.planfix.ru/" + "a" * 3000, False, "longer"),
    ],
)
def test_bad_urls_say_what_to_fix(url, allow_http, message):
    with pytest.raises(ValueError, match=message):
        validate_planfix_url(url, allow_http)


def test_good_urls():
    assert validate_planfix_url(" https://test.planfix.ru/tel/api ", False) == "https://test.planfix.ru/tel/api"
    assert validate_planfix_url("http://127.0.0.1:8000/tel", True) == "http://127.0.0.1:8000/tel"
    assert validate_planfix_url("HTTPS://[::1]:8443/a?b=c", False) == "HTTPS://[::1]:8443/a?b=c"


@pytest.mark.parametrize("token,message", [("", "empty"), ("a b", "printable"), ("тест", "printable"),
                                           ("x" * 513, "longer")])
def test_bad_tokens(token, message):
    with pytest.raises(ValueError, match=message):
        validate_planfix_token(token)


def test_recheck_interval_spares_the_stat_but_sees_own_saves_at_once(tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    store = SettingsStore(path, recheck_s=60)
    store.save(CREDS)
    assert store.load() == CREDS
    other = Credentials(url="https://other.planfix.com/tel/api", token="zzz")
    SettingsStore(path).save(other)
    assert store.load() == CREDS  # another writer: seen after recheck_s, not on every request
    newer = Credentials(url="https://newer.planfix.com/tel/api", token="yyy")
    store.save(newer)
    assert store.load() == newer  # our own save: at once
