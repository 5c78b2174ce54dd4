"""`fsbridge install-dialplan` on a temp copy of FreeSWITCH 1.10.12's vanilla conf files."""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fsbridge import cli, install_dialplan, packaged

VANILLA = Path(__file__).resolve().parent / "data" / "freeswitch-vanilla"
FILES = ("vars.xml", "dialplan/public.xml", "dialplan/default.xml", "autoload_configs/modules.conf.xml")


@pytest.fixture
def conf(tmp_path) -> Path:
    root = tmp_path / "conf"
    for name in FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(VANILLA / name, root / name)
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _sets(path: Path) -> dict[str, str]:
    return dict(e.get("data").split("=", 1) for e in ET.parse(path).getroot() if e.get("cmd") == "set")


def _context(path: Path, name: str) -> ET.Element:
    (context,) = [c for c in ET.parse(path).getroot().iter("context") if c.get("name") == name]
    return context


def test_installs_files_and_absolute_includes_in_the_right_places(conf, capsys):
    assert cli.main(["install-dialplan", "--conf-dir", str(conf)]) == 0
    for source in packaged.dialplan_files():
        assert (conf / "fsbridge" / source.name).is_file()
    assert not list((conf / "dialplan").glob("fsbridge*"))  # never a context of its own
    vars_root = ET.parse(conf / "vars.xml").getroot()
    includes = [e.get("data") for e in vars_root if e.tag == "X-PRE-PROCESS" and e.get("cmd") == "include"]
    assert includes[-1] == "$${conf_dir}/fsbridge/fsbridge-vars.xml"
    # after domain is set: the fallback dial string expands $${domain}
    sets = [e.get("data") for e in vars_root if e.get("cmd") == "set"]
    assert any(s.startswith("domain=") for s in sets)
    for relative, context, name in (("dialplan/public.xml", "public", "fsbridge-inbound.xml"),
                                    ("dialplan/default.xml", "default", "fsbridge-outbound.xml")):
        first = _context(conf / relative, context)[0]
        assert (first.tag, first.get("data")) == ("X-PRE-PROCESS", f"$${{conf_dir}}/fsbridge/{name}")
    out = capsys.readouterr().out
    assert 'load mod_curl: add <load module="mod_curl"/>' in out  # commented out in vanilla
    assert "reloadxml" in out


def test_second_run_changes_nothing(conf, capsys):
    assert cli.main(["install-dialplan", "--conf-dir", str(conf), "--did", "74951112233"]) == 0
    before = _snapshot(conf)
    capsys.readouterr()
    assert cli.main(["install-dialplan", "--conf-dir", str(conf)]) == 0
    assert _snapshot(conf) == before
    out = capsys.readouterr().out
    assert "nothing changed" in out and "reloadxml" not in out
    # the DID given the first time is kept, not reset to the packaged default
    assert _sets(conf / "fsbridge" / "fsbridge-vars.xml")["fsbridge_did"] == "74951112233"


def test_backs_up_every_file_it_changes(conf):
    originals = _snapshot(conf)
    assert install_dialplan.run(str(conf), out=lambda line: None) == 0
    backups = sorted(conf.rglob("*.fsbridge-bak-*"))
    assert {b.name.split(".fsbridge-bak-")[0] for b in backups} == {"vars.xml", "public.xml", "default.xml"}
    for backup in backups:
        original = str(backup.relative_to(conf)).split(".fsbridge-bak-")[0]
        assert backup.read_bytes() == originals[original]


def test_dry_run_prints_the_diff_and_writes_nothing(conf, capsys):
    before = _snapshot(conf)
    assert cli.main(["install-dialplan", "--conf-dir", str(conf), "--dry-run"]) == 0
    assert _snapshot(conf) == before
    out = capsys.readouterr().out
    assert f"+++ {conf / 'dialplan' / 'public.xml'}" in out
    assert '+    <X-PRE-PROCESS cmd="include" data="$${conf_dir}/fsbridge/fsbridge-inbound.xml"/>' in out
    assert f"+++ {conf / 'fsbridge' / 'fsbridge-vars.xml'}" in out
    # every packaged file, vars.xml, public.xml, default.xml
    assert f"{len(packaged.dialplan_files()) + 3} file(s) would change" in out


