"""Where PlanFix may be: the address policy for every request to PlanFix (issue 14).

PlanFix's ``setup`` command sets the URL every later request goes to (call
events with recording links, contact lookups whose answers pick the name on
the manager's phone and the extension that rings).  Anyone with the PBX token
can send ``setup``, so the URL is checked twice:

* when ``setup`` stores it (:func:`check_url`): ``https://`` only, the host
  must match ``[planfix] allowed_hosts`` (default: PlanFix's account domains,
  ``*.planfix.ru``, ``*.planfix.com``, ``*.planfix.ua``: an account is a
  third-level domain on one of them), never an IP literal in any spelling
  (``127.0.0.1``, ``0x7f000001``, ``2130706433``, ``127.1``, ``[::ffff:127.0.0.1]``);
* when connecting (:func:`resolve`, called from the HTTP client's connection
  path, :class:`GuardedAdapter`): every address the name resolves to must be
  a public one: no loopback, private, link-local (cloud metadata
  169.254.169.254), shared, multicast or reserved address.  The connection
  goes to the address that was checked, so DNS rebinding between check and
  connect does not help.

Labs and tests opt out with ``[planfix] allow_http = yes`` (lab mode): http://,
any host, IP literals, loopback and private addresses are then all accepted.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NewConnectionError

__all__ = ["DEFAULT_ALLOWED_HOSTS", "AddressPolicy", "AddressRefused", "check_url", "resolve",
           "is_ip_literal", "GuardedAdapter", "host_of"]

# PlanFix's help ("Аккаунт"): an account is a third-level domain on planfix.com, planfix.ru or planfix.ua.
DEFAULT_ALLOWED_HOSTS = ("*.planfix.ru", "*.planfix.com", "*.planfix.ua")


class AddressRefused(ValueError):
    """A PlanFix URL or address outside the policy (the message says why)."""


@dataclass(frozen=True)
class AddressPolicy:
    """``[planfix] allowed_hosts`` and the lab switch ``allow_http``."""

    allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS
    lab_mode: bool = False  # allow_http = yes: http, any host, loopback and private addresses

    @classmethod
    def from_config(cls, cfg: Any) -> "AddressPolicy":
        return cls(tuple(cfg.planfix.allowed_hosts), cfg.planfix.allow_http)

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for pattern in self.allowed_hosts:
            pattern = pattern.lower()
            if pattern.startswith("*."):
                # "*.planfix.ru": any name under planfix.ru, at least one label deep.
                if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                    return True
            elif fnmatch.fnmatchcase(host, pattern):
                return True
        return False


def host_of(url: str) -> str:
    """The host of ``url`` for a log line (never the path or the query)."""
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


def is_ip_literal(host: str) -> bool:
    """True for any spelling the resolver would read as an address, not a name."""
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        pass
    try:
        socket.inet_aton(host)  # 0x7f000001, 2130706433, 127.1, 0177.0.0.1
        return True
    except OSError:
        return False


def check_url(url: str, policy: AddressPolicy) -> None:
    """Raise AddressRefused when ``setup`` must not store ``url``."""
    if policy.lab_mode:
        return
    parts = urlsplit(url)
    if parts.scheme.lower() != "https":
        raise AddressRefused("planfix_url must start with https://")
    host = parts.hostname or ""
    if is_ip_literal(host):
        raise AddressRefused("planfix_url must name PlanFix's host, not an IP address")
    if not policy.host_allowed(host):
        raise AddressRefused(
            f"planfix_url host {host!r} is not one of [planfix] allowed_hosts "
            f"({' '.join(policy.allowed_hosts)}); add your PlanFix domain there"
        )


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve(host: str, port: int, policy: AddressPolicy | None) -> list[tuple[Any, ...]]:
    """getaddrinfo results for ``host`` that the policy lets us connect to.

    Raises AddressRefused when the name resolves to a non-public address
    (any of them: a name pointing at both is not PlanFix) or, outside lab
    mode, when ``host`` is an IP literal.  ``policy`` None: no checks.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if policy is None or policy.lab_mode:
        return infos
    if is_ip_literal(host):
        raise AddressRefused(f"PlanFix address {host} is an IP literal")
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if not _public(ip):
            raise AddressRefused(f"PlanFix host {host} resolves to {ip}, not a public address: refused")
    return infos


def _connect_checked(conn: HTTPConnection, policy: AddressPolicy | None) -> socket.socket:
    """Resolve, check, and connect to a checked address (the policy hook)."""
    try:
        infos = resolve(conn._dns_host, conn.port, policy)  # noqa: SLF001 - urllib3's resolved name
    except AddressRefused as exc:
        raise NewConnectionError(conn, str(exc)) from None
    except socket.gaierror as exc:
        raise NewConnectionError(conn, f"cannot resolve {conn._dns_host}: {exc}") from None  # noqa: SLF001
    last: OSError | None = None
    for family, socktype, proto, _name, sockaddr in infos:
        sock = socket.socket(family, socktype, proto)
        try:
            for opt in conn.socket_options or ():
                sock.setsockopt(*opt)
            if isinstance(conn.timeout, (int, float)):  # else urllib3's "default" sentinel
                sock.settimeout(conn.timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            last = exc
            sock.close()
    raise NewConnectionError(conn, f"cannot connect to {conn._dns_host}: {last}")  # noqa: SLF001


class _CheckedHTTPConnection(HTTPConnection):
    address_policy: AddressPolicy | None = None

    def _new_conn(self) -> socket.socket:
        return _connect_checked(self, self.address_policy)


class _CheckedHTTPSConnection(HTTPSConnection):
    address_policy: AddressPolicy | None = None

    def _new_conn(self) -> socket.socket:
        return _connect_checked(self, self.address_policy)


class GuardedAdapter(HTTPAdapter):
    """requests' adapter whose connections go only where ``policy`` allows.

    TLS still verifies the certificate for the *name* (urllib3 uses the
    host, not the address, for SNI and hostname checks).
    """

    def __init__(self, policy: AddressPolicy | None, **kwargs: Any):
        self.address_policy = policy
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        policy = self.address_policy
        http_conn = type("PolicyHTTPConnection", (_CheckedHTTPConnection,), {"address_policy": policy})
        https_conn = type("PolicyHTTPSConnection", (_CheckedHTTPSConnection,), {"address_policy": policy})
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("PolicyHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type("PolicyHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
        }

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["address_policy"] = self.address_policy
        return state
