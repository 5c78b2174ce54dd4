"""Call recordings: permanent signed links PlanFix can store and play.

One module a job:

* ``recorder``: ``Recordings``, what the service wires: a call's file on the
  event path (``is_recorded``, the link in COMPLETED), MP3 jobs, the route;
* ``links``: the HMAC key under storage.dir and the signed, never-expiring
  links (public_url + /records/<callid>/<signature>.<ext>);
* ``index``: the durable callid -> file mapping, so a request path never
  becomes a file path;
* ``convert``: WAV to MP3 with lame or ffmpeg;
* ``serving``: GET/HEAD of the files (Content-Type, Range, no shared caches);
* ``retention``: old files go, never one whose link PlanFix has not received;
* ``settings``, ``files``: settings and checks; file naming rules.
"""

from fsbridge.recordings.convert import ConversionError, Mp3Converter
from fsbridge.recordings.links import KEY_FILE, LinkSigner, load_or_create_key
from fsbridge.recordings.recorder import Recordings, register_routes
from fsbridge.recordings.settings import RecordCommand, RecordingSettings, RecordingsError, check_settings

__all__ = [
    "KEY_FILE", "ConversionError", "LinkSigner", "Mp3Converter", "RecordCommand", "RecordingSettings",
    "Recordings", "RecordingsError", "check_settings", "load_or_create_key", "register_routes",
]
