"""Record the mod_callcenter strategy captures 28-31 of tests/data/esl in the live lab.

`python -m tests.live.record_queues OUTDIR` builds the live suite's lab (real
FreeSWITCH, SIPp phones and carrier, the real `fsbridge run` and the fake
PlanFix, as tests/live/conftest.py does), then for each scenario connects a
raw ESL client that subscribes `event plain` to fsbridge's SUBSCRIBED_EVENTS
and writes every byte it received, unmodified, to OUTDIR/<name>.plain.txt
(what it sent to <name>.plain.sent.txt).  What the real fsbridge sent to
PlanFix for each call is printed, for the README.
"""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from fsbridge.core.events import SUBSCRIBED_EVENTS
from tests.live import lab as lab_mod
from tests.live.conftest import Env
from tests.live.lab import ESL_PASSWORD, STRATEGY_DIDS, free_udp_port


class Recorder:
    """A raw ESL connection: every byte received goes to `received`."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.received = bytearray()
        self.sent = bytearray()
        self._until(b"auth/request")
        self._send(f"auth {ESL_PASSWORD}\n\n".encode(), b"+OK accepted")
        self._send(f"event plain {' '.join(SUBSCRIBED_EVENTS)}\n\n".encode(), b"+OK event listener enabled plain")
        self.sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_all, daemon=True)
        self._reader.start()

    def _until(self, marker: bytes) -> None:
        while marker not in self.received:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"ESL closed before {marker!r}: {bytes(self.received)!r}")
            self.received += chunk

    def _send(self, data: bytes, reply: bytes) -> None:
        self.sent += data
        self.sock.sendall(data)
        self._until(reply)

    def _read_all(self) -> None:
        while chunk := self.sock.recv(65536):
            self.received += chunk

    def close(self) -> tuple[bytes, bytes]:
        data = b"exit\n\n"
        self.sent += data
        self.sock.sendall(data)
        self._reader.join(10)
        self.sock.close()
        return bytes(self.received), bytes(self.sent)


def phones(env: Env, **scenarios: list[str]) -> None:
    for user, args in scenarios.items():
        env.lab.sipp(args[0], "-m", "3", "-aa", *args[1:], port=env.phone_ports[user])


def queue_call(env: Env, did: str, caller: str) -> None:
    proc = env.lab.sipp("carrier-uac-inbound-long", "-s", did, "-key", "caller", caller, "-m", "1",
                        port=free_udp_port(), target="external")
    if proc.wait(60) != 0:
        raise RuntimeError(f"carrier call to {did} failed: {lab_mod.messages(proc)[-3000:]}")


def settle(env: Env) -> None:
    """Every SIPp ended, no call left in FreeSWITCH, fsbridge's outbox empty."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "0 total" not in env.lab.cli("show calls count"):
        time.sleep(0.2)
    while time.monotonic() < deadline and env.service.health()["outbox"]["depth"]:
        time.sleep(0.2)
    time.sleep(1.0)
    for proc in env.lab.sipps:
        lab_mod._end(proc)
    env.lab.sipps.clear()


ANSWER = ["uas-answer-send-bye", "-d", "1000"]  # rings 1 s, talks 2 s, hangs up
NOANSWER = ["uas-noanswer"]

# name -> (strategy, caller, phone scenarios, warm-up call first)
SCENARIOS = {
    # 101 answers a warm-up call first, so 102 and 103 are longer idle: 102 (lower position) rings
    "28-inbound-callcenter-longest-idle-agent": ("longest-idle-agent", "79160000028",
                                                 {"101": ANSWER, "102": ANSWER, "103": ANSWER}, True),
    # after 28 the queue's last offered agent is 102's position: round-robin offers 103
    "29-inbound-callcenter-round-robin": ("round-robin", "79160000029",
                                          {"101": ANSWER, "102": ANSWER, "103": ANSWER}, False),
    "30-inbound-callcenter-top-down": ("top-down", "79160000030",
                                       {"101": ANSWER, "102": ANSWER, "103": ANSWER}, False),
    # 101 rings AGENT_RING s and does not answer; top-down moves on to 102, who answers
    "31-inbound-callcenter-top-down-agent-noanswer-next-answers": ("top-down", "79160000031",
                                                                   {"101": NOANSWER, "102": ANSWER, "103": ANSWER}, False),
}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="fsbridge-record-"))
    env = Env(root)
    # the recording paths in the captures are the ones the repo's other captures name
    recordings = lab_mod.PREFIX / "recordings"
    env.lab = lab_mod.Lab(root / "fs", recordings=recordings)
    before = set(recordings.iterdir()) if recordings.is_dir() else set()
    try:
        env.start()
        for name, (strategy, caller, scenarios, warm_up) in SCENARIOS.items():
            did = STRATEGY_DIDS[strategy]
            if warm_up:
                phones(env, **{"101": ANSWER})
                queue_call(env, did, "79160000128")
                settle(env)
            env.planfix.clear()
            recorder = Recorder(env.lab.esl_port)
            phones(env, **scenarios)
            queue_call(env, did, caller)
            settle(env)
            received, sent = recorder.close()
            (out / f"{name}.plain.txt").write_bytes(received)
            (out / f"{name}.plain.sent.txt").write_bytes(sent)
            print(f"== {name}: {len(received)} bytes")
            for r in env.planfix.delivered:
                if r.get("cmd") == "event":
                    print("  ", r.get("event"), r.get("ext"), r.get("status", ""), r.get("duration", ""), r.get("callid"))
    finally:
        env.stop()
        shutil.rmtree(root, ignore_errors=True)
        for made in set(recordings.glob("*.wav")) - before:  # only the recordings of our own calls
            made.unlink()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.live.record_queues OUTDIR")
    why = lab_mod.missing()
    if why:
        sys.exit(why)
    main(Path(sys.argv[1]))
