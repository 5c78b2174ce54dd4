"""SIGHUP: re-read the config; apply what can change without dropping calls, name the rest.

``Reloader(cfg).reload()`` reads ``cfg.path`` again.  An invalid file
changes nothing (every problem is logged, the running config stays).
``[log]`` (level, levels, format) applies at once.  Every other changed key
is logged as "needs a restart" with its section and key: the limits, ring
settings and listeners are handed to their components at start, and a
restart (``systemctl restart fsbridge``) keeps calls safe -- the outbox and
the open-calls registry survive it.
"""

from __future__ import annotations

import logging
from typing import Any

from fsbridge import config, logs

log = logging.getLogger("fsbridge.reload")

LIVE_SECTIONS = {"log"}


def changed_keys(old: config.Config, new: config.Config) -> list[tuple[str, str]]:
    """(section, key) of every value that differs, in schema order."""
    out = []
    for section, keys in config.SCHEMA.items():
        before = old.sections[section].as_dict() if section in old.sections else {}
        after = new.sections[section].as_dict() if section in new.sections else {}
        out += [(section, k.name) for k in keys if before.get(k.name) != after.get(k.name)]
    return out


class Reloader:
    def __init__(self, cfg: config.Config) -> None:
        self.cfg = cfg  # what runs: only [log] moves forward on reload

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
        live = [key for key in changed if key[0] in LIVE_SECTIONS]
        restart = [key for key in changed if key[0] not in LIVE_SECTIONS]
        if live:
            logs.setup(new.log, new.path)
            sections = dict(self.cfg.sections, log=new.sections["log"])
            self.cfg = config.Config(self.cfg.path, sections, self.cfg.warnings)
        applied = ", ".join(f"[{s}] {k}" for s, k in live) or "nothing changed that applies live"
        log.info("reload of %s: applied %s", self.cfg.path, applied)
        if restart:
            log.warning("reload: %s changed; these need a restart (systemctl restart fsbridge)",
                        ", ".join(f"[{s}] {k}" for s, k in restart))
        return restart