def test_config_gives_the_lookup_url(conf, tmp_path):
    ini = tmp_path / "fsbridge.ini"
    ini.write_text("[dialplan]\nlisten = 127.0.0.1:18099\n")
    assert install_dialplan.run(str(conf), config_path=str(ini), out=lambda line: None) == 0
    sets = _sets(conf / "fsbridge" / "fsbridge-vars.xml")
    assert sets["fsbridge_lookup_url"] == "http://127.0.0.1:18099/dialplan/contact"
    # a later change of the config is carried over by the next run
    ini.write_text("[dialplan]\nlisten = 127.0.0.1:18100\n")
    install_dialplan.run(str(conf), config_path=str(ini), out=lambda line: None)
    assert _sets(conf / "fsbridge" / "fsbridge-vars.xml")["fsbridge_lookup_url"].endswith(":18100/dialplan/contact")


def test_config_gives_the_did_the_client_sees_and_an_option_still_wins(conf, tmp_path):
    ini = tmp_path / "fsbridge.ini"
    ini.write_text("[dialplan]\nlisten = 127.0.0.1:18099\n[click_to_call]\nclient_caller_id = 74957654321\n")
    assert install_dialplan.run(str(conf), config_path=str(ini), out=lambda line: None) == 0
    assert _sets(conf / "fsbridge" / "fsbridge-vars.xml")["fsbridge_did"] == "74957654321"
    install_dialplan.run(str(conf), config_path=str(ini), values={"fsbridge_did": "74950000009"},
                         out=lambda line: None)
    assert _sets(conf / "fsbridge" / "fsbridge-vars.xml")["fsbridge_did"] == "74950000009"


def test_options_set_did_gateway_fallback(conf):
    values = {"fsbridge_did": "74950000001", "fsbridge_gateway": "my-carrier",
              "fsbridge_fallback": "user/101@$${domain}|user/102@$${domain}"}
    assert install_dialplan.run(str(conf), values=values, out=lambda line: None) == 0
    sets = _sets(conf / "fsbridge" / "fsbridge-vars.xml")
    assert {k: sets[k] for k in values} == values


@pytest.mark.parametrize("option,value", [
    ("--did", '7495" data="x'), ("--did", "7495 000"), ("--did", "74950000000|1"), ("--gateway", "a/b"),
    ("--fallback", "user/101@${domain_name}"), ("--fallback", 'user/101"/><X-PRE-PROCESS cmd="include'),
])
def test_bad_values_are_refused_and_nothing_written(conf, option, value, capsys):
    before = _snapshot(conf)
    assert cli.main(["install-dialplan", "--conf-dir", str(conf), option, value]) == 2
    assert _snapshot(conf) == before
    assert capsys.readouterr().err.startswith("error: ")


def test_not_a_conf_dir(tmp_path, capsys):
    assert cli.main(["install-dialplan", "--conf-dir", str(tmp_path)]) == 2
    assert "no vars.xml" in capsys.readouterr().err


def test_old_relative_include_is_rewritten(conf):
    public = conf / "dialplan" / "public.xml"
    text = public.read_text()
    public.write_text(text.replace('<context name="public">',
                                   '<context name="public">\n    <X-PRE-PROCESS cmd="include" data="fsbridge/fsbridge-inbound.xml"/>', 1))
    install_dialplan.run(str(conf), out=lambda line: None)
    datas = [e.get("data") for e in _context(public, "public").iter("X-PRE-PROCESS") if "fsbridge" in e.get("data")]
    assert datas == ["$${conf_dir}/fsbridge/fsbridge-inbound.xml"]


