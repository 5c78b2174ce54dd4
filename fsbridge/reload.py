"""SIGHUP: re-read the config; apply what can change without dropping calls, name the rest.

``Reloader(cfg).reload()`` reads ``cfg.path`` again.  An invalid file
changes nothing (every problem is logged, the running config stays).
``[log]`` (level, levels, format) and the click-to-call policy, limits and
originate settings (``web.LIVE_CLICK_TO_CALL_KEYS``) apply at once.  Every
other changed key is logged as "needs a restart" with its section and key:
listeners, storage, the outbox and the tracker are built at start, and a
restart (``systemctl restart fsbridge``) keeps calls safe -- the outbox and
the open-calls registry survive it.  Ring times live in the dialplan
(``fsbridge-vars.xml``): FreeSWITCH's ``reloadxml`` applies those.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

from fsbridge import config, logs
from fsbridge.web import LIVE_CLICK_TO_CALL_KEYS

log = logging.getLogger("fsbridge.reload")

LIVE_SECTIONS = {"log"}


def applies_live(key: tuple[str, str]) -> bool:
    section, name = key
    return section in LIVE_SECTIONS or (section == "click_to_call" and name in LIVE_CLICK_TO_CALL_KEYS)


def changed_keys(old: config.Config, new: config.Config) -> list[tuple[str, str]]:
    """(section, key) of every value that differs, in schema order."""
    out = []
    for section, keys in config.SCHEMA.items():
        before = old.sections[section].as_dict() if section in old.sections else {}
        after = new.sections[section].as_dict() if section in new.sections else {}
        out += [(section, k.name) for k in keys if before.get(k.name) != after.get(k.name)]
    return out


class Reloader:
    def __init__(self, cfg: config.Config, apply_click_to_call: Callable[[config.Config], None] | None = None,
                 apply_tenants: Callable[[config.Config], None] | None = None) -> None:
        self.cfg = cfg  # what runs: only the live keys move forward on reload
        self.apply_click_to_call = apply_click_to_call
        # Cloud PBX: [tenant.*] sections apply live (added, removed, changed).
        self.apply_tenants = apply_tenants

    def reload(self, *_: Any) -> list[tuple[str, str]]:
        """Re-read the file; returns the keys that changed but need a restart."""
        try:
            new = config.load(self.cfg.path)
        except config.ConfigError as exc:
            for problem in exc.problems:
                log.error("reload: %s", problem)
            log.error("reload: %s not applied; the running configuration stays", self.cfg.path)
            return []
        changed = changed_keys(self.cfg, new)
        live = [key for key in changed if applies_live(key)]
        restart = [key for key in changed if not applies_live(key)]
        restart += self._node_changes(new)
        if new.multi_tenant != self.cfg.multi_tenant:
            restart.append(("tenant.*", "sections added or all removed"))
        elif new.multi_tenant and self.apply_tenants is not None:
            if any(section in ("calls", "click_to_call") for section, _ in changed):
                # Every tenant's defaults: they apply through the tenants.
                live += [key for key in restart if key[0] in ("calls", "click_to_call")]
                restart = [key for key in restart if key[0] not in ("calls", "click_to_call")]
            try:
                self.apply_tenants(new)
                live.append(("tenant.*", "sections"))
                self.cfg = dataclasses.replace(self.cfg, tenants=new.tenants)
            except (ValueError, OSError) as exc:
                log.error("reload: [tenant.*] not applied: %s", exc)
        if any(section == "click_to_call" for section, _ in live):
            if self.apply_click_to_call is None:
                restart += [key for key in live if key[0] == "click_to_call"]
                live = [key for key in live if key[0] != "click_to_call"]
            else:
                try:
                    self.apply_click_to_call(new)
                except ValueError as exc:  # a value the originate whitelists refuse
                    log.error("reload: [click_to_call] not applied: %s", exc)
                    live = [key for key in live if key[0] != "click_to_call"]
        if live:
            logs.setup(new.log, new.path)
            sections = dict(self.cfg.sections)
            sections["log"] = new.sections["log"]
            # The section moves forward only when all of its changes applied:
            # a changed key that needs a restart is named again next reload.
            if any(section == "click_to_call" for section, _ in live) and not any(
                    section == "click_to_call" for section, _ in restart):
                sections["click_to_call"] = new.sections["click_to_call"]
            self.cfg = dataclasses.replace(self.cfg, sections=sections)
        applied = ", ".join(f"[{s}] {k}" for s, k in live) or "nothing changed that applies live"
        log.info("reload of %s: applied %s", self.cfg.path, applied)
        if restart:
            log.warning("reload: %s changed; these need a restart (systemctl restart fsbridge)",
                        ", ".join(f"[{s}] {k}" for s, k in restart))
        return restart

    def _node_changes(self, new: config.Config) -> list[tuple[str, str]]:
        """FreeSWITCH nodes added, removed or changed: those need a restart."""
        def described(cfg: config.Config) -> dict[str, dict]:
            return {n.name: n.section.as_dict() for n in cfg.nodes if not n.implicit}
        old, now = described(self.cfg), described(new)
        return [(f"freeswitch.{name}", "section") for name in sorted(set(old) | set(now)) if old.get(name) != now.get(name)]
