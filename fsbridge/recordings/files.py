"""What a recording file may be called, and the file system helpers every part shares."""

from __future__ import annotations

import logging
import os
import re

log = logging.getLogger("fsbridge.recordings")

# PlanFix callids we make links for: FreeSWITCH UUIDs (and any similar token
# an originate may set).  No dot and no slash: a callid is never a path.
CALL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
# The last path segment of a link: the signature and the file type.
SIGNED_NAME = re.compile(r"([0-9a-f]{32})\.(wav|mp3)")
# Files fsbridge may serve, by extension.
CONTENT_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg"}
# Files FreeSWITCH writes with the dialplan snippet (and our MP3s): <uuid>.<ext>.
RECORDING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}\.(wav|mp3)")
# Subdirectories FreeSWITCH may record into (e.g. a date layout): plain names.
SUBDIR_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
# Our unfinished MP3s (.<uuid>.mp3.part): written there, renamed when complete.
PARTIAL_SUFFIX = ".mp3.part"


def fsync(path: str) -> None:
    """Flush a file's data, or a directory's entries (a create or rename), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.error("cannot delete %s: %s", path, exc.strerror)
        return False
