"""`fsbridge install-dialplan`: put the packaged dialplan into a FreeSWITCH conf dir.

What the README's manual steps do, done the same way every time:

* the packaged ``dialplan/*.xml`` go to ``<conf>/fsbridge/`` (never into
  ``<conf>/dialplan/``: freeswitch.xml loads every ``dialplan/*.xml`` as a
  context);
* ``fsbridge-vars.xml`` gets its values, by precedence: what the command line
  or the fsbridge config say (``-c``: the lookup URL from ``[dialplan]
  listen``), else what an earlier install (or the admin) wrote there, else the
  packaged defaults;
* an include line is added to ``vars.xml`` (before its closing tag, after
  ``domain`` is set), ``dialplan/public.xml`` and ``dialplan/default.xml``
  (first thing inside the ``public`` / ``default`` context).  Include paths
  are absolute (``$${conf_dir}/fsbridge/...``): FreeSWITCH resolves a
  relative one from the including file's directory and includes nothing.
  A relative fsbridge include left by an older install is rewritten.

Idempotent (a second run changes nothing), every changed file is first
copied to ``<file>.fsbridge-bak-<UTC time>``, and ``--dry-run`` prints the
unified diff of what would change and writes nothing.
"""

from __future__ import annotations

import difflib
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fsbridge import config, packaged
from fsbridge.lookup import CONTACT_PATH

__all__ = ["InstallError", "Change", "plan", "apply", "include_line", "run"]

SUBDIR = "fsbridge"
VARS_FILE = "fsbridge-vars.xml"
# Which packaged file each FreeSWITCH file includes, and where.
# (file, context or None for vars.xml, included fsbridge file)
TARGETS = (
    ("vars.xml", None, VARS_FILE),
    ("dialplan/public.xml", "public", "fsbridge-inbound.xml"),
    ("dialplan/default.xml", "default", "fsbridge-outbound.xml"),
)
_SET = re.compile(r'(<X-PRE-PROCESS\s+cmd="set"\s+data=")(\w+)=([^"]*)("\s*/>)')
# Values that go into an XML attribute and a FreeSWITCH dial string / regex.
_DID = re.compile(r"[0-9]{3,20}")  # one number: it is also the caller ID presented outbound
_WORD = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_FALLBACK = re.compile(r"[A-Za-z0-9_.@/:=\[\],|${}-]{1,1000}")


class InstallError(Exception):
    """The conf dir or an option cannot be used; nothing was written."""


@dataclass
class Change:
    path: Path
    old: str | None  # None: a new file
    new: str

    def diff(self) -> str:
        return "".join(
            difflib.unified_diff(
                (self.old or "").splitlines(keepends=True),
                self.new.splitlines(keepends=True),
                fromfile="/dev/null" if self.old is None else str(self.path),
                tofile=str(self.path),
            )
        )


def include_line(name: str) -> str:
    return f'<X-PRE-PROCESS cmd="include" data="$${{conf_dir}}/{SUBDIR}/{name}"/>'


def _strip_comments(text: str) -> str:
    # Same length, so offsets stay valid; FreeSWITCH would run a directive in a
    # comment, but an admin's commented-out line is not an install of ours.
    return re.sub(r"<!--.*?-->", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.S)


def _with_include(text: str, path: Path, context: str | None, name: str) -> str:
    wanted = include_line(name)
    bare = _strip_comments(text)
    ours = re.compile(r'<X-PRE-PROCESS\s+cmd="include"\s+data="([^"]*?)' + re.escape(f"{SUBDIR}/{name}") + r'"\s*/>')
    found = list(ours.finditer(bare))
    if any(m.group(0) == wanted for m in found):
        return text
    if found:  # an older, relative include: it includes nothing; fix it in place
        m = found[0]
        return text[: m.start()] + wanted + text[m.end() :]
    if context is None:
        closing = bare.rfind("</include>")
        if closing < 0:
            raise InstallError(f"{path}: no closing </include> to add the include before")
        line_start = text.rfind("\n", 0, closing) + 1
        return text[:line_start] + f"  {wanted}\n" + text[line_start:]
    opening = re.search(r'<context\s+name="' + re.escape(context) + r'"\s*>[^\n]*\n', bare)
    if not opening:
        raise InstallError(f'{path}: no <context name="{context}"> to add the include to')
    return text[: opening.end()] + f"    {wanted}\n" + text[opening.end() :]


def _vars_text(packaged_text: str, existing: str | None, values: dict[str, str]) -> str:
    kept = {m.group(2): m.group(3) for m in _SET.finditer(_strip_comments(existing))} if existing else {}

    def value(m: re.Match) -> str:
        name = m.group(2)
        new = values.get(name, kept.get(name, m.group(3)))
        return f"{m.group(1)}{name}={new}{m.group(4)}"

    return _SET.sub(value, packaged_text)


