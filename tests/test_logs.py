"""Logs an admin can use: floods summarised, hints, formats, per-logger levels, refusals."""

from __future__ import annotations

import io
import json
import logging

import pytest

from fsbridge import logs


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_logger(name: str, fmt: str = "text", environ=None, clock=None, config_path="/etc/fsbridge/fsbridge.ini"):
    stream = io.StringIO()
    handler = logs.make_handler(fmt, config_path, stream=stream, environ=environ or {},
                                repeat=logs.RepeatFilter(clock=clock or Clock()))
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, handler, stream


def test_an_hour_of_freeswitch_down_writes_a_dozen_lines():
    """The ESL supervisor's warning every 15-30 s for an hour: 1 line, then one summary per 5 min."""
    clock = Clock()
    logger, handler, stream = make_logger("t.esl.down", clock=clock)
    attempts = 0
    while clock.now < 3600:
        logger.warning("%s; waiting for FreeSWITCH",
                       "cannot connect to FreeSWITCH at 127.0.0.1:8021: [Errno 111] Connection refused")
        attempts += 1
        clock.now += 22.5  # the backoff's mean at max_backoff = 30
    lines = stream.getvalue().splitlines()
    assert attempts == 160
    assert len(lines) == 12  # the first, then one per 5-minute window (each 14 attempts = 315 s)
    assert "repeated" not in lines[0]
    assert all("(repeated 13 times in the last 315 s)" in line for line in lines[1:]), lines[1]
    repeat = next(f for f in handler.filters if isinstance(f, logs.RepeatFilter))
    for record in repeat.pending():  # what fsbridge writes at exit
        handler.handle(record)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 13
    # the hint rides on every line, the summary included
    assert all("is FreeSWITCH running and mod_event_socket loaded? see [freeswitch] host/port in "
               "/etc/fsbridge/fsbridge.ini" in line for line in lines)
    # every attempt is accounted for: the written ones plus the summarised ones
    written = sum(1 for line in lines[:12])
    assert written + sum(int(line.split("(repeated ")[1].split()[0]) for line in lines[1:]) == attempts


def test_pending_repeats_are_written_at_flush_and_distinct_messages_pass():
    clock = Clock()
    logger, handler, stream = make_logger("t.flood", clock=clock)
    for address in ("10.0.0.1", "10.0.0.2"):
        logger.warning("makeCall from %s refused with 401: Invalid token", address)
    for _ in range(50):
        logger.warning("makeCall from %s refused with 401: Invalid token", "10.0.0.1")
        clock.now += 1
    assert len(stream.getvalue().splitlines()) == 2
    repeat = next(f for f in handler.filters if isinstance(f, logs.RepeatFilter))
    for record in repeat.pending():
        handler.handle(record)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[2].endswith("makeCall from 10.0.0.1 refused with 401: Invalid token "
                             "(repeated 50 times in the last 50 s)")


def test_debug_is_never_summarised():
    logger, _, stream = make_logger("t.debug")
    for _ in range(5):
        logger.debug("frame")
    assert len(stream.getvalue().splitlines()) == 5


def test_json_format_and_no_timestamp_under_journald():
    logger, _, stream = make_logger("t.json", fmt="json", environ={"JOURNAL_STREAM": "8:1234"})
    logger.error("FreeSWITCH at %s rejected the ESL password (%s)", "127.0.0.1:8021", "-ERR invalid")
    line = json.loads(stream.getvalue())
    assert set(line) == {"level", "logger", "message"}
    assert line["level"] == "ERROR" and line["logger"] == "t.json"
    assert line["message"].startswith("FreeSWITCH at 127.0.0.1:8021 rejected the ESL password (-ERR invalid) (")
    logger, _, stream = make_logger("t.json2", fmt="json")
    logger.info("x")
    assert "time" in json.loads(stream.getvalue())


def test_text_format_drops_the_timestamp_under_journald():
    logger, _, stream = make_logger("t.text", environ={"JOURNAL_STREAM": "8:1"})
    logger.info("hello")
    assert stream.getvalue() == "INFO t.text: hello\n"
    logger, _, stream = make_logger("t.text2")
    logger.info("hello")
    assert stream.getvalue().endswith(" INFO t.text2: hello\n") and stream.getvalue()[:4].isdigit()


def test_parse_levels():
    assert logs.parse_levels("fsbridge.esl=debug, fsbridge.web = Warning,") == {
        "fsbridge.esl": "DEBUG", "fsbridge.web": "WARNING"}
    assert logs.parse_levels("") == {}
    for bad in ("fsbridge.esl", "fsbridge.esl=loud", "=debug", "a b=info"):
        with pytest.raises(ValueError):
            logs.parse_levels(bad)


def test_per_logger_levels_apply_and_reload_resets():
    root = logging.getLogger()
    saved = root.level
    try:
        logs.apply_levels("INFO", {"t.levels.esl": "DEBUG", "t.levels.web": "ERROR"})
        assert logging.getLogger("t.levels.esl").getEffectiveLevel() == logging.DEBUG
        assert logging.getLogger("t.levels.web.sub").getEffectiveLevel() == logging.ERROR
        logs.apply_levels("WARNING", {})
        assert logging.getLogger("t.levels.esl").getEffectiveLevel() == logging.WARNING
    finally:
        root.setLevel(saved)


def test_config_rejects_a_bad_levels_key(tmp_path):
    from fsbridge import config

    path = tmp_path / "f.ini"
    path.write_text("[server]\ntoken = t0123456789abcdef0123\n[log]\nlevels = fsbridge.esl=chatty\n")
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(path))
    assert any("[log] levels" in p and "chatty" in p for p in exc.value.problems), exc.value.problems
