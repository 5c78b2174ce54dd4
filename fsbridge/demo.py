"""`fsbridge demo`: the real service between a fake FreeSWITCH and a fake PlanFix.

A newcomer sees fsbridge work before wiring anything: this starts the real
service (``python -m fsbridge run -c <temp config>``, its own process), the
built-in fake FreeSWITCH (fsbridge.fakes.freeswitch) and the built-in fake
PlanFix (fsbridge.fakes.planfix, with one contact: the demo client), then
plays four real FreeSWITCH captures shipped in fsbridge/fakes/captures:

1. a known client calls and reaches their responsible manager (01),
2. a call rings a group of three phones, 102 picks up (02),
3. a client gives up before anyone answers: a missed call (04a),
4. click-to-call: a real ``POST /planfix makeCall``; the fake FreeSWITCH
   answers our originate with capture 06a rewritten for it.

Before each inbound call it asks the lookup listener what the dialplan
would (``GET /dialplan/contact``).  Every PlanFix request is printed as it
arrives.  Everything stops at the end, on an error and on Ctrl-C; the temp
directory (config, state, service log) is removed.  Nothing needs root,
FreeSWITCH or PlanFix: all sockets are on 127.0.0.1, ephemeral ports.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

import gevent
import requests

from fsbridge.fakes.clicktocall import originate_answer
from fsbridge.fakes.freeswitch import CAPTURES, FakeFreeSwitch, read_trace, trace_events
from fsbridge.fakes.planfix import FakePlanfix
from fsbridge.core.wire import parse_event_plain

CLIENT = "79101234567"  # the caller in every capture
CLIENT_NAME = "Ivan Petrov"
MANAGER = "101"  # the client's responsible manager in the fake PlanFix
DEMO_TOKEN = "demo-pbx-token-0123456789abcdef"
# Where the captured FreeSWITCH recorded (record_session in the captures' dialplan).
FS_RECORDINGS = "/usr/local/freeswitch/recordings"
CALL_TIMEOUT = 20.0  # seconds to wait for one call's COMPLETED


@dataclass(frozen=True)
class Scene:
    title: str
    capture: str  # file name under CAPTURES; "" = click-to-call
    recorded: bool


SCENES = [
    Scene("A known client calls: the call rings their responsible manager 101 first",
          "01-inbound-single-answer.plain.txt.gz", True),
    Scene("A call rings the group 101, 102, 103; 102 picks up",
          "02-inbound-ring-group.plain.txt.gz", True),
    Scene("The client gives up while the group rings: a missed call",
          "04a-inbound-missed-caller-cancel.plain.txt.gz", False),
    Scene(f"Click-to-call: PlanFix asks for a call from {MANAGER} to {CLIENT}",
          "06a-click-to-call-answer.plain.txt.gz", True),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def inbound_callid(capture: Path) -> str:
    """The A leg's UUID (PlanFix's callid) of an inbound capture."""
    for event in trace_events(capture):
        if event.name == "CHANNEL_CREATE":
            headers, _ = parse_event_plain(event.body)
            if headers.get("Call-Direction") == "inbound":
                return headers.get("Unique-ID") or ""
    raise ValueError(f"{capture.name}: no inbound CHANNEL_CREATE")


def write_wav(path: Path, seconds: float = 0.5) -> None:
    """A short silent recording where the captured call would have recorded."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(b"\0\0" * int(8000 * seconds))


def format_request(form: dict[str, str]) -> str:
    """One PlanFix request in a line: the command, then its fields (no token)."""
    fields = {k: v for k, v in form.items() if k not in ("cmd", "planfix_token")}
    cmd = form.get("cmd", "?")
    if cmd == "event":
        head = f"event {fields.pop('event', '?'):<9} {fields.pop('type', '?'):<3}"
    else:
        head = cmd
    callid = fields.pop("callid", "")
    link = fields.pop("record_link", "")
    parts = [f"{k}={v}" for k, v in fields.items()]
    if callid:
        parts.append(f"callid={callid[:8]}…")
    if link:
        parts.append("record_link=" + link.split("/records/", 1)[0] + "/records/…")
    return f"  PlanFix <- {head}  " + " ".join(parts)


