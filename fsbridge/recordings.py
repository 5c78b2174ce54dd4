"""Call recordings: permanent signed links PlanFix can store and play.

FreeSWITCH records an answered client call into one file named by the call's
UUID (dialplan/fsbridge-record.xml) and reports the closed file in
RECORD_STOP's `Record-File-Path`; the tracker hands that path on with the
call's COMPLETED command.  This module then

* decides `is_recorded` (1 only for a file that exists and is not empty:
  FreeSWITCH deletes recordings shorter than RECORD_MIN_SEC),
* keeps its own durable mapping callid -> file (SQLite under storage.dir), so
  a request path never becomes a filesystem path,
* makes the link: public_url + /records/<callid>/<signature>.<ext>, where the
  signature is an HMAC-SHA256 of callid and extension under a key generated
  once under storage.dir: links never expire, cannot be guessed or altered,
* optionally converts WAV to MP3 (lame or ffmpeg) in worker greenlets off the
  event path; PlanFix then gets COMPLETED with is_recorded=1 and no link, and a
  `record` command with the MP3 link when it is ready (the WAV link if the
  conversion fails, so PlanFix never waits forever),
* serves the files (Content-Type, Content-Length, single Range requests, HEAD),
* deletes recordings older than retention_days whose link PlanFix has received.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import posixpath
import re
import secrets
import shutil
import sqlite3
import stat
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import gevent
import gevent.queue
from gevent import subprocess

from fsbridge import metrics
from fsbridge.sqlitedb import open_private

log = logging.getLogger("fsbridge.recordings")

# PlanFix callids we make links for: FreeSWITCH UUIDs (and any similar token
# an originate may set).  No dot and no slash: a callid is never a path.
_CALL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
# The last path segment of a link: the signature and the file type.
_SIGNED_NAME = re.compile(r"([0-9a-f]{32})\.(wav|mp3)")
# Files this module may serve, by extension.
CONTENT_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg"}
# Files FreeSWITCH writes with the dialplan snippet (and our MP3s): <uuid>.<ext>.
_RECORDING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}\.(wav|mp3)")
# Subdirectories FreeSWITCH may record into (e.g. a date layout): plain names.
_SUBDIR_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
# Our unfinished MP3s (.<uuid>.mp3.part): written there, renamed when complete.
_PARTIAL_SUFFIX = ".mp3.part"

KEY_FILE = "recording-link.key"
INDEX_FILE = "recordings.sqlite3"
_SIGNATURE_HEX = 32  # 128 bits of HMAC-SHA256
_KEY_BYTES = 32


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


# --- link signing -------------------------------------------------------------


def load_or_create_key(storage_dir: str) -> bytes:
    """The link-signing key, made on first run.

    Created atomically (written to a private temp file, then hard-linked into
    place, which fails if another process got there first), mode 0600.  An
    existing but unreadable or malformed key is an error, never replaced:
    a new key would silently break every link PlanFix already stored.
    """
    path = os.path.join(storage_dir, KEY_FILE)
    if not os.path.exists(path):
        os.makedirs(storage_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=storage_dir, prefix=f".{KEY_FILE}.")  # mode 0600
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(_KEY_BYTES) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # a concurrent start made it first: use theirs
        finally:
            os.unlink(tmp)
        _fsync(storage_dir)
        log.info("made a new recording-link key in %s", path)
    try:
        with open(path) as fh:
            text = fh.read().strip()
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise RecordingsError(f"cannot read the recording-link key {path}: {exc.strerror}") from None
    if not re.fullmatch(r"[0-9a-f]{64,}", text):
        raise RecordingsError(
            f"{path}: not a recording-link key (expected hex); restore it from a backup "
            "(deleting it makes a new key and breaks every link PlanFix stored)"
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users; chmod 600 it", path)
    return bytes.fromhex(text)


def _fsync(path: str) -> None:
    """Flush a file's data, or a directory's entries (a create or rename), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LinkSigner:
    def __init__(self, key: bytes, public_url: str):
        self._key = key
        self._base = public_url.rstrip("/")

    def signature(self, call_id: str, ext: str) -> str:
        # Extension signed too: a WAV link cannot be turned into an MP3 one.
        message = f"fsbridge-record\0{call_id}\0{ext}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:_SIGNATURE_HEX]

    def link(self, call_id: str, ext: str) -> str:
        return f"{self._base}/records/{call_id}/{self.signature(call_id, ext)}.{ext}"

    def verify(self, call_id: str, signature: str, ext: str) -> bool:
        return hmac.compare_digest(self.signature(call_id, ext), signature)


