"""The recordings part the service wires: a call's file on the event path, MP3 jobs, links.

FreeSWITCH records an answered client call into one file named by the call's
UUID (dialplan/fsbridge-record.xml) and reports the closed file in
RECORD_STOP's `Record-File-Path`; the tracker hands that path on with the
call's COMPLETED command.  ``Recordings`` then decides `is_recorded` (1 only
for a file that exists and is not empty: FreeSWITCH deletes recordings
shorter than RECORD_MIN_SEC), indexes the file (index.py), puts the signed
link (links.py) into COMPLETED, and with `convert = mp3` sends COMPLETED
with is_recorded=1 and no link, then a `record` command with the MP3 link
when the conversion (convert.py) is done (the WAV link if it fails, so
PlanFix never waits forever).  Serving (serving.py) and retention
(retention.py) work on the same index.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import stat
from typing import Callable, Iterable

import gevent
import gevent.queue

from fsbridge import metrics
from fsbridge.recordings import retention, serving
from fsbridge.recordings.convert import ConversionError, Mp3Converter
from fsbridge.recordings.files import CALL_ID, RECORDING_NAME, SUBDIR_NAME, fsync, unlink_quietly
from fsbridge.recordings.index import CONVERTING, READY, INDEX_FILE, IndexEntry, RecordingIndex
from fsbridge.recordings.links import LinkSigner, load_or_create_key
from fsbridge.recordings.settings import CommandLike, RecordCommand, RecordingsError, RecordingSettings

log = logging.getLogger("fsbridge.recordings")


class Recordings:
    """process() / on_completed() on the event path, conversion workers
    (start()/stop()), cleanup() for retention, and the download route
    (blueprint() or register_routes())."""

    def __init__(
        self,
        settings: RecordingSettings,
        emit: Callable[[list[RecordCommand]], None] | None = None,
        is_delivered: Callable[[str], bool] | None = None,
        converter: Mp3Converter | None = None,
        pending_call_ids: Callable[[], set[str]] | None = None,
    ):
        self.settings = settings
        self._emit = emit
        self._is_delivered = is_delivered
        # Call ids with requests still waiting for PlanFix: asked once per
        # cleanup run (is_delivered per recording listed the whole outbox each time).
        self._pending_call_ids = pending_call_ids
        self.enabled = bool(settings.dir and settings.public_url)
        if settings.dir and not settings.public_url:
            log.warning("[server] public_url is empty: recordings are reported as is_recorded=0")
        self._fs_dir = posixpath.normpath(settings.freeswitch_dir) if settings.freeswitch_dir else ""
        self._dir = os.path.realpath(settings.dir) if settings.dir else ""
        self._signer = LinkSigner(load_or_create_key(settings.storage_dir), settings.public_url)
        self._index = RecordingIndex(os.path.join(settings.storage_dir, INDEX_FILE))
        self._converter: Mp3Converter | None = None
        if self.enabled and settings.convert == "mp3":
            self._converter = converter or Mp3Converter.find()
            if self._converter is None:
                raise RecordingsError(
                    "[recordings] convert = mp3 needs lame or ffmpeg on PATH: apt install lame (or ffmpeg)"
                )
            log.info("recordings: converting to MP3 with %s", self._converter.executable)
        self._jobs: gevent.queue.Queue = gevent.queue.Queue(maxsize=settings.convert_queue_size)
        self._workers: list[gevent.Greenlet] = []
        self._deferred_jobs = 0  # asked for by on_completed, not yet in self._jobs
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the conversion workers and resume conversions a stop cut short."""
        if self._converter is None or self._workers:
            return
        for entry in self._index.converting():
            self._start_job(entry.call_id)
        self._workers = [gevent.spawn(self._work) for _ in range(self.settings.converter_workers)]

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the workers; unfinished conversions resume at the next start()."""
        gevent.killall(self._workers, timeout=timeout)
        self._workers = []

    def close(self) -> None:
        self._closed = True
        self.stop()
        self._index.close()

    def pending_conversions(self) -> int:
        return self._jobs.qsize()

    # -- the event path ------------------------------------------------------------

    def process(self, commands: Iterable[CommandLike], put: Callable[[list[CommandLike]], None]) -> None:
        """The event-path stage: on_completed() for each command, put() the
        result (the outbox), then start the conversions it asked for.

        Conversions start only after put() returned, so a `record` can never
        reach the outbox before its COMPLETED.
        """
        jobs: list[str] = []
        out: list[CommandLike] = []
        for command in commands:
            out.extend(self._complete(command, jobs))
        put(out)
        for call_id in jobs:
            self._start_job(call_id)

    def on_completed(self, command: CommandLike) -> list[CommandLike]:
        """Fill in is_recorded / record_link of a COMPLETED; other commands pass.

        Only local file checks and one SQLite commit: fast enough for the
        event path.  A conversion it asks for starts when this greenlet next
        yields, so put the result into the outbox before yielding (or use
        process(), which orders that for you).
        """
        jobs: list[str] = []
        out = self._complete(command, jobs)
        for call_id in jobs:
            self._deferred_jobs += 1
            gevent.get_hub().loop.run_callback(self._start_deferred_job, call_id)
        return out

    def _start_deferred_job(self, call_id: str) -> None:
        self._deferred_jobs -= 1
        self._start_job(call_id)

    def _complete(self, command: CommandLike, jobs: list[str]) -> list[CommandLike]:
        fields = command.fields
        if fields.get("cmd") != "event" or fields.get("event") != "COMPLETED":
            return [command]
        new_fields = {k: v for k, v in fields.items() if k != "record_link"}
        new_fields["is_recorded"] = "0"
        if self.enabled and command.recording_path:
            link_ext = self._register(command.call_id, command.recording_path, jobs, getattr(command, "tenant", ""))
            if link_ext is not None:
                new_fields["is_recorded"] = "1"
                if link_ext:
                    new_fields["record_link"] = self._signer.link(command.call_id, link_ext)
        return [_with_fields(command, new_fields)]

    def _register(self, call_id: str, fs_path: str, jobs: list[str], tenant: str = "") -> str | None:
        """Index the call's file.  None: not recorded; "": link follows via
        `record` (call_id appended to jobs); otherwise the extension of the
        link to send now."""
        if not CALL_ID.fullmatch(call_id):
            log.error("recording of call %r: not a valid callid; reported as not recorded", call_id)
            return None
        name = self._local_name(fs_path)
        if name is None:
            return None
        local = os.path.join(self._dir, name)
        try:
            st = os.stat(local)
        except FileNotFoundError:
            log.info("call %s: recording %s is gone (too short?): is_recorded=0", call_id, local)
            return None
        except OSError as exc:
            log.error("call %s: cannot stat recording %s: %s", call_id, local, exc.strerror)
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            log.info("call %s: recording %s is empty: is_recorded=0", call_id, local)
            return None
        ext = name.rsplit(".", 1)[1]
        existing = self._index.get(call_id)
        if existing is not None and name in (existing.wav_name, existing.mp3_name):
            # The same COMPLETED again (replay after a reconnect): same answer.
            if existing.state == CONVERTING:
                return ""
            return "mp3" if existing.mp3_name else "wav"
        if ext == "mp3":
            self._index.put(IndexEntry(call_id, None, name, READY, st.st_mtime, tenant))
            return "mp3"
        if self._converter is not None:
            if self._jobs.qsize() + self._deferred_jobs + len(jobs) < self.settings.convert_queue_size:
                self._index.put(IndexEntry(call_id, name, None, CONVERTING, st.st_mtime, tenant))
                jobs.append(call_id)
                return ""
            log.warning("call %s: conversion queue full; PlanFix gets the WAV link", call_id)
        self._index.put(IndexEntry(call_id, name, None, READY, st.st_mtime, tenant))
        return "wav"

    def _local_name(self, fs_path: str) -> str | None:
        """Record-File-Path (as FreeSWITCH names it) -> name relative to our dir.

        Refuses anything outside freeswitch_dir or with an odd name: the
        path comes from an event, and we must never open an arbitrary file.
        """
        if "\0" in fs_path or not posixpath.isabs(fs_path) or ".." in fs_path.split("/"):
            log.error("Record-File-Path %r refused: not a plain absolute path", fs_path)
            return None
        path = posixpath.normpath(fs_path)
        if not self._fs_dir or posixpath.commonpath([self._fs_dir, path]) != self._fs_dir or path == self._fs_dir:
            log.error(
                "Record-File-Path %r refused: outside [recordings] freeswitch_dir %s", fs_path, self._fs_dir
            )
            return None
        parts = posixpath.relpath(path, self._fs_dir).split("/")
        if not RECORDING_NAME.fullmatch(parts[-1]) or not all(map(SUBDIR_NAME.fullmatch, parts[:-1])):
            log.error("Record-File-Path %r refused: expected <uuid>.wav or <uuid>.mp3", fs_path)
            return None
        local = os.path.realpath(os.path.join(self._dir, *parts))
        if os.path.commonpath([self._dir, local]) != self._dir:
            log.error("Record-File-Path %r refused: %s leads outside %s", fs_path, local, self._dir)
            return None
        return os.path.relpath(local, self._dir)

    # -- conversion ------------------------------------------------------------------

    def _start_job(self, call_id: str) -> None:
        if self._closed:
            return  # still "converting" in the index: resumed by the next start()
        try:
            self._jobs.put_nowait(call_id)
        except gevent.queue.Full:
            # Filled up since on_completed looked (jobs resumed by start()):
            # PlanFix already waits for a `record`, so send the WAV link now.
            entry = self._index.get(call_id)
            if entry is not None and entry.state == CONVERTING:
                log.warning("call %s: conversion queue full; PlanFix gets the WAV link", call_id)
                self._send_record(entry, "wav")

    def _work(self) -> None:
        while True:
            call_id = self._jobs.get()
            try:
                self._convert(call_id)
            except Exception:  # one bad call must not stop the worker
                log.exception("call %s: recording conversion failed unexpectedly", call_id)

    def _convert(self, call_id: str) -> None:
        entry = self._index.get(call_id)
        if entry is None or entry.state != CONVERTING or not entry.wav_name:
            return
        assert self._converter is not None
        wav = os.path.join(self._dir, entry.wav_name)
        mp3_name = entry.wav_name[: -len(".wav")] + ".mp3"
        mp3 = os.path.join(self._dir, mp3_name)
        # A hidden name the retention sweep recognises if we die mid-way.
        partial = os.path.join(os.path.dirname(mp3), "." + os.path.basename(mp3) + ".part")
        linked = entry  # still "converting": a crash before the outbox has the link reruns the job
        try:
            self._converter.convert(wav, partial, self.settings.convert_timeout)
            fsync(partial)  # on disk before the WAV it replaces is deleted
            os.replace(partial, mp3)  # the complete MP3 appears at once, never half-written
            fsync(os.path.dirname(mp3))
            linked = dataclasses.replace(entry, mp3_name=mp3_name)
            ext = "mp3"
        except (ConversionError, OSError) as exc:
            log.error("call %s: MP3 conversion of %s failed (%s); PlanFix gets the WAV link", call_id, wav, exc)
            unlink_quietly(partial)
            ext = "wav"
        metrics.RECORDINGS.labels("converted" if ext == "mp3" else "failed").inc()
        self._send_record(linked, ext)

    def _send_record(self, entry: IndexEntry, ext: str) -> None:
        """Emit the `record` command with the link of `ext`, then mark the call ready."""
        call_id = entry.call_id
        record = RecordCommand(
            call_id,
            {"cmd": "record", "callid": call_id, "record_link": self._signer.link(call_id, ext), "is_temp": "0"},
            tenant=entry.tenant,  # the call's own PlanFix, also after a restart (kept in the index)
        )
        # Index before the outbox: the link must resolve by the time PlanFix
        # follows it.  Marked ready only after the outbox has it, so a crash
        # in between repeats the `record` (harmless) rather than losing it.
        self._index.put(entry)
        if self._emit is not None:
            self._emit([record])
        if ext == "mp3" and entry.wav_name:
            # The WAV link was never handed out: the MP3 replaces the WAV on disk.
            self._index.put(dataclasses.replace(entry, state=READY, wav_name=None))
            unlink_quietly(os.path.join(self._dir, entry.wav_name))
        else:
            self._index.put(dataclasses.replace(entry, state=READY))

    # -- retention ---------------------------------------------------------------------

    def cleanup(self, now: float) -> int:
        """Delete recordings older than retention_days (see retention.cleanup); returns files deleted."""
        return retention.cleanup(self._index, self._dir, self.settings.retention_days, now,
                                 self._pending_call_ids, self._is_delivered)

    # -- serving -----------------------------------------------------------------------

    def link(self, call_id: str, ext: str) -> str:
        return self._signer.link(call_id, ext)

    def resolve(self, call_id: str, signed_name: str) -> tuple[int, str | None, str | None]:
        """(status, local path, extension) for a download request (see serving.resolve)."""
        return serving.resolve(self._signer, self._index, self._dir, call_id, signed_name)

    def blueprint(self):
        """Flask blueprint with GET/HEAD /records/<callid>/<signature>.<ext>."""
        return serving.blueprint(self.resolve, self.settings.link_max_age)


def register_routes(app, recordings: Recordings) -> None:
    app.register_blueprint(recordings.blueprint())


def _with_fields(command: CommandLike, fields: dict[str, str]) -> CommandLike:
    if dataclasses.is_dataclass(command) and not isinstance(command, type):
        return dataclasses.replace(command, fields=fields)
    return RecordCommand(command.call_id, fields, command.recording_path, getattr(command, "tenant", ""),
                         getattr(command, "node", ""), getattr(command, "unmatched", ""))
