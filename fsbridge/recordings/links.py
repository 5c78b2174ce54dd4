"""Permanent signed links: the HMAC key kept under storage.dir and the signer."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import tempfile

from fsbridge.recordings.files import fsync
from fsbridge.recordings.settings import RecordingsError

log = logging.getLogger("fsbridge.recordings")

KEY_FILE = "recording-link.key"
INDEX_FILE = "recordings.sqlite3"
SIGNATURE_HEX = 32  # 128 bits of HMAC-SHA256
KEY_BYTES = 32


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
                fh.write(secrets.token_hex(KEY_BYTES) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # a concurrent start made it first: use theirs
        finally:
            os.unlink(tmp)
        fsync(storage_dir)
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


class LinkSigner:
    def __init__(self, key: bytes, public_url: str):
        self._key = key
        self._base = public_url.rstrip("/")

    def signature(self, call_id: str, ext: str) -> str:
        # Extension signed too: a WAV link cannot be turned into an MP3 one.
        message = f"fsbridge-record\0{call_id}\0{ext}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:SIGNATURE_HEX]

    def link(self, call_id: str, ext: str) -> str:
        return f"{self._base}/records/{call_id}/{self.signature(call_id, ext)}.{ext}"

    def verify(self, call_id: str, signature: str, ext: str) -> bool:
        return hmac.compare_digest(self.signature(call_id, ext), signature)
