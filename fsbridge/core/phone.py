"""Phone number normalisation, shared by call events, makeCall and the dialplan lookup.

Pure: no I/O, no clock.  The only state is a bounded memo of parse results,
because libphonenumber parsing costs tens of microseconds and the same few
numbers come back on every event of a call.

Rules (issue 5):

* ``+7XXXXXXXXXX``, ``8XXXXXXXXXX``, ``7XXXXXXXXXX`` and ``(910) 123-45-67``
  (default region RU) are the same number; ``output="digits"`` gives
  ``7XXXXXXXXXX``, ``output="e164"`` gives ``+7XXXXXXXXXX``.
* A number is taken as parsed only when libphonenumber says it is *valid*
  for its metadata (kept up to date by upgrading the ``phonenumbers``
  package).  "Possible" is not enough: ``00 49 ...`` in region RU is
  "possible" as a bogus ``+700...`` number, which would be worse than
  leaving it alone.
* Anything else (short codes such as ``112``, extensions, ranges the
  metadata does not know, garbage) goes through *digits only* and is never
  dropped.  In ``e164`` output a leading ``+`` the caller typed is kept on
  such a number (it says "this is international"); in ``digits`` output there
  is never a ``+``.  Text without a single digit (``anonymous``,
  ``unknown``, but also ``${system(id)}`` or HTML in a forged caller ID)
  becomes ``NO_NUMBER`` ("anonymous"): a caller's text never reaches PlanFix
  verbatim (issue 14), and it is not a number anyone can dial or look up.
"""

from __future__ import annotations

import functools
import re
from typing import Callable

import phonenumbers

__all__ = [
    "OUTPUT_FORMATS",
    "MAX_DIAL_LENGTH",
    "normalize_phone",
    "normalizer",
    "is_region",
    "looks_like_extension",
    "clean_dial_number",
    "dial_number",
]

OUTPUT_FORMATS = ("digits", "e164")

# makeCall's `to` after cleaning: longer is not a phone number and would only
# be a way to push text into an originate line.
MAX_DIAL_LENGTH = 32

# libphonenumber refuses input over 250 characters anyway; anything much longer
# than a real number is not parsed, so garbage cannot evict useful cache entries
# with expensive work.
_MAX_PARSE_INPUT = 64

# Separators people and CRMs put into numbers; makeCall drops exactly these.
_DIAL_SEPARATORS = str.maketrans("", "", " -.()")
# After cleaning: an optional leading '+', then digits and the DTMF-ish '*' '#'
# used by service codes (*72, #31#).  Nothing else can reach FreeSWITCH.
_DIAL_ALLOWED = re.compile(r"\+?[0-9*#]+")
_NON_DIGITS = re.compile(r"[^0-9]")


def is_region(code: str) -> bool:
    """``code`` (upper case) is a country libphonenumber has numbering data for:
    only such a region turns a national ``8 910 ...`` into ``7910...``."""
    return code in phonenumbers.SUPPORTED_REGIONS


def _check_output(output: str) -> None:
    if output not in OUTPUT_FORMATS:
        raise ValueError(f"output must be one of {OUTPUT_FORMATS}, got {output!r}")


def normalize_phone(raw: str, region: str = "RU", output: str = "digits") -> str:
    """The canonical form of ``raw`` (see the module doc for the rules).

    ``region`` is the ISO country of numbers written without a country code
    (``[phone] default_region``); ``output`` is ``"digits"`` or ``"e164"``
    (``[phone] format``).  Raises ValueError only for a bad ``output`` argument
    (a programming or config error), never for a bad number.  A region that
    phonenumbers does not know is not an error here: numbers without a country
    code then stay their digits (the config checks ``default_region``'s form).
    """
    _check_output(output)
    return _normalize_cached(raw, region.upper(), output)


