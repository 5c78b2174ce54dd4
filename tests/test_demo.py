"""`fsbridge demo` end to end: its own process, the real service under it, bounded in time.

What a newcomer must see: the lookup answer for the known client, each
call's PlanFix events in order (single, ring group, missed, click-to-call),
no spec violation, and nothing left running afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from tests.conftest import REPO


def run_demo(timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsbridge", "demo"], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def events(section: str) -> list[tuple[str, str, str]]:
    """(event, ext, status) of each PlanFix event line in one numbered section."""
    found = []
    for line in section.splitlines():
        match = re.search(r"PlanFix <- event (\w+)\s+\w+\s+.*?ext=(\d+)(?:.*status=(\w+))?", line)
        if match:
            found.append((match.group(1), match.group(2), match.group(3) or ""))
    return found


def test_demo_prints_every_call_and_stops():
    started = time.monotonic()
    result = run_demo()
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 60
    out = result.stdout
    sections = re.split(r"\n(?=\d\. )", out)
    assert len(sections) == 5, out  # the header and four calls
    head, single, group, missed, click = sections
    assert "connected to FreeSWITCH" in head
    assert "PlanFix <- contact  phone=79101234567" in single
    assert "GET /dialplan/contact?phone=79101234567 -> status=found;name=Ivan Petrov;responsible=101" in single
    assert events(single) == [("INCOMING", "101", ""), ("ACCEPTED", "101", ""), ("COMPLETED", "101", "Success")]
    assert "is_recorded=1" in single and "record_link=http://127.0.0.1:" in single
    assert sorted(events(group)) == sorted([
        ("INCOMING", "101", ""), ("INCOMING", "102", ""), ("INCOMING", "103", ""), ("ACCEPTED", "102", ""),
        ("COMPLETED", "101", "Cancelled"), ("COMPLETED", "103", "Cancelled"), ("COMPLETED", "102", "Success")])
    assert [e for e in events(missed) if e[0] == "COMPLETED"] == [
        ("COMPLETED", ext, "Missed") for ext in ("101", "102", "103")]
    assert re.search(r"makeCall from=101 to=\+7 \(910\) 123-45-67 -> 200 \{\"callid\":\"[0-9a-f-]{36}\"\}", click)
    assert events(click) == [("OUTGOING", "101", ""), ("ACCEPTED", "101", ""), ("COMPLETED", "101", "Success")]
    assert "20 PlanFix requests, 0 breaking the telephony API spec." in out
    assert out.rstrip().endswith("stopped: the service and both fakes")


def test_demo_interrupted_leaves_no_process(tmp_path):
    """SIGINT (Ctrl-C) mid-demo: the demo stops the service it started and exits."""
    proc = subprocess.Popen([sys.executable, "-m", "fsbridge", "demo"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    service_pid = None
    try:
        pid_line = proc.stdout.readline()
        service_pid = int(re.search(r"service pid (\d+)", pid_line).group(1))
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        # the service runs in its own session: a demo killed above never stopped it
        if service_pid is not None and _alive(service_pid):
            os.kill(service_pid, signal.SIGKILL)
            service_left = True
        else:
            service_left = False
    assert "interrupted" in proc.stderr.read()
    assert not service_left, "the demo exited without stopping its service"


# A fake's server thread (a greenlet under gevent's patching) signals the
# process and keeps running Python code: a plain Python handler would raise
# KeyboardInterrupt in that thread, whose machinery prints and drops it.
SIGNAL_PROBE = """
from gevent import monkey; monkey.patch_all()
import os, signal, sys, threading, time
from fsbridge import demo
disarm = demo.interrupt_on_signals()
if sys.argv[1] == "disarmed":
    disarm()
def busy():
    os.kill(os.getpid(), signal.SIGINT)
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        pass
threading.Thread(target=busy, daemon=True).start()
try:
    time.sleep(2)
    print("main slept on")
except KeyboardInterrupt:
    print("main interrupted")
"""


def probe_signal(mode: str, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SIGNAL_PROBE, mode], cwd=REPO, capture_output=True, text=True,
                          timeout=30, **popen)


def test_ctrl_c_reaches_the_demo_even_while_a_fake_thread_runs():
    result = probe_signal("armed")
    assert result.stdout.strip() == "main interrupted", result.stderr
    assert "KeyboardInterrupt" not in result.stderr  # no thread died of it


def test_ctrl_c_works_in_a_background_job_that_starts_with_sigint_ignored():
    result = probe_signal("armed", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert result.stdout.strip() == "main interrupted", result.stderr


def test_ctrl_c_during_the_cleanup_does_not_cut_it_short():
    result = probe_signal("disarmed")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "main slept on"
    assert "KeyboardInterrupt" not in result.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of an already-exited child counts as gone
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
