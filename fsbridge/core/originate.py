"""makeCall -> the FreeSWITCH ``originate`` command line (pure: no I/O, no clock).

The line (sent by the caller as ``bgapi <line>`` with a ``Job-UUID:`` header)::

    originate {origination_uuid=<call uuid>,fsbridge_click_to_call=<request id>,
               fsbridge_ext=<ext>,fsbridge_phone=<client number>,
               origination_caller_id_number=<number shown>,
               origination_caller_id_name='<name shown>',
               ignore_early_media=true,originate_timeout=<s>}<manager dial string> <client number> <dialplan> <context>

(one line; the only spaces inside ``{...}`` are those of the display name,
which is single-quoted so the originate parser keeps it one argument: the
manager's phone shows "Иванов Иван", not "Иванов_Иван").  FreeSWITCH rings the manager first
(the dial string, default ``user/<ext>``); when the manager answers, the leg
runs the dialplan for ``<client number>`` in ``<context>``, which dials the
client.  ``origination_uuid`` fixes the manager leg's UUID (PlanFix's callid)
and the ``fsbridge_*`` variables let call tracking recognise the leg.

Why whitelists and not escaping: an originate line is split on spaces, ``{}``
and ``[]`` open variable blocks, ``,`` and ``|`` add legs, ``=`` assigns,
``$``/``^`` expand variables and API calls, ``'`` and ``\\`` quote, CR/LF end
the ESL command, ``@ / ; % < >`` change dial strings.  FreeSWITCH's quoting
rules differ between those layers, so no escaping is safe everywhere.  Every
value that reaches the line is therefore checked against a pattern that
cannot contain any of them, or (the display name only) reduced to such
characters plus single spaces, and then put in single quotes (it can hold
no quote, so it cannot close them).  Anything else raises a ValueError subclass and nothing is built.
"""

from __future__ import annotations

import collections
import re
import unicodedata
from dataclasses import dataclass

import phonenumbers
from phonenumbers import shortnumberinfo

__all__ = [
    "OriginateError",
    "InvalidSettings",
    "InvalidExtension",
    "InvalidNumber",
    "InvalidIdentifier",
    "OriginateSettings",
    "DEFAULT_EXTENSION_PATTERN",
    "MAX_NUMBER_LENGTH",
    "MAX_CALLER_ID_NAME_LENGTH",
    "build_originate",
    "safe_caller_id_name",
    "CallPolicy",
    "Destination",
    "check_destination",
    "RateLimiter",
]

DEFAULT_EXTENSION_PATTERN = r"^\d{2,6}$"
# The longest client number makeCall accepts (issue 2): more is no phone number.
MAX_NUMBER_LENGTH = 32
# SIP display names beyond this are cut by phones anyway.
MAX_CALLER_ID_NAME_LENGTH = 48

# A client number: optional leading '+', then digits and the '*'/'#' of service codes.
_NUMBER = re.compile(r"\+?[0-9*#]{1,%d}" % MAX_NUMBER_LENGTH)
# Canonical lowercase UUID version 4, as uuid.uuid4() prints it.
_UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
# Whatever an extension pattern lets through must still be a plain token:
# an admin's loose pattern (e.g. ".+") must not open the line to injection.
_EXTENSION_CHARS = re.compile(r"[0-9A-Za-z_.+*#-]{1,64}")
# The admin's manager dial string, {ext} taken out: a literal such as
# user/, sofia/internal/, @pbx.example.com, loopback/.  '@' and '/' belong to
# dial strings; none of the characters that open variables, legs or quoting.
_DIAL_STRING_LITERAL = re.compile(r"[A-Za-z0-9_.:@/+-]*")
# Dialplan and context names.
_WORD = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# A tenant's name (fsbridge.core.tenancy.TENANT_NAME).
_TENANT = re.compile(r"[A-Za-z0-9_-]{1,32}")
# What may stay in a display name; everything else becomes '_' (see safe_caller_id_name).
_NAME_PUNCTUATION = frozenset("._-")


class OriginateError(ValueError):
    """makeCall input or settings that must not reach FreeSWITCH."""


class InvalidSettings(OriginateError):
    """A click-to-call setting (from the config) is unusable."""


class InvalidExtension(OriginateError):
    """``from`` is not a manager extension."""


