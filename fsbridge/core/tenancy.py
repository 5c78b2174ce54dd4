"""Which PlanFix account (tenant) a call, a request or a lookup belongs to.

Pure: no I/O.  A cloud PBX serves many PlanFix accounts from one
FreeSWITCH; each account owns FreeSWITCH domains (its extensions are
``user@domain``) and external numbers (DIDs).  A call belongs to the tenant
its channels name, strongest fact first:

1. ``variable_fsbridge_tenant``: set by our own click-to-call originate;
2. the channel's domain: ``variable_domain_name`` (a phone's own call, or a
   dialplan that routed the call into a domain), ``variable_dialed_domain``
   (a leg rung as ``user/<ext>@<domain>``), the domain of the presence id;
3. the DID an inbound channel dialled (``Caller-Destination-Number``).

Without ``[tenant.*]`` sections there is one implicit tenant that owns
everything (``TenantMap.single``): the service behaves as before tenants.
A call that matches no tenant belongs to nobody and is sent nowhere.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

__all__ = [
    "IMPLICIT_TENANT",
    "TENANT_NAME",
    "TenantRules",
    "TenantMap",
    "Owner",
    "match_token",
    "digits",
    "domain_of_presence",
]

# The name of the one tenant of a config without [tenant.*] sections.
IMPLICIT_TENANT = "default"
# A tenant's name: a file-name and metric-label safe word (it names a
# directory under [storage] dir and a channel variable value).
TENANT_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


def digits(number: str) -> str:
    """``+7 (495) 000-00-00`` -> ``74950000000``: how DIDs are compared by default."""
    return "".join(ch for ch in number if ch.isdigit() and ch.isascii())


def domain_of_presence(presence_id: str) -> str:
    """``101@acme.pbx.example`` -> ``acme.pbx.example`` ("" without an ``@``)."""
    _, at, domain = presence_id.rpartition("@")
    return domain if at else ""


@dataclass(frozen=True, slots=True)
class TenantRules:
    """What call tracking needs to know of one tenant."""

    name: str
    domains: tuple[str, ...] = ()
    dids: tuple[str, ...] = ()
    extension_pattern: str = r"^\d{2,6}$"
    report_internal_calls: bool = False


@dataclass(frozen=True, slots=True)
class Owner:
    """A call's tenant (``name``; "" when none matched) and the fact that decided it."""

    name: str
    seen: str  # "domain acme.pbx.example", "DID 74950000000", "tag acme", "" (no fact at all)


_NOBODY = Owner("", "")


class TenantMap:
    """Domains and DIDs to tenants.  ``single``: every call is that tenant's."""

    def __init__(self, tenants: Sequence[TenantRules], *, single: str | None = None,
                 normalize_did: Callable[[str], str] = digits) -> None:
        self.single = single
        self.rules = {t.name: t for t in tenants}
        self._normalize = normalize_did
        self._by_domain: dict[str, str] = {}
        self._by_did: dict[str, str] = {}
        for tenant in tenants:
            for domain in tenant.domains:
                self._by_domain.setdefault(domain.lower(), tenant.name)
            for did in tenant.dids:
                key = self._did_key(did)
                if key:
                    self._by_did.setdefault(key, tenant.name)
        self._single_owner = Owner(single, "") if single else None

    def _did_key(self, number: str) -> str:
        try:
            return self._normalize(number)
        except ValueError:
            return digits(number)

    def by_domain(self, domain: str) -> str:
        if self.single:
            return self.single
        return self._by_domain.get(domain.lower(), "") if domain else ""

    def by_did(self, number: str) -> str:
        if self.single:
            return self.single
        return self._by_did.get(self._did_key(number), "") if number else ""

    def find(self, *, domain: str = "", did: str = "") -> str:
        """The tenant of a dialplan lookup (the domain wins over the DID); "" for none."""
        return self.by_domain(domain) or self.by_did(did)

    def owner(self, *, tag: str = "", domains: Iterable[str] = (), did: str = "") -> Owner:
        """The tenant a channel names (see the module doc for the order)."""
        if self._single_owner is not None:
            return self._single_owner
        if tag and tag in self.rules:
            return Owner(tag, f"tag {tag}")
        seen = ""
        for domain in domains:
            if domain:
                name = self._by_domain.get(domain.lower())
                if name:
                    return Owner(name, f"domain {domain}")
                seen = seen or f"domain {domain}"
        if did:
            name = self._by_did.get(self._did_key(did))
            if name:
                return Owner(name, f"DID {did}")
            seen = seen or f"DID {did}"
        return Owner("", seen) if seen else _NOBODY


def match_token(given: str, tokens: Sequence[tuple[str, bytes]]) -> str | None:
    """The name of the tenant whose PBX key is ``given``, or None.

    Compared in constant time against *every* tenant, with no early exit,
    so the answer's timing tells nothing about which key came close or
    where in the list it is.  Keys are unique (the config checks it).
    """
    candidate = given.encode("utf-8", "surrogatepass")
    found = None
    for name, token in tokens:
        if hmac.compare_digest(candidate, token) and found is None:
            found = name
    return found
