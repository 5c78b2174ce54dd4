"""The PlanFix accounts one process serves: each tenant's setup, client, outbox and lookup.

Each account is delivered on its own: its own stored ``setup``, its own
HTTP pool to its own PlanFix, its own outbox (order, backoff, in-flight
limit), so one PlanFix down, slow or answering 401 never delays another
account's events.  On disk (``[storage] dir``):

    planfix-settings.json, outbox.sqlite3               the one tenant of a config
                                                        without [tenant.*] (as before tenants)
    tenants/<name>/planfix-settings.json, outbox.sqlite3  each [tenant.<name>]

An outbox database also holds the tenant's open-calls registry
(``fsbridge.opencalls``): its calls' starts are stored in the same commit as
their requests.

A removed tenant's directory stays: adding it back delivers what it held.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from fsbridge import metrics, outbox
from fsbridge.config import Config, TenantConfig
from fsbridge.lookup import ContactLookup, LookupSettings
from fsbridge.planfix import Credentials, PlanfixClient
from fsbridge.planfix_address import AddressPolicy, host_of
from fsbridge.state import SettingsError, SettingsStore

log = logging.getLogger("fsbridge.accounts")

TENANTS_DIR = "tenants"


def account_dir(storage_dir: str, tenant: TenantConfig) -> str:
    """Where a tenant's setup and outbox live."""
    if tenant.implicit:
        return storage_dir
    return os.path.join(storage_dir, TENANTS_DIR, tenant.name)


def settings_store(directory: str) -> SettingsStore:
    """Where `setup` keeps PlanFix's address and token."""
    # recheck_s: no stat per PlanFix request; `setup` saves through this
    # store (seen at once), a hand edit of the file within a second.
    return SettingsStore(os.path.join(directory, "planfix-settings.json"), recheck_s=1.0)


def make_client(cfg: Config, credentials, tenant: str) -> metrics.InstrumentedClient:
    return metrics.InstrumentedClient(PlanfixClient(
        credentials,
        connect_timeout=cfg.planfix.connect_timeout,
        read_timeout=cfg.planfix.read_timeout,
        pool_size=max(cfg.outbox.concurrency, cfg.planfix.max_in_flight),
        address_policy=AddressPolicy.from_config(cfg),
    ), tenant=tenant)


def effective_credentials(store: SettingsStore, tenant: TenantConfig) -> Credentials | None:
    """A tenant's PlanFix URL and token: what `setup` stored wins over the config file."""
    try:
        stored = store.load()
    except SettingsError as exc:
        log.error("%s", exc)
        stored = None
    if stored is not None:
        return stored
    if tenant.planfix_url and tenant.planfix_token:
        return Credentials(tenant.planfix_url, tenant.planfix_token)
    return None


class Account:
    """One tenant's delivery side (the service routes its calls' commands here)."""

    def __init__(self, cfg: Config, tenant: TenantConfig) -> None:
        self.name = tenant.name
        self.tenant = tenant
        self.dir = account_dir(cfg.storage.dir, tenant)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.settings_store = settings_store(self.dir)
        self.client = make_client(cfg, self.credentials, tenant.name)
        self.outbox = outbox.Outbox(
            outbox.db_path_for(self.dir),
            self.client,
            concurrency=cfg.outbox.concurrency,
            max_concurrency=max(cfg.outbox.concurrency, cfg.planfix.max_in_flight),
            max_age_s=cfg.outbox.max_age,
            min_backoff_s=cfg.outbox.min_backoff,
            max_backoff_s=cfg.outbox.max_backoff,
            name=tenant.name,
        )
        # The lookup tells numbers from extensions by the tenant's own pattern.
        lookup_settings = dataclasses.replace(LookupSettings.from_config(cfg),
                                              extension_pattern=tenant.calls.extension_pattern)
        self.lookup = ContactLookup(lookup_settings, self.client.contact)

    def credentials(self) -> Credentials | None:
        return effective_credentials(self.settings_store, self.tenant)

    def update(self, tenant: TenantConfig) -> None:
        """A reload changed the tenant's section (its config credentials are read per request)."""
        self.tenant = tenant

    def start(self) -> None:
        self.outbox.start()

    def stop(self, drain_timeout: float = 5.0) -> None:
        self.outbox.stop(drain_timeout=drain_timeout)

    def stats(self) -> dict[str, Any]:
        """Per-tenant figures for /healthz (loopback) and the metrics: never a token."""
        try:
            creds = self.credentials()
        except Exception:  # noqa: BLE001 - health must answer
            creds = None
        box = self.outbox.stats()
        return {
            "planfix_configured": creds is not None,
            "planfix_host": host_of(creds.url) if creds is not None else None,
            "outbox": box,
            "lookup": self.lookup.stats(),
        }