class InvalidNumber(OriginateError):
    """``to`` (or a caller ID number) is not a dialable number."""


class InvalidIdentifier(OriginateError):
    """A call UUID or request id is not a canonical uuid4."""


@dataclass(frozen=True)
class OriginateSettings:
    """``[click_to_call]`` (plus ``[calls] extension_pattern``), validated on construction."""

    dial_string: str = "user/{ext}"  # how the manager's phone is rung; only {ext} is substituted
    context: str = "default"  # dialplan context that routes the client number
    dialplan: str = "XML"
    timeout_s: int = 30  # how long the manager's phone rings before giving up
    keep_plus: bool = False  # keep a leading '+' of the client number
    extension_pattern: str = DEFAULT_EXTENSION_PATTERN
    # Caller ID shown on the manager's phone: None -> the client's number
    # (and the client's name from PlanFix when known).
    caller_id_number: str | None = None
    caller_id_name: str | None = None
    # Cloud PBX: the tenant the call is made for, set on the leg as
    # fsbridge_tenant so its events go to that tenant ("" for none).
    tenant: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.tenant, str) or (self.tenant and not _TENANT.fullmatch(self.tenant)):
            raise InvalidSettings(f"tenant may only contain letters, digits, '_', '-' (got {self.tenant!r})")
        _check_dial_string(self.dial_string)
        for name in ("context", "dialplan"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _WORD.fullmatch(value):
                raise InvalidSettings(
                    f"{name} may only contain letters, digits, '_', '.', '-' (got {value!r})"
                )
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, int) or not 1 <= self.timeout_s <= 600:
            raise InvalidSettings(f"timeout_s must be a whole number of seconds 1..600 (got {self.timeout_s!r})")
        try:
            re.compile(self.extension_pattern)
        except (re.error, TypeError) as exc:
            raise InvalidSettings(f"extension_pattern is not a regular expression: {exc}") from None
        if self.caller_id_number is not None and (
            len(self.caller_id_number) > MAX_NUMBER_LENGTH or not _NUMBER.fullmatch(self.caller_id_number)
        ):
            raise InvalidSettings(
                f"caller_id_number must be digits (optional leading +, *, #), got {self.caller_id_number!r}"
            )
        if self.caller_id_name is not None and safe_caller_id_name(self.caller_id_name) != self.caller_id_name:
            raise InvalidSettings(
                "caller_id_name may only contain letters, digits, '.', '-', '_' and single spaces "
                f"(got {self.caller_id_name!r})"
            )


def _check_dial_string(template: str) -> None:
    # str.format would also expand {0}, {ext.__class__} and friends: only the
    # literal "{ext}" is a placeholder, and everything around it is checked.
    if not isinstance(template, str) or "{ext}" not in template:
        raise InvalidSettings(f"dial_string must contain {{ext}}, e.g. user/{{ext}} (got {template!r})")
    literal = template.replace("{ext}", "")
    if not _DIAL_STRING_LITERAL.fullmatch(literal):
        raise InvalidSettings(
            "dial_string may only contain {ext}, letters, digits and '_ . : @ / + -' "
            f"(got {template!r})"
        )


def safe_caller_id_name(raw: str) -> str:
    """``raw`` reduced to letters (any script), ASCII digits, ``. - _`` and single spaces.

    Every other character (quotes, commas, braces, controls, tabs) becomes a
    space, runs of spaces collapse, and the result is cut to
    MAX_CALLER_ID_NAME_LENGTH.  The originate line single-quotes it, so the
    spaces stay inside one value.  Returns "" when nothing useful is left.
    Cyrillic names survive (PlanFix is used in Russia); a letter is anything
    Unicode calls a letter, never a symbol, mark or control.
    """
    out: list[str] = []
    for ch in unicodedata.normalize("NFC", raw):
        keep = ch.isascii() and (ch.isalnum() or ch in _NAME_PUNCTUATION)
        keep = keep or (not ch.isascii() and unicodedata.category(ch) in ("Lu", "Ll", "Lt", "Lo"))
        if keep:
            out.append(ch)
        elif out and out[-1] != " ":
            out.append(" ")
    return "".join(out).strip(" ")[:MAX_CALLER_ID_NAME_LENGTH].rstrip(" ")


