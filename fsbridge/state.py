"""PlanFix credentials written by PlanFix's ``setup`` command, kept on disk.

One small JSON file under ``[storage] dir`` (mode 0600: it holds PlanFix's
key).  Saving is atomic and durable: a temp file in the same directory,
fsync, ``os.replace``, fsync of the directory; a crash or a full disk at
any point leaves either the old file or the new one, never a mix.

A file that exists but cannot be read as our JSON is an error the admin must
see (``SettingsCorrupt``), never silently treated as "no settings": that
would quietly stop every delivery to PlanFix.  A later ``setup`` replaces it
and keeps the bad copy beside it for inspection.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from urllib.parse import urlsplit

from fsbridge.planfix import Credentials

log = logging.getLogger(__name__)

__all__ = [
    "Credentials",
    "SettingsError",
    "SettingsCorrupt",
    "SettingsStore",
    "MAX_URL_LENGTH",
    "MAX_TOKEN_LENGTH",
    "validate_planfix_url",
    "validate_planfix_token",
]

FORMAT_VERSION = 1
# A PlanFix notification URL is ~40 characters; a bound keeps junk out of the file and logs.
MAX_URL_LENGTH = 2048
MAX_TOKEN_LENGTH = 512
# The settings file is tiny; anything bigger is not ours.
_MAX_FILE_BYTES = 64 * 1024


class SettingsError(Exception):
    """The stored settings cannot be read or written (the message says why)."""


class SettingsCorrupt(SettingsError):
    """The settings file exists but is not valid stored settings."""


def validate_planfix_url(url: str, allow_http: bool) -> str:
    """``url`` if PlanFix's address is usable, else ValueError with advice for the admin.

    PlanFix shows the message to whoever switched the integration on, so it
    names the field and says what to change.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("planfix_url is empty: PlanFix must send its notification address")
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"planfix_url is longer than {MAX_URL_LENGTH} characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise ValueError("planfix_url must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
        parts.port  # noqa: B018  -- raises ValueError for a port out of range / not a number
    except ValueError:
        raise ValueError(f"planfix_url is not a valid URL: {url!r}") from None
    scheme = parts.scheme.lower()
    if scheme == "http" and not allow_http:
        raise ValueError(
            "planfix_url must start with https:// (PlanFix accepts only HTTPS; "
            "http:// is allowed only with [planfix] allow_http = yes, for labs and tests)"
        )
    if scheme not in ("http", "https"):
        raise ValueError(f"planfix_url must start with https://, got {url!r}")
    if not hostname:
        raise ValueError(f"planfix_url has no host name: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("planfix_url must not contain a user name or password")
    if parts.fragment:
        raise ValueError("planfix_url must not contain a #fragment")
    return url


def validate_planfix_token(token: str) -> str:
    """PlanFix's key as sent by ``setup``: printable ASCII without spaces, bounded."""
    if not isinstance(token, str) or not token:
        raise ValueError("planfix_token is empty: PlanFix must send its key")
    if len(token) > MAX_TOKEN_LENGTH:
        raise ValueError(f"planfix_token is longer than {MAX_TOKEN_LENGTH} characters")
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError("planfix_token may only contain printable ASCII characters without spaces")
    return token


class SettingsStore:
    """The ``setup`` values in one JSON file at ``path``.

    ``load()`` is cheap to call on every PlanFix request: it looks at the
    file (one ``stat``) at most every ``recheck_s`` seconds (0: on every
    call) and re-reads it only when its stat signature changed; ``save()``
    takes effect at once.  An edit by another process is seen within
    ``recheck_s``.  Thread- and
    greenlet-safe.
    """

    def __init__(self, path: str | os.PathLike[str], recheck_s: float = 0.0):
        self.path = os.fspath(path)
        self.recheck_s = recheck_s
        self._next_check = 0.0  # monotonic; 0: stat on the next load()
        self._lock = threading.Lock()
        self._cached_signature: tuple[int, int, int] | None = None
        self._cached: Credentials | None = None

    def load(self) -> Credentials | None:
        """The stored credentials, None when ``setup`` never ran.

        Raises SettingsCorrupt (file exists but is not ours or is damaged) or
        SettingsError (cannot be read, e.g. permissions).
        """
        now = time.monotonic()
        with self._lock:
            if now < self._next_check:
                return self._cached
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            with self._lock:
                self._cached_signature, self._cached, self._next_check = None, None, now + self.recheck_s
            return None
        except OSError as exc:
            raise SettingsError(f"cannot read PlanFix settings {self.path}: {exc.strerror}") from None
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if signature == self._cached_signature:
                return self._cached
        creds = self._read()
        with self._lock:
            self._cached_signature, self._cached, self._next_check = signature, creds, now + self.recheck_s
        return creds

    def _read(self) -> Credentials:
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read(_MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            # Raced with a replace of a stale file; the caller sees "not set".
            raise SettingsError(f"PlanFix settings {self.path} vanished while reading") from None
        except OSError as exc:
            raise SettingsError(f"cannot read PlanFix settings {self.path}: {exc.strerror}") from None
        if len(raw) > _MAX_FILE_BYTES:
            raise SettingsCorrupt(
                f"PlanFix settings {self.path} are too large to be ours; run setup from PlanFix "
                "again (switch the integration off and on) or remove the file"
            )
        try:
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
                raise ValueError(f"expected a JSON object with version {FORMAT_VERSION}")
            url, token = data.get("planfix_url"), data.get("planfix_token")
            if not isinstance(url, str) or not isinstance(token, str):
                raise ValueError("planfix_url and planfix_token must be strings")
            # http:// may have been allowed when it was stored; the config's
            # allow_http governs what setup accepts, not what is already there.
            validate_planfix_url(url, allow_http=True)
            validate_planfix_token(token)
        except ValueError as exc:  # includes JSONDecodeError and UnicodeDecodeError
            raise SettingsCorrupt(
                f"PlanFix settings {self.path} are damaged ({exc}); run setup from PlanFix again "
                "(switch the integration off and on) or remove the file to fall back to the config"
            ) from None
        return Credentials(url=url, token=token)

    def save(self, creds: Credentials) -> None:
        """Store ``creds`` atomically and durably (raises SettingsError with the reason)."""
        validate_planfix_url(creds.url, allow_http=True)
        validate_planfix_token(creds.token)
        payload = json.dumps(
            {"version": FORMAT_VERSION, "planfix_url": creds.url, "planfix_token": creds.token},
            indent=2,
        ).encode("utf-8") + b"\n"
        directory = os.path.dirname(os.path.abspath(self.path))
        with self._lock:
            self._keep_corrupt_copy()
            tmp_path = None
            try:
                fd, tmp_path = tempfile.mkstemp(prefix=".planfix-settings-", suffix=".tmp", dir=directory)
                with os.fdopen(fd, "wb") as fh:
                    os.fchmod(fh.fileno(), 0o600)  # mkstemp makes 0600 already; say so explicitly
                    fh.write(payload)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp_path, self.path)
                tmp_path = None
                _fsync_dir(directory)
            except OSError as exc:
                raise SettingsError(
                    f"cannot store PlanFix settings in {directory}: {exc.strerror or exc}"
                ) from None
            finally:
                if tmp_path is not None:
                    try:
                        os.unlink(tmp_path)
                    except OSError:
                        pass
            self._cached_signature, self._cached, self._next_check = None, None, 0.0
        log.info("PlanFix settings stored in %s (host %s)", self.path, urlsplit(creds.url).hostname)

    def _keep_corrupt_copy(self) -> None:
        # A damaged file is evidence (disk fault? someone edited it?): keep it
        # beside the new one instead of silently overwriting it.
        try:
            self._read()
        except SettingsCorrupt:
            aside = f"{self.path}.corrupt"
            try:
                os.replace(self.path, aside)
                log.warning("damaged PlanFix settings kept as %s; writing the new ones", aside)
            except OSError as exc:
                log.warning("cannot keep damaged PlanFix settings %s aside: %s", self.path, exc.strerror)
        except SettingsError:
            pass  # missing or unreadable: the write below reports real problems


def _fsync_dir(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