def test_commented_out_include_does_not_count_as_installed(conf):
    default = conf / "dialplan" / "default.xml"
    default.write_text(default.read_text().replace(
        '<context name="default">',
        '<context name="default">\n    <!-- old: X-PRE-PROCESS fsbridge/fsbridge-outbound.xml -->', 1))
    install_dialplan.run(str(conf), out=lambda line: None)
    assert re.search(r'^    <X-PRE-PROCESS cmd="include" data="\$\$\{conf_dir\}/fsbridge/fsbridge-outbound.xml"/>$',
                     default.read_text(), flags=re.M)


def test_mod_curl_loaded_is_not_asked_for(conf, capsys):
    modules = conf / "autoload_configs" / "modules.conf.xml"
    modules.write_text(modules.read_text().replace('<!-- <load module="mod_curl"/> -->', '<load module="mod_curl"/>'))
    install_dialplan.run(str(conf))
    assert "load mod_curl" not in capsys.readouterr().out


def test_readme_manual_steps_write_the_same_lines_as_the_command():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    for _, _, name in install_dialplan.TARGETS:
        assert f"`{install_dialplan.include_line(name)}`" in readme, name


# ---- cloud PBX: [tenant.*] sections -------------------------------------------

BETA_CONTEXT = """<include>
  <context name="beta">
    <extension name="beta_local">
      <condition field="destination_number" expression="^(10[12])$">
        <action application="bridge" data="user/$1@beta.example"/>
      </condition>
    </extension>
  </context>
</include>
"""


def _tenant_ini(tmp_path, **overrides: str) -> Path:
    """Two tenants: alpha in the default context, beta in a context of its own.
    overrides: "beta_fallback" -> [tenant.beta] fallback = ..."""
    sections = {
        "alpha": {"token": "alpha-token-0123456789", "domains": "alpha.example", "dids": "74950000010",
                  "fallback": "[leg_timeout=5]user/101,user/102@{domain}"},
        "beta": {"token": "beta-token-0123456789ab", "domains": "beta.example", "dids": "+74950000020 74950000021",
                 "fallback": "user/101|user/102", "context": "beta", "client_caller_id": "74950000029"},
    }
    for key, value in overrides.items():
        tenant, _, name = key.partition("_")
        if value is None:
            sections[tenant].pop(name, None)
        else:
            sections[tenant][name] = value
    text = f"[storage]\ndir = {tmp_path / 'state'}\n[dialplan]\nlisten = 127.0.0.1:18099\n"
    for tenant, values in sections.items():
        text += f"[tenant.{tenant}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
    ini = tmp_path / "tenants.ini"
    ini.write_text(text)
    return ini


def _single_ini(tmp_path) -> Path:
    ini = tmp_path / "single.ini"
    ini.write_text(f"[storage]\ndir = {tmp_path / 'state'}\n")
    return ini


@pytest.fixture
def cloud(conf) -> Path:
    (conf / "dialplan" / "beta.xml").write_text(BETA_CONTEXT)
    return conf


def _ours(path: Path) -> list[str]:
    """The fsbridge files a FreeSWITCH file includes, in order."""
    return re.findall(r'<X-PRE-PROCESS cmd="include" data="\$\$\{conf_dir\}/fsbridge/([^"]+)"/>',
                      install_dialplan._strip_comments(path.read_text()))


def _generated_sets(path: Path) -> list[dict[str, str]]:
    """Per tenant block of a generated file: its set lines."""
    blocks, current = [], {}
    for element in ET.parse(path).getroot():
        if element.get("cmd") == "set":
            name, _, value = element.get("data").partition("=")
            current[name] = value
        elif element.get("cmd") == "include" and current:
            blocks.append(current)
            current = {}
    return blocks


