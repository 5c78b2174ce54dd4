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

Cloud PBX (``-c FILE`` with ``[tenant.*]`` sections: several PlanFix
accounts on one FreeSWITCH, each with its own domains and DIDs): instead of
the one-DID files, ``<conf>/fsbridge/fsbridge-tenants-public.xml`` (every
tenant's DIDs: one copy of ``fsbridge-tenant-inbound.xml`` each) and, per
context the tenants' calls run in (``[tenant.NAME] context``),
``fsbridge-tenants-<context>.xml`` (``fsbridge-tenant-outbound.xml`` per
tenant) are written from the config and included first in those contexts;
the one-DID includes are taken out (a tenant's DID must never be routed with
another tenant's domain or caller ID), and so are includes of tenant files
the config no longer needs.  A config without tenants puts the one-DID
layout back; without ``-c`` a tenant install is refused (it would be undone
blind).

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
from fsbridge.core.tenancy import digits

__all__ = ["InstallError", "Change", "TenantRoute", "plan", "apply", "include_line", "tenant_routes",
           "tenants_file", "tenants_text", "run"]

SUBDIR = "fsbridge"
VARS_FILE = "fsbridge-vars.xml"
# Which packaged file each FreeSWITCH file includes, and where.
# (file, context or None for vars.xml, included fsbridge file)
TARGETS = (
    ("vars.xml", None, VARS_FILE),
    ("dialplan/public.xml", "public", "fsbridge-inbound.xml"),
    ("dialplan/default.xml", "default", "fsbridge-outbound.xml"),
)
RECORD_FILE = "fsbridge-record.xml"
# Cloud PBX: the packaged per-tenant routes, and the public context.
TENANT_INBOUND = "fsbridge-tenant-inbound.xml"
TENANT_OUTBOUND = "fsbridge-tenant-outbound.xml"
PUBLIC = "public"
_SET = re.compile(r'(<X-PRE-PROCESS\s+cmd="set"\s+data=")(\w+)=([^"]*)("\s*/>)')
# The includes this command puts into dialplan/*.xml and may take out again
# (never fsbridge-record.xml, which admins include in contexts of their own).
_MANAGED = re.compile(r'<X-PRE-PROCESS\s+cmd="include"\s+data="([^"]*?)' + re.escape(SUBDIR)
                      + r'/(fsbridge-(?:inbound|outbound|tenants-[A-Za-z0-9_.-]+)\.xml)"\s*/>')
_CONTEXT = re.compile(r'<context\s+name="([^"]*)"\s*>')
# Values that go into an XML attribute and a FreeSWITCH dial string / regex.
_DID = re.compile(r"[0-9]{3,20}")  # one number: it is also the caller ID presented outbound
_WORD = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# user/<ext>[@<domain>] in a fallback dial string (after '[...]', ',', '|' or at the start).
_USER_LEG = re.compile(r"(?:^|(?<=[\],|}]))user/([^@,|\[\]{}]+)(?:@([^,|\[\]{}]+))?")


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


def tenants_file(context: str) -> str:
    """The generated file of one context's tenant routes (``public``: their inbound routes)."""
    return f"fsbridge-tenants-{context}.xml"


@dataclass(frozen=True)
class TenantRoute:
    """What the dialplan needs of one ``[tenant.NAME]``."""

    name: str
    domains: tuple[str, ...]  # the first one is where its calls are routed
    dids: tuple[str, ...]  # digits
    fallback: str  # every user/ leg in one of its domains ("" without DIDs)
    context: str  # its phones' and its click-to-call's context
    caller_id: str  # presented on its outbound calls


def _strip_comments(text: str) -> str:
    # Same length, so offsets stay valid; FreeSWITCH would run a directive in a
    # comment, but an admin's commented-out line is not an install of ours.
    return re.sub(r"<!--.*?-->", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.S)


def _with_vars_include(text: str, path: Path) -> str:
    wanted = include_line(VARS_FILE)
    bare = _strip_comments(text)
    ours = re.compile(r'<X-PRE-PROCESS\s+cmd="include"\s+data="([^"]*?)' + re.escape(f"{SUBDIR}/{VARS_FILE}") + r'"\s*/>')
    found = list(ours.finditer(bare))
    if any(m.group(0) == wanted for m in found):
        return text
    if found:  # an older, relative include: it includes nothing; fix it in place
        m = found[0]
        return text[: m.start()] + wanted + text[m.end() :]
    closing = bare.rfind("</include>")
    if closing < 0:
        raise InstallError(f"{path}: no closing </include> to add the include before")
    line_start = text.rfind("\n", 0, closing) + 1
    return text[:line_start] + f"  {wanted}\n" + text[line_start:]


def _cut(text: str, start: int, end: int) -> str:
    """``text`` without ``text[start:end]``; without its line when nothing else is on it."""
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    line_end = len(text) if line_end < 0 else line_end
    if not text[line_start:start].strip() and not text[end:line_end].strip():
        return text[:line_start] + text[line_end + 1 :]
    return text[:start] + text[end:]


def _with_includes(text: str, path: Path, wanted: list[tuple[str, str]], single_too: bool) -> str:
    """``text`` with exactly the ``wanted`` (context, file) includes of ours: a
    missing one added first inside its context, a relative one made absolute
    in place, every other include of a tenants file taken out, and of
    fsbridge-inbound/outbound.xml too when ``single_too`` (a file we put them in)."""
    names = {name for _, name in wanted}
    kept: set[str] = set()
    edits: list[tuple[int, int, str | None]] = []
    for m in _MANAGED.finditer(_strip_comments(text)):
        name = m.group(2)
        if name in names and name not in kept:
            kept.add(name)
            if m.group(0) != include_line(name):
                edits.append((m.start(), m.end(), include_line(name)))
        elif single_too or name.startswith("fsbridge-tenants-"):
            edits.append((m.start(), m.end(), None))
    for start, end, replacement in reversed(edits):  # back to front: the offsets before stay valid
        text = _cut(text, start, end) if replacement is None else text[:start] + replacement + text[end:]
    for context, name in wanted:
        if name in kept:
            continue
        opening = re.search(r'<context\s+name="' + re.escape(context) + r'"\s*>[^\n]*\n', _strip_comments(text))
        if not opening:
            raise InstallError(f'{path}: no <context name="{context}"> to add the include to')
        text = text[: opening.end()] + f"    {include_line(name)}\n" + text[opening.end() :]
    return text


def _vars_text(packaged_text: str, existing: str | None, values: dict[str, str]) -> str:
    kept = {m.group(2): m.group(3) for m in _SET.finditer(_strip_comments(existing))} if existing else {}

    def value(m: re.Match) -> str:
        name = m.group(2)
        new = values.get(name, kept.get(name, m.group(3)))
        return f"{m.group(1)}{name}={new}{m.group(4)}"

    return _SET.sub(value, packaged_text)


def _load(path: str) -> config.Config:
    try:
        return config.load(path, require_token=False)
    except config.ConfigError as exc:
        raise InstallError("; ".join(exc.problems)) from None


def settings_from_config(cfg: config.Config) -> dict[str, str]:
    """The fsbridge-vars.xml values an fsbridge config decides: the lookup URL,
    and (one PlanFix) the DID when ``[click_to_call] client_caller_id`` names it
    (the number the client sees is the outbound route's caller ID, fsbridge_did)."""
    listen = cfg.dialplan.listen
    host = "127.0.0.1" if listen.host in ("0.0.0.0", "") else ("::1" if listen.host == "::" else listen.host)
    host = f"[{host}]" if ":" in host else host
    values = {"fsbridge_lookup_url": f"http://{host}:{listen.port}{CONTACT_PATH}"}
    if not cfg.multi_tenant and cfg.click_to_call.client_caller_id:
        values["fsbridge_did"] = cfg.click_to_call.client_caller_id
    return values


def _tenant_fallback(raw: str, domains: tuple[str, ...]) -> str:
    """``raw`` with {domain} filled in and every user/ leg in one of ``domains``:
    a bare user/101 would ring 101 of FreeSWITCH's default domain, another
    tenant's phone."""
    if "$" in raw:
        raise ValueError("pre-processor variables ($${...}) are FreeSWITCH-wide, not this tenant's: "
                         "write {domain} (its first domain) or the domain itself")

    def leg(m: re.Match) -> str:
        ext, domain = m.group(1), m.group(2)
        if domain is None:
            return f"user/{ext}@{domains[0]}"
        if domain.lower() not in domains:
            raise ValueError(f"user/{ext}@{domain} is a phone of another domain (the tenant's: {', '.join(domains)})")
        return m.group(0)

    return _USER_LEG.sub(leg, raw.replace("{domain}", domains[0]))


def tenant_routes(cfg: config.Config) -> list[TenantRoute]:
    """Each tenant's dialplan values; InstallError naming every tenant key that is missing or unusable."""
    problems: list[str] = []
    routes = []
    for tenant in cfg.tenants:
        where = f"{cfg.path}: [tenant.{tenant.name}]"
        before = len(problems)
        if not tenant.domains:
            problems.append(f"{where} domains: its calls are routed to its phones in its FreeSWITCH domain; name it")
        dids = tuple(digits(did) for did in tenant.dids)
        caller_id = digits(tenant.click_to_call.client_caller_id) or (dids[0] if dids else "")
        if not caller_id:
            problems.append(f"{where} dids: its outbound calls need a number to present; set dids or client_caller_id")
        elif not _DID.fullmatch(caller_id):
            problems.append(f"{where} client_caller_id: expected 3 to 20 digits, got {caller_id!r}")
        context = tenant.click_to_call.context
        if context == PUBLIC:
            problems.append(f"{where} context: {PUBLIC} is the carrier's context; name the context of its phones")
        fallback = ""
        if dids and not tenant.fallback:
            problems.append(f"{where} fallback: its DIDs' inbound route needs the ring group rung when the client "
                            "has no responsible manager, e.g. fallback = user/101,user/102")
        elif dids and tenant.domains:
            try:
                fallback = _tenant_fallback(tenant.fallback, tenant.domains)
            except ValueError as exc:
                problems.append(f"{where} fallback: {exc}")
        if len(problems) == before:
            routes.append(TenantRoute(tenant.name, tenant.domains, dids, fallback, context, caller_id))
    if problems:
        raise InstallError("; ".join(problems))
    return routes


def tenants_text(context: str, routes: list[TenantRoute]) -> str:
    """The generated file of one context: the record snippet once, then per tenant
    its values (pre-processor set lines, read in order) and the template."""
    inbound = context == PUBLIC
    what = ("incoming calls to each tenant's DIDs: fsbridge-tenant-inbound.xml once per tenant" if inbound else
            f"calls to clients in the {context} context, each tenant with its own number: "
            "fsbridge-tenant-outbound.xml once per tenant")
    lines = [
        "<!--",
        f"  {tenants_file(context)}: written by `fsbridge install-dialplan -c FILE` from the",
        "  [tenant.*] sections of the fsbridge config; the next run writes it again,",
        "  so change the config, not this file.",
        f"  {what[0].upper()}{what[1:]}.",
        "-->",
        "<include>",
        f"  {include_line(RECORD_FILE)}",
    ]
    for route in routes:
        if inbound:
            if not route.dids:
                continue
            values = {"name": route.name, "domain": route.domains[0], "dids": "|".join(route.dids),
                      "fallback": route.fallback, "context": route.context}
        elif route.context == context:
            values = {"name": route.name, "domains": "|".join(d.replace(".", r"\.") for d in route.domains),
                      "caller_id": route.caller_id}
        else:
            continue
        lines.append("")
        lines += [f'  <X-PRE-PROCESS cmd="set" data="fsbridge_tenant_{key}={value}"/>' for key, value in values.items()]
        lines.append(f"  {include_line(TENANT_INBOUND if inbound else TENANT_OUTBOUND)}")
    lines.append("</include>")
    return "\n".join(lines) + "\n"


def _check_values(values: dict[str, str]) -> None:
    checks = {
        "fsbridge_did": (_DID, "the DID's digits, e.g. 74950000000"),
        "fsbridge_gateway": (_WORD, "a sofia gateway name: letters, digits, '_', '.', '-'"),
    }
    for name, value in values.items():
        option = f"--{name.removeprefix('fsbridge_')}"
        if name == "fsbridge_fallback":
            try:
                if not config.parse_fallback(value):
                    raise ValueError("must not be empty")
            except ValueError as exc:
                raise InstallError(f"{option}: {exc}") from None
        pattern, what = checks.get(name, (None, ""))
        if pattern is not None and not pattern.fullmatch(value):
            raise InstallError(f"{option}: expected {what}, got {value!r}")


def _context_files(conf_dir: Path) -> dict[str, Path]:
    """Context name -> the dialplan/*.xml file that defines it."""
    found: dict[str, Path] = {}
    for path in sorted((conf_dir / "dialplan").glob("*.xml")):
        for m in _CONTEXT.finditer(_strip_comments(path.read_text(encoding="utf-8"))):
            found.setdefault(m.group(1), path)
    return found


def _has_tenant_include(path: Path) -> bool:
    return any(m.group(2).startswith("fsbridge-tenants-")
               for m in _MANAGED.finditer(_strip_comments(path.read_text(encoding="utf-8"))))


def installed_for_tenants(conf_dir: Path) -> bool:
    """Whether the dialplan holds tenant routes of an earlier install."""
    return any(_has_tenant_include(p) for p in sorted((Path(conf_dir) / "dialplan").glob("*.xml")))


def plan(conf_dir: Path, values: dict[str, str] | None = None,
         tenants: list[TenantRoute] | None = None) -> list[Change]:
    """What installing would change, nothing written.  ``tenants``: the cloud
    PBX layout (see the module doc); None: the one-DID layout."""
    conf_dir = Path(conf_dir)
    values = dict(values or {})
    _check_values(values)
    if not (conf_dir / "vars.xml").is_file():
        raise InstallError(f"{conf_dir}: not a FreeSWITCH conf dir (no vars.xml)")
    changes: list[Change] = []

    def propose(target: Path, new: str) -> None:
        old = target.read_text(encoding="utf-8") if target.exists() else None
        if new != old:
            changes.append(Change(target, old, new))

    for source in packaged.dialplan_files():
        target = conf_dir / SUBDIR / source.name
        new = source.read_text(encoding="utf-8")
        if source.name == VARS_FILE:
            new = _vars_text(new, target.read_text(encoding="utf-8") if target.exists() else None, values)
        propose(target, new)
    single = {conf_dir / relative: (context, name) for relative, context, name in TARGETS if context}
    for path in [conf_dir / "vars.xml", *single]:
        if not path.is_file():
            raise InstallError(f"{path}: not found")
    propose(conf_dir / "vars.xml", _with_vars_include((conf_dir / "vars.xml").read_text(encoding="utf-8"),
                                                      conf_dir / "vars.xml"))
    wanted: dict[Path, list[tuple[str, str]]] = {}
    if tenants is None:
        wanted = {path: [entry] for path, entry in single.items()}
    else:
        defined = _context_files(conf_dir)
        contexts = [PUBLIC] + list(dict.fromkeys(route.context for route in tenants))
        for context in contexts:
            if context not in defined:
                who = ", ".join(f"[tenant.{r.name}]" for r in tenants if r.context == context)
                raise InstallError(f'no <context name="{context}"> in {conf_dir / "dialplan"}/*.xml'
                                   + (f" (the context of {who}: create it first)" if who else ""))
            wanted.setdefault(defined[context], []).append((context, tenants_file(context)))
            propose(conf_dir / SUBDIR / tenants_file(context), tenants_text(context, tenants))
    ours = list(dict.fromkeys([*single, *wanted]))  # files we put includes in
    stale = [p for p in sorted((conf_dir / "dialplan").glob("*.xml")) if p not in ours and _has_tenant_include(p)]
    for path in ours + stale:
        old = path.read_text(encoding="utf-8")
        propose(path, _with_includes(old, path, wanted.get(path, []), single_too=path in ours))
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



def left_to_do(conf_dir: Path, changed: bool, tenants: list[TenantRoute] | None = None) -> list[str]:
    conf_dir = Path(conf_dir)
    todo = []
    modules = conf_dir / "autoload_configs" / "modules.conf.xml"
    loaded = modules.is_file() and re.search(
        r'<load\s+module="mod_curl"\s*/>', _strip_comments(modules.read_text(encoding="utf-8"))
    )
    if not loaded:
        todo.append(f'load mod_curl: add <load module="mod_curl"/> to {modules}, then restart FreeSWITCH (or fs_cli -x "load mod_curl")')
    vars_file = conf_dir / SUBDIR / VARS_FILE
    if tenants is None:
        todo.append(f"check DID, gateway, fallback group and ring times in {vars_file} (or pass --did/--gateway/--fallback)")
    else:
        todo.append(f"check gateway and ring times in {vars_file} (every tenant's); each tenant's DIDs, domains, "
                    "fallback and caller ID come from the config: change them there and run this again")
        todo.append("each tenant's phones: user_context = its [tenant.NAME] context in the directory "
                    "(their outbound calls run there), one FreeSWITCH domain per tenant")
        internal = conf_dir / "sip_profiles" / "internal.xml"
        if internal.is_file() and re.search(r'<param\s+name="force-register-(?:db-)?domain"',
                                            _strip_comments(internal.read_text(encoding="utf-8"))):
            todo.append(f"{internal} puts every registration into one domain (force-register-domain, "
                        "force-register-db-domain): comment both out, or the tenants' phones cannot be reached "
                        "in their own domains; then fs_cli -x 'sofia profile internal restart'")
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
    """The command: 0 done (or nothing to do), 2 on an unusable conf dir, config or option."""
    tenants = None
    try:
        cfg = _load(config_path) if config_path else None
        merged = settings_from_config(cfg) if cfg is not None else {}
        given = {k: v for k, v in (values or {}).items() if v is not None}
        if cfg is not None and cfg.multi_tenant:
            tenants = tenant_routes(cfg)
            for name in ("fsbridge_did", "fsbridge_fallback"):
                if name in given:
                    raise InstallError(f"--{name.removeprefix('fsbridge_')}: with [tenant.*] sections each tenant's "
                                       "DIDs and fallback come from its section of the config")
        elif cfg is None and installed_for_tenants(Path(conf_dir)):
            raise InstallError(f"{conf_dir}: the dialplan holds fsbridge's tenant routes (fsbridge-tenants-*.xml); "
                               "pass -c with the fsbridge config (one without [tenant.*] sections puts the "
                               "one-DID routes back)")
        merged.update(given)
        changes = plan(Path(conf_dir), merged, tenants)
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
    for item in left_to_do(Path(conf_dir), bool(changes), tenants):
        out(f"to do: {item}")
    return 0
