"""The INI configuration: read, validated, turned into frozen dataclasses.

Every problem is reported with the file, the section, the key and what is
wrong, and all problems are collected at once so that `fsbridge check` can
show an admin everything to fix in one go.  The schema below is the single
source of truth for keys and defaults; `conf/fsbridge.ini` documents them and
`tests/test_config.py` checks the two agree.
"""

from __future__ import annotations

import codecs
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

from fsbridge.core.originate import InvalidSettings, _check_dial_string, safe_caller_id_name
from fsbridge.core.phone import is_region, normalizer
from fsbridge.core.tenancy import IMPLICIT_TENANT, TENANT_NAME


class ConfigError(Exception):
    """One or more problems in a config file; str() lists them all."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# --- value parsers: each returns the value or raises ValueError(reason) ---


def _str(raw: str) -> str:
    return raw


def _nonempty(raw: str) -> str:
    if not raw:
        raise ValueError("must not be empty")
    return raw


def _bool(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"expected yes or no, got {raw!r}")


def _bounded(kind: type, what: str, lo: float, hi: float, unit: str = "") -> Callable[[str], Any]:
    fmt = "d" if kind is int else "g"

    def parse(raw: str) -> Any:
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"expected {what}, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo:{fmt}} and {hi:{fmt}}{unit}, got {raw}")
        return value

    return parse


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    return _bounded(int, "a whole number", lo, hi)


def _seconds(lo: float, hi: float) -> Callable[[str], float]:
    return _bounded(float, "a number of seconds", lo, hi, " seconds")


_port = _int_range(1, 65535)


def _host(raw: str) -> str:
    if not raw or any(c.isspace() for c in raw) or "/" in raw:
        raise ValueError(f"expected a host name or IP address, got {raw!r}")
    return raw


def _host_patterns(raw: str) -> tuple[str, ...]:
    """Host names or *.domain patterns, separated by spaces or commas."""
    items = tuple(p for p in re.split(r"[\s,]+", raw) if p)
    if not items:
        raise ValueError("must name at least one host, e.g. *.planfix.ru")
    for item in items:
        if not re.fullmatch(r"(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+", item):
            raise ValueError(f"expected host names or *.domain patterns, got {item!r}")
    return items


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def _listen(raw: str) -> Listen:
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\s\[\]]+):(\d+)", raw)
    if not match:
        raise ValueError(f"expected HOST:PORT (e.g. 0.0.0.0:8080), got {raw!r}")
    host = match.group(1) or match.group(3)
    return Listen(host, _port(match.group(2) or match.group(4)))


def _url(raw: str) -> str:
    """An http(s) URL, or empty."""
    if not raw:
        return ""
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"must start with https:// (or http://), got {raw!r}")
    if not parts.hostname:
        raise ValueError(f"has no host name: {raw!r}")
    if parts.username or parts.password:
        raise ValueError("must not contain a user name or password")
    return raw.rstrip("/") if not parts.query else raw


def _existing_file(raw: str) -> str:
    if raw and not os.path.isfile(raw):
        raise ValueError(f"file does not exist: {raw}")
    return raw


def _regex(raw: str) -> str:
    try:
        re.compile(raw)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return raw


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {raw!r}")
        return value

    return parse


def _region(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z]{2}", raw):
        raise ValueError(f"expected a two-letter country code such as RU, got {raw!r}")
    code = raw.upper()
    if not is_region(code):
        # A typo would otherwise load, and national numbers reach PlanFix unnormalised.
        hint = " (the United Kingdom is GB)" if code == "UK" else ""
        raise ValueError(f"{raw!r} is not a country code with phone numbering data{hint} "
                         f"(ISO 3166-1 alpha-2, such as RU, BY, KZ, GB)")
    return code


def _regions(raw: str) -> tuple[str, ...]:
    """Two-letter country codes separated by spaces or commas (empty: none)."""
    return tuple(_region(item) for item in re.split(r"[\s,]+", raw) if item)


def _prefixes(raw: str) -> tuple[str, ...]:
    """Number prefixes ("+7800", "8800", "103") separated by spaces or commas."""
    items = tuple(p for p in re.split(r"[\s,]+", raw) if p)
    for item in items:
        if not re.fullmatch(r"\+?[0-9]{1,15}", item):
            raise ValueError(f"expected number prefixes such as +7800, got {item!r}")
    return items


def _log_level(raw: str) -> str:
    value = raw.upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"must be DEBUG, INFO, WARNING or ERROR, got {raw!r}")
    return value


def _logger_levels(raw: str) -> dict[str, str]:
    from fsbridge.logs import parse_levels  # logs imports metrics (prometheus): only when parsed

    return parse_levels(raw)


def _domains(raw: str) -> tuple[str, ...]:
    """FreeSWITCH domain names (``acme.pbx.example``), separated by spaces or commas."""
    items = tuple(d.lower() for d in re.split(r"[\s,]+", raw) if d)
    for item in items:
        if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", item) or len(item) > 253:
            raise ValueError(f"expected domain names such as acme.pbx.example, got {item!r}")
    return items


def _dids(raw: str) -> tuple[str, ...]:
    """External numbers (digits, optional leading +), separated by spaces or commas."""
    items = tuple(d for d in re.split(r"[\s,]+", raw) if d)
    for item in items:
        if not re.fullmatch(r"\+?[0-9]{3,20}", item):
            raise ValueError(f"expected phone numbers such as 74950000000, got {item!r}")
    return items


def _optional_listen(raw: str) -> Listen | None:
    return _listen(raw) if raw else None


def _dial_string(raw: str) -> str:
    # The originate builder's own rule (only {ext} substituted, no character
    # that splits an originate line), so check and run can never disagree.
    # {domain} (a tenant's first domain) is put in before originate sees it.
    try:
        _check_dial_string(raw.replace("{domain}", "example.org"))
    except InvalidSettings as exc:
        raise ValueError(str(exc)) from None
    return raw


def _caller_id_name(raw: str) -> str:
    if raw and safe_caller_id_name(raw) != raw:
        raise ValueError(f"may only contain letters, digits, '.', '-', '_' and single spaces, got {raw!r}")
    return raw


def _caller_id_number(raw: str) -> str:
    if raw and not re.fullmatch(r"\+?[0-9]{1,32}", raw):
        raise ValueError(f"expected digits with an optional leading +, got {raw!r}")
    return raw


# A ring group / hunt list for the dialplan (install-dialplan's --fallback, a
# tenant's fallback): it goes into an XML attribute and a bridge, so only the
# characters of dial strings.  A channel variable (single $) in a pre-processor
# value reaches the dialplan as %{...} and the leg fails: only $${...}.
_FALLBACK = re.compile(r"[A-Za-z0-9_.@/:=\[\],|${}-]{1,1000}")


def parse_fallback(raw: str) -> str:
    """A fallback dial string, or "" (ValueError with the reason otherwise)."""
    if raw and not _FALLBACK.fullmatch(raw):
        raise ValueError(f"expected a dial string such as [leg_timeout=20]user/101,user/102|user/103, got {raw!r}")
    if "${" in raw.replace("$${", ""):
        raise ValueError(f"use $${{...}} (expanded when FreeSWITCH loads its XML), not ${{...}}: {raw!r}")
    return raw


def _safe_word(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", raw):
        raise ValueError(f"may only contain letters, digits, '_', '.', '-', got {raw!r}")
    return raw


@dataclass(frozen=True)
class Key:
    name: str
    parse: Callable[[str], Any]
    default: str
    attr: str = ""


# section -> keys.  Defaults are the strings an admin would write.
SCHEMA: dict[str, list[Key]] = {
    "freeswitch": [
        Key("host", _host, "127.0.0.1"),
        Key("port", _port, "8021"),
        Key("password", _nonempty, "ClueCon"),
        Key("connect_timeout", _seconds(0.1, 120), "5"),
        Key("command_timeout", _seconds(0.1, 300), "10"),
        Key("max_backoff", _seconds(0.1, 3600), "30"),
        Key("idle_timeout", _seconds(1, 3600), "60"),
    ],
    "server": [
        Key("listen", _listen, "0.0.0.0:8080"),
        Key("token", _str, ""),
        Key("public_url", _url, ""),
        Key("certfile", _existing_file, ""),
        Key("keyfile", _existing_file, ""),
        Key("max_body_bytes", _int_range(1024, 1024 * 1024), "16384"),
        Key("auth_failures_per_minute", _int_range(1, 100000), "10"),
        Key("auth_block", _seconds(1, 86400), "300"),
        Key("request_line_timeout", _seconds(0.1, 600), "10"),
        Key("header_timeout", _seconds(0.1, 600), "10"),
        Key("body_timeout", _seconds(0.1, 3600), "30"),
        Key("keepalive_timeout", _seconds(0.1, 3600), "15"),
        Key("tls_handshake_timeout", _seconds(0.1, 600), "10"),
        Key("max_connections", _int_range(10, 1_000_000), "10000"),
        Key("max_connections_per_address", _int_range(1, 1_000_000), "64"),
    ],
    "planfix": [
        Key("url", _url, ""),
        Key("token", _str, ""),
        Key("allow_http", _bool, "no"),
        Key("allowed_hosts", _host_patterns, "*.planfix.ru *.planfix.com *.planfix.ua"),
        Key("connect_timeout", _seconds(0.1, 120), "3"),
        Key("read_timeout", _seconds(0.1, 600), "10"),
        Key("max_in_flight", _int_range(1, 1024), "256"),
    ],
    "outbox": [
        Key("concurrency", _int_range(1, 256), "16"),
        Key("max_age", _seconds(60, 365 * 86400), "604800"),
        Key("min_backoff", _seconds(0.01, 3600), "1"),
        Key("max_backoff", _seconds(0.1, 86400), "300"),
        Key("max_depth", _int_range(100, 100_000_000), "1000000"),
    ],
    "storage": [
        Key("dir", _nonempty, "/var/lib/fsbridge"),
    ],
    "calls": [
        Key("extension_pattern", _regex, r"^\d{2,6}$"),
        Key("report_internal_calls", _bool, "no"),
        Key("max_open_calls", _int_range(100, 10_000_000), "10000"),
    ],
    "phone": [
        Key("default_region", _region, "RU"),
        Key("format", _choice("digits", "e164"), "digits"),
    ],
    "click_to_call": [
        Key("dial_string", _dial_string, "user/{ext}"),
        Key("context", _safe_word, "default"),
        Key("dialplan", _safe_word, "XML"),
        Key("timeout", _int_range(5, 300), "30"),
        Key("keep_plus", _bool, "no"),
        Key("caller_id_name", _caller_id_name, ""),
        Key("caller_id_number", _caller_id_number, ""),
        Key("client_caller_id", _caller_id_number, ""),
        Key("allowed_countries", _regions, ""),
        Key("allow_prefixes", _prefixes, ""),
        Key("deny_prefixes", _prefixes, ""),
        Key("calls_per_extension_per_minute", _int_range(1, 100000), "10"),
        Key("calls_per_minute", _int_range(1, 1000000), "60"),
        Key("max_concurrent", _int_range(1, 100000), "20"),
    ],
    "dialplan": [
        Key("listen", _listen, "127.0.0.1:8081"),
        Key("deadline", _seconds(0.05, 30), "1.5"),
        Key("cache_ttl", _seconds(0, 30 * 86400), "300"),
        Key("cache_ttl_not_found", _seconds(0, 30 * 86400), "60"),
        Key("cache_ttl_failure", _seconds(0, 86400), "5"),
        Key("cache_size", _int_range(10, 10_000_000), "10000"),
        Key("max_concurrent_lookups", _int_range(1, 256), "8"),
    ],
    "cdr": [
        # mod_json_cdr's cred password for POST /cdr on [dialplan] listen;
        # empty: no CDR receiver (calls ended unseen are closed blind at once).
        Key("secret", _str, ""),
        Key("max_body_bytes", _int_range(4096, 16 * 1024 * 1024), "1048576"),
        # How long a call FreeSWITCH no longer lists waits for its CDR
        # before it is closed blind.
        Key("wait", _seconds(1, 86400), "600"),
    ],
    "recordings": [
        Key("dir", _str, ""),
        # FreeSWITCH's Debian/Ubuntu packages; a source build uses
        # /usr/local/freeswitch/recordings (init-config picks the one that exists).
        Key("freeswitch_dir", _str, "/var/lib/freeswitch/recordings"),
        Key("convert", _choice("off", "mp3"), "off"),
        Key("retention_days", _int_range(0, 36500), "0"),
    ],
    "log": [
        Key("level", _log_level, "INFO"),
        Key("format", _choice("text", "json"), "text"),
        Key("levels", _logger_levels, ""),
    ],
    "metrics": [
        Key("listen", _optional_listen, "127.0.0.1:9102"),
    ],
}


# [tenant.NAME]: one PlanFix account of a cloud PBX.  Its own keys, then
# overrides of [calls] and [click_to_call] keys (same names; each defaults to
# the global value).
TENANT_KEYS: list[Key] = [
    Key("token", _str, ""),
    Key("domains", _domains, ""),
    Key("dids", _dids, ""),
    Key("planfix_url", _url, ""),
    Key("planfix_token", _str, ""),
    Key("node", _str, ""),
    # The ring group `fsbridge install-dialplan` writes into this tenant's
    # inbound route (its DIDs): rung when the client has no responsible
    # manager or the manager does not answer.  {domain}: the tenant's first
    # domain; a bare user/101 gets @<first domain> (never FreeSWITCH's default
    # domain, another tenant's phones).  Only the dialplan reads it.
    Key("fallback", parse_fallback, ""),
]
TENANT_OVERRIDES = {"calls": ("extension_pattern", "report_internal_calls")}


def _tenant_override_keys() -> dict[str, tuple[str, ...]]:
    return {**TENANT_OVERRIDES,
            "click_to_call": tuple(k.name for k in SCHEMA["click_to_call"] if k.name != "keep_plus")}


def defaults() -> dict[str, dict[str, str]]:
    """The default string of every key, by section (for docs and tests)."""
    return {section: {k.name: k.default for k in keys} for section, keys in SCHEMA.items()}


class Section:
    """Read-only attribute access to one section's parsed values."""

    def __init__(self, name: str, values: dict[str, Any]):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"[{self._name}] has no key {key!r}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("config is read-only")

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)