class Demo:
    def __init__(self, workdir: Path, out: TextIO) -> None:
        self.workdir = workdir
        self.out = out
        self.recordings = workdir / "recordings"
        self.recordings.mkdir()
        self.port = _free_port()
        self.lookup_port = _free_port()
        self.metrics_port = _free_port()
        self.planfix = FakePlanfix()
        self.fs = FakeFreeSwitch()
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "service.log"
        self._printed = 0

    # -- output ---------------------------------------------------------------

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def print_new_requests(self) -> list[dict[str, str]]:
        new = self.planfix.requests[self._printed:]
        self._printed += len(new)
        for form in new:
            self.say(format_request(form))
        return new

    def wait_completed(self, callid: str, timeout: float = CALL_TIMEOUT) -> None:
        """Print requests as they arrive until ``callid``'s COMPLETED (and its record) arrived."""
        deadline = time.monotonic() + timeout
        done_at = None
        while time.monotonic() < deadline:
            for form in self.print_new_requests():
                if form.get("callid") == callid and form.get("event") == "COMPLETED":
                    done_at = time.monotonic()
            # a moment more: anything that belongs to this call still prints in its scene
            if done_at is not None and time.monotonic() - done_at > 0.5:
                return
            self.check_alive()
            time.sleep(0.02)
        raise DemoError(f"no COMPLETED for call {callid} within {timeout:.0f}s")

    # -- the stack ------------------------------------------------------------

    def config_text(self) -> str:
        return "\n".join([
            "; written by fsbridge demo; removed when it ends",
            "[freeswitch]", "host = 127.0.0.1", f"port = {self.fs.port}", "password = ClueCon",
            "connect_timeout = 1", "max_backoff = 0.5",
            "[server]", f"listen = 127.0.0.1:{self.port}", f"token = {DEMO_TOKEN}",
            f"public_url = http://127.0.0.1:{self.port}",
            "[planfix]", f"url = {self.planfix.url}", f"token = {self.planfix.token}", "allow_http = yes",
            "[outbox]", "min_backoff = 0.05", "max_backoff = 0.5",
            "[storage]", f"dir = {self.workdir / 'state'}",
            "[dialplan]", f"listen = 127.0.0.1:{self.lookup_port}",
            "[metrics]", f"listen = 127.0.0.1:{self.metrics_port}",
            "[recordings]", f"dir = {self.recordings}", f"freeswitch_dir = {FS_RECORDINGS}",
            "[log]", "level = INFO",
            "",
        ])

    def start(self) -> None:
        self.planfix.contacts[CLIENT] = {"contact_name": CLIENT_NAME, "responsible": int(MANAGER)}
        self.planfix.start()
        self.fs.start()
        config = self.workdir / "fsbridge.ini"
        config.write_text(self.config_text())
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fsbridge", "run", "-c", str(config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                # its own process group: Ctrl-C reaches the demo, which stops it in order
                start_new_session=True,
            )
        self.say(f"fsbridge demo: service pid {self.proc.pid} on http://127.0.0.1:{self.port}, "
                 f"lookup on http://127.0.0.1:{self.lookup_port}")
        self.say(f"  fake FreeSWITCH ESL 127.0.0.1:{self.fs.port}, fake PlanFix {self.planfix.url} "
                 f"(contact {CLIENT} = {CLIENT_NAME}, responsible {MANAGER})")
        self.wait_for(self.esl_connected, 30, "the service did not connect to the fake FreeSWITCH")
        self.say("  service is up and connected to FreeSWITCH")

    def esl_connected(self) -> bool:
        self.check_alive()
        try:
            health = requests.get(f"http://127.0.0.1:{self.lookup_port}/healthz", timeout=1).json()
        except (requests.RequestException, ValueError):
            return False
        return health.get("freeswitch", {}).get("state") == "connected"

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise DemoError(what)
            time.sleep(0.05)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DemoError(f"the service exited with code {self.proc.returncode}")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            self.proc = None
        self.fs.stop()
        self.planfix.stop()

    def service_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- the calls ------------------------------------------------------------

    def lookup(self, callid: str) -> None:
        url = f"http://127.0.0.1:{self.lookup_port}/dialplan/contact"
        answer = requests.get(url, params={"phone": CLIENT, "callid": callid}, timeout=5)
        self.print_new_requests()
        self.say(f"  dialplan lookup: GET /dialplan/contact?phone={CLIENT} -> {answer.text.strip()}")

    def inbound(self, scene: Scene) -> None:
        capture = CAPTURES / scene.capture
        callid = inbound_callid(capture)
        self.lookup(callid)
        if scene.recorded:
            write_wav(self.recordings / f"{callid}.wav")
        self.fs.replay(capture).wait(10)
        self.wait_completed(callid)

    def click_to_call(self, scene: Scene) -> None:
        def seen(variables: dict[str, str]) -> None:
            write_wav(self.recordings / f"{variables['origination_uuid']}.wav")

        self.fs.clear_hooks()
        self.fs.on_command("bgapi originate", originate_answer(read_trace(CAPTURES / scene.capture), seen))
        answer = requests.post(f"http://127.0.0.1:{self.port}/planfix", timeout=10, data={
            "cmd": "makeCall", "token": DEMO_TOKEN, "from": MANAGER, "to": "+7 (910) 123-45-67"})
        self.say(f"  POST /planfix cmd=makeCall from={MANAGER} to=+7 (910) 123-45-67 -> "
                 f"{answer.status_code} {answer.text.strip()}")
        if answer.status_code != 200:
            raise DemoError("makeCall was refused")
        self.wait_completed(answer.json()["callid"])

    def run(self) -> None:
        self.start()
        for number, scene in enumerate(SCENES, 1):
            self.say()
            self.say(f"{number}. {scene.title}")
            if scene.capture.startswith("06"):
                self.click_to_call(scene)
            else:
                self.inbound(scene)
        self.say()
        self.say(f"{len(self.planfix.requests)} PlanFix requests, "
                 f"{len(self.planfix.violations)} breaking the telephony API spec.")


