"""Serving the files behind the links: GET/HEAD /records/<callid>/<signature>.<ext>."""

from __future__ import annotations

import os
from typing import Callable

import flask

from fsbridge.recordings.files import CALL_ID, SIGNED_NAME, CONTENT_TYPES
from fsbridge.recordings.index import RecordingIndex
from fsbridge.recordings.links import LinkSigner


def resolve(signer: LinkSigner, index: RecordingIndex, directory: str, call_id: str,
            signed_name: str) -> tuple[int, str | None, str | None]:
    """(status, local path, extension) for a download request.

    403 unless the signature is right (checked before the lookup, so a
    stranger learns nothing about which calls exist), 404 for an unknown
    call or a file that is gone.
    """
    match = SIGNED_NAME.fullmatch(signed_name)
    if not CALL_ID.fullmatch(call_id) or not match:
        return 403, None, None
    signature, ext = match.groups()
    if not signer.verify(call_id, signature, ext):
        return 403, None, None
    entry = index.get(call_id)
    name = entry.name_for(ext) if entry else None
    if not name or not directory:
        return 404, None, None
    path = os.path.realpath(os.path.join(directory, name))
    # Re-checked at every request: the directory is shared with FreeSWITCH,
    # and a file swapped for a symlink must not lead outside it.
    if os.path.commonpath([directory, path]) != directory or not os.path.isfile(path):
        return 404, None, None
    return 200, path, ext


def blueprint(resolve: Callable[[str, str], tuple[int, str | None, str | None]], max_age: int):
    """Flask blueprint with GET/HEAD /records/<callid>/<signature>.<ext>."""
    bp = flask.Blueprint("recordings", __name__)

    @bp.get("/records/<call_id>", defaults={"signed_name": ""})
    @bp.get("/records/<call_id>/", defaults={"signed_name": ""})
    @bp.get("/records/<call_id>/<signed_name>")
    def download(call_id: str, signed_name: str):
        status, path, ext = resolve(call_id, signed_name)
        if status != 200:
            message = "Forbidden" if status == 403 else "Not found"
            return flask.jsonify(error=message), status
        try:
            response = flask.send_file(
                path,
                mimetype=CONTENT_TYPES[ext],
                download_name=f"{call_id}.{ext}",
                conditional=True,  # ETag, If-None-Match, single Range -> 206 / 416
                max_age=max_age,
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