@dataclass(frozen=True)
class TenantConfig:
    """One PlanFix account.  ``calls`` and ``click_to_call`` hold the effective
    values (the tenant's own, else the global ones; ``{domain}`` filled in)."""

    name: str
    token: str = field(repr=False)
    domains: tuple[str, ...]
    dids: tuple[str, ...]
    planfix_url: str
    planfix_token: str = field(repr=False)
    node: str
    calls: Section = field(repr=False)
    click_to_call: Section = field(repr=False)
    fallback: str = ""  # install-dialplan's ring group of this tenant's DIDs
    implicit: bool = False  # the one tenant of a config without [tenant.*] sections


@dataclass(frozen=True)
class NodeConfig:
    """One FreeSWITCH ([freeswitch] or [freeswitch.NAME])."""

    name: str
    section: Section = field(repr=False)
    implicit: bool = False


@dataclass(frozen=True)
class Config:
    path: str
    sections: dict[str, Section] = field(repr=False)
    warnings: tuple[str, ...] = ()
    tenants: tuple[TenantConfig, ...] = ()
    nodes: tuple[NodeConfig, ...] = ()

    @property
    def multi_tenant(self) -> bool:
        return not (len(self.tenants) == 1 and self.tenants[0].implicit)

    def tenant(self, name: str) -> TenantConfig | None:
        return next((t for t in self.tenants if t.name == name), None)

    def __getattr__(self, name: str) -> Section:
        try:
            return self.sections[name]
        except KeyError:
            raise AttributeError(name) from None


