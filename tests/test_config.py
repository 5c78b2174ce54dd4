"""Config loading: the sample is valid, every error names file, section, key."""

import configparser
import os
import re
import subprocess
import sys

import pytest

from fsbridge import cli, config
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
        ("[phone]\ndefault_region = RUS\n", r"\[phone\] default_region: expected a two-letter country code"),
        # A typo of the right form would leave national numbers unnormalised: refused too.
        ("[phone]\ndefault_region = RY\n", r"\[phone\] default_region: 'RY' is not a country code"),
        ("[phone]\ndefault_region = uk\n", r"\[phone\] default_region: 'uk' .*\(the United Kingdom is GB\)"),
        ("[click_to_call]\nallowed_countries = RU, XX\n",
         r"\[click_to_call\] allowed_countries: 'XX' is not a country code"),
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


def test_country_codes_taken_in_any_case(tmp_path):
    cfg = config.load(write(tmp_path, minimal(tmp_path, "[phone]\ndefault_region = by\n"
                                                        "[click_to_call]\nallowed_countries = gb, Kz RU\n")))
    assert cfg.phone.default_region == "BY"
    assert cfg.click_to_call.allowed_countries == ("GB", "KZ", "RU")


def test_empty_token_refused(tmp_path):
    path = write(tmp_path, f"[storage]\ndir = {tmp_path}\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert "[server] token: must not be empty" in str(err.value)


def test_all_problems_reported_at_once(tmp_path):
    # a bad port does not hide the empty token (a cross check)
    path = write(tmp_path, "[freeswitch]\nport = x\n[dialplan]\nlisten = nope\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert [p.split(": ")[1] for p in err.value.problems] == [
        "[freeswitch] port", "[dialplan] listen", "[server] token"]


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


# --- syntax: every bad line reported, with its line, naming the right key ------------


def problems_of(path):
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    return err.value.problems


def test_every_syntax_error_reported_not_only_the_first(tmp_path):
    text = minimal(tmp_path, "[freeswitch]\nport 8021\nhost = 127.0.0.1\nhost = 10.0.0.1\n[log\nlevel = INFO\n")
    path = write(tmp_path, "orphan = 1\n" + text)
    problems = problems_of(path)
    assert f"{path}: orphan: line 1: comes before any [section] line" in problems
    assert f"{path}: [freeswitch]: line 7: expected key = value, got 'port 8021'" in problems
    assert f"{path}: [freeswitch] host: line 9: set twice (also on line 8); keep one" in problems
    assert f"{path}: line 10: a section header looks like [name], got '[log'" in problems
    assert len(problems) == 4, problems


def test_syntax_error_does_not_hide_bad_values_or_the_empty_token(tmp_path):
    path = write(tmp_path, f"[storage]\ndir = {tmp_path}\n[freeswitch]\nport = 0\nnonsense\n")
    problems = problems_of(path)
    assert any("[freeswitch]: line 5: expected key = value" in p for p in problems)
    assert any("[freeswitch] port: must be between 1 and 65535" in p for p in problems)
    assert any("[server] token: must not be empty" in p for p in problems)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "notepad.ini"
    path.write_bytes(b"\xef\xbb\xbf" + minimal(tmp_path).encode())
    assert config.load(str(path)).server.token == "0123456789abcdef0123"


def test_not_utf8_says_save_as_utf8_with_the_line(tmp_path):
    path = tmp_path / "cp1251.ini"
    text = minimal(tmp_path, "[click_to_call]\n; Менеджер\ncaller_id_name = Офис\n[freeswitch]\nport = x\n")
    path.write_bytes(text.encode("cp1251"))
    problems = problems_of(str(path))
    assert f"{path}: lines 6, 7: not UTF-8 text (another encoding, e.g. Windows-1251?); save the file as UTF-8" \
        in problems
    assert any("[freeswitch] port: expected a whole number" in p for p in problems)  # and the rest still checked


def test_quoted_value_is_a_warning(tmp_path):
    path = write(tmp_path, minimal(tmp_path, '[freeswitch]\npassword = "Secret"\n'))
    cfg = config.load(path)
    assert cfg.freeswitch.password == '"Secret"'  # INI has no quoting: that is what would be sent
    assert any(w.startswith(f"{path}: [freeswitch] password: the value is in quotes") for w in cfg.warnings)


def test_indented_key_is_explained_and_the_key_above_not_blamed(tmp_path):
    path = write(tmp_path, minimal(tmp_path, "[freeswitch]\nport = 8021\n  password = x\n"))
    problems = problems_of(path)
    assert problems == [
        f"{path}: [freeswitch] password: line 7 starts with a space, and INI reads an indented line as the "
        "continuation of the value above ([freeswitch] port, line 6), so it is ignored; "
        "remove the spaces at the start of the line"
    ]


def test_inline_comment_needs_a_space_before_the_semicolon(tmp_path):
    cfg = config.load(write(tmp_path, minimal(tmp_path, "[freeswitch]\npassword = a;b   ; why\n")))
    assert cfg.freeswitch.password == "a;b"


# --- [recordings] dir defaults to FreeSWITCH's directory when it exists here --------


def test_recordings_dir_defaults_to_an_existing_freeswitch_dir(tmp_path):
    fs_dir = tmp_path / "fs-recordings"
    fs_dir.mkdir()
    cfg = config.load(write(tmp_path, minimal(tmp_path, f"[recordings]\nfreeswitch_dir = {fs_dir}\n")))
    assert cfg.recordings.dir == str(fs_dir)
    missing = config.load(write(tmp_path, minimal(tmp_path, f"[recordings]\nfreeswitch_dir = {tmp_path}/no\n")))
    assert missing.recordings.dir == ""
    own = tmp_path / "mine"
    own.mkdir()
    given = config.load(write(tmp_path, minimal(tmp_path, f"[recordings]\ndir = {own}\nfreeswitch_dir = {fs_dir}\n")))
    assert given.recordings.dir == str(own)


def test_check_says_which_recordings_directory_is_used(tmp_path):
    fs_dir = tmp_path / "fs-recordings"
    fs_dir.mkdir()
    used = run_cli("check", "-c", write(tmp_path, minimal(tmp_path, f"[recordings]\nfreeswitch_dir = {fs_dir}\n")))
    assert used.returncode == 0, used.stderr
    assert f"recordings: read from {fs_dir}" in used.stdout
    none = run_cli("check", "-c", write(tmp_path, minimal(tmp_path, f"[recordings]\nfreeswitch_dir = {tmp_path}/no\n"),
                                        "none.ini"))
    assert none.returncode == 0, none.stderr
    assert "recordings: not reported (is_recorded=0)" in none.stdout and f"{tmp_path}/no" in none.stdout


def test_init_config_picks_the_freeswitch_recordings_that_exist(tmp_path, monkeypatch, capsys):
    source_build = tmp_path / "usr-local-freeswitch-recordings"
    source_build.mkdir()
    monkeypatch.setattr(cli, "FREESWITCH_RECORDINGS", (str(tmp_path / "absent"), str(source_build)))
    out = tmp_path / "x.ini"
    assert cli.main(["init-config", "--out", str(out), "--storage-dir", str(tmp_path / "st")]) == 0
    cfg = config.load(str(out))
    assert cfg.recordings.freeswitch_dir == str(source_build) and cfg.recordings.dir == str(source_build)
    assert str(source_build) in capsys.readouterr().out
