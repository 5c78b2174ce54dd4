"""`fsbridge tenants -c FILE`: each tenant with its setup state and its outbox.

Read from ``[storage] dir`` (the service may be running; SQLite lets both
read): the PlanFix host its ``setup`` stored (or the config's
``planfix_url``), when PlanFix last took a request, how many wait and how
many PlanFix refused (kept aside, see ``fsbridge outbox``).  Never a token.
"""

from __future__ import annotations

import time
from typing import Any

from fsbridge.accounts import account_dir, settings_store
from fsbridge.config import Config, TenantConfig
from fsbridge.outbox import OutboxError, db_path_for, summary
from fsbridge.planfix_address import host_of
from fsbridge.state import SettingsError


def tenant_row(cfg: Config, tenant: TenantConfig) -> dict[str, Any]:
    directory = account_dir(cfg.storage.dir, tenant)
    row: dict[str, Any] = {
        "tenant": tenant.name,
        "domains": list(tenant.domains),
        "dids": list(tenant.dids),
        "node": tenant.node or "any",
    }
    try:
        stored = settings_store(directory).load()
    except SettingsError as exc:
        stored, row["problem"] = None, str(exc)
    if stored is not None:
        row["setup"], row["planfix_host"] = "done", host_of(stored.url)
    elif tenant.planfix_url and tenant.planfix_token:
        row["setup"], row["planfix_host"] = "from the config", host_of(tenant.planfix_url)
    else:
        row["setup"], row["planfix_host"] = "waiting for PlanFix's setup", None
    try:
        row.update(summary(db_path_for(directory)))
    except OutboxError as exc:
        row["problem"] = str(exc)
    return row


def _when(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    ago = max(0, int(now - ts))
    if ago < 120:
        return f"{ago}s ago"
    if ago < 7200:
        return f"{ago // 60}min ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def format_rows(rows: list[dict[str, Any]], now: float) -> str:
    header = ("TENANT", "PLANFIX HOST", "SETUP", "LAST DELIVERY", "PENDING", "KEPT ASIDE", "DOMAINS / DIDS")
    table = [header]
    for row in rows:
        owns = " ".join(row["domains"] + row["dids"]) or "-"
        table.append((row["tenant"], row["planfix_host"] or "-", row["setup"], _when(row.get("last_success_at"), now),
                      str(row.get("pending", "?")), str(row.get("kept_aside", "?")), owns))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
    lines += [f"{row['tenant']}: {row['problem']}" for row in rows if row.get("problem")]
    return "\n".join(lines) + "\n"


def report(cfg: Config) -> tuple[str, int]:
    """(text, exit code): 1 when a tenant's files cannot be read."""
    rows = [tenant_row(cfg, tenant) for tenant in cfg.tenants]
    return format_rows(rows, time.time()), 1 if any(row.get("problem") for row in rows) else 0