class DemoError(Exception):
    pass


def interrupt_on_signals() -> Callable[[], None]:
    """SIGINT (Ctrl-C) and SIGTERM raise KeyboardInterrupt in the calling (main) greenlet, once.

    The demo runs under gevent's patching (``fsbridge.cli``), so the fakes'
    threads are greenlets.  A Python signal handler runs in whichever greenlet
    is running when the signal lands: often a fake's server thread, whose
    thread machinery printed the KeyboardInterrupt and swallowed it while the
    demo ran on to its call timeout.  gevent's handler runs from the hub and
    throws into the main greenlet.  It also works in a shell's background job,
    which starts with SIGINT ignored.  Returns ``disarm``: signals after it are
    ignored, so a second Ctrl-C cannot cut the cleanup short.
    """
    main_greenlet = gevent.getcurrent()
    armed = True

    def disarm() -> None:
        nonlocal armed
        armed = False

    def throw() -> None:  # runs in the hub's loop, so the main greenlet is waiting
        if armed:
            disarm()
            main_greenlet.throw(KeyboardInterrupt)

    def interrupt() -> None:
        gevent.get_hub().loop.run_callback(throw)

    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, interrupt)
    return disarm


def main(out: TextIO = sys.stdout, keep: bool = False) -> int:
    """Run the demo; 0 when every call reached PlanFix, 1 otherwise."""
    # SIGTERM (e.g. a test's timeout) stops it like Ctrl-C: the finally below cleans up.
    disarm = interrupt_on_signals()
    workdir = Path(tempfile.mkdtemp(prefix="fsbridge-demo-"))
    demo = Demo(workdir, out)
    code = 1
    try:
        demo.run()
        code = 0
    except DemoError as exc:
        print(f"demo failed: {exc}\n--- service log ---\n{demo.service_log()[-4000:]}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
    finally:
        disarm()
        demo.stop()
        if keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("stopped: the service and both fakes", file=out, flush=True)
    return code

