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
* when connecting (:func:`resolve`, called by fsbridge.planfix's connection
  pools for every new connection): every address the name resolves to must be
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


__all__ = ["DEFAULT_ALLOWED_HOSTS", "AddressPolicy", "AddressRefused", "check_url", "resolve",
           "is_ip_literal", "host_of"]

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
