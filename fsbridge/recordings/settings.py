"""The recordings part's settings, commands and start-up checks."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Any, Protocol

from fsbridge.recordings.convert import Mp3Converter

class RecordingsError(Exception):
    """The recordings part cannot start (the message says why, for the admin)."""


class CommandLike(Protocol):
    """What the tracker emits (tracker.PlanfixCommand has this shape)."""

    call_id: str
    fields: dict[str, str]
    recording_path: str | None


@dataclass(frozen=True, slots=True)
class RecordCommand:
    """A command this module makes itself (`record`, or a rewritten COMPLETED
    when the input was not a dataclass); same shape as tracker.PlanfixCommand."""

    call_id: str
    fields: dict[str, str]
    recording_path: str | None = None
    tenant: str = ""  # the PlanFix account it goes to (tracker.PlanfixCommand.tenant)
    node: str = ""
    unmatched: str = ""


@dataclass(frozen=True)
class RecordingSettings:
    dir: str  # where this service finds the files; "" = recordings not reported
    freeswitch_dir: str  # the same directory as FreeSWITCH names it in Record-File-Path
    public_url: str  # links start with this; "" = no links, so recordings not reported
    storage_dir: str  # the HMAC key and the callid -> file index live here
    convert: str = "off"  # "off" or "mp3"
    retention_days: int = 0  # 0 = keep forever
    converter_workers: int = 1  # conversions at once (each is one lame/ffmpeg process)
    convert_queue_size: int = 1000  # beyond this, calls get the WAV link at once
    convert_timeout: float = 600.0  # seconds before a stuck lame/ffmpeg is killed
    link_max_age: int = 86400  # Cache-Control max-age of served files (they never change)

    @classmethod
    def from_config(cls, cfg: Any) -> "RecordingSettings":
        rec = cfg.recordings
        return cls(
            dir=rec.dir,
            freeswitch_dir=rec.freeswitch_dir,
            public_url=cfg.server.public_url,
            storage_dir=cfg.storage.dir,
            convert=rec.convert,
            retention_days=rec.retention_days,
        )


def check_settings(settings: RecordingSettings) -> list[str]:
    """Problems an admin must fix (for `fsbridge check` and start-up)."""
    problems: list[str] = []
    if not settings.dir:
        return problems
    if not os.path.isdir(settings.dir):
        problems.append(f"[recordings] dir: not a directory: {settings.dir}")
    elif (settings.convert != "off" or settings.retention_days) and not os.access(
        settings.dir, os.W_OK | os.X_OK
    ):
        problems.append(
            f"[recordings] dir: {settings.dir} must be writable by this service for "
            "convert = mp3 and retention_days (it writes MP3s and deletes old files)"
        )
    if not posixpath.isabs(settings.freeswitch_dir):
        problems.append(f"[recordings] freeswitch_dir: must be an absolute path, got {settings.freeswitch_dir!r}")
    if settings.convert not in ("off", "mp3"):
        problems.append(f"[recordings] convert: expected off or mp3, got {settings.convert!r}")
    elif settings.convert == "mp3" and Mp3Converter.find() is None:
        problems.append(
            "[recordings] convert = mp3 needs lame or ffmpeg on PATH: apt install lame (or ffmpeg)"
        )
    return problems
