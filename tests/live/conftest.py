"""The live suite's lab: a real FreeSWITCH, SIPp phones and carrier, the real fsbridge process.

Not part of plain `make test` (collected only when `FSBRIDGE_LIVE=1`, which
`make live-test` sets, or when tests/live is named on the command line).
Without FreeSWITCH or sipp the whole suite is skipped with one line.

One lab per session (FreeSWITCH takes ~6 s to start): a temp dir with its own
conf (vanilla + loopback edits + `fsbridge install-dialplan`), free ports,
FreeSWITCH, three registered phones (101-103), the fake PlanFix in this
process and `fsbridge run` as a child process.  Teardown ends every process
it started, by id, pass or fail.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from fsbridge.fakes.planfix import FakePlanfix
from tests.live import lab as lab_mod
from tests.service_proc import ServiceProcess

FIGURES: list[str] = []  # measurements reported at the end (never asserted tightly)
# A fallback of two phones, short rings: the suite must stay quick.
FALLBACK = "[leg_timeout=5]user/101@$${domain},[leg_timeout=5]user/103@$${domain}"
RESPONSIBLE_RING = 4


_NUMBERS = itertools.count(random.randrange(1_000_000, 8_000_000))


def pytest_ignore_collect(collection_path, config):
    here = Path(__file__).resolve().parent
    if os.environ.get("FSBRIDGE_LIVE") == "1":
        return None
    named = any(str(Path(a.split("::")[0]).resolve()).startswith(str(here)) for a in config.args)
    return None if named else True


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.write_sep("-", "live figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


class Env:
    """Everything a live test talks to."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lab = lab_mod.Lab(root / "fs")
        self.planfix = FakePlanfix()
        self.service: ServiceProcess | None = None
        self.phone_ports = {u: lab_mod.free_udp_port() for u in lab_mod.USERS}
        self.install_output = ""
        self.log_offset_after_start = 0

    def start(self) -> None:
        self.planfix.start()
        self.lab.build_conf()
        self.lab.add_forward_pickup_fifo_flows()
        self.service = ServiceProcess(
            self.root / "svc",
            fs_port=self.lab.esl_port,
            planfix_url=self.planfix.url,
            planfix_token=self.planfix.token,
            settings={
                "recordings": {"dir": str(self.lab.dirs["recordings"]), "freeswitch_dir": str(self.lab.dirs["recordings"])},
                "click_to_call": {"timeout": "6"},
                "log": {"level": "INFO"},
                # mod_json_cdr posts here (lab.json_cdr); a call waits this long for its CDR
                "cdr": {"secret": lab_mod.CDR_SECRET, "wait": "60"},
            },
        )
        pin_ports(self.service)
        self.cdr_dir = self.lab.json_cdr(self.service.dialplan_url + "/cdr", lab_mod.CDR_SECRET)
        self.install_output = self.lab.install_dialplan(self.service.config_path, fallback=FALLBACK,
                                                         responsible_ring=RESPONSIBLE_RING)
        self.lab.start()
        self.service.start()
        self.service.wait_health(lambda h: h["freeswitch"]["state"] == "connected", timeout=20)
        for user, port in self.phone_ports.items():
            self.lab.register(user, port)
        # the end of what loading the conf logged, before any test's call
        self.log_offset_after_start = self.lab.log_size()

    def stop(self) -> None:
        if self.service is not None:
            self.service.__exit__(None, None, None)
        self.lab.stop()
        self.planfix.stop()


def pin_ports(service: ServiceProcess) -> None:
    """The service's listeners on ports it gets back after a restart (tests restart
    it mid-call: mod_json_cdr keeps posting to the same url, PlanFix keeps the links)."""
    text = service.config_path.read_text()  # edited in place: keeps whatever else it says ([tenant.*])
    for attr, section, key in (("port", "server", "listen"), ("dialplan_port", "dialplan", "listen"),
                               ("metrics_port", "metrics", "listen")):
        old, new = getattr(service, attr), lab_mod.stable_port()
        text = text.replace(f"127.0.0.1:{old}\n", f"127.0.0.1:{new}\n")
        setattr(service, attr, new)
        service.sections[section][key] = f"127.0.0.1:{new}"
    service.sections["server"]["public_url"] = service.url
    service.config_path.write_text(text)



def started(make, prefix: str):
    """A lab environment (``make(root)``) in its own temp dir, started; stopped and
    removed (unless FSBRIDGE_LIVE_KEEP=1) after, pass or fail.  A generator for fixtures."""
    if lab_mod.missing():
        pytest.skip(lab_mod.missing())
    root = Path(tempfile.mkdtemp(prefix=prefix))
    environment = make(root)
    try:
        environment.start()
        yield environment
    finally:
        environment.stop()
        if os.environ.get("FSBRIDGE_LIVE_KEEP") != "1":
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def env():
    yield from started(Env, "fsbridge-live-")


@pytest.fixture
def live(env):
    """Per test: a clean PlanFix log; every SIPp the test started is ended after it."""
    env.planfix.clear()
    env.planfix.delay = 0.0
    env.planfix.contacts.clear()
    # numbers no earlier test used: fsbridge's lookup caches PlanFix's answers
    n = next(_NUMBERS)
    env.client, env.other = f"7910{n:07d}", f"7495{n:07d}"
    yield env
    for proc in env.lab.sipps:
        lab_mod._end(proc)
    env.lab.sipps.clear()
    # let FreeSWITCH finish the call's hangup before the next test's phones bind
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "0 total" not in env.lab.cli("show calls count"):
        time.sleep(0.2)
    env.planfix.assert_no_violations()