def normalizer(region: str, output: str) -> Callable[[str], str]:
    """``normalize_phone`` bound to one ``[phone]`` section's settings: what
    the service, the config's DID check and the benchmark all compare
    numbers with, so they cannot drift apart.  The output format is checked
    now, not at the first call; the region is not checked (see
    ``normalize_phone``)."""
    _check_output(output)
    return functools.partial(normalize_phone, region=region, output=output)


# What PlanFix gets for a caller ID without a single digit.
NO_NUMBER = "anonymous"


@functools.lru_cache(maxsize=8192)
def _normalize_cached(raw: str, region: str, output: str) -> str:
    text = raw.strip()
    e164 = _parse_e164(text, region)
    if e164 is not None:
        return e164 if output == "e164" else e164[1:]
    digits = _NON_DIGITS.sub("", text)
    if not digits:
        return NO_NUMBER
    if output == "e164" and text.startswith("+"):
        return "+" + digits
    return digits


def _parse_e164(text: str, region: str) -> str | None:
    """``+CC...`` when libphonenumber finds a valid number in ``text``, else None."""
    if not text or len(text) > _MAX_PARSE_INPUT:
        return None
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def looks_like_extension(raw: str, pattern: str) -> bool:
    """True when all of ``raw`` is an internal extension per ``pattern``.

    ``pattern`` is ``[calls] extension_pattern`` (default ``^\\d{2,6}$``).
    fullmatch, not search, and no stripping: with ``$`` a search would accept
    ``"101\\n"``, and makeCall may use this to validate ``from`` before it goes
    into an originate line as is.  Extensions are never looked up in PlanFix
    nor rewritten as phone numbers.
    """
    return isinstance(raw, str) and re.fullmatch(pattern, raw) is not None


def clean_dial_number(raw: str, keep_plus: bool) -> str | None:
    """makeCall's ``to`` made safe for an originate line, or None (-> HTTP 400).

    Drops spaces, dashes, dots and parentheses; what is left must be only
    digits, ``*`` and ``#`` with an optional leading ``+``, 1..32 characters.
    Tabs, newlines, commas, braces, ``$``, quotes, ``@``, ``/``, ``%`` ... are
    refused rather than removed: a number carrying them is not a typo but an
    attempt to smuggle dialplan syntax.  ``keep_plus`` (``[click_to_call]
    keep_plus``) decides whether a leading ``+`` survives.
    """
    if not isinstance(raw, str):
        return None
    cleaned = raw.translate(_DIAL_SEPARATORS)
    if len(cleaned) > MAX_DIAL_LENGTH or not _DIAL_ALLOWED.fullmatch(cleaned):
        return None
    if not keep_plus:
        cleaned = cleaned[1:] if cleaned.startswith("+") else cleaned
    return cleaned


def dial_number(
    raw: str, *, region: str, keep_plus: bool, extension_pattern: str
) -> str | None:
    """makeCall's ``to`` cleaned *and* normalised: the number to originate to.

    None when :func:`clean_dial_number` refuses it (-> 400).  Extensions and
    service codes (containing ``*``/``#``) are dialled as typed.  A number
    libphonenumber understands is dialled in full international form:
    ``+7XXXXXXXXXX`` when ``keep_plus`` else ``7XXXXXXXXXX`` (the carrier
    route in dialplan/ expects that); anything else as its cleaned digits.
    The number reported to PlanFix is :func:`normalize_phone` of the result
    with ``[phone] format``, which is the same number.
    """
    # Parse with the '+' still on: "+44..." must not be read as a Russian number.
    cleaned = clean_dial_number(raw, keep_plus=True)
    if cleaned is None:
        return None
    unsigned = cleaned.lstrip("+")
    if "*" in cleaned or "#" in cleaned or looks_like_extension(cleaned, extension_pattern):
        return cleaned if keep_plus else unsigned
    e164 = _normalize_cached(cleaned, region.upper(), "e164")
    if keep_plus:
        return e164
    return e164.lstrip("+")