def test_tenants_get_their_own_routes_in_public_and_in_their_contexts(cloud, tmp_path, capsys):
    assert cli.main(["install-dialplan", "--conf-dir", str(cloud), "-c", str(_tenant_ini(tmp_path))]) == 0
    # the one-DID routes are out: a tenant's DID must not meet another tenant's domain or number
    assert _ours(cloud / "dialplan" / "public.xml") == ["fsbridge-tenants-public.xml"]
    assert _ours(cloud / "dialplan" / "default.xml") == ["fsbridge-tenants-default.xml"]
    assert _ours(cloud / "dialplan" / "beta.xml") == ["fsbridge-tenants-beta.xml"]
    first = _context(cloud / "dialplan" / "beta.xml", "beta")[0]
    assert first.get("data") == "$${conf_dir}/fsbridge/fsbridge-tenants-beta.xml"
    generated = cloud / "fsbridge"
    assert _ours(generated / "fsbridge-tenants-public.xml") == [
        "fsbridge-record.xml", "fsbridge-tenant-inbound.xml", "fsbridge-tenant-inbound.xml"]
    assert _generated_sets(generated / "fsbridge-tenants-public.xml") == [
        {"fsbridge_tenant_name": "alpha", "fsbridge_tenant_domain": "alpha.example",
         "fsbridge_tenant_dids": "74950000010",
         "fsbridge_tenant_fallback": "[leg_timeout=5]user/101@alpha.example,user/102@alpha.example",
         "fsbridge_tenant_context": "default"},
        {"fsbridge_tenant_name": "beta", "fsbridge_tenant_domain": "beta.example",
         "fsbridge_tenant_dids": "74950000020|74950000021",
         "fsbridge_tenant_fallback": "user/101@beta.example|user/102@beta.example",
         "fsbridge_tenant_context": "beta"},
    ]
    # caller ID: client_caller_id, else the first DID; each context only its own tenants
    assert _generated_sets(generated / "fsbridge-tenants-default.xml") == [
        {"fsbridge_tenant_name": "alpha", "fsbridge_tenant_domains": r"alpha\.example",
         "fsbridge_tenant_caller_id": "74950000010"}]
    assert _generated_sets(generated / "fsbridge-tenants-beta.xml") == [
        {"fsbridge_tenant_name": "beta", "fsbridge_tenant_domains": r"beta\.example",
         "fsbridge_tenant_caller_id": "74950000029"}]
    assert _sets(generated / "fsbridge-vars.xml")["fsbridge_lookup_url"] == "http://127.0.0.1:18099/dialplan/contact"
    out = capsys.readouterr().out
    assert "user_context" in out and "reloadxml" in out


def test_tenant_install_is_idempotent_backed_up_and_dry_run_writes_nothing(cloud, tmp_path, capsys):
    ini = str(_tenant_ini(tmp_path))
    before = _snapshot(cloud)
    assert cli.main(["install-dialplan", "--conf-dir", str(cloud), "-c", ini, "--dry-run"]) == 0
    assert _snapshot(cloud) == before
    assert f"+++ {cloud / 'fsbridge' / 'fsbridge-tenants-beta.xml'}" in capsys.readouterr().out
    assert cli.main(["install-dialplan", "--conf-dir", str(cloud), "-c", ini]) == 0
    backups = {b.name.split(".fsbridge-bak-")[0] for b in cloud.rglob("*.fsbridge-bak-*")}
    assert backups == {"vars.xml", "public.xml", "default.xml", "beta.xml"}
    after = _snapshot(cloud)
    capsys.readouterr()
    assert cli.main(["install-dialplan", "--conf-dir", str(cloud), "-c", ini]) == 0
    assert _snapshot(cloud) == after
    assert "nothing changed" in capsys.readouterr().out


def test_back_to_one_planfix_puts_the_one_did_routes_back(cloud, tmp_path):
    install_dialplan.run(str(cloud), config_path=str(_tenant_ini(tmp_path)), out=lambda line: None)
    assert install_dialplan.run(str(cloud), config_path=str(_single_ini(tmp_path)), out=lambda line: None) == 0
    assert _ours(cloud / "dialplan" / "public.xml") == ["fsbridge-inbound.xml"]
    assert _ours(cloud / "dialplan" / "default.xml") == ["fsbridge-outbound.xml"]
    assert _ours(cloud / "dialplan" / "beta.xml") == []
    assert (cloud / "dialplan" / "beta.xml").read_text() == BETA_CONTEXT  # line and all