def _check_uuid(value: str, what: str) -> str:
    if not isinstance(value, str) or not _UUID4.fullmatch(value):
        raise InvalidIdentifier(f"{what} must be a lowercase uuid4, got {value!r}")
    return value


def build_originate(
    ext: str,
    to: str,
    *,
    call_uuid: str,
    request_id: str,
    client_name: str | None,
    settings: OriginateSettings,
    keep_plus: bool | None = None,
) -> str:
    """The originate line (without ``bgapi``) that rings ``ext`` and then dials ``to``.

    ``ext`` must match ``settings.extension_pattern`` *and* be a plain token;
    ``to`` must already be cleaned (digits, ``*``, ``#``, optional leading
    ``+``, at most 32); a leading ``+`` is dropped unless ``keep_plus``.
    ``call_uuid`` becomes the manager leg's UUID, ``request_id`` tags the leg.
    ``client_name`` (from PlanFix, may be None) is shown to the manager after
    :func:`safe_caller_id_name`.  Raises an OriginateError subclass.
    """
    if not isinstance(ext, str) or re.fullmatch(settings.extension_pattern, ext) is None:
        raise InvalidExtension(f"from must be an extension matching {settings.extension_pattern}, got {ext!r}")
    if not _EXTENSION_CHARS.fullmatch(ext):
        raise InvalidExtension(f"from contains characters not allowed in an extension: {ext!r}")
    if not isinstance(to, str) or len(to) > MAX_NUMBER_LENGTH or not _NUMBER.fullmatch(to):
        raise InvalidNumber(
            f"to must be digits, '*', '#' with an optional leading '+', 1..{MAX_NUMBER_LENGTH} characters, got {to!r}"
        )
    _check_uuid(call_uuid, "call_uuid")
    _check_uuid(request_id, "request_id")

    # keep_plus given: the click-to-call policy already chose the form (E.164 abroad).
    keep = settings.keep_plus if keep_plus is None else keep_plus
    number = to if keep else to.removeprefix("+")
    if not number:
        raise InvalidNumber(f"to has no digits: {to!r}")
    shown_number = settings.caller_id_number or number
    shown_name = settings.caller_id_name or (safe_caller_id_name(client_name) if client_name else "") or shown_number

    variables = ",".join(
        (
            f"origination_uuid={call_uuid}",
            f"fsbridge_click_to_call={request_id}",
            f"fsbridge_ext={ext}",
            f"fsbridge_phone={number}",
            f"origination_caller_id_number={shown_number}",
            # Quoted: a name may hold spaces (and nothing that could end the quotes).
            f"origination_caller_id_name='{shown_name}'",
            # The manager hears the client's ringback only after answering;
            # early media must not count as the manager having answered.
            "ignore_early_media=true",
            f"originate_timeout={settings.timeout_s}",
        ) + ((f"fsbridge_tenant={settings.tenant}",) if settings.tenant else ())
    )
    dial_string = settings.dial_string.replace("{ext}", ext)
    return f"originate {{{variables}}}{dial_string} {number} {settings.dialplan} {settings.context}"


# --- click-to-call policy (issue 14: toll fraud through makeCall) -------------

# Number types never dialled by default: they cost the PBX owner money per
# minute (premium rate, shared cost) or cannot be judged (unknown).
_REFUSED_TYPES = {
    phonenumbers.PhoneNumberType.PREMIUM_RATE: "a premium-rate number",
    phonenumbers.PhoneNumberType.SHARED_COST: "a shared-cost number",
    phonenumbers.PhoneNumberType.UNKNOWN: "a number of unknown type",
}


@dataclass(frozen=True)
class CallPolicy:
    """``[click_to_call]`` destination rules; see :func:`check_destination`."""

    default_region: str = "RU"
    allowed_countries: tuple[str, ...] = ()  # empty: only default_region
    allow_prefixes: tuple[str, ...] = ()  # "+7800", "103": dialled whatever the other rules say
    deny_prefixes: tuple[str, ...] = ()  # never dialled
    keep_plus: bool = False  # also dial default-region numbers with their '+'
    extension_pattern: str = DEFAULT_EXTENSION_PATTERN

    @property
    def countries(self) -> tuple[str, ...]:
        return tuple(c.upper() for c in self.allowed_countries) or (self.default_region.upper(),)


