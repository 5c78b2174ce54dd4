"""Retention: recordings older than retention_days go, never one whose link PlanFix has not received."""

from __future__ import annotations

import logging
import os
from typing import Callable

from fsbridge.recordings.files import PARTIAL_SUFFIX, RECORDING_NAME, unlink_quietly
from fsbridge.recordings.index import RecordingIndex

log = logging.getLogger("fsbridge.recordings")


def cleanup(index: RecordingIndex, directory: str, retention_days: int, now: float,
            pending_call_ids: Callable[[], set[str]] | None,
            is_delivered: Callable[[str], bool] | None) -> int:
    """Delete recordings older than retention_days; returns files deleted.

    A recording whose link PlanFix has not yet received (is_delivered
    false, or still converting) is kept.  Files of our naming that we
    never indexed (calls that were not answered, or ended while the
    service was down: no link exists) are deleted by age alone.
    """
    if not retention_days or not directory:
        return 0
    cutoff = now - retention_days * 86400
    deleted = 0
    pending = pending_call_ids() if pending_call_ids is not None else None
    for entry in index.ready_before(cutoff):
        if pending is not None:
            if entry.call_id in pending:
                continue
        elif is_delivered is None or not is_delivered(entry.call_id):
            continue
        for name in (entry.wav_name, entry.mp3_name):
            if name and unlink_quietly(os.path.join(directory, name)):
                deleted += 1
        index.delete(entry.call_id)
    indexed = index.file_names()
    for name, path in _top_level_files(directory):
        if name in indexed:
            continue
        if not (RECORDING_NAME.fullmatch(name) or (name.startswith(".") and name.endswith(PARTIAL_SUFFIX))):
            continue
        try:
            if os.stat(path).st_mtime >= cutoff:
                continue
        except OSError:
            continue
        if unlink_quietly(path):
            deleted += 1
    if deleted:
        log.info("retention: deleted %d recording file(s) older than %d days", deleted, retention_days)
    return deleted


def _top_level_files(directory: str) -> list[tuple[str, str]]:
    try:
        with os.scandir(directory) as it:
            return [(e.name, e.path) for e in it if e.is_file(follow_symlinks=False)]
    except OSError as exc:
        log.error("retention: cannot list %s: %s", directory, exc.strerror)
        return []