# --- the callid -> file index ---------------------------------------------------

_CONVERTING = "converting"  # MP3 being made; PlanFix has no link yet
_READY = "ready"  # the link of `ext` was handed to PlanFix (or is on its way)


@dataclass(frozen=True)
class IndexEntry:
    call_id: str
    wav_name: str | None  # relative to [recordings] dir
    mp3_name: str | None
    state: str
    recorded_at: float  # the file's mtime: when FreeSWITCH closed it

    def name_for(self, ext: str) -> str | None:
        return self.mp3_name if ext == "mp3" else self.wav_name


_COLUMNS = "call_id, wav_name, mp3_name, state, recorded_at"


class RecordingIndex:
    """Durable mapping callid -> file names (relative to the recordings dir).

    Written (synchronous=FULL) before a link leaves for the outbox, so a link
    PlanFix holds always resolves after a crash or power loss.
    """

    def __init__(self, path: str):
        self._db = open_private(path, "FULL")
        self._lock = threading.Lock()
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS recordings ("
            " call_id TEXT PRIMARY KEY,"
            " wav_name TEXT,"
            " mp3_name TEXT,"
            " state TEXT NOT NULL,"
            " recorded_at REAL NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS recordings_age ON recordings (recorded_at)")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _rows(self, sql: str, args: Iterable[Any] = ()) -> list[IndexEntry]:
        with self._lock:
            return [IndexEntry(*row) for row in self._db.execute(sql, tuple(args)).fetchall()]

    def get(self, call_id: str) -> IndexEntry | None:
        rows = self._rows(
            f"SELECT {_COLUMNS} FROM recordings WHERE call_id = ?",
            (call_id,),
        )
        return rows[0] if rows else None

    def put(self, entry: IndexEntry) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO recordings VALUES (?, ?, ?, ?, ?)",
                (entry.call_id, entry.wav_name, entry.mp3_name, entry.state, entry.recorded_at),
            )

    def delete(self, call_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM recordings WHERE call_id = ?", (call_id,))

    def converting(self) -> list[IndexEntry]:
        return self._rows(
            f"SELECT {_COLUMNS} FROM recordings WHERE state = ? ORDER BY recorded_at",
            (_CONVERTING,),
        )

    def ready_before(self, cutoff: float) -> list[IndexEntry]:
        return self._rows(
            f"SELECT {_COLUMNS} FROM recordings WHERE state = ? AND recorded_at < ? ORDER BY recorded_at",
            (_READY, cutoff),
        )

    def file_names(self) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT wav_name, mp3_name FROM recordings").fetchall()
        return {name for row in rows for name in row if name}


# --- MP3 conversion -------------------------------------------------------------


class ConversionError(Exception):
    pass


class Mp3Converter:
    """Runs lame (Debian package `lame`) or ffmpeg (package `ffmpeg`)."""

    def __init__(self, executable: str, kind: str):
        if kind not in ("lame", "ffmpeg"):
            raise ValueError(f"unknown converter {kind!r}")
        self.executable = executable
        self.kind = kind

    @classmethod
    def find(cls) -> "Mp3Converter | None":
        for kind in ("lame", "ffmpeg"):
            path = shutil.which(kind)
            if path:
                return cls(path, kind)
        return None

    def argv(self, src: str, dst: str) -> list[str]:
        # VBR quality 5: speech stays clear at a fraction of the WAV size.
        if self.kind == "lame":
            return [self.executable, "--quiet", "--nohist", "-V", "5", src, dst]
        return [
            self.executable, "-nostdin", "-loglevel", "error", "-y", "-i", src,
            "-codec:a", "libmp3lame", "-q:a", "5", "-f", "mp3", dst,
        ]

    def convert(self, src: str, dst: str, timeout: float) -> None:
        """src -> dst (dst must not be the final name: the caller renames it)."""
        try:
            proc = subprocess.Popen(
                self.argv(src, dst), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            raise ConversionError(f"cannot run {self.executable}: {exc.strerror}") from None
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise ConversionError(f"{self.kind} took longer than {timeout:g} s") from None
        except BaseException:
            # The worker is being stopped: leave no orphan encoder behind.
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0:
            detail = output.decode("utf-8", "replace").strip()[-500:]
            raise ConversionError(f"{self.kind} exited with {proc.returncode}: {detail}")
        if not _looks_like_mp3(dst):
            raise ConversionError(f"{self.kind} wrote no MP3 data to {dst}")


def _looks_like_mp3(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(3)
    except OSError:
        return False
    # An ID3v2 tag, or an MPEG audio frame (11 sync bits).
    return head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)


# --- the part the service wires ---------------------------------------------------


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
            link_ext = self._register(command.call_id, command.recording_path, jobs)
            if link_ext is not None:
                new_fields["is_recorded"] = "1"
                if link_ext:
                    new_fields["record_link"] = self._signer.link(command.call_id, link_ext)
        return [_with_fields(command, new_fields)]

    def _register(self, call_id: str, fs_path: str, jobs: list[str]) -> str | None:
        """Index the call's file.  None: not recorded; "": link follows via
        `record` (call_id appended to jobs); otherwise the extension of the
        link to send now."""
        if not _CALL_ID.fullmatch(call_id):
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
            if existing.state == _CONVERTING:
                return ""
            return "mp3" if existing.mp3_name else "wav"
        if ext == "mp3":
            self._index.put(IndexEntry(call_id, None, name, _READY, st.st_mtime))
            return "mp3"
        if self._converter is not None:
            if self._jobs.qsize() + self._deferred_jobs + len(jobs) < self.settings.convert_queue_size:
                self._index.put(IndexEntry(call_id, name, None, _CONVERTING, st.st_mtime))
                jobs.append(call_id)
                return ""
            log.warning("call %s: conversion queue full; PlanFix gets the WAV link", call_id)
        self._index.put(IndexEntry(call_id, name, None, _READY, st.st_mtime))
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
        if not _RECORDING_NAME.fullmatch(parts[-1]) or not all(map(_SUBDIR_NAME.fullmatch, parts[:-1])):
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
            if entry is not None and entry.state == _CONVERTING:
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
        if entry is None or entry.state != _CONVERTING or not entry.wav_name:
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
            _fsync(partial)  # on disk before the WAV it replaces is deleted
            os.replace(partial, mp3)  # the complete MP3 appears at once, never half-written
            _fsync(os.path.dirname(mp3))
            linked = dataclasses.replace(entry, mp3_name=mp3_name)
            ext = "mp3"
        except (ConversionError, OSError) as exc:
            log.error("call %s: MP3 conversion of %s failed (%s); PlanFix gets the WAV link", call_id, wav, exc)
            _unlink_quietly(partial)
            ext = "wav"
        metrics.RECORDINGS.labels("converted" if ext == "mp3" else "failed").inc()
        self._send_record(linked, ext)

    def _send_record(self, entry: IndexEntry, ext: str) -> None:
        """Emit the `record` command with the link of `ext`, then mark the call ready."""
        call_id = entry.call_id
        record = RecordCommand(
            call_id,
            {"cmd": "record", "callid": call_id, "record_link": self._signer.link(call_id, ext), "is_temp": "0"},
        )
        # Index before the outbox: the link must resolve by the time PlanFix
        # follows it.  Marked ready only after the outbox has it, so a crash
        # in between repeats the `record` (harmless) rather than losing it.
        self._index.put(entry)
        if self._emit is not None:
            self._emit([record])
        if ext == "mp3" and entry.wav_name:
            # The WAV link was never handed out: the MP3 replaces the WAV on disk.
            self._index.put(dataclasses.replace(entry, state=_READY, wav_name=None))
            _unlink_quietly(os.path.join(self._dir, entry.wav_name))
        else:
            self._index.put(dataclasses.replace(entry, state=_READY))

    # -- retention ---------------------------------------------------------------------

    def cleanup(self, now: float) -> int:
        """Delete recordings older than retention_days; returns files deleted.

        A recording whose link PlanFix has not yet received (is_delivered
        false, or still converting) is kept.  Files of our naming that we
        never indexed (calls that were not answered, or ended while the
        service was down: no link exists) are deleted by age alone.
        """
        if not self.settings.retention_days or not self._dir:
            return 0
        cutoff = now - self.settings.retention_days * 86400
        deleted = 0
        pending = self._pending_call_ids() if self._pending_call_ids is not None else None
        for entry in self._index.ready_before(cutoff):
            if pending is not None:
                if entry.call_id in pending:
                    continue
            elif self._is_delivered is None or not self._is_delivered(entry.call_id):
                continue
            for name in (entry.wav_name, entry.mp3_name):
                if name and _unlink_quietly(os.path.join(self._dir, name)):
                    deleted += 1
            self._index.delete(entry.call_id)
        indexed = self._index.file_names()
        for name, path in self._top_level_files():
            if name in indexed:
                continue
            if not (_RECORDING_NAME.fullmatch(name) or (name.startswith(".") and name.endswith(_PARTIAL_SUFFIX))):
                continue
            try:
                if os.stat(path).st_mtime >= cutoff:
                    continue
            except OSError:
                continue
            if _unlink_quietly(path):
                deleted += 1
        if deleted:
            log.info("retention: deleted %d recording file(s) older than %d days", deleted, self.settings.retention_days)
        return deleted

    def _top_level_files(self) -> list[tuple[str, str]]:
        try:
            with os.scandir(self._dir) as it:
                return [(e.name, e.path) for e in it if e.is_file(follow_symlinks=False)]
        except OSError as exc:
            log.error("retention: cannot list %s: %s", self._dir, exc.strerror)
            return []

    # -- serving -----------------------------------------------------------------------

    def link(self, call_id: str, ext: str) -> str:
        return self._signer.link(call_id, ext)

    def resolve(self, call_id: str, signed_name: str) -> tuple[int, str | None, str | None]:
        """(status, local path, extension) for a download request.

        403 unless the signature is right (checked before the lookup, so a
        stranger learns nothing about which calls exist), 404 for an unknown
        call or a file that is gone.
        """
        match = _SIGNED_NAME.fullmatch(signed_name)
        if not _CALL_ID.fullmatch(call_id) or not match:
            return 403, None, None
        signature, ext = match.groups()
        if not self._signer.verify(call_id, signature, ext):
            return 403, None, None
        entry = self._index.get(call_id)
        name = entry.name_for(ext) if entry else None
        if not name or not self._dir:
            return 404, None, None
        path = os.path.realpath(os.path.join(self._dir, name))
        # Re-checked at every request: the directory is shared with FreeSWITCH,
        # and a file swapped for a symlink must not lead outside it.
        if os.path.commonpath([self._dir, path]) != self._dir or not os.path.isfile(path):
            return 404, None, None
        return 200, path, ext

    def blueprint(self):
        """Flask blueprint with GET/HEAD /records/<callid>/<signature>.<ext>."""
        import flask

        bp = flask.Blueprint("recordings", __name__)

        @bp.get("/records/<call_id>", defaults={"signed_name": ""})
        @bp.get("/records/<call_id>/", defaults={"signed_name": ""})
        @bp.get("/records/<call_id>/<signed_name>")
        def download(call_id: str, signed_name: str):
            status, path, ext = self.resolve(call_id, signed_name)
            if status != 200:
                message = "Forbidden" if status == 403 else "Not found"
                return flask.jsonify(error=message), status
            try:
                response = flask.send_file(
                    path,
                    mimetype=CONTENT_TYPES[ext],
                    download_name=f"{call_id}.{ext}",
                    conditional=True,  # ETag, If-None-Match, single Range -> 206 / 416
                    max_age=self.settings.link_max_age,
                )
            except FileNotFoundError:  # deleted between the check and the open
                return flask.jsonify(error="Not found"), 404
            # The link is the credential: keep it out of shared caches and referrers.
            response.cache_control.public = False
            response.cache_control.private = True
            response.headers["Referrer-Policy"] = "no-referrer"
            response.headers["X-Content-Type-Options"] = "nosniff"
            return response

        return bp


def register_routes(app, recordings: Recordings) -> None:
    app.register_blueprint(recordings.blueprint())


def _with_fields(command: CommandLike, fields: dict[str, str]) -> CommandLike:
    if dataclasses.is_dataclass(command) and not isinstance(command, type):
        return dataclasses.replace(command, fields=fields)
    return RecordCommand(command.call_id, fields, command.recording_path)


def _unlink_quietly(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.error("cannot delete %s: %s", path, exc.strerror)
        return False
