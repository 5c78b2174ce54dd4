"""Config loading: the sample is valid, every error names file, section, key."""

import configparser
import os
import re
import subprocess
import sys

import pytest

from fsbridge import config
from tests.conftest import REPO

SAMPLE = REPO / "conf" / "fsbridge.ini"


def write(tmp_path, text, name="f.ini"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def minimal(tmp_path, extra=""):
    return (
        "[server]\ntoken = 0123456789abcdef0123\n"
        f"[storage]\ndir = {tmp_path / 'state'}\n" + extra
    )


def test_sample_documents_every_key_with_its_default():
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    parser.read(SAMPLE)
    text = SAMPLE.read_text()
    for section, keys in config.defaults().items():
        assert parser.has_section(section), section
        assert set(parser.options(section)) == set(keys), section
        for key, default in keys.items():
            if (section, key) in {("server", "token"), ("storage", "dir")}:
                continue
            assert parser.get(section, key) == default, (section, key)
            # every key has a comment line right above it (or above its group)
            before = text.split(f"\n{key} = ", 1)[0].rstrip().splitlines()
            assert any(line.startswith(";") for line in before[-4:]), (section, key)


def test_sample_with_token_is_valid(tmp_path):
    text = SAMPLE.read_text().replace("\ntoken =\n", "\ntoken = 0123456789abcdef0123\n", 1)
    text = text.replace("dir = /var/lib/fsbridge", f"dir = {tmp_path}")
    cfg = config.load(write(tmp_path, text))
    assert cfg.freeswitch.port == 8021
    assert cfg.server.listen.port == 8080
    assert cfg.dialplan.listen.is_loopback
    assert cfg.planfix.allow_http is False


def test_missing_file_is_named(tmp_path):
    with pytest.raises(config.ConfigError) as err:
        config.load(str(tmp_path / "nope.ini"))
    assert "nope.ini: file not found" in str(err.value)


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("[freeswitch]\nport = eighty\n", r"\[freeswitch\] port: expected a whole number"),
        ("[freeswitch]\nport = 70000\n", r"\[freeswitch\] port: must be between 1 and 65535"),
        ("[dialplan]\nlisten = 127.0.0.1\n", r"\[dialplan\] listen: expected HOST:PORT"),
        ("[planfix]\nurl = planfix.ru/tel\n", r"\[planfix\] url: must start with https://"),
        ("[planfix]\nurl = http://x.planfix.ru/tel\n", r"\[planfix\] url: PlanFix accepts only https"),
        ("[server]\ncertfile = /nonexistent.pem\nkeyfile = /nonexistent.key\n", r"\[server\] certfile: file does not exist"),
        ("[calls]\nextension_pattern = (\n", r"\[calls\] extension_pattern: not a valid regular expression"),
        ("[click_to_call]\ndial_string = user/{ext} &park\n", r"\[click_to_call\] dial_string"),
        ("[bogus]\nx = 1\n", r"\[bogus\]: unknown section"),
        ("[log]\nlevl = INFO\n", r"\[log\] levl: unknown key"),
    ],
)
def test_bad_values_name_file_section_key(tmp_path, extra, expected):
    text = minimal(tmp_path)
    if extra.startswith("[server]"):  # merge into the section minimal() has
        text = text.replace("[server]\n", extra, 1)
    else:
        text += extra
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert re.search(re.escape(path) + ": " + expected, str(err.value)), str(err.value)


def test_empty_token_refused(tmp_path):
    path = write(tmp_path, f"[storage]\ndir = {tmp_path}\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert "[server] token: must not be empty" in str(err.value)


def test_all_problems_reported_at_once(tmp_path):
    path = write(tmp_path, "[freeswitch]\nport = x\n[dialplan]\nlisten = nope\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert len(err.value.problems) == 2


def test_non_loopback_lookup_listener_warns(tmp_path):
    cfg = config.load(write(tmp_path, minimal(tmp_path, "[dialplan]\nlisten = 0.0.0.0:8081\n")))
    assert any("[dialplan] listen" in w and "loopback" in w for w in cfg.warnings)


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fsbridge", *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )


def test_check_exit_codes_and_no_traceback(tmp_path):
    bad = write(tmp_path, "[freeswitch]\nport = x\n", "bad.ini")
    result = run_cli("check", "-c", bad)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{bad}: [freeswitch] port" in result.stderr
    good = write(tmp_path, minimal(tmp_path), "good.ini")
    result = run_cli("check", "-c", good)
    assert result.returncode == 0, result.stderr
    missing = run_cli("run", "-c", str(tmp_path / "missing.ini"))
    assert missing.returncode == 2 and "file not found" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_gen_token_is_fresh_and_accepted(tmp_path):
    first, second = run_cli("gen-token").stdout.strip(), run_cli("gen-token").stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", first) and first != second


def test_init_config_makes_a_runnable_private_config(tmp_path):
    out = tmp_path / "local.ini"
    result = run_cli(
        "init-config", "--sample", str(SAMPLE), "--out", str(out), "--storage-dir", str(tmp_path / "var")
    )
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "var") in result.stdout
    assert oct(os.stat(out).st_mode & 0o777) == "0o600"
    cfg = config.load(str(out))
    assert re.fullmatch(r"[0-9a-f]{32}", cfg.server.token)
    assert cfg.storage.dir == str(tmp_path / "var")
    # a second run leaves the existing file (and its token) alone
    again = run_cli("init-config", "--sample", str(SAMPLE), "--out", str(out), "--storage-dir", "x")
    assert again.returncode == 0 and config.load(str(out)).server.token == cfg.server.token