def test_a_context_no_tenant_uses_any_more_loses_its_include(cloud, tmp_path):
    install_dialplan.run(str(cloud), config_path=str(_tenant_ini(tmp_path)), out=lambda line: None)
    install_dialplan.run(str(cloud), config_path=str(_tenant_ini(tmp_path, beta_context="default")),
                         out=lambda line: None)
    assert _ours(cloud / "dialplan" / "beta.xml") == []
    assert [b["fsbridge_tenant_name"] for b in _generated_sets(cloud / "fsbridge" / "fsbridge-tenants-default.xml")] \
        == ["alpha", "beta"]


def test_without_config_a_tenant_install_is_not_undone(cloud, tmp_path, capsys):
    install_dialplan.run(str(cloud), config_path=str(_tenant_ini(tmp_path)), out=lambda line: None)
    before = _snapshot(cloud)
    assert cli.main(["install-dialplan", "--conf-dir", str(cloud)]) == 2
    assert _snapshot(cloud) == before
    assert "pass -c" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,expected", [
    ({"beta_fallback": None}, "[tenant.beta] fallback: its DIDs' inbound route needs"),
    ({"beta_fallback": "user/101@alpha.example"}, "user/101@alpha.example is a phone of another domain"),
    ({"beta_fallback": "user/101@$${domain}"}, "[tenant.beta] fallback: pre-processor variables"),
    ({"beta_fallback": "user/101@${domain_name}"}, "[tenant.beta] fallback: use $${...}"),  # config's own rule
    ({"beta_context": "nowhere"}, 'no <context name="nowhere">'),
    ({"beta_context": "public"}, "[tenant.beta] context: public is the carrier's context"),
    ({"alpha_domains": None}, "[tenant.alpha] domains:"),
    ({"alpha_dids": None, "alpha_domains": "alpha.example"}, "[tenant.alpha] dids: its outbound calls need"),
], ids=["no-fallback", "other-domain", "default-domain", "channel-variable", "no-context", "public-context",
        "no-domain", "no-caller-id"])
def test_unusable_tenant_values_are_named_and_nothing_written(cloud, tmp_path, capsys, overrides, expected):
    before = _snapshot(cloud)
    assert cli.main(["install-dialplan", "--conf-dir", str(cloud), "-c", str(_tenant_ini(tmp_path, **overrides))]) == 2
    assert _snapshot(cloud) == before
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--did", "--fallback"])
def test_did_and_fallback_options_are_refused_with_tenants(cloud, tmp_path, capsys, option):
    value = "74950000001" if option == "--did" else "user/101"
    assert cli.main(["install-dialplan", "--conf-dir", str(cloud), "-c", str(_tenant_ini(tmp_path)),
                     option, value]) == 2
    assert "each tenant's" in capsys.readouterr().err


def test_forced_registration_domain_is_named_as_left_to_do(cloud, tmp_path, capsys):
    profile = cloud / "sip_profiles" / "internal.xml"
    profile.parent.mkdir()
    profile.write_text('<profile name="internal"><settings>\n'
                       '    <param name="force-register-domain" value="$${domain}"/>\n</settings></profile>\n')
    install_dialplan.run(str(cloud), config_path=str(_tenant_ini(tmp_path)))
    assert "force-register-domain" in capsys.readouterr().out


def test_tenants_replace_an_earlier_one_did_install(cloud, tmp_path):
    install_dialplan.run(str(cloud), values={"fsbridge_did": "74950000010"}, out=lambda line: None)
    assert _ours(cloud / "dialplan" / "public.xml") == ["fsbridge-inbound.xml"]
    install_dialplan.run(str(cloud), config_path=str(_tenant_ini(tmp_path)), out=lambda line: None)
    assert _ours(cloud / "dialplan" / "public.xml") == ["fsbridge-tenants-public.xml"]
    assert _ours(cloud / "dialplan" / "default.xml") == ["fsbridge-tenants-default.xml"]
