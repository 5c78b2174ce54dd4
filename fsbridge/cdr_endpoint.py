"""``POST /cdr``: where FreeSWITCH's mod_json_cdr posts each finished channel.

On the loopback lookup listener, with HTTP basic auth (mod_json_cdr's
``cred``) whose password is compared in constant time, and a hard body-size
limit.  What a CDR means is fsbridge.core.cdr's job; this module only takes
the post in and answers it.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from typing import Callable

from flask import Flask, jsonify, request

from fsbridge.core.cdr import CdrError, CdrFacts, CdrRetry, facts, parse_body

_BASIC = re.compile(r"^Basic ([A-Za-z0-9+/=]{1,1024})$")


def authorized(header: str, secret: str) -> bool:
    """HTTP basic auth whose password is ``secret`` (any user name), in constant time."""
    match = _BASIC.match(header or "")
    if not match or not secret:
        return False
    try:
        decoded = base64.b64decode(match.group(1), validate=True)
    except binascii.Error:
        return False
    _user, sep, password = decoded.partition(b":")
    return bool(sep) and hmac.compare_digest(password, secret.encode("utf-8"))


def register_route(app: Flask, secret: str, max_bytes: int, on_cdr: Callable[[CdrFacts], str]) -> None:
    """``POST /cdr``: 401 without the credential, 413 above ``max_bytes``,
    400 for a body that is no CDR, 503 when ``on_cdr`` raises ``CdrRetry``,
    else 200 with what ``on_cdr`` did (any 2xx stops mod_json_cdr's
    retries, so a CDR fsbridge ignores is a 200)."""

    @app.post("/cdr")
    def cdr_post():
        if not authorized(request.headers.get("Authorization", ""), secret):
            response = jsonify(error="Unauthorized")
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Basic realm="fsbridge cdr"'
            return response
        length = request.content_length
        if length is None or length > max_bytes:
            return jsonify(error="Payload too large", detail=f"at most {max_bytes} bytes, with Content-Length"), 413
        body = request.stream.read(max_bytes + 1)
        if len(body) > max_bytes:
            return jsonify(error="Payload too large", detail=f"at most {max_bytes} bytes"), 413
        try:
            parsed = facts(parse_body(body, request.content_type or ""))
        except CdrError as exc:
            return jsonify(error="Invalid parameters", detail=str(exc)), 400
        try:
            return jsonify(result=on_cdr(parsed)), 200
        except CdrRetry as exc:
            return jsonify(error="Service unavailable", detail=str(exc)), 503