@dataclass(frozen=True)
class Destination:
    """The verdict on one makeCall ``to``: ``dial`` when allowed, else ``reason``."""

    dial: str | None
    reason: str = ""


def _prefix_match(number: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if number.startswith(prefix):
            return prefix
    return None


def check_destination(to: str, policy: CallPolicy) -> Destination:
    """May makeCall dial ``to`` (cleaned: digits, ``*``, ``#``, optional ``+``)?

    In order: feature codes (``*``, ``#``: in a stock dialplan they reach
    eavesdrop, intercept, voicemail) are refused; ``deny_prefixes`` refuse
    and ``allow_prefixes`` allow (matched on the E.164 form with ``+`` and
    on the number as sent); emergency numbers are refused; an extension
    (``extension_pattern``) is dialled as typed; anything else must be a
    valid number of an allowed country and not premium-rate, shared-cost or
    of unknown type.  A number of ``default_region`` is dialled without its
    ``+`` unless ``keep_plus``; an international one always in E.164 with it.
    """
    if not to or "*" in to or "#" in to:
        return Destination(None, "feature codes (* and #) are not dialled by click-to-call")
    region = policy.default_region.upper()
    parsed: phonenumbers.PhoneNumber | None
    try:
        parsed = phonenumbers.parse(to, region)
    except phonenumbers.NumberParseException:
        parsed = None
    e164 = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164) if parsed is not None else to
    forms = (e164, to)
    denied = next((p for p in (_prefix_match(f, policy.deny_prefixes) for f in forms) if p), None)
    if denied:
        return Destination(None, f"the number starts with {denied}, in [click_to_call] deny_prefixes")
    allowed = next((p for p in (_prefix_match(f, policy.allow_prefixes) for f in forms) if p), None)
    if allowed:
        return Destination(to)
    if shortnumberinfo.is_emergency_number(to.lstrip("+"), region):
        return Destination(None, "emergency numbers are not dialled by click-to-call")
    if re.fullmatch(policy.extension_pattern, to):
        return Destination(to)
    if parsed is None or not phonenumbers.is_valid_number(parsed):
        return Destination(None, "not a valid phone number")
    country = phonenumbers.region_code_for_number(parsed) or "?"
    if country not in policy.countries:
        return Destination(None, f"calls to {country} (+{parsed.country_code}) are not in "
                                 f"[click_to_call] allowed_countries ({' '.join(policy.countries)})")
    kind = phonenumbers.number_type(parsed)
    if kind in _REFUSED_TYPES:
        return Destination(None, f"{_REFUSED_TYPES[kind]} (add a prefix to allow_prefixes to permit it)")
    if country == region and not policy.keep_plus:
        return Destination(e164.lstrip("+"))
    return Destination(e164)


class RateLimiter:
    """Sliding-window count per key and in total (pure: the caller passes ``now``).

    ``allow(key, now)`` records one attempt and says whether it is within
    ``per_key`` per ``window_s`` for that key and ``total`` overall; refused
    attempts are not counted.  Keys are extensions (a bounded set), and the
    table is bounded as well (oldest key dropped).
    """

    def __init__(self, per_key: int, total: int, window_s: float = 60.0, max_keys: int = 10_000):
        self.per_key, self.total, self.window_s, self.max_keys = per_key, total, window_s, max_keys
        self._keys: "collections.OrderedDict[str, collections.deque[float]]" = collections.OrderedDict()
        self._all: "collections.deque[float]" = collections.deque()

    def _trim(self, times: "collections.deque[float]", now: float) -> None:
        while times and times[0] <= now - self.window_s:
            times.popleft()

    def allow(self, key: str, now: float) -> str | None:
        """None when allowed (and counted), else the reason."""
        times = self._keys.pop(key, None) or collections.deque()
        self._keys[key] = times
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        self._trim(times, now)
        self._trim(self._all, now)
        if len(times) >= self.per_key:
            return f"more than {self.per_key} click-to-call calls per {self.window_s:g}s from {key}"
        if len(self._all) >= self.total:
            return f"more than {self.total} click-to-call calls per {self.window_s:g}s in total"
        times.append(now)
        self._all.append(now)
        return None