# One INI line, as an admin writes it.  Only "=" separates key and value;
# ";" starts an inline comment when whitespace precedes it ("key = x  ; why").
_HEADER = re.compile(r"\[(?P<name>[^\]]*)\]\s*(?:[;#].*)?")
_INLINE_COMMENT = re.compile(r"\s;.*$")
_SHOWN = 60  # enough of a bad line to find it


@dataclass(frozen=True)
class _Value:
    raw: str
    line: int


def _read(path: str, problems: list[str], warnings: list[str]) -> dict[str, dict[str, _Value]]:
    """Read ``path`` line by line: {section: {key: value}}; every bad line is a problem.

    Hand-written rather than configparser, which stops at the first syntax
    error, names no line for most of them, and silently glues an indented
    line onto the value above (so the key above is blamed for it).
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if data.startswith(codecs.BOM_UTF8):  # Notepad writes one
        data = data[len(codecs.BOM_UTF8):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        bad = []
        for number, line in enumerate(data.split(b"\n"), 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                bad.append(str(number))
        problems.append(
            f"{path}: line{'s' if len(bad) > 1 else ''} {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}: "
            "not UTF-8 text (another encoding, e.g. Windows-1251?); save the file as UTF-8"
        )
        text = data.decode("utf-8", errors="replace")  # go on: report the other problems too

    sections: dict[str, dict[str, _Value]] = {}
    header_line: dict[str, int] = {}
    current: str | None = None
    previous = ""  # "[section] key" of the last key line, for indented lines
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        shown = stripped if len(stripped) <= _SHOWN else stripped[:_SHOWN] + "..."
        if line[0].isspace():
            key = stripped.partition("=")[0].strip().lower() if "=" in stripped else ""
            where = f"[{current}] {key}" if current and key else f"line {number}"
            above = f" ({previous})" if previous else ""
            problems.append(
                f"{path}: {where}: line {number} starts with a space, and INI reads an indented line "
                f"as the continuation of the value above{above}, so it is ignored; "
                "remove the spaces at the start of the line"
            )
            continue
        if stripped.startswith("["):
            header = _HEADER.fullmatch(stripped)
            if not header or not header["name"].strip():
                problems.append(f"{path}: line {number}: a section header looks like [name], got {shown!r}")
                current = ""  # its keys belong to no known section: reported once, here
                continue
            current = header["name"].strip()
            if current in header_line:
                problems.append(
                    f"{path}: [{current}]: line {number}: the section appears twice "
                    f"(first on line {header_line[current]}); keep one"
                )
            header_line.setdefault(current, number)
            sections.setdefault(current, {})
            previous = ""
            continue
        if "=" not in stripped:
            where = f"[{current}]" if current else f"line {number}"
            problems.append(f"{path}: {where}: line {number}: expected key = value, got {shown!r}")
            continue
        if current == "":
            continue
        key, _, value = stripped.partition("=")
        key = key.strip().lower()
        value = _INLINE_COMMENT.sub("", value).strip()
        if not key:
            problems.append(f"{path}: line {number}: nothing before '=': {shown!r}")
            continue
        if current is None:
            problems.append(f"{path}: {key}: line {number}: comes before any [section] line")
            continue
        previous = f"[{current}] {key}, line {number}"
        if key in sections[current]:
            problems.append(
                f"{path}: [{current}] {key}: line {number}: set twice "
                f"(also on line {sections[current][key].line}); keep one"
            )
            continue
        sections[current][key] = _Value(value, number)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            warnings.append(
                f"{path}: [{current}] {key}: the value is in quotes, and INI keeps quotes as part of "
                f"the value ({value}); remove them unless they belong to it"
            )
    return sections


def load(path: str, *, require_token: bool = True) -> Config:
    """Read and validate ``path``; raise ConfigError listing every problem."""
    problems: list[str] = []
    warnings: list[str] = []
    parsed = _read(path, problems, warnings)
    sections: dict[str, Section] = {}
    failed: set[str] = set()  # "section.key" that did not parse: cross checks skip them

    for name in parsed:
        if name not in SCHEMA and not _is_named(name):
            problems.append(f"{path}: [{name}]: unknown section "
                            f"(known: {', '.join(SCHEMA)}, tenant.NAME, freeswitch.NAME)")
    for name, keys in SCHEMA.items():
        known = {k.name for k in keys}
        given = parsed.get(name, {})
        values: dict[str, Any] = {}
        for key in given:
            if key not in known:
                problems.append(
                    f"{path}: [{name}] {key}: unknown key (known: {', '.join(sorted(known))})"
                )
        for key in keys:
            raw = given[key.name].raw if key.name in given else key.default
            try:
                values[key.name] = key.parse(raw)
            except ValueError as exc:
                problems.append(f"{path}: [{name}] {key.name}: {exc}")
                failed.add(f"{name}.{key.name}")
                values[key.name] = key.parse(key.default)  # defaults always parse
        sections[name] = Section(name, values)

    _default_recordings_dir(sections)
    nodes = _nodes(path, parsed, sections, problems)
    tenants = _tenants(path, parsed, sections, problems, {n.name for n in nodes})
    if tenants:
        require_token = False  # each tenant has its own
        if sections["server"].token:
            problems.append(f"{path}: [server] token: leave it empty when [tenant.*] sections exist "
                            "(each tenant has its own token)")
    _cross_checks(path, sections, problems, warnings, require_token, failed)
    if problems:
        raise ConfigError(problems)
    if not tenants:
        tenants = [_implicit_tenant(sections)]
    return Config(path, sections, tuple(warnings), tuple(tenants), tuple(nodes))


def tenant_view(cfg: Config, tenant: TenantConfig) -> Config:
    """``cfg`` as one tenant sees it: its token, PlanFix, [calls] and [click_to_call]
    (so the code that reads a Config builds that tenant's settings)."""
    sections = dict(cfg.sections)
    sections["server"] = Section("server", {**cfg.server.as_dict(), "token": tenant.token})
    sections["planfix"] = Section("planfix", {**cfg.planfix.as_dict(), "url": tenant.planfix_url,
                                              "token": tenant.planfix_token})
    sections["calls"] = tenant.calls
    sections["click_to_call"] = tenant.click_to_call
    return Config(cfg.path, sections, cfg.warnings, (tenant,), cfg.nodes)


def _is_named(section: str) -> bool:
    kind, dot, name = section.partition(".")
    return bool(dot) and kind in ("tenant", "freeswitch")


def _named(parsed: dict[str, dict[str, _Value]], kind: str, path: str,
           problems: list[str]) -> list[tuple[str, dict[str, _Value]]]:
    found = []
    for section, given in parsed.items():
        prefix, dot, name = section.partition(".")
        if prefix != kind or not dot:
            continue
        if not TENANT_NAME.fullmatch(name):
            problems.append(f"{path}: [{section}]: the name after '{kind}.' may only hold letters, "
                            "digits, '_' and '-' (at most 32)")
            continue
        found.append((name, given))
    return found


def _parse_keys(path: str, section: str, keys: list[Key], given: dict[str, _Value],
                defaults: dict[str, str], problems: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key in keys:
        raw = given[key.name].raw if key.name in given else defaults.get(key.name, key.default)
        try:
            values[key.name] = key.parse(raw)
        except ValueError as exc:
            problems.append(f"{path}: [{section}] {key.name}: {exc}")
            values[key.name] = key.parse(key.default)
    return values


def _nodes(path: str, parsed: dict, sections: dict[str, Section], problems: list[str]) -> list[NodeConfig]:
    """[freeswitch.NAME] sections (plain [freeswitch] then gives their defaults), else [freeswitch]."""
    named = _named(parsed, "freeswitch", path, problems)
    if not named:
        return [NodeConfig(IMPLICIT_TENANT, sections["freeswitch"], implicit=True)]
    keys = SCHEMA["freeswitch"]
    base = parsed.get("freeswitch", {})
    base_raw = {k.name: base[k.name].raw for k in keys if k.name in base}
    nodes = []
    for name, given in named:
        section = f"freeswitch.{name}"
        for key in given:
            if key not in {k.name for k in keys}:
                problems.append(f"{path}: [{section}] {key}: unknown key (known: {', '.join(k.name for k in keys)})")
        values = _parse_keys(path, section, keys, given, base_raw, problems)
        nodes.append(NodeConfig(name, Section(section, values)))
    seen: dict[tuple[str, int], str] = {}
    for node in nodes:
        where = (node.section.host, node.section.port)
        if where in seen:
            problems.append(f"{path}: [freeswitch.{node.name}] host: {where[0]}:{where[1]} is also "
                            f"[freeswitch.{seen[where]}]; each node once")
        seen.setdefault(where, node.name)
    return nodes


def _tenants(path: str, parsed: dict, sections: dict[str, Section], problems: list[str],
             node_names: set[str]) -> list[TenantConfig]:
    named = _named(parsed, "tenant", path, problems)
    overrides = _tenant_override_keys()
    own = {k.name for k in TENANT_KEYS}
    known = own | {k for names in overrides.values() for k in names}
    schema = {s: {k.name: k for k in SCHEMA[s]} for s in overrides}
    global_raw = {s: {k: parsed.get(s, {})[k].raw for k in names if k in parsed.get(s, {})}
                  for s, names in overrides.items()}
    tenants: list[TenantConfig] = []
    tokens: dict[str, str] = {}
    domains: dict[str, str] = {}
    dids: dict[str, str] = {}
    allow_http = sections["planfix"].allow_http
    # DIDs clash as the call routing compares them (service.tenant_map): 84990000001
    # and +74990000001 are one number.
    phone_section = sections["phone"]
    did_key = normalizer(phone_section.default_region, phone_section.format)
    for name, given in named:
        section = f"tenant.{name}"
        for key in given:
            if key not in known:
                problems.append(f"{path}: [{section}] {key}: unknown key (known: {', '.join(sorted(known))})")
        before = len(problems)
        values = _parse_keys(path, section, TENANT_KEYS, given, {}, problems)
        effective: dict[str, Section] = {}
        for s, names in overrides.items():
            keys = [schema[s][k] for k in names]
            parsed_values = _parse_keys(path, section, keys, given, global_raw[s], problems)
            effective[s] = Section(s, {**sections[s].as_dict(), **parsed_values})
        token = values["token"]
        if not token:
            problems.append(f"{path}: [{section}] token: must not be empty; run `fsbridge gen-token` and "
                            "paste the value here and into this account's PlanFix integration settings")
        elif len(token) < 16 or not re.fullmatch(r"[\x21-\x7e]+", token):
            problems.append(f"{path}: [{section}] token: must be at least 16 printable characters without spaces")
        elif token in tokens:
            problems.append(f"{path}: [{section}] token: the same as [tenant.{tokens[token]}]'s; "
                            "every tenant needs its own")
        else:
            tokens[token] = name
        if not values["domains"] and not values["dids"]:
            problems.append(f"{path}: [{section}] domains: a tenant needs at least one domain or DID "
                            "(dids) to own calls")
        for domain in values["domains"]:
            if domain in domains:
                problems.append(f"{path}: [{section}] domains: {domain} is also a domain of "
                                f"[tenant.{domains[domain]}]; a domain belongs to one tenant")
            domains.setdefault(domain, name)
        for did in values["dids"]:
            key = did_key(did)
            if key in dids:
                problems.append(f"{path}: [{section}] dids: {did} is also a DID of [tenant.{dids[key]}]; "
                                "a DID belongs to one tenant")
            dids.setdefault(key, name)
        if bool(values["planfix_url"]) != bool(values["planfix_token"]):
            missing = "planfix_token" if values["planfix_url"] else "planfix_url"
            problems.append(f"{path}: [{section}] {missing}: planfix_url and planfix_token must be set "
                            "together (or left out: PlanFix's setup command stores them)")
        if values["planfix_url"].startswith("http://") and not allow_http:
            problems.append(f"{path}: [{section}] planfix_url: PlanFix accepts only https://; "
                            "set [planfix] allow_http = yes only for a lab or tests")
        if values["node"] and values["node"] not in node_names:
            problems.append(f"{path}: [{section}] node: no [freeswitch.{values['node']}] section "
                            f"(nodes: {', '.join(sorted(node_names))})")
        c2c = effective["click_to_call"]
        dial = c2c.dial_string
        if "{domain}" in dial:
            if values["domains"]:
                dial = dial.replace("{domain}", values["domains"][0])
            else:
                problems.append(f"{path}: [{section}] dial_string: uses {{domain}} but the tenant has no domains")
        elif "@" not in dial and dial.startswith("user/") and values["domains"]:
            # user/{ext} alone would ring that extension in FreeSWITCH's default
            # domain: another tenant's phone.
            dial = f"{dial}@{values['domains'][0]}"
        effective["click_to_call"] = Section("click_to_call", {**c2c.as_dict(), "dial_string": dial})
        if len(problems) > before:
            continue
        tenants.append(TenantConfig(
            name=name, token=token, domains=values["domains"], dids=values["dids"],
            planfix_url=values["planfix_url"], planfix_token=values["planfix_token"], node=values["node"],
            calls=effective["calls"], click_to_call=effective["click_to_call"], fallback=values["fallback"],
        ))
    if not named and "{domain}" in sections["click_to_call"].dial_string:
        problems.append(f"{path}: [click_to_call] dial_string: {{domain}} is filled in per tenant; "
                        "without [tenant.*] sections write the domain itself")
    return tenants


def _implicit_tenant(sections: dict[str, Section]) -> TenantConfig:
    """The one tenant of a config without [tenant.*]: [server] token, [planfix], [calls], [click_to_call]."""
    return TenantConfig(
        name=IMPLICIT_TENANT, token=sections["server"].token, domains=(), dids=(),
        planfix_url=sections["planfix"].url, planfix_token=sections["planfix"].token, node="",
        calls=sections["calls"], click_to_call=sections["click_to_call"], implicit=True,
    )


def _default_recordings_dir(s: dict[str, Section]) -> None:
    """An empty [recordings] dir means FreeSWITCH's own directory, when it exists
    here (FreeSWITCH on the same machine, the usual case)."""
    rec = s["recordings"]
    if not rec.dir and rec.freeswitch_dir and os.path.isdir(rec.freeswitch_dir):
        s["recordings"] = Section("recordings", dict(rec.as_dict(), dir=rec.freeswitch_dir))


def _cross_checks(
    path: str,
    s: dict[str, Section],
    problems: list[str],
    warnings: list[str],
    require_token: bool,
    failed: set[str],
) -> None:
    """Checks across keys; a check whose keys did not parse is skipped (already reported)."""

    def ok(*keys: str) -> bool:
        return not failed.intersection(keys)

    server, planfix = s["server"], s["planfix"]
    token = server.token
    if require_token and not token:
        problems.append(
            f"{path}: [server] token: must not be empty; run `fsbridge gen-token` and paste "
            "the value here and into PlanFix's integration settings"
        )
    elif token and (len(token) < 16 or not re.fullmatch(r"[\x21-\x7e]+", token)):
        problems.append(
            f"{path}: [server] token: must be at least 16 printable characters without spaces"
        )
    if ok("server.certfile", "server.keyfile") and bool(server.certfile) != bool(server.keyfile):
        missing = "keyfile" if server.certfile else "certfile"
        problems.append(f"{path}: [server] {missing}: certfile and keyfile must be set together")
    if ok("planfix.url", "planfix.allow_http") and planfix.url.startswith("http://") and not planfix.allow_http:
        problems.append(
            f"{path}: [planfix] url: PlanFix accepts only https://; "
            "set allow_http = yes only for a lab or tests"
        )
    if ok("outbox.min_backoff", "outbox.max_backoff") and s["outbox"].min_backoff > s["outbox"].max_backoff:
        problems.append(f"{path}: [outbox] min_backoff: must not exceed max_backoff")
    if ok("dialplan.listen") and not s["dialplan"].listen.is_loopback:
        warnings.append(
            f"{path}: [dialplan] listen: {s['dialplan'].listen} is not a loopback address; the "
            "lookup answers client names by phone number, keep it on 127.0.0.1 or firewall it"
        )
    if ok("dialplan.listen", "server.listen") and s["dialplan"].listen == server.listen:
        problems.append(f"{path}: [dialplan] listen: must differ from [server] listen")
    if not ok("server.public_url", "planfix.allow_http"):
        pass
    elif not server.public_url:
        warnings.append(
            f"{path}: [server] public_url: empty; recording links cannot be made and "
            "`fsbridge ping` cannot compare PlanFix's PBX address"
        )
    elif not server.public_url.startswith("https://") and not planfix.allow_http:
        warnings.append(f"{path}: [server] public_url: PlanFix expects an https:// address")
    if ok("server.certfile") and not server.certfile:
        warnings.append(
            f"{path}: [server] certfile: not set, so the PlanFix endpoint speaks plain HTTP; "
            "put it behind a TLS proxy or set certfile/keyfile"
        )
    secret = s["cdr"].secret
    if ok("cdr.secret") and secret and (len(secret) < 16 or not re.fullmatch(r"[\x21-\x7e]+", secret)):
        problems.append(f"{path}: [cdr] secret: must be at least 16 printable characters without spaces")
    storage = s["storage"].dir
    if not ok("storage.dir"):
        pass
    elif os.path.exists(storage):
        if not os.path.isdir(storage) or not os.access(storage, os.W_OK | os.X_OK):
            problems.append(f"{path}: [storage] dir: {storage} is not a writable directory")
    else:
        parent = os.path.dirname(os.path.abspath(storage))
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            problems.append(
                f"{path}: [storage] dir: {storage} does not exist and cannot be created "
                f"({parent} is not writable by this user)"
            )
    if s["recordings"].dir and not os.path.isdir(s["recordings"].dir):
        warnings.append(f"{path}: [recordings] dir: directory does not exist: {s['recordings'].dir}")
