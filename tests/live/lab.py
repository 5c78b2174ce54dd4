"""A private FreeSWITCH lab for the live suite: its own conf, dirs and ports, loopback only.

Built in a temp dir from a vanilla conf (never the installed conf, which
another lab may be using): `$PREFIX/conf.vanilla` when the shared lab script
saved one, else `$PREFIX/conf`.  The edits mirror ../shared/freeswitch/lab.sh
(127.0.0.1 everywhere, no STUN, no IPv6 or websocket listeners, no example.com
gateway, users 101-103, a gateway `carrier` to a SIPp UAS) but on free ports:
two labs can run on one machine at once.

Cloud PBX labs add FreeSWITCH domains of their own (`add_domain`: users in
``directory/<domain>.xml``, registrations kept in their own domain) and
contexts (`add_context`), the way several PlanFix accounts share one
FreeSWITCH.

fsbridge's dialplan is installed by `fsbridge install-dialplan`, exactly as an
admin would, and FreeSWITCH runs as `freeswitch -nf -nc -nonat -conf ... -log
... -db ... -run ... -recordings ...` in its own process group, so teardown
ends it (and every SIPp) by process id, pass or fail.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIPP_DIR = HERE / "sipp"
REPO = HERE.parent.parent
PREFIX = Path(os.environ.get("FREESWITCH_PREFIX", "/usr/local/freeswitch"))
ESL_PASSWORD = "ClueCon"
USERS = ("101", "102", "103")
USER_PASSWORD = "1234"
DID = "74950000000"
QUEUE_DID = "74950000001"  # answer, callcenter sales@default (ring-all 101-103)
# one mod_callcenter queue per strategy, agents 101-103 at tier positions 1-3
STRATEGY_DIDS = {
    "longest-idle-agent": "74950000004",
    "round-robin": "74950000005",
    "top-down": "74950000006",
}
AGENT_RING = 5  # seconds an agent rings before the queue moves on (leg_timeout of its contact)
VOICEMAIL_DID = "74950000003"  # group 101-103, then voicemail of 101
GROUP_TIMEOUT = 4  # seconds the group rings before voicemail
# Call flows of captures 40-48 (tests/data/esl/README.md); DIDs far from the others' so labs can grow
FORWARD_USER = "104"  # a directory user without a phone: its dial-string forwards every call to a mobile
FORWARD_MOBILE = "79160000104"  # 104's mobile, through the gateway `carrier`
NOANSWER_FORWARD_DID = "74950000041"  # rings 101 NOANSWER_RING s, then 101's mobile (Diversion: 101)
NOANSWER_MOBILE = "79160000101"
NOANSWER_RING = 3
GROUP_PICKUP_DID = "74950000042"  # group 101,102 of the call group "sales"; *80 picks it up
GROUP_PICKUP_CODE = "*80"
PICKUP_GROUP_DID = "74950000047"  # group 101,102 plus pickup/sales (mod_dptools); `pickup sales` on *81 takes it
PICKUP_CODE = "*81"
FIFO_DID = "74950000043"  # the caller waits in mod_fifo's 5900 (the vanilla "park"); an agent dials 5901
FIFO_MEMBERS_DID = "74950000044"  # the caller waits in agents@<domain>; mod_fifo rings 102 and 103 for him (ringall)
LOOPBACK_FORWARD_DID = "74950000046"  # 101 forwarded through loopback/ (the mobile via the default context), tagged
FIFO_ENTERPRISE_DID = "74950000045"  # ... in agents_e@<domain>: mod_fifo rings 102 and 103 for the queue (enterprise)

# mod_json_cdr: a post is retried CDR_RETRIES times CDR_DELAY s apart (covers a restart of fsbridge)
CDR_SECRET = "live-lab-cdr-secret-0123456789"
CDR_RETRIES, CDR_DELAY = 40, 1


def missing() -> str | None:
    """Why the live suite cannot run here, or None."""
    if not (PREFIX / "bin" / "freeswitch").is_file():
        return f"no FreeSWITCH at {PREFIX}/bin/freeswitch (set FREESWITCH_PREFIX)"
    if shutil.which("sipp") is None:
        return "no sipp on PATH (apt-get install sip-tester)"
    if not any((PREFIX / d / "vars.xml").is_file() for d in ("conf.vanilla", "conf")):
        return f"no FreeSWITCH conf at {PREFIX}/conf"
    return None


def free_udp_port() -> int:
    """A port free for UDP and TCP on 127.0.0.1 now."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def stable_port() -> int:
    """A TCP port free on 127.0.0.1 now and below the ephemeral range (32768+):
    for a listener that must get its port back after a restart (mod_json_cdr's
    url, recording links).  A port from ``bind(0)`` is an ephemeral one: while
    its server is down any outgoing connection on the machine may take it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) \
        if Path("/proc/sys/net/ipv4/ip_local_port_range").is_file() else 32768
    for _ in range(200):
        port = random.randrange(20000, min(low, 32768))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range")


def rtp_range(size: int = 200) -> int:
    """A random RTP range above the usual ephemeral ports (61000+) and away from
    FreeSWITCH's default 16384-32768 that another lab uses."""
    return 61000 + random.randrange(0, (64000 - 61000) // size) * size


def _sub(path: Path, pattern: str, repl: str, count: int = 0, required: bool = True) -> None:
    text = path.read_text()
    new, n = re.subn(pattern, repl, text, count=count)
    if required and not n:
        raise RuntimeError(f"{path}: {pattern!r} not found")
    path.write_text(new)


class Lab:
    def __init__(self, root: Path, recordings: Path | None = None) -> None:
        self.root = Path(root)
        self.conf = self.root / "conf"
        self.dirs = {name: self.root / name for name in ("log", "db", "run", "recordings", "temp", "cache", "storage", "certs")}
        if recordings is not None:  # record_queues: the recording paths the repo's captures name
            self.dirs["recordings"] = Path(recordings)
        self.sip_port = free_udp_port()  # internal profile: the phones
        self.ext_port = free_udp_port()  # external profile: the carrier
        self.esl_port = free_udp_port()
        self.carrier_port = free_udp_port()
        self.rtp_start = rtp_range()
        self.proc: subprocess.Popen | None = None
        self.sipps: list[subprocess.Popen] = []

    # ---- conf -------------------------------------------------------------

    def build_conf(self) -> None:
        source = PREFIX / "conf.vanilla" if (PREFIX / "conf.vanilla" / "vars.xml").is_file() else PREFIX / "conf"
        shutil.copytree(source, self.conf, symlinks=True)
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        c = self.conf
        v = c / "vars.xml"
        _sub(v, r'(<X-PRE-PROCESS cmd="set" data="default_password=[^"]*"/>)',
             r'<X-PRE-PROCESS cmd="set" data="local_ip_v4=127.0.0.1"/>\n  \1', count=1)
        # with the vanilla 1234 the default context's "global" extension sleeps 10 s per call
        _sub(v, r'data="default_password=[^"]*"', 'data="default_password=live-lab-4321"')
        _sub(v, r'cmd="stun-set" data="external_rtp_ip=[^"]*"', 'cmd="set" data="external_rtp_ip=127.0.0.1"')
        _sub(v, r'cmd="stun-set" data="external_sip_ip=[^"]*"', 'cmd="set" data="external_sip_ip=127.0.0.1"')
        _sub(v, r'data="bind_server_ip=auto"', 'data="bind_server_ip=127.0.0.1"', required=False)
        _sub(v, r'data="internal_sip_port=\d+"', f'data="internal_sip_port={self.sip_port}"')
        _sub(v, r'data="external_sip_port=\d+"', f'data="external_sip_port={self.ext_port}"')
        _sub(v, r'data="internal_tls_port=\d+"', f'data="internal_tls_port={self.sip_port + 1}"', required=False)
        _sub(v, r'data="external_tls_port=\d+"', f'data="external_tls_port={self.ext_port + 1}"', required=False)
        for f in ("directory/default/example.com.xml", "dialplan/default/01_example.com.xml",
                  "sip_profiles/internal-ipv6.xml", "sip_profiles/external-ipv6.xml",
                  "sip_profiles/external/example.xml"):
            (c / f).unlink(missing_ok=True)
        # websocket listeners would take the fixed ports 5066/7443 of another lab
        _sub(c / "sip_profiles/internal.xml", r'\s*<param name="wss?-binding"[^>]*/>', "", required=False)
        es = c / "autoload_configs/event_socket.conf.xml"
        _sub(es, r'<param name="listen-ip" value="[^"]*"/>', '<param name="listen-ip" value="127.0.0.1"/>')
        _sub(es, r'<param name="listen-port" value="[^"]*"/>', f'<param name="listen-port" value="{self.esl_port}"/>')
        _sub(es, r'<param name="password" value="[^"]*"/>', f'<param name="password" value="{ESL_PASSWORD}"/>')
        # voicemail messages where fsbridge may link them: under the recordings dir
        _sub(c / "autoload_configs/voicemail.conf.xml", r'<!--<param name="storage-dir" value="[^"]*"/>-->',
             f'<param name="storage-dir" value="{self.dirs["recordings"] / "voicemail"}"/>', count=1)
        sw = c / "autoload_configs/switch.conf.xml"
        _sub(sw, r'<!-- <param name="rtp-start-port" value="\d+"/> -->', f'<param name="rtp-start-port" value="{self.rtp_start}"/>')
        _sub(sw, r'<!-- <param name="rtp-end-port" value="\d+"/> -->', f'<param name="rtp-end-port" value="{self.rtp_start + 198}"/>')  # even: FS warns on an odd end
        for u in USERS:
            (c / f"directory/default/{u}.xml").write_text(f"""<include>
  <user id="{u}">
    <params>
      <param name="password" value="{USER_PASSWORD}"/>
      <param name="vm-password" value="{u}"/>
    </params>
    <variables>
      <variable name="toll_allow" value="domestic,international,local"/>
      <variable name="accountcode" value="{u}"/>
      <variable name="user_context" value="default"/>
      <variable name="effective_caller_id_name" value="Manager {u}"/>
      <variable name="effective_caller_id_number" value="{u}"/>
    </variables>
  </user>
</include>
""")
        (c / "sip_profiles/external/carrier.xml").write_text(f"""<include>
  <gateway name="carrier">
    <param name="proxy" value="127.0.0.1:{self.carrier_port}"/>
    <param name="realm" value="127.0.0.1:{self.carrier_port}"/>
    <param name="username" value="{DID}"/>
    <param name="password" value="unused"/>
    <param name="register" value="false"/>
    <param name="caller-id-in-from" value="true"/>
  </gateway>
</include>
""")
        # the target of a blind transfer: extensions 101..103 in the default context
        (c / "dialplan/default/00_live_local.xml").write_text("""<include>
  <extension name="live_local_10x">
    <condition field="destination_number" expression="^(10[1-3])$">
      <action application="set" data="call_timeout=15"/>
      <action application="set" data="hangup_after_bridge=true"/>
      <action application="bridge" data="user/$1@$${domain}"/>
    </condition>
  </extension>
  <!-- pickup of one ringing leg: a phone dials **<uuid of the leg> (capture 22) -->
  <extension name="live_intercept_uuid">
    <condition field="destination_number" expression="^\\*\\*([0-9a-f-]{36})$">
      <action application="answer"/>
      <action application="intercept" data="-bleg $1"/>
    </condition>
  </extension>
</include>
""")
        # lab-only DIDs of the call flows beyond the spec (README of tests/data/esl, captures 23, 25);
        # "zz_" sorts after fsbridge's files so that fsbridge_record (continue="true") runs first
        strategy_extensions = "\n".join(f"""  <extension name="live_queue_{strategy}">
    <condition field="destination_number" expression="^{did}$">
      <action application="answer"/>
      <action application="callcenter" data="{strategy}@default"/>
    </condition>
  </extension>""" for strategy, did in STRATEGY_DIDS.items())
        (c / "dialplan/public/zz_live_flows.xml").write_text(f"""<include>
  <extension name="live_queue">
    <condition field="destination_number" expression="^{QUEUE_DID}$">
      <action application="answer"/>
      <action application="callcenter" data="sales@default"/>
    </condition>
  </extension>
{strategy_extensions}
  <extension name="live_group_then_voicemail">
    <condition field="destination_number" expression="^{VOICEMAIL_DID}$">
      <action application="set" data="call_timeout={GROUP_TIMEOUT}"/>
      <action application="set" data="continue_on_fail=true"/>
      <action application="set" data="hangup_after_bridge=true"/>
      <action application="bridge" data="user/101@$${{domain}},user/102@$${{domain}},user/103@$${{domain}}"/>
      <action application="answer"/>
      <!-- the lab has no sound files: a failing greeting would end voicemail before the beep -->
      <action application="set" data="skip_greeting=true"/>
      <action application="set" data="skip_instructions=true"/>
      <action application="voicemail" data="default $${{domain}} 101"/>
    </condition>
  </extension>
</include>
""")
        # a ring-all queue of 101-103 and one queue per other strategy, 101-103 in that order;
        # no wrap-up or delays: the next test's call must find them free
        agents = "\n".join(
            f'    <agent name="{u}@default" type="callback" contact="[leg_timeout={AGENT_RING}]user/{u}@127.0.0.1" status="Available"'
            ' max-no-answer="0" wrap-up-time="0" reject-delay-time="0" busy-delay-time="0" no-answer-delay-time="0"/>'
            for u in USERS)
        tiers = "\n".join(f'    <tier agent="{u}@default" queue="sales@default" level="1" position="1"/>' for u in USERS)
        tiers += "".join(f'\n    <tier agent="{u}@default" queue="{strategy}@default" level="1" position="{n}"/>'
                         for strategy in STRATEGY_DIDS for n, u in enumerate(USERS, 1))
        queues = "\n".join(f"""    <queue name="{name}@default">
      <param name="strategy" value="{strategy}"/>
      <param name="moh-sound" value="silence_stream://-1"/>
      <param name="time-base-score" value="system"/>
      <param name="max-wait-time" value="0"/>
      <param name="max-wait-time-with-no-agent" value="0"/>
      <param name="tier-rules-apply" value="false"/>
      <param name="discard-abandoned-after" value="60"/>
      <param name="abandoned-resume-allowed" value="false"/>
    </queue>""" for name, strategy in [("sales", "ring-all"), *((s, s) for s in STRATEGY_DIDS)])
        (c / "autoload_configs/callcenter.conf.xml").write_text(f"""<configuration name="callcenter.conf" description="CallCenter">
  <settings/>
  <queues>
{queues}
  </queues>
  <agents>
{agents}
  </agents>
  <tiers>
{tiers}
  </tiers>
</configuration>
""")

    def add_forward_pickup_fifo_flows(self) -> None:
        """Forwarding to a mobile, group pickup and mod_fifo (captures 40-48): a user, DIDs, codes, FIFOs.

        As an admin configures them: unconditional forwarding is the user's
        own `dial-string` (every `user/104` is the mobile; FreeSWITCH still
        tags the leg `dialed_user=104`); forwarding on no answer is a second
        bridge that names the extension in the Diversion header the carrier
        gets (RFC 5806), or our tag on a `loopback/` leg; group pickup is the
        vanilla `*8` (intercept of the call group's last call,
        `hash .../last_dial/<group>`) for the group "sales", or mod_dptools
        `pickup` of `pickup/sales`; the FIFOs are the vanilla park/unpark
        pair 5900/5901 and two with outbound members (ringall, enterprise).
        A phone's own forwarding (302, capture 48) needs nothing here.
        """
        c = self.conf
        (c / f"directory/default/{FORWARD_USER}.xml").write_text(f"""<include>
  <user id="{FORWARD_USER}">
    <params>
      <param name="password" value="{USER_PASSWORD}"/>
      <!-- forwards every call: user/{FORWARD_USER} rings the mobile, never a phone -->
      <param name="dial-string" value="sofia/gateway/carrier/{FORWARD_MOBILE}"/>
    </params>
    <variables>
      <variable name="user_context" value="default"/>
      <variable name="effective_caller_id_name" value="Manager {FORWARD_USER}"/>
      <variable name="effective_caller_id_number" value="{FORWARD_USER}"/>
    </variables>
  </user>
</include>
""")
        (c / "dialplan/public/zz_live_flows_40.xml").write_text(f"""<include>
  <extension name="live_forward_on_no_answer">
    <condition field="destination_number" expression="^{NOANSWER_FORWARD_DID}$">
      <action application="set" data="domain_name=$${{domain}}"/>
      <action application="set" data="continue_on_fail=true"/>
      <action application="set" data="hangup_after_bridge=true"/>
      <action application="bridge" data="[leg_timeout={NOANSWER_RING}]user/101@$${{domain}}"/>
      <action application="bridge" data="{{sip_h_Diversion=&lt;sip:101@$${{domain}}&gt;;reason=no-answer}}sofia/gateway/carrier/{NOANSWER_MOBILE}"/>
    </condition>
  </extension>
  <extension name="live_forward_loopback">
    <condition field="destination_number" expression="^{LOOPBACK_FORWARD_DID}$">
      <action application="set" data="domain_name=$${{domain}}"/>
      <action application="set" data="hangup_after_bridge=true"/>
      <!-- loopback/ legs bridge on early media otherwise (before the mobile answered) -->
      <action application="set" data="ignore_early_media=true"/>
      <!-- the mobile through the phones' outbound route; our tag names whose forward it is -->
      <action application="bridge" data="{{fsbridge_forwarded_from=101}}loopback/{NOANSWER_MOBILE}/default"/>
    </condition>
  </extension>
  <extension name="live_group_sales">
    <condition field="destination_number" expression="^{GROUP_PICKUP_DID}$">
      <action application="set" data="domain_name=$${{domain}}"/>
      <action application="set" data="call_timeout=20"/>
      <action application="set" data="hangup_after_bridge=true"/>
      <!-- what vanilla Local_Extension does for the callee's call group -->
      <action application="hash" data="insert/$${{domain}}-last_dial/sales/${{uuid}}"/>
      <action application="bridge" data="user/101@$${{domain}},user/102@$${{domain}}"/>
    </condition>
  </extension>
  <extension name="live_group_pickup_endpoint">
    <condition field="destination_number" expression="^{PICKUP_GROUP_DID}$">
      <action application="set" data="domain_name=$${{domain}}"/>
      <action application="set" data="call_timeout=20"/>
      <action application="set" data="hangup_after_bridge=true"/>
      <action application="set" data="ignore_early_media=true"/>
      <action application="bridge" data="user/101@$${{domain}},user/102@$${{domain}},pickup/sales@$${{domain}}"/>
    </condition>
  </extension>
  <extension name="live_fifo_park">
    <condition field="destination_number" expression="^{FIFO_DID}$">
      <action application="set" data="domain_name=$${{domain}}"/>
      <!-- the lab has no sound files -->
      <action application="set" data="fifo_music=silence_stream://-1"/>
      <action application="fifo" data="5900@$${{domain}} in"/>
    </condition>
  </extension>
  <extension name="live_fifo_members">
    <condition field="destination_number" expression="^{FIFO_MEMBERS_DID}$">
      <action application="set" data="domain_name=$${{domain}}"/>
      <action application="set" data="fifo_music=silence_stream://-1"/>
      <action application="fifo" data="agents@$${{domain}} in"/>
    </condition>
  </extension>
  <extension name="live_fifo_members_enterprise">
    <condition field="destination_number" expression="^{FIFO_ENTERPRISE_DID}$">
      <action application="set" data="domain_name=$${{domain}}"/>
      <action application="set" data="fifo_music=silence_stream://-1"/>
      <action application="fifo" data="agents_e@$${{domain}} in"/>
    </condition>
  </extension>
</include>
""")
        # FIFOs with outbound members: mod_fifo rings them while a caller waits; ringall
        # picks the caller first (fifo_bridge_uuid), enterprise when a member answers
        members = "\n".join(
            f'      <member timeout="10" simo="1" lag="1">{{fifo_member_wait=nowait}}user/{u}@$${{domain}}</member>'
            for u in ("102", "103"))
        (c / "autoload_configs/fifo.conf.xml").write_text(f"""<configuration name="fifo.conf" description="FIFO Configuration">
  <settings>
    <param name="delete-all-outbound-member-on-startup" value="true"/>
  </settings>
  <fifos>
    <fifo name="cool_fifo@$${{domain}}" importance="0"/>
    <fifo name="agents@$${{domain}}" importance="0" outbound_strategy="ringall" outbound_per_cycle="2">
{members}
    </fifo>
    <fifo name="agents_e@$${{domain}}" importance="0" outbound_strategy="enterprise" outbound_per_cycle_min="2">
{members}
    </fifo>
  </fifos>
</configuration>
""")
        (c / "dialplan/default/00_live_local_40.xml").write_text("""<include>
  <!-- vanilla group-intercept (*8) for the call group "sales" -->
  <extension name="live_group_intercept_sales">
    <condition field="destination_number" expression="^\\*80$">
      <action application="answer"/>
      <action application="intercept" data="${hash(select/$${domain}-last_dial/sales)}"/>
      <action application="sleep" data="2000"/>
    </condition>
  </extension>
  <!-- a FIFO consumer off-hook: his one call serves caller after caller of 5900 -->
  <extension name="live_fifo_consumer_wait">
    <condition field="destination_number" expression="^5902$">
      <action application="answer"/>
      <action application="set" data="fifo_music=silence_stream://-1"/>
      <action application="fifo" data="5900@$${domain} out wait"/>
    </condition>
  </extension>
  <!-- mod_dptools group pickup: takes the call ringing pickup/sales@<domain> -->
  <extension name="live_pickup_sales">
    <condition field="destination_number" expression="^\\*81$">
      <action application="pickup" data="sales@$${domain}"/>
    </condition>
  </extension>
</include>
""")

    def add_domain(self, domain: str, users: tuple[str, ...], context: str) -> None:
        """A FreeSWITCH domain with its own users (the same numbers may exist in
        another domain: other phones), whose outbound calls run in ``context``."""
        # vanilla forces every registration into $${domain}: user/101@<domain> would find no phone
        for param in ("force-register-domain", "force-subscription-domain", "force-register-db-domain"):
            _sub(self.conf / "sip_profiles/internal.xml", rf'\s*<param name="{param}" value="[^"]*"/>', "",
                 required=False)
        entries = "".join(f"""
          <user id="{u}">
            <params>
              <param name="password" value="{USER_PASSWORD}"/>
            </params>
            <variables>
              <variable name="user_context" value="{context}"/>
              <variable name="effective_caller_id_name" value="{domain} {u}"/>
              <variable name="effective_caller_id_number" value="{u}"/>
            </variables>
          </user>""" for u in users)
        # the dial string of vanilla's default domain: sofia_contact finds the phone registered in this domain
        (self.conf / f"directory/{domain}.xml").write_text(f"""<include>
  <domain name="{domain}">
    <params>
      <param name="dial-string" value="{{^^:sip_invite_domain=${{dialed_domain}}:presence_id=${{dialed_user}}@${{dialed_domain}}}}${{sofia_contact(*/${{dialed_user}}@${{dialed_domain}})}}"/>
    </params>
    <groups>
      <group name="default">
        <users>{entries}
        </users>
      </group>
    </groups>
  </domain>
</include>
""")

    def add_context(self, name: str, domain: str) -> None:
        """A dialplan context of its own (``dialplan/<name>.xml``): transfers to
        10x ring that extension of ``domain``; install-dialplan adds the rest."""
        (self.conf / f"dialplan/{name}.xml").write_text(f"""<include>
  <context name="{name}">
    <extension name="{name}_local_10x">
      <condition field="destination_number" expression="^(10[1-9])$">
        <action application="set" data="call_timeout=15"/>
        <action application="set" data="hangup_after_bridge=true"/>
        <action application="bridge" data="user/$1@{domain}"/>
      </condition>
    </extension>
  </context>
</include>
""")

    def json_cdr(self, url: str, secret: str, *, retries: int = CDR_RETRIES, delay: int = CDR_DELAY) -> Path:
        """mod_json_cdr posting every finished channel to fsbridge's ``/cdr``, as the
        repo's conf/json_cdr.conf.xml says (encode=false), with the B legs too
        (log-b-leg=true) and a copy of each CDR on disk (the returned dir) for the
        tests to read.  ``retries`` x ``delay`` covers a short fsbridge outage.
        Call before ``start``."""
        example = (REPO / "conf" / "json_cdr.conf.xml").read_text()
        cdr_dir = self.dirs["log"] / "json_cdr"
        cdr_dir.mkdir(parents=True, exist_ok=True)
        params = {"url": url, "cred": f"fsbridge:{secret}", "retries": str(retries), "delay": str(delay),
                  "log-b-leg": "true", "log-http-and-disk": "true", "log-dir": str(cdr_dir),
                  "err-log-dir": str(self.dirs["log"] / "json_cdr_spool")}
        for name, value in params.items():
            example = re.sub(rf'<param name="{name}" value="[^"]*"/>', f'<param name="{name}" value="{value}"/>',
                             example, count=1)
            if f'<param name="{name}" value="{value}"/>' not in example:
                raise RuntimeError(f"conf/json_cdr.conf.xml: no param {name}")
        (self.conf / "autoload_configs" / "json_cdr.conf.xml").write_text(example)
        _sub(self.conf / "autoload_configs/modules.conf.xml", r'(\s*<load module="mod_event_socket"/>)',
             r'\1\n    <load module="mod_json_cdr"/>', count=1)
        return cdr_dir

    def cdrs(self) -> dict[str, dict]:
        """The CDRs mod_json_cdr wrote so far (log-http-and-disk): channel uuid -> document."""
        out = {}
        for path in sorted((self.dirs["log"] / "json_cdr").glob("*.cdr.json")):
            try:
                doc = json.loads(path.read_text())
            except ValueError:
                continue  # being written
            out[path.name.split(".")[0].removeprefix("a_").removeprefix("b_")] = doc
        return out

    def install_dialplan(self, fsbridge_config: Path, *, fallback: str | None, responsible_ring: int,
                         did: str | None = DID) -> str:
        """`fsbridge install-dialplan -c`; no did/fallback: the config's [tenant.*] give them."""
        options = [*(("--did", did) if did else ()), *(("--fallback", fallback) if fallback else ())]
        out = subprocess.run(
            [sys.executable, "-m", "fsbridge", "install-dialplan", "--conf-dir", str(self.conf),
             "-c", str(fsbridge_config), "--gateway", "carrier", *options],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"install-dialplan failed: {out.stdout}{out.stderr}")
        # ring times have no option: edit them as an admin would
        _sub(self.conf / "fsbridge/fsbridge-vars.xml", r'data="fsbridge_responsible_ring=\d+"',
             f'data="fsbridge_responsible_ring={responsible_ring}"')
        _sub(self.conf / "fsbridge/fsbridge-vars.xml", r'data="fsbridge_outbound_ring=\d+"',
             'data="fsbridge_outbound_ring=6"')
        return out.stdout

    # ---- FreeSWITCH -------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.dirs["log"] / "freeswitch.log"

    def start(self, wait: float = 60.0) -> None:
        args = [str(PREFIX / "bin" / "freeswitch"), "-nf", "-nc", "-nonat", "-conf", str(self.conf)]
        for name, d in self.dirs.items():
            args += [f"-{name}", str(d)]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=open(self.root / "freeswitch.out", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"freeswitch exited {self.proc.returncode}: {self.tail()}")
            if "is ready" in self.cli("status", timeout=3):
                return
            time.sleep(0.5)
        raise RuntimeError(f"freeswitch not ready in {wait}s: {self.tail()}")

    def cli(self, command: str, timeout: float = 10) -> str:
        try:
            out = subprocess.run([str(PREFIX / "bin" / "fs_cli"), "-H", "127.0.0.1", "-P", str(self.esl_port),
                                  "-p", ESL_PASSWORD, "-x", command], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return ""
        return out.stdout

    def stop(self) -> None:
        for p in self.sipps:
            _end(p)
        self.sipps.clear()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.cli("fsctl shutdown", timeout=5)
            _end(self.proc, grace=15)
            self.proc = None

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def log_problems(self, since: int = 0, until: int | None = None) -> list[str]:
        """[WARNING]/[ERR]/[CRIT] lines of freeswitch.log from byte offset `since` (to `until`)."""
        text = self.log_path.read_bytes()[since:until].decode(errors="replace")
        return [line for line in text.splitlines() if re.search(r"\[(WARNING|ERR|CRIT|ALERT)\]", line)]

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    # ---- SIPp ---------------------------------------------------------------

    def sipp(self, scenario: str, *args: str, port: int, target: str = "internal", cwd: Path | None = None,
             timeout_s: int = 60, domain: str = "127.0.0.1") -> subprocess.Popen:
        """SIPp against a profile; ``domain``: [domain] of the scenario (a phone's SIP domain)."""
        remote = self.sip_port if target == "internal" else self.ext_port
        workdir = cwd or (self.root / "sipp" / f"{scenario}-{port}-{time.monotonic_ns()}")
        workdir.mkdir(parents=True, exist_ok=True)
        cmd = ["sipp", f"127.0.0.1:{remote}", "-sf", str(SIPP_DIR / f"{scenario}.xml"), "-i", "127.0.0.1",
               "-p", str(port), "-nostdin", "-timeout", f"{timeout_s}", "-timeout_error", "-trace_msg",
               "-trace_err", "-mp", str(free_udp_port()), "-key", "domain", domain, *args]
        proc = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        proc.workdir = workdir  # type: ignore[attr-defined]
        self.sipps.append(proc)
        return proc

    def register(self, user: str, port: int, domain: str = "127.0.0.1") -> None:
        proc = self.sipp("register", "-s", user, "-au", user, "-ap", USER_PASSWORD, "-m", "1", port=port, timeout_s=10,
                         domain=domain)
        if proc.wait(15) != 0:
            raise RuntimeError(f"REGISTER {user}@{domain} from port {port} failed: {messages(proc)[-2000:]}")


def messages(proc: subprocess.Popen) -> str:
    """What a SIPp process sent and received (its -trace_msg log)."""
    return "".join(p.read_text(errors="replace") for p in sorted(proc.workdir.glob("*_messages.log")))  # type: ignore[attr-defined]


def _end(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """End a process we started, and its process group, by id."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)


if __name__ == "__main__":
    # `python -m tests.live.lab`: the one-line preflight of `make live-test`.
    why = missing()
    print(f"live tests skipped: {why}" if why else "live tests: FreeSWITCH and sipp found")
    sys.exit(3 if why else 0)