def settings_from_config(path: str) -> dict[str, str]:
    """The dialplan values an fsbridge config decides: the lookup URL, and the
    DID when ``[click_to_call] client_caller_id`` names it (the number the
    client sees is the outbound route's caller ID, fsbridge_did)."""
    try:
        cfg = config.load(path, require_token=False)
    except config.ConfigError as exc:
        raise InstallError("; ".join(exc.problems)) from None
    listen = cfg.dialplan.listen
    host = "127.0.0.1" if listen.host in ("0.0.0.0", "") else ("::1" if listen.host == "::" else listen.host)
    host = f"[{host}]" if ":" in host else host
    values = {"fsbridge_lookup_url": f"http://{host}:{listen.port}{CONTACT_PATH}"}
    if cfg.click_to_call.client_caller_id:
        values["fsbridge_did"] = cfg.click_to_call.client_caller_id
    return values


def _check_values(values: dict[str, str]) -> None:
    checks = {
        "fsbridge_did": (_DID, "the DID's digits, e.g. 74950000000"),
        "fsbridge_gateway": (_WORD, "a sofia gateway name: letters, digits, '_', '.', '-'"),
        "fsbridge_fallback": (_FALLBACK, "a dial string such as user/101@$${domain},user/102@$${domain}"),
    }
    for name, value in values.items():
        pattern, what = checks.get(name, (None, ""))
        if pattern is not None and not pattern.fullmatch(value):
            raise InstallError(f"--{name.removeprefix('fsbridge_')}: expected {what}, got {value!r}")
        if "${" in value.replace("$${", ""):
            # In a pre-processor value FreeSWITCH turns ${ into %{ (the leg fails).
            raise InstallError(f"{name}: use $${{...}} (expanded at load), not ${{...}}: {value!r}")


def plan(conf_dir: Path, values: dict[str, str] | None = None) -> list[Change]:
    """What installing would change, nothing written."""
    conf_dir = Path(conf_dir)
    values = dict(values or {})
    _check_values(values)
    if not (conf_dir / "vars.xml").is_file():
        raise InstallError(f"{conf_dir}: not a FreeSWITCH conf dir (no vars.xml)")
    changes: list[Change] = []
    for source in packaged.dialplan_files():
        target = conf_dir / SUBDIR / source.name
        old = target.read_text(encoding="utf-8") if target.exists() else None
        new = source.read_text(encoding="utf-8")
        if source.name == VARS_FILE:
            new = _vars_text(new, old, values)
        if new != old:
            changes.append(Change(target, old, new))
    for relative, context, name in TARGETS:
        target = conf_dir / relative
        if not target.is_file():
            raise InstallError(f"{target}: not found")
        old = target.read_text(encoding="utf-8")
        new = _with_include(old, target, context, name)
        if new != old:
            changes.append(Change(target, old, new))
    return changes


def apply(changes: list[Change], stamp: str | None = None) -> list[Path]:
    """Write the changes, each changed file backed up first; returns the backups."""
    stamp = stamp or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    backups = []
    for change in changes:
        change.path.parent.mkdir(parents=True, exist_ok=True)
        if change.old is not None:
            backup = change.path.with_name(f"{change.path.name}.fsbridge-bak-{stamp}")
            shutil.copy2(change.path, backup)
            backups.append(backup)
        tmp = change.path.with_name(change.path.name + ".fsbridge-tmp")
        tmp.write_text(change.new, encoding="utf-8")
        tmp.replace(change.path)
    return backups


def left_to_do(conf_dir: Path, changed: bool) -> list[str]:
    todo = []
    modules = Path(conf_dir) / "autoload_configs" / "modules.conf.xml"
    loaded = modules.is_file() and re.search(
        r'<load\s+module="mod_curl"\s*/>', _strip_comments(modules.read_text(encoding="utf-8"))
    )
    if not loaded:
        todo.append(f'load mod_curl: add <load module="mod_curl"/> to {modules}, then restart FreeSWITCH (or fs_cli -x "load mod_curl")')
    todo.append(
        f"check DID, gateway, fallback group and ring times in {Path(conf_dir) / SUBDIR / VARS_FILE}"
        " (or pass --did/--gateway/--fallback)"
    )
    if changed:
        todo.append('apply it: fs_cli -x reloadxml (then look for errors in freeswitch.log)')
    return todo


def run(
    conf_dir: str,
    *,
    config_path: str | None = None,
    values: dict[str, str] | None = None,
    dry_run: bool = False,
    out: Callable[[str], None] = print,
) -> int:
    """The command: 0 done (or nothing to do), 2 on an unusable conf dir or option."""
    try:
        merged = settings_from_config(config_path) if config_path else {}
        merged.update({k: v for k, v in (values or {}).items() if v is not None})
        changes = plan(Path(conf_dir), merged)
        if dry_run:
            for change in changes:
                out(change.diff().rstrip("\n"))
            out(f"dry run: {len(changes)} file(s) would change, nothing written" if changes else "nothing to change")
        else:
            backups = apply(changes)
            for change in changes:
                out(f"{'updated' if change.old is not None else 'created'} {change.path}")
            for backup in backups:
                out(f"backup  {backup}")
            if not changes:
                out(f"{conf_dir}: fsbridge dialplan already installed, nothing changed")
    except (InstallError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for item in left_to_do(Path(conf_dir), bool(changes)):
        out(f"to do: {item}")
    return 0
