"""Benchmark: how many calls one fsbridge process keeps up with, and how
fast a PlanFix pop-up appears.  `make bench` runs it (`BENCH_QUICK=1` for a
one-minute version); docs/benchmark.md explains the figures.

The real service runs as its own process (`python -m fsbridge run -c FILE`).
This process plays FreeSWITCH and PlanFix with the fakes the tests use
(fsbridge.fakes): the fake FreeSWITCH streams the load capture, scaled up by
rewriting UUIDs and caller numbers; the fake PlanFix runs in its lean
keep-alive mode, answering after a configurable delay.

Scaling keeps every byte length: a UUID is replaced by a UUID, an 11-digit
caller number by an 11-digit number, so frames are copied with
``bytes.replace`` and their Content-Length stays right.  Calls are scheduled
as the capture has them (each call keeps its own event timing) and started
at a fixed rate, so they interleave as real calls do; "full speed" sends the
same order without waiting.

Latency is measured per PlanFix request: the bench runs the real tracker
over the original capture once to learn which channel event causes which
PlanFix request (e.g. INCOMING <- CHANNEL_CREATE of the A leg), then stamps
the moment that event left the fake FreeSWITCH and the moment the fake
PlanFix received the request.  Both clocks are CLOCK_MONOTONIC.

Tenants (cloud PBX, issue 16): the same capture shared out among N
tenants, each call copied by `fsbridge.fakes.tenants` into its tenant's SIP
domain, DID and UUIDs (`tenant_input`), the calls of all tenants
interleaved; one [tenant.NAME] per tenant in the service's config.  One
tenant's PlanFix can be down for a whole run (refusing connections, or
taking requests and never answering), optionally with a backlog left in
its outbox as after hours of outage; the other tenants' latency is compared
with all-healthy runs of the same N.

Backlog drain: delivery alone, a backlog of calls stored before the start
and no events, so what a delivered request costs is not mixed with intake
(at full speed the two share one core and the delivery figure is what
intake leaves).

The last line printed is one JSON object for scripts (docs/benchmark.md).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import heapq
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from fsbridge import outbox
from fsbridge.accounts import TENANTS_DIR
from fsbridge.config import defaults
from fsbridge.core.events import SUBSCRIBED_EVENTS, channel_event
from fsbridge.core.phone import normalizer
from fsbridge.core.tracker import CallTracker, TrackerSettings
from fsbridge.fakes.freeswitch import FakeFreeSwitch
from fsbridge.fakes.planfix import FakePlanfix
from fsbridge.fakes.tenants import Tenant, make_tenants
from fsbridge.core.wire import FrameParser, parse_event_plain

REPO = Path(__file__).resolve().parent.parent
# The checkout the service runs from (`--service-tree`): another commit's
# service measured by this harness, on this machine, in alternated runs, for
# before/after ratios that do not depend on which VM the runs got.
SERVICE_TREE = REPO
TRACES = REPO / "tests" / "data" / "esl"
LOAD_TRACE = "load-100-calls.plain.txt.gz"
UUID_RE = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
PBX_TOKEN = "bench-pbx-token-0123456789abcdef"
PLANFIX_TOKEN = "bench-planfix-token"
METRIC_ATTEMPTS = re.compile(r"^fsbridge_planfix_requests_total\{([^}]*)\} (\S+)$", re.MULTILINE)
# Calls per second used to order the "full speed" stream: about 300 calls
# are open at any moment (the capture's calls last ~3 s).
FULL_SPEED_ORDER_CPS = 100.0


def _frame_bytes(body: bytes) -> bytes:
    # FreeSWITCH's exact outer layout for a plain event (see the traces).
    return b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(body) + body


# -- the input: call templates ------------------------------------------------


@dataclass(slots=True)
class TemplateEvent:
    offset_s: float            # since the call's first event
    name: str                  # Event-Name
    frame: bytes               # exact frame bytes as FreeSWITCH sent them
    causes: list[tuple[int, str]] = field(default_factory=list)  # (uuid index, PlanFix event)
    # The frame cut at every UUID and the caller number: bytes pieces, and
    # ints naming the replacement (uuid index; len(uuids) = the number).
    pieces: list = field(default_factory=list)


@dataclass(slots=True)
class CallTemplate:
    uuids: list[bytes]
    number: bytes | None       # the caller number rewritten per copy (None: leave as is)
    events: list[TemplateEvent]


@dataclass(slots=True)
class Input:
    source: str
    templates: list[CallTemplate]
    core_uuid: str


def input_files() -> tuple[str, list[Path]]:
    load = TRACES / LOAD_TRACE
    return str(load.relative_to(REPO)), [load]


def _read(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def _find(parent: dict, item):
    while parent[item] != item:
        parent[item] = parent[parent[item]]
        item = parent[item]
    return item


def load_input() -> Input:
    """Call templates: the capture's events grouped into calls (every UUID an
    event mentions belongs to its call), each with its timing and causes."""
    source, paths = input_files()
    templates: list[CallTemplate] = []
    core_uuid = ""
    for path in paths:
        parsed = []  # (headers, frame bytes, uuids)
        parent: dict[bytes, bytes] = {}
        for frame in FrameParser().feed(_read(path)):
            if frame.content_type != "text/event-plain":
                continue
            headers, _ = parse_event_plain(frame.body)
            core = (headers.get("Core-UUID") or "").encode()
            core_uuid = core_uuid or core.decode()
            uuids = list(dict.fromkeys(u for u in UUID_RE.findall(frame.body) if u != core))
            parsed.append((headers, _frame_bytes(frame.body), uuids, frame.body))
            for u in uuids:
                parent.setdefault(u, u)
            for u in uuids[1:]:
                parent[_find(parent, u)] = _find(parent, uuids[0])
        # Which PlanFix requests each event causes: the real tracker, once.
        tracker = CallTracker(TrackerSettings())
        calls: dict[bytes, CallTemplate] = {}
        starts: dict[bytes, int] = {}
        for headers, raw, uuids, body in parsed:
            if not uuids:
                continue  # HEARTBEAT and the like: not part of a call
            root = _find(parent, uuids[0])
            ts = int(headers.get("Event-Date-Timestamp") or 0)
            tpl = calls.get(root)
            if tpl is None:
                tpl = calls[root] = CallTemplate([], None, [])
                starts[root] = ts
            for u in uuids:
                if u not in tpl.uuids:
                    tpl.uuids.append(u)
            event = TemplateEvent(max(0, ts - starts[root]) / 1e6, headers.get("Event-Name") or "", raw)
            if tpl.number is None and event.name == "CHANNEL_CREATE":
                number = (headers.get("Caller-Caller-ID-Number") or "").encode()
                if number.isdigit() and len(number) >= 10:
                    tpl.number = number
            reduced = channel_event(*parse_event_plain(body))
            if reduced is not None:
                for command in tracker.feed(reduced):
                    cid = command.call_id.encode()
                    if cid in tpl.uuids:
                        event.causes.append((tpl.uuids.index(cid), command.fields.get("event", "")))
            tpl.events.append(event)
        for tpl in calls.values():
            _cut(tpl)
        templates.extend(calls.values())
    return Input(source, templates, core_uuid)


def _cut(tpl: CallTemplate) -> None:
    targets = list(tpl.uuids) + ([tpl.number] if tpl.number is not None else [])
    index = {t: i for i, t in enumerate(targets)}
    pattern = re.compile(b"(" + b"|".join(re.escape(t) for t in targets) + b")")
    for event in tpl.events:
        parts = pattern.split(event.frame)
        # re.split alternates text, match, text, ...: odd positions are matches.
        event.pieces = [index[part] if i % 2 else part for i, part in enumerate(parts)]


def copy_ids(tpl: CallTemplate, copy: int) -> tuple[list[bytes], bytes | None]:
    """The UUIDs and caller number of copy number `copy` of a template."""
    suffix = b"%012x" % copy
    uuids = [u[:24] + suffix for u in tpl.uuids]
    number = None
    if tpl.number is not None:
        number = tpl.number[:-7] + b"%07d" % (copy % 10_000_000)
    return uuids, number


def rewrite(event: TemplateEvent, replacements: list[bytes]) -> bytes:
    """The event's frame with every UUID and the caller number replaced
    (same lengths, so Content-Length stays right)."""
    return b"".join([replacements[p] if isinstance(p, int) else p for p in event.pieces])


def tenant_input(inp: Input, tenants: list[Tenant]) -> Input:
    """The capture's calls shared out among ``tenants`` (cloud PBX): tenant t
    gets a slice of the calls, copied by ``fakes.tenants`` as its own
    (its SIP domain and DID, its UUIDs); templates are interleaved so that
    call j of a schedule belongs to tenant ``j % len(tenants)``.  Only the
    subscribed events are copied (a copy of all 67 events a call for 50
    tenants would hold ~400 MB); every call of the capture is used about
    equally whatever the number of tenants."""
    n = len(tenants)
    per = -(-len(inp.templates) // n)
    copies = [[_tenant_template(inp.templates[(t * per + i) % len(inp.templates)], tenant)
               for i in range(per)] for t, tenant in enumerate(tenants)]
    templates = [copies[t][i] for i in range(per) for t in range(n)]
    return Input(f"{inp.source} as {n} tenants", templates, inp.core_uuid)


def _tenant_template(tpl: CallTemplate, tenant: Tenant) -> CallTemplate:
    events = [e for e in tpl.events if e.name in SUBSCRIBED_EVENTS]
    frames = tenant.copy([e.frame for e in events])  # one frame per event, in order
    uuids = [tenant.uuid(u.decode()).encode() for u in tpl.uuids]  # same index: causes stay right
    out = CallTemplate(uuids, tpl.number, [TemplateEvent(e.offset_s, e.name, frame, list(e.causes))
                                           for e, frame in zip(events, frames, strict=True)])
    _cut(out)
    return out


def schedule(inp: Input, n_calls: int, rate: float, subscribed: set[str], first: int = 0):
    """(due time s, call number, frame bytes, [(callid, PlanFix event)]) in
    send order: call j starts at (j - first)/rate and keeps the capture's
    timing.  FreeSWITCH sends only what the connection subscribed to."""
    calls = [[e for e in t.events if e.name in subscribed] for t in inp.templates]
    templates = inp.templates
    interval = 1.0 / rate
    heap: list[tuple[float, int, int]] = []
    ids: dict[int, tuple[list[bytes], list[bytes]]] = {}
    next_call = first
    next_start = 0.0
    end_call = first + n_calls
    while next_call < end_call or heap:
        if not heap or heap[0][0] > next_start:
            events = calls[next_call % len(calls)]
            if events:
                heapq.heappush(heap, (next_start + events[0].offset_s, next_call, 0))
                uuids, number = copy_ids(templates[next_call % len(calls)], next_call)
                ids[next_call] = (uuids, uuids + ([number] if number is not None else []))
            next_call += 1
            next_start = (next_call - first) * interval if next_call < end_call else float("inf")
            continue
        due, j, k = heapq.heappop(heap)
        events = calls[j % len(calls)]
        event = events[k]
        uuids, replacements = ids[j]
        if k + 1 < len(events):
            heapq.heappush(heap, ((j - first) * interval + events[k + 1].offset_s, j, k + 1))
        else:
            del ids[j]
        causes = [(uuids[i].decode(), pf_event) for i, pf_event in event.causes]
        yield due, j, rewrite(event, replacements), causes


def stream(fs: FakeFreeSwitch, subscribed: set[str], inp: Input, n_calls: int, rate: float, paced: bool,
           sent: dict | None, on_call=None, first: int = 0, owners: dict | None = None) -> int:
    """Send n_calls; full speed batches ~64 KB per send. Returns events sent.

    `sent` gets (callid, PlanFix event, n) -> send time of the channel event
    that causes the n-th such request of the call (a ring group sends one
    INCOMING per ringing extension).  `owners` gets callid -> the call's
    number j (with tenants: its tenant is j % tenants)."""
    events = 0
    seen: dict[tuple[str, str], int] = {}

    def keyed(causes):
        out = []
        for key in causes:
            n = seen.get(key, 0)
            seen[key] = n + 1
            out.append((*key, n))
        return out

    batch: list[bytes] = []
    size = 0
    pending: list = []
    start = time.monotonic()
    last_call = -1
    for due, j, frame, causes in schedule(inp, n_calls, rate, subscribed, first):
        if j > last_call:
            last_call = j
            if on_call is not None:
                on_call(j)
        if owners is not None:
            for callid, _ in causes:
                owners[callid] = j
        if paced:
            delay = start + due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = time.monotonic()
            fs.stream(frame)
            if sent is not None:
                for key in keyed(causes):
                    sent.setdefault(key, now)
        else:
            batch.append(frame)
            size += len(frame)
            pending.extend(keyed(causes))
            if size >= 65536:
                now = time.monotonic()
                fs.stream(b"".join(batch))
                if sent is not None:
                    for key in pending:
                        sent.setdefault(key, now)
                batch, size, pending = [], 0, []
        events += 1
    if batch:
        now = time.monotonic()
        fs.stream(b"".join(batch))
        if sent is not None:
            for key in pending:
                sent.setdefault(key, now)
    return events


# -- the service process -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tenant_name(tenant: Tenant) -> str:
    return tenant.seed  # tenant<i>


def tenant_token(tenant: Tenant) -> str:
    return f"bench-pbx-token-{tenant.seed}-0123456789"


class Service:
    """`python -m fsbridge run -c FILE` with a config of defaults plus the
    addresses of the fakes.  ``tenants``: (tenant, its PlanFix URL) pairs, one
    [tenant.NAME] each (cloud PBX); without, the one implicit tenant."""

    def __init__(self, workdir: Path, fs_port: int, planfix_url: str,
                 tenants: list[tuple[Tenant, str]] | None = None) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.dialplan_port = _free_port()
        # Free ports: the default 9102 may be taken on a shared machine.
        self.metrics_port = _free_port()
        # A checkout from before /metrics (issue 15's starting point, bdbf619)
        # has no [metrics] section and serves /healthz on its public listener.
        self.tree = SERVICE_TREE
        legacy = not (self.tree / "fsbridge" / "metrics.py").exists()
        self._health_port = self.port if legacy else self.dialplan_port
        storage = workdir / "state"
        config = {
            "freeswitch": {"host": "127.0.0.1", "port": str(fs_port), "password": "ClueCon"},
            "server": {"listen": f"127.0.0.1:{self.port}", "token": PBX_TOKEN,
                       "public_url": f"http://127.0.0.1:{self.port}"},
            "planfix": {"url": planfix_url, "token": PLANFIX_TOKEN if planfix_url else "", "allow_http": "yes"},
            "storage": {"dir": str(storage)},
            "dialplan": {"listen": f"127.0.0.1:{self.dialplan_port}"},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
        }
        if legacy:
            del config["metrics"]
        if tenants:
            config["server"]["token"] = ""  # each tenant has its own
            config["planfix"].update(url="", token="")
            for tenant, url in tenants:
                config[f"tenant.{tenant_name(tenant)}"] = {
                    "token": tenant_token(tenant), "domains": tenant.domain, "dids": tenant.did,
                    "planfix_url": url, "planfix_token": PLANFIX_TOKEN}
        self.config_path = workdir / "fsbridge.ini"
        self.config_path.write_text("".join(
            f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) + "\n"
            for section, values in config.items()))
        self.log_path = workdir / "service.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fsbridge", "run", "-c", str(self.config_path)],
            cwd=self.tree, stdout=self._log, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.pid = self.proc.pid

    def health(self) -> dict:
        """The detailed /healthz (loopback listener), 200 (ok) or 503 (degraded)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self._health_port}/healthz", timeout=5) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 503 still carries the body
            return json.loads(exc.read())

    def wait_up(self, fs: FakeFreeSwitch, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"bench: service exited {self.proc.returncode}:\n{self.log_tail()}")
            if fs.subscribed:
                try:
                    self.health()
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        raise SystemExit(f"bench: service not up in {timeout}s:\n{self.log_tail()}")

    def planfix_attempts(self) -> dict[str, dict[str, float]]:
        """fsbridge_planfix_requests_total from /metrics: tenant -> outcome -> count."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out: dict[str, dict[str, float]] = {}
        for match in METRIC_ATTEMPTS.finditer(text):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            tenant = out.setdefault(labels.get("tenant", ""), {})
            tenant[labels.get("outcome", "")] = tenant.get(labels.get("outcome", ""), 0) + float(match.group(2))
        return out

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory_mb(self) -> dict:
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
        return out

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


# -- figures --------------------------------------------------------------------


def machine_cpu_s() -> float:
    """CPU seconds every process of the machine used so far, steal included (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """This process's CPU seconds (every thread: the sender, the fakes)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def latencies_ms(sent: dict, received: list) -> list[float]:
    """Per request received: receive time - send time of its cause. The
    outbox delivers a call's requests in order, so the n-th INCOMING of a
    call received is the n-th caused."""
    out = []
    count: dict[tuple[str, str], int] = {}
    for callid, event, t in received:
        n = count.get((callid, event), 0)
        count[(callid, event)] = n + 1
        t0 = sent.get((callid, event, n))
        if t0 is not None:
            out.append((t - t0) * 1000)
    return out


def expected_requests(inp: Input, n_calls: int, but_tenant0_of: int = 0) -> int:
    """PlanFix requests n_calls cause; ``but_tenant0_of`` = n: without the calls
    of tenant 0 of n (call j belongs to tenant j % n, see tenant_input)."""
    per_tpl = [sum(len(e.causes) for e in t.events) for t in inp.templates]
    return sum(per_tpl[j % len(per_tpl)] for j in range(n_calls) if not but_tenant0_of or j % but_tenant0_of)


def wait_for(predicate, timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


DOWN_MODES = ("refused", "hang")


@dataclass(frozen=True, slots=True)
class _Queued:
    call_id: str
    fields: dict


# A backlog's calls ended during the outage: an INCOMING alone would leave
# each of them open in the registry, and the service would close them all
# when it connects (100,000 "inherited" calls: 0.8 s of the reader's time
# and gen-2 collections of up to 0.2 s, in the first second of the run).
BACKLOG_EVENTS = ("INCOMING", "COMPLETED")


def preload_outbox(storage: Path, tenant: Tenant | None, calls: int,
                   events: tuple[str, ...] = BACKLOG_EVENTS) -> None:
    """Leave `calls` calls' `events` pending in the tenant's outbox (None: the
    one implicit tenant's), as after hours of its PlanFix being down (a
    tenant at 2 calls/s: 7,200 an hour)."""
    directory = storage if tenant is None else storage / TENANTS_DIR / tenant_name(tenant)
    directory.mkdir(parents=True)
    seed = "one" if tenant is None else tenant.seed
    box = outbox.Outbox(outbox.db_path_for(str(directory)), client=None)
    try:
        for start in range(0, calls, 5000):
            box.put([_Queued(callid, {"cmd": "event", "type": "in", "event": event, "phone": "79100000000",
                                      "ext": "101", "callid": callid})
                     for callid in (f"backlog-{seed}-{i:09d}" for i in range(start, min(calls, start + 5000)))
                     for event in events])
    finally:
        box.stop()


def backlog_drain(inp: Input, workroot: Path, n_calls: int) -> dict:
    """Delivery alone: `n_calls` calls (3 requests each) pending from before
    the start, no events coming, instant PlanFix: how fast a backlog left by
    an outage goes out, and the CPU a delivered request costs."""
    run = Run(inp, workroot, "drain", backlog=n_calls,
              backlog_events=("INCOMING", "ACCEPTED", "COMPLETED"))
    try:
        service = run.service
        cpu0 = service.cpu_s()
        expected = 3 * n_calls
        wait_for(lambda: len(run.planfix.arrivals) >= expected, 300, 0.05)
        cpu = service.cpu_s() - cpu0
        arrivals = list(run.planfix.arrivals)
        span = arrivals[-1][2] - arrivals[0][2] if len(arrivals) > 1 else 0.0
        return {"requests_expected": expected, "requests_delivered": len(arrivals),
                "requests_per_s": len(arrivals) / span if span > 0 else None,
                "cpu_us_per_request": cpu * 1e6 / len(arrivals) if arrivals else None,
                "rss_mb": service.memory_mb()["VmHWM"]}
    finally:
        run.close()


class Run:
    """One service process with its fake FreeSWITCH and fake PlanFix.

    ``tenants``: a cloud PBX config, one [tenant.NAME] each; they share the
    fake PlanFix (each has its own client, pool and outbox in the service),
    except tenant 0 (tenant1) when ``down`` is "refused" (its URL is a bound port that
    does not listen: every connection refused at once) or "hang" (a PlanFix
    that takes each request and never answers: it sits for read_timeout)."""

    def __init__(self, inp: Input, workroot: Path, name: str, planfix_delay: float = 0.0,
                 planfix_configured: bool = True, tenants: list[Tenant] | None = None, down: str = "",
                 backlog: int = 0, backlog_events: tuple[str, ...] = BACKLOG_EVENTS) -> None:
        if down and (down not in DOWN_MODES or not tenants):
            raise ValueError(f"bench: down={down!r}: one of {DOWN_MODES}, and only with tenants")
        self.inp = inp
        self.tenants = tenants or []
        self.down_planfix: FakePlanfix | None = None
        self._refuser: socket.socket | None = None
        self.planfix = FakePlanfix(token=PLANFIX_TOKEN, lean=True)
        self.planfix.delay = planfix_delay
        self.planfix.start()
        self.fs = FakeFreeSwitch(core_uuid=inp.core_uuid).start()
        self.service = None
        try:
            workdir = workroot / name
            workdir.mkdir(parents=True)
            urls = [self.planfix.url] * len(self.tenants)
            if down == "hang":
                self.down_planfix = FakePlanfix(token=PLANFIX_TOKEN, lean=True, hang_seconds=600.0)
                self.down_planfix.failure = "hang"
                urls[0] = self.down_planfix.start().url
            elif down == "refused":
                # Bound, not listening: a connect gets RST (and the port stays ours for the run).
                self._refuser = socket.socket()
                self._refuser.bind(("127.0.0.1", 0))
                urls[0] = f"http://127.0.0.1:{self._refuser.getsockname()[1]}/refused"
            if backlog:  # tenant1's outbox, or the one implicit tenant's
                preload_outbox(workdir / "state", self.tenants[0] if self.tenants else None, backlog, backlog_events)
            for retry in (True, False):
                self.service = Service(workdir, self.fs.port, self.planfix.url if planfix_configured else "",
                                       list(zip(self.tenants, urls)))
                try:
                    self.service.wait_up(self.fs)
                    break
                except SystemExit:
                    # A free port taken by another process of the shared machine before
                    # the service bound it: once more, with new ports.
                    if not retry or "cannot listen" not in self.service.log_tail():
                        raise
                    self.service.stop()
            print(f"  {name}: metrics at http://127.0.0.1:{self.service.metrics_port}/metrics", flush=True)
            self.events = self.fs.wait_subscribed()
        except BaseException:
            self.close()
            raise
        self.sent: dict = {}

    def close(self) -> None:
        if self.service is not None:
            self.service.stop()
        self.fs.stop()
        self.planfix.stop()
        if self.down_planfix is not None:
            self.down_planfix.stop()
        if self._refuser is not None:
            self._refuser.close()


def full_speed(inp: Input, workroot: Path, n_calls: int, rss_at: int, drain_cap: float) -> dict:
    run = Run(inp, workroot, "full-speed")
    try:
        svc = run.service
        rss_marks: dict[int, float] = {}

        def on_call(j: int) -> None:
            if j == rss_at:
                rss_marks[rss_at] = svc.memory_mb()["VmHWM"]

        cpu0 = svc.cpu_s()
        t0 = time.monotonic()
        events = stream(run.fs, run.events, inp, n_calls, FULL_SPEED_ORDER_CPS, False, run.sent, on_call)
        wait_for(run.fs.drained, 600)
        t_ingest = time.monotonic() - t0
        expected = expected_requests(inp, n_calls)
        # The outbox keeps delivering after intake ends; it gets a bounded
        # drain (100,000 calls are 300,000 requests: more than the budget).
        wait_for(lambda: len(run.planfix.arrivals) >= expected, drain_cap, 0.1)
        cpu = svc.cpu_s() - cpu0
        received = list(run.planfix.arrivals)
        memory = svc.memory_mb()
        first = received[0][2] if received else t0
        last = received[-1][2] if received else t0
        lat = latencies_ms(run.sent, received)
        return {
            "calls": n_calls, "events": events, "ingest_s": t_ingest,
            "ingest_events_per_s": events / t_ingest,
            "requests_expected": expected, "requests_delivered": len(received),
        "delivered_requests_per_s": len(received) / (last - first) if last > first else None,
            "cpu_s": cpu, "cpu_s_per_1000_calls": cpu * 1000 / n_calls,
            "rss_mb_at_mark": rss_marks.get(rss_at), "rss_mark_calls": rss_at,
            "rss_mb_end": memory["VmHWM"], "rss_now_mb_end": memory["VmRSS"],
            "p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99),
        }
    finally:
        run.close()


def intake_only(inp: Input, workroot: Path, n_calls: int) -> dict:
    """Full speed before PlanFix's `setup` (no PlanFix address yet): the
    outbox stores every request and sends none, so this is what event
    intake alone costs.  In two halves: the RSS growth of the second half
    over the requests it left pending is the memory per pending request
    (the first half fills SQLite's page cache and the allocator's pools)."""
    run = Run(inp, workroot, "intake-only", planfix_configured=False)
    try:
        svc = run.service
        half = n_calls // 2
        cpu0 = svc.cpu_s()
        t0 = time.monotonic()
        events = stream(run.fs, run.events, inp, half, FULL_SPEED_ORDER_CPS, False, None)
        wait_for(run.fs.drained, 600)
        elapsed = time.monotonic() - t0
        cpu = svc.cpu_s() - cpu0
        depth1 = _settled_depth(svc)
        rss1 = svc.memory_mb()["VmRSS"]
        cpu0 = svc.cpu_s()
        t0 = time.monotonic()
        events2 = stream(run.fs, run.events, inp, n_calls - half, FULL_SPEED_ORDER_CPS, False, None, first=half)
        wait_for(run.fs.drained, 600)
        elapsed += time.monotonic() - t0
        cpu += svc.cpu_s() - cpu0
        depth2 = _settled_depth(svc)
        rss2 = svc.memory_mb()["VmRSS"]
        events += events2
        per_pending = None
        if depth1 is not None and depth2 is not None and depth2 > depth1:
            per_pending = (rss2 - rss1) * 1024 / (depth2 - depth1)
        return {"calls": n_calls, "events": events, "events_per_s": events / elapsed,
                "cpu_us_per_event": cpu * 1e6 / events, "requests_tried": len(run.planfix.arrivals),
                "pending": depth2, "rss_kb_per_pending_request": per_pending}
    finally:
        run.close()


def _settled_depth(svc: "Service") -> int | None:
    """The outbox depth once the service stored what it read (stable for 0.3 s)."""
    last = None
    for _ in range(100):
        try:
            depth = svc.health()["outbox"]["depth"]
        except (OSError, KeyError, ValueError):
            return None
        if depth == last:
            return depth
        last = depth
        time.sleep(0.3)
    return last


def paced(inp: Input, workroot: Path, name: str, rate: float, seconds: float, delay: float,
          drain_s: float = 30.0, tenants: list[Tenant] | None = None, down: str = "", backlog: int = 0) -> dict:
    """Calls at `rate` for `seconds`, PlanFix taking `delay` s per request.
    With `tenants` (inp from tenant_input) the figures healthy_* are those of
    every tenant but tenant 0, the one that is down when `down` is set; the
    run then waits only for their requests."""
    run = Run(inp, workroot, name, delay, tenants=tenants, down=down, backlog=backlog)
    try:
        n_calls = int(rate * seconds)
        n_tenants = len(tenants or ())
        owners: dict | None = {} if tenants else None
        depths: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(1.0):
                try:
                    depths.append((time.monotonic(), run.service.health()["outbox"]["depth"]))
                except (OSError, KeyError, ValueError):
                    pass

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        cpu0 = run.service.cpu_s()
        machine0, own0 = machine_cpu_s(), own_cpu_s()
        t0 = time.monotonic()
        stream(run.fs, run.events, inp, n_calls, rate, True, run.sent, owners=owners)
        t_sent = time.monotonic()
        stop.set()
        sampler.join()
        expected = expected_requests(inp, n_calls)
        healthy_expected = expected_requests(inp, n_calls, n_tenants) if n_tenants else expected
        awaited = healthy_expected if down else expected
        all_delivered = wait_for(lambda: len(run.planfix.arrivals) >= awaited, drain_s, 0.05)
        cpu = run.service.cpu_s() - cpu0
        elapsed = time.monotonic() - t0
        # The rest of the shared machine (and the hypervisor's steal) meanwhile: a disturbed run shows here.
        own = own_cpu_s() - own0
        others = machine_cpu_s() - machine0 - cpu - own
        # Requests tenant 0 sent its PlanFix: those the hanging one took (the
        # service counts a request when it ends), the refused ones the service counted.
        down_attempts = None
        if run.down_planfix is not None:
            down_attempts = len(run.down_planfix.arrivals)
        elif down:
            try:
                down_attempts = sum(run.service.planfix_attempts().get(tenant_name(tenants[0]), {}).values())
            except (OSError, ValueError):
                pass
        received = list(run.planfix.arrivals)
        lat = latencies_ms(run.sent, received)
        healthy = received
        if owners is not None:
            healthy = [r for r in received if owners.get(r[0], 0) % n_tenants]
        healthy_lat = latencies_ms(run.sent, healthy)
        # Growth: outbox depth at the end of sending minus its depth a quarter
        # in (the warm-up, when open calls are still building up).
        steady = [d for t, d in depths if t >= t0 + (t_sent - t0) / 4]
        growth = steady[-1] - steady[0] if len(steady) >= 2 else None
        return {
            "rate_cps": rate, "calls": n_calls, "planfix_delay_s": delay,
            "requests_expected": expected, "requests_delivered": len(run.planfix.arrivals),
            "p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99),
            "max_ms": max(lat) if lat else None,
            "outbox_depth_max": max((d for _, d in depths), default=None),
            "outbox_growth": growth,
            # Everything sent was delivered: the whole cost of a call, at a rate it keeps up with.
            "cpu_s_per_1000_calls": cpu * 1000 / n_calls if all_delivered else None,
            "all_delivered": all_delivered, "planfix_max_in_flight": run.planfix.max_in_flight,
            "tenants": n_tenants, "down": down,
            "healthy_requests_expected": healthy_expected, "healthy_requests_delivered": len(healthy),
            "healthy_p50_ms": percentile(healthy_lat, 0.5), "healthy_p99_ms": percentile(healthy_lat, 0.99),
            "healthy_max_ms": max(healthy_lat) if healthy_lat else None,
            "down_attempts_per_s": down_attempts / elapsed if down_attempts is not None else None,
            "cpu_share": cpu / elapsed, "others_cpu_share": max(0.0, others / elapsed), "bench_cpu_share": own / elapsed,
        }
    finally:
        run.close()


def sustained(inp: Input, workroot: Path, delay: float, rates: list[float], seconds: float,
              tenants: list[Tenant] | None = None) -> dict:
    """The highest of `rates` (calls/s) kept up with at PlanFix `delay` s per
    request, default settings: every request delivered within 10 s + 3 x delay
    after the last event, and the outbox growing by less than one second's
    worth of requests over the steady part of the run.  Rates are tried in
    order; the first one missed ends the ladder."""
    best, tried = None, []
    for rate in rates:
        try:
            got = paced(inp, workroot, f"sustained-{delay:g}s-{rate:g}cps-{len(tenants or ())}t", rate, seconds,
                        delay, drain_s=10.0 + 3 * delay, tenants=tenants)
        except (OSError, SystemExit, TimeoutError) as exc:
            tried.append({"rate_cps": rate, "error": str(exc)[:200]})
            break
        per_call = got["requests_expected"] / max(1, got["calls"])
        flat = got["outbox_growth"] is not None and got["outbox_growth"] <= rate * per_call
        ok = got["all_delivered"] and flat
        tried.append({"rate_cps": rate, "ok": ok, "p99_ms": got["p99_ms"], "growth": got["outbox_growth"],
                      "delivered": got["requests_delivered"], "expected": got["requests_expected"],
                      "planfix_max_in_flight": got["planfix_max_in_flight"],
                      "cpu_s_per_1000_calls": got["cpu_s_per_1000_calls"], "cpu_share": got["cpu_share"],
                      "bench_cpu_share": got["bench_cpu_share"], "others_cpu_share": got["others_cpu_share"]})
        if not ok:
            break
        best = rate
    return {"delay_s": delay, "calls_per_s": best, "tried": tried}


# -- tenants (cloud PBX, issue 16) ------------------------------------------------


def tenant_isolation(inp: Input, workroot: Path, counts: list[int], rate: float, seconds: float,
                     cases: list[tuple[str, int]], only_first: set[tuple[str, int]] = frozenset()) -> list[dict]:
    """Per tenant count n: n tenants' calls interleaved at `rate`, instant
    PlanFix, the healthy tenants' (all but tenant 0) event -> PlanFix latency
    with every tenant healthy, then with tenant 0's PlanFix down for the
    whole run in each of `cases` ((down mode, calls pending in its outbox
    from before: an outage of hours)), each case its own service process.
    All healthy runs before and after the down cases; the ratios are to the
    better of the two.  A down case whose p99 is more than twice that runs
    once more and keeps the better try (both are reported): on a shared
    machine one disturbed run says nothing, a real delay shows in both.
    `only_first`: cases run for the first count only (a shorter quick run)."""
    out = []
    for n in counts:
        tenants = make_tenants(n)
        tinp = tenant_input(inp, tenants)
        sequence = [("", 0)] + [c for c in cases if n == counts[0] or c not in only_first] + [("", 0)]
        rows = [_isolation_run(tinp, workroot, f"tenants-{n}-{i}", tenants, rate, seconds, down, backlog)
                for i, (down, backlog) in enumerate(sequence)]
        best = {key: min((r[key] for r in rows if not r["down"] and r[key] is not None), default=None)
                for key in ("p50_ms", "p99_ms")}
        for i, row in enumerate(rows):
            if not row["down"]:
                continue
            if row["p99_ms"] is None or best["p99_ms"] is None or row["p99_ms"] > 2 * best["p99_ms"]:
                again = _isolation_run(tinp, workroot, f"tenants-{n}-{i}-again", tenants, rate, seconds,
                                       row["down"], row["backlog"])
                first = {k: row[k] for k in ("p50_ms", "p99_ms", "max_ms", "others_cpu_share")}
                if again["p99_ms"] is not None and (row["p99_ms"] is None or again["p99_ms"] < row["p99_ms"]):
                    row = rows[i] = again
                row["tries"] = [first, {k: again[k] for k in first}]
            row["p50_to_all_healthy"] = _ratio(row["p50_ms"], best["p50_ms"])
            row["p99_to_all_healthy"] = _ratio(row["p99_ms"], best["p99_ms"])
        out += rows
    return out


def _isolation_run(tinp: Input, workroot: Path, name: str, tenants: list[Tenant], rate: float, seconds: float,
                   down: str, backlog: int) -> dict:
    name += f"-{down or 'healthy'}" + (f"-backlog{backlog}" if backlog else "")
    try:
        got = paced(tinp, workroot, name, rate, seconds, 0.0, tenants=tenants, down=down, backlog=backlog)
    except (OSError, SystemExit, TimeoutError, ValueError) as exc:
        got = {"error": f"{exc.__class__.__name__}: {str(exc)[-300:]}"}  # the log's last lines
    row = {"tenants": len(tenants), "down": down, "backlog": backlog, "rate_cps": rate, "calls": got.get("calls"),
           "p50_ms": got.get("healthy_p50_ms"), "p99_ms": got.get("healthy_p99_ms"), "max_ms": got.get("healthy_max_ms"),
           "delivered": got.get("healthy_requests_delivered"), "expected": got.get("healthy_requests_expected"),
           "cpu_s_per_1000_calls": got.get("cpu_s_per_1000_calls"), "cpu_share": got.get("cpu_share"),
           "others_cpu_share": got.get("others_cpu_share"), "down_attempts_per_s": got.get("down_attempts_per_s")}
    if "error" in got:
        row["error"] = got["error"]
    return row


def idle_tenants(inp: Input, workroot: Path, counts: list[int], seconds: float) -> dict:
    """RSS, start-up time and CPU of a process serving `counts` tenants with no
    calls (each with its PlanFix set, so its outbox runs); the RSS per tenant
    is the growth from the fewest to the most, divided by the tenants added."""
    rows = []
    for n in counts:
        t0 = time.monotonic()
        run = Run(inp, workroot, f"idle-{n}-tenants", tenants=make_tenants(n))
        try:
            start_s = time.monotonic() - t0
            time.sleep(2.0)  # the outboxes' first rescans
            cpu0, t1 = run.service.cpu_s(), time.monotonic()
            time.sleep(seconds)
            cpu_share = (run.service.cpu_s() - cpu0) / (time.monotonic() - t1)
            rows.append({"tenants": n, "rss_mb": run.service.memory_mb()["VmRSS"], "start_s": start_s,
                         "idle_cpu_share": cpu_share})
        finally:
            run.close()
    first, last = rows[0], rows[-1]
    per_tenant = None
    if last["tenants"] > first["tenants"]:
        per_tenant = (last["rss_mb"] - first["rss_mb"]) * 1024 / (last["tenants"] - first["tenants"])
    return {"runs": rows, "rss_kb_per_tenant": per_tenant}


# The gap between events at 20 calls/s: ~160 events a second arrive in ~80
# reads, one every ~6-12 ms.
PACED_GAP_S = 0.006


def core_pacing(inp: Input, n_calls: int) -> dict:
    """Reference (c): the pure core (parse, reduce, track; no socket, no
    SQLite) on the stream's events in this process, CPU us per event: back
    to back, and after a PACED_GAP_S sleep each (one block of 100 events in
    5, so both kinds span the same mix of events), as at 20 calls/s.  The
    code is the same; what differs is what the machine makes of a process
    waking from a sleep (caches refilled, a core woken or shared): on a
    shared VM that, not the code, is most of an event's cost at a low rate,
    and of `cpu_s_per_1000_calls_20cps`."""
    phone_defaults = defaults()["phone"]  # the service's number normalisation at default settings
    tracker = CallTracker(TrackerSettings(
        normalize_phone=normalizer(phone_defaults["default_region"], phone_defaults["format"])))
    read = functools.partial(channel_event, wants=tracker.wants)
    frames = [frame for _, _, frame, _ in schedule(inp, n_calls, FULL_SPEED_ORDER_CPS, set(SUBSCRIBED_EVENTS))]
    bodies = [f.body for f in FrameParser().feed(b"".join(frames))]
    cpu = {False: 0.0, True: 0.0}
    count = {False: 0, True: 0}
    for i, body in enumerate(bodies):
        paced = (i // 100) % 5 == 4
        if paced:
            time.sleep(PACED_GAP_S)
        t0 = time.process_time()
        headers, rest = parse_event_plain(body)
        event = read(headers, rest, name=headers.get("Event-Name") or "")
        if event is not None:
            tracker.feed(event)
        cpu[paced] += time.process_time() - t0
        count[paced] += 1
    warm, paced = (cpu[k] * 1e6 / count[k] for k in (False, True))
    return {"warm_us_per_event": warm, "paced_us_per_event": paced, "paced_to_warm": paced / warm,
            "gap_ms": PACED_GAP_S * 1000, "events": len(bodies)}


def client_compare(n_requests: int) -> dict:
    """CPU per request of the PlanFix client (geventhttpclient) and of the
    requests/urllib3 path it replaced, each in its own gevent process, 16
    greenlets, against the lean fake PlanFix in this process."""
    pf = FakePlanfix(token=PLANFIX_TOKEN, lean=True).start()
    out = {}
    try:
        for kind in ("requests", "fsbridge"):
            proc = subprocess.run([sys.executable, "-m", "bench", "--client-bench", kind, pf.url, str(n_requests)],
                                  cwd=REPO, capture_output=True, text=True, timeout=300)
            try:
                out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                out[kind] = {"error": (proc.stderr or proc.stdout)[-300:]}
    finally:
        pf.stop()
    return out


def client_bench(kind: str, url: str, n_requests: int) -> None:
    """One side of client_compare: n_requests form POSTs, 16 at a time."""
    # A child process of its own: gevent must patch before the rest is imported.
    from gevent import monkey

    monkey.patch_all()
    import gevent.pool

    fields = {"cmd": "event", "type": "in", "event": "INCOMING", "phone": "79101234567",
              "ext": "101", "callid": "8c4b6d4e-0000-4000-8000-000000000001"}
    if kind == "requests":
        import requests
        from requests.adapters import HTTPAdapter

        # The path fsbridge used before: a prepared request straight to the adapter.
        session = requests.Session()
        session.trust_env = False
        adapter = HTTPAdapter(pool_connections=2, pool_maxsize=20)
        session.mount("http://", adapter)

        def send() -> bool:
            request = requests.PreparedRequest()
            request.prepare(method="POST", url=url, headers={"User-Agent": "fsbridge"},
                            data=dict(fields, planfix_token=PLANFIX_TOKEN))
            resp = adapter.send(request, timeout=(3, 10))
            return resp.status_code == 200 and resp.text is not None
    else:
        from fsbridge.planfix import Credentials, PlanfixClient

        client = PlanfixClient(lambda: Credentials(url, PLANFIX_TOKEN), pool_size=16)

        def send() -> bool:
            return client.send(fields).delivered

    def worker(count: int) -> int:
        return sum(send() for _ in range(count))

    worker(20)  # connections up, code warm
    usage0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    pool = gevent.pool.Pool(16)
    done = sum(pool.map(worker, [n_requests // 16] * 16))
    elapsed = time.monotonic() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime - usage0.ru_utime + usage.ru_stime - usage0.ru_stime
    print(json.dumps({"requests": done, "requests_per_s": done / elapsed, "cpu_us_per_request": cpu * 1e6 / done}))


# -- references ------------------------------------------------------------------


def _reference(inp: Input, n_calls: int, mode: str, planfix_url: str = "") -> dict:
    """Replay n_calls at full speed to a reference client process; its rate
    is events / (first byte received .. last event handled), as it reports."""
    fs = FakeFreeSwitch(core_uuid=inp.core_uuid).start()
    subscribed = set(SUBSCRIBED_EVENTS)
    expected = sum(1 for _ in schedule(inp, n_calls, FULL_SPEED_ORDER_CPS, subscribed))
    # The stream is built before the clock starts, so the generator's own
    # cost does not cap the reference's rate.
    data = [frame for _, _, frame, _ in schedule(inp, n_calls, FULL_SPEED_ORDER_CPS, subscribed)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", f"--{mode}-client", str(fs.port), str(expected),
         planfix_url or "-", " ".join(sorted(subscribed))],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        fs.wait_subscribed(30)
        for i in range(0, len(data), 16):
            fs.stream(b"".join(data[i:i + 16]))
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        fs.stop()
    result = json.loads(out.strip().splitlines()[-1])
    result["calls"] = n_calls
    return result


# One bare run reads its 2,000 calls in 0.06-0.15 s: how the two processes
# happen to share the cores decides much of it (102k to 232k events/s in two
# runs of one day), and the ratios divide by it.  The median of several.
BARE_RUNS = 5


def bare_reference(inp: Input, n_calls: int, runs: int) -> dict:
    """The bare loop's rate: the median of ``runs`` runs (all of them in "runs")."""
    rates = sorted(_reference(inp, n_calls, "bare")["events_per_s"] for _ in range(runs))
    return {"events_per_s": statistics.median(rates), "runs": rates, "calls": n_calls}


def bare_client(port: int, expected: int, events: str) -> None:
    """Reference (a): read the socket and split frames, nothing else."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"auth ClueCon\n\nevent plain " + events.encode() + b"\n\n")
    parser = FrameParser()
    count = -3  # greeting and the two replies
    first = None
    while count < expected:
        chunk = sock.recv(262144)
        if not chunk:
            break
        if first is None and count >= 0:
            first = time.monotonic()
        count += len(parser.feed(chunk))
        if first is None and count >= 0:
            first = time.monotonic()
    elapsed = time.monotonic() - first
    print(json.dumps({"events": count, "seconds": elapsed, "events_per_s": count / elapsed}))


def naive_client(port: int, expected: int, planfix_url: str, events: str) -> None:
    """Reference (b): greenswitch with one synchronous requests.post per event."""
    # A child process of its own: gevent must patch before the rest is imported.
    from gevent import monkey

    monkey.patch_all()
    import gevent
    import greenswitch
    import requests

    session = requests.Session()
    state = {"count": 0, "first": None}

    def handler(event) -> None:
        if state["first"] is None:
            state["first"] = time.monotonic()
        headers = event.headers
        session.post(planfix_url, data={"cmd": "event", "event": headers.get("Event-Name", ""),
                                        "callid": headers.get("Unique-ID", ""),
                                        "planfix_token": PLANFIX_TOKEN}, timeout=10)
        state["count"] += 1

    esl = greenswitch.InboundESL(host="127.0.0.1", port=port, password="ClueCon")
    for name in events.split():
        esl.register_handle(name, handler)
    esl.connect()
    esl.send("event plain " + events)
    while state["count"] < expected:
        gevent.sleep(0.01)
    elapsed = time.monotonic() - state["first"]
    print(json.dumps({"events": state["count"], "seconds": elapsed,
                      "events_per_s": state["count"] / elapsed}))


# -- main -------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def _round(value, digits: int = 1):
    return None if value is None else round(value, digits)


def _rounded(row: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else [_rounded(t) for t in v] if k == "tries" else v
            for k, v in row.items()}


def fmt(value, spec: str = ",.1f", unit: str = "") -> str:
    """A figure for the text report; one that could not be measured says so."""
    if value is None:
        return "not measured"
    return f"{value:{spec}}{unit}"


def attempt(name: str, fn, *args, **kwargs) -> dict:
    """Run one part of the benchmark; a failure is reported, never fatal."""
    try:
        return fn(*args, **kwargs)
    except (Exception, SystemExit) as exc:  # a loaded machine, a crashed service: report and go on
        print(f"{name}: could not be measured: {exc.__class__.__name__}: {str(exc)[:300]}")
        return {}


def main(argv: list[str] | None = None) -> int:
    global SERVICE_TREE  # --service-tree
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("--bare-client", "--naive-client"):
        port, expected, url, events = int(argv[1]), int(argv[2]), argv[3], argv[4]
        if argv[0] == "--bare-client":
            bare_client(port, expected, events)
        else:
            naive_client(port, expected, url, events)
        return 0
    if argv and argv[0] == "--client-bench":
        client_bench(argv[1], argv[2], int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", default=bool(os.environ.get("BENCH_QUICK")),
                        help="short version, a few minutes (also BENCH_QUICK=1)")
    parser.add_argument("--calls", type=int, help="calls for the full-speed run")
    parser.add_argument("--tenants", action="store_true",
                        help="only the tenant (cloud PBX) runs and their one-tenant references")
    single = parser.add_mutually_exclusive_group()
    single.add_argument("--paced", nargs=3, type=float, metavar=("RATE", "SECONDS", "DELAY"),
                        help="only one paced run: RATE calls/s for SECONDS, PlanFix taking DELAY s per "
                             "request (the 20 calls/s line is 20 60 0.150); prints its figures as JSON")
    single.add_argument("--full-speed", type=int, metavar="CALLS",
                        help="only one full-speed run of CALLS calls, instant PlanFix; prints its figures as JSON")
    parser.add_argument("--service-tree", type=Path, metavar="DIR",
                        help="with --paced or --full-speed: run the service from this checkout (another commit, "
                             "e.g. `git worktree add /tmp/before bdbf619`), driven by this benchmark")
    args = parser.parse_args(argv)
    single_run = args.paced is not None or args.full_speed is not None
    if args.full_speed is not None and args.full_speed < 1:
        parser.error(f"--full-speed {args.full_speed}: at least 1 call")
    if args.service_tree is not None:
        if not single_run:
            parser.error("--service-tree goes with --paced or --full-speed")
        if not (args.service_tree / "fsbridge" / "__main__.py").is_file():
            parser.error(f"--service-tree {args.service_tree}: no fsbridge/__main__.py there")
        SERVICE_TREE = args.service_tree.resolve()
    if single_run:
        inp = load_input()
        workroot = Path(tempfile.mkdtemp(prefix="fsbridge-bench-"))
        try:
            if args.paced:
                rate, seconds, delay = args.paced
                got = paced(inp, workroot, "paced", rate, seconds, delay)
                keys = ("rate_cps", "calls", "planfix_delay_s", "cpu_s_per_1000_calls", "p50_ms", "p99_ms",
                        "requests_delivered", "requests_expected", "outbox_growth", "others_cpu_share")
            else:
                got = full_speed(inp, workroot, args.full_speed, args.full_speed // 2, 300.0)
                keys = ("calls", "events", "ingest_events_per_s", "delivered_requests_per_s", "cpu_s_per_1000_calls",
                        "requests_delivered", "requests_expected", "p50_ms", "p99_ms")
        finally:
            shutil.rmtree(workroot, ignore_errors=True)
        print(json.dumps({"service_tree": str(SERVICE_TREE), **{k: got[k] for k in keys}}))
        return 0
    quick = args.quick
    everything = not args.tenants
    clients = bare = naive = pacing = full = intake = slow = sus1 = drain = {}
    n_calls = args.calls or (3_000 if quick else 100_000)
    rss_mark = min(10_000, n_calls // 2) if quick else 10_000
    machine = f"{cpu_model()} x {os.cpu_count()}"

    inp = load_input()
    per_call = sum(len(t.events) for t in inp.templates) / len(inp.templates)
    print(f"fsbridge bench ({'quick' if quick else 'full'}) on {machine}")
    print(f"input: {inp.source}: {len(inp.templates)} calls, {per_call:.1f} events per call "
          f"(all types), {expected_requests(inp, len(inp.templates))} PlanFix requests")
    workroot = Path(tempfile.mkdtemp(prefix="fsbridge-bench-"))
    try:
        if everything:
            clients = attempt("client comparison", client_compare, 4_000 if quick else 20_000)
            for kind, label in (("requests", "requests/urllib3 (before)"), ("fsbridge", "geventhttpclient (fsbridge now)")):
                got = clients.get(kind, {})
                print(f"PlanFix client, {label}: {fmt(got.get('requests_per_s'), ',.0f')} requests/s, "
                      f"{fmt(got.get('cpu_us_per_request'), '.0f', ' us')} CPU per request"
                      + (f" ({got['error']})" if "error" in got else ""))

            # The bare reference gets its stream prebuilt in memory (~75 KB a call).
            ref_calls = 1_000 if quick else 2_000
            bare = attempt("bare loop", bare_reference, inp, ref_calls, BARE_RUNS)
            print(f"(a) bare loop, {ref_calls} calls: {fmt(bare.get('events_per_s'), ',.0f')} events/s, the median of "
                  f"{BARE_RUNS} runs ({', '.join(fmt(r, ',.0f') for r in bare.get('runs', []))})")
            naive_calls = 100 if quick else 1_000
            pf = FakePlanfix(token=PLANFIX_TOKEN, lean=True).start()
            try:
                naive = attempt("naive reference", _reference, inp, naive_calls, "naive", pf.url)
            finally:
                pf.stop()
            print(f"(b) naive greenswitch + requests.post, {naive_calls} calls: {fmt(naive.get('events_per_s'), ',.0f')} events/s")

            pacing = attempt("core pacing", core_pacing, inp, 500 if quick else 1_000)
            print(f"(c) the core alone (parse, reduce, track), {pacing.get('events')} events in this process: "
                  f"{fmt(pacing.get('warm_us_per_event'))} us CPU per event back to back, "
                  f"{fmt(pacing.get('paced_us_per_event'))} us after a {fmt(pacing.get('gap_ms'), '.0f')} ms sleep each "
                  f"(the gap at 20 calls/s): x{fmt(pacing.get('paced_to_warm'), '.1f')} for the same code")

            full = attempt("full speed", full_speed, inp, workroot, n_calls, rss_mark, 20.0 if quick else 60.0)
            print(f"fsbridge, {n_calls} calls at full speed: {fmt(full.get('ingest_events_per_s'), ',.0f')} events/s ingested "
                  f"({full.get('events')} events in {fmt(full.get('ingest_s'), '.1f')} s); "
                  f"{full.get('requests_delivered')}/{full.get('requests_expected')} PlanFix requests delivered at "
                  f"{fmt(full.get('delivered_requests_per_s'), ',.0f')}/s; CPU {fmt(full.get('cpu_s_per_1000_calls'), '.2f')} s "
                  f"per 1,000 calls (until the drain cap)")
            print(f"  ratio to bare loop {_ratio(full.get('ingest_events_per_s'), bare.get('events_per_s'))}, "
                  f"to naive {_ratio(full.get('ingest_events_per_s'), naive.get('events_per_s'))}")
            print(f"  peak RSS {fmt(full.get('rss_mb_at_mark'))} MB after {rss_mark} calls, "
                  f"{fmt(full.get('rss_mb_end'))} MB after {n_calls} calls (RSS now {fmt(full.get('rss_now_mb_end'))} MB)")

            intake = attempt("intake only", intake_only, inp, workroot, 6_000 if quick else 20_000)
            print(f"intake only (PlanFix not set up yet: stored, not sent), {intake.get('calls')} calls: "
                  f"{fmt(intake.get('events_per_s'), ',.0f')} events/s, {fmt(intake.get('cpu_us_per_event'), '.0f')} us CPU per event "
                  f"(ratio to bare loop {_ratio(intake.get('events_per_s'), bare.get('events_per_s'))}); "
                  f"RSS {fmt(intake.get('rss_kb_per_pending_request'), '.3f')} kB per pending request "
                  f"({intake.get('pending')} pending)")

            drain_calls = 10_000 if quick else 30_000
            drain = attempt("backlog drain", backlog_drain, inp, workroot, drain_calls)
            print(f"backlog drain (delivery alone), {drain_calls:,} calls pending at start, instant PlanFix: "
                  f"{drain.get('requests_delivered')}/{drain.get('requests_expected')} requests at "
                  f"{fmt(drain.get('requests_per_s'), ',.0f')}/s, {fmt(drain.get('cpu_us_per_request'), '.0f', ' us')} "
                  f"CPU per request, peak RSS {fmt(drain.get('rss_mb'))} MB")

        fast = attempt("200 calls/s", paced, inp, workroot, "200cps", 200.0, 6.0 if quick else 30.0, 0.0)
        print(f"200 calls/s, instant PlanFix, {fast.get('calls')} calls: latency p50 {fmt(fast.get('p50_ms'), '.1f')} ms, "
              f"p99 {fmt(fast.get('p99_ms'), '.1f')} ms, max {fmt(fast.get('max_ms'), '.1f')} ms "
              f"({fast.get('requests_delivered')}/{fast.get('requests_expected')} requests); "
              f"CPU {fmt(fast.get('cpu_s_per_1000_calls'), '.2f')} s per 1,000 calls")
        if everything:
            slow = attempt("20 calls/s", paced, inp, workroot, "20cps-slow", 20.0, 12.0 if quick else 60.0, 0.150)
            print(f"20 calls/s, PlanFix 150 ms, {slow.get('calls')} calls: latency p50 {fmt(slow.get('p50_ms'), '.1f')} ms, "
                  f"p99 {fmt(slow.get('p99_ms'), '.1f')} ms, max {fmt(slow.get('max_ms'), '.1f')} ms; outbox depth max "
                  f"{slow.get('outbox_depth_max')}, growth {slow.get('outbox_growth')}; "
                  f"CPU {fmt(slow.get('cpu_s_per_1000_calls'), '.2f')} s per 1,000 calls "
                  f"({slow.get('requests_delivered')}/{slow.get('requests_expected')} requests)")

        seconds = 10.0 if quick else 30.0
        # Up to 800 calls/s: past the ~570 calls/s that one PlanFix account's 256 requests
        # in flight carry at 150 ms (3 a call), for the comparison with 50 tenants below.
        ladder150 = [50, 100, 150, 200, 300, 400] + ([] if quick else [600, 800])
        sus150 = attempt("sustained, PlanFix 150 ms", sustained, inp, workroot, 0.150, ladder150, seconds)
        if everything:
            sus1 = attempt("sustained, PlanFix 1 s", sustained, inp, workroot, 1.0, [20, 40, 60, 80], seconds)
        for label, got in (("150 ms", sus150), ("1 s", sus1)) if everything else (("150 ms", sus150),):
            steps = ", ".join(
                f"{t['rate_cps']:g}: {'ok' if t.get('ok') else 'missed'} (p99 {fmt(t.get('p99_ms'), '.0f')} ms, "
                f"growth {t.get('growth')}, PlanFix saw {t.get('planfix_max_in_flight')} in flight)"
                if "error" not in t else f"{t['rate_cps']:g}: {t['error']}"
                for t in got.get("tried", []))
            print(f"sustained calls/s, PlanFix {label} per request, defaults: "
                  f"{fmt(got.get('calls_per_s'), 'g')} [{steps}]")

        # Tenants (cloud PBX): isolation of delivery, then how many one process serves.
        t_counts = [2, 20] if quick else [2, 50]
        t_rate, t_seconds = 200.0, (12.0 if quick else 30.0)
        backlog = 20_000 if quick else 100_000
        cases = [("refused", backlog), ("hang", 0)] if quick else [("refused", 0), ("hang", 0), ("refused", backlog)]
        isolation = attempt("tenant isolation", tenant_isolation, inp, workroot, t_counts, t_rate, t_seconds, cases,
                            {("refused", backlog)} if quick else set()) or []
        print(f"tenants: {t_rate:g} calls/s from all tenants interleaved, instant PlanFix, {t_seconds:g} s a run; "
              f"one tenant's PlanFix (tenant1's) down for the whole run; the other tenants' event -> PlanFix latency:")
        seen_healthy: set[int] = set()
        for row in isolation:
            what = {"": "all healthy", "refused": "tenant1's PlanFix refusing connections",
                    "hang": "tenant1's PlanFix hanging (each request held until read_timeout, 10 s)"}[row["down"]]
            if not row["down"]:
                what += " (again)" if row["tenants"] in seen_healthy else ""
                seen_healthy.add(row["tenants"])
            if row["backlog"]:
                what += f", {row['backlog']:,} calls pending from before (an outage of hours)"
            line = (f"  {row['tenants']} tenants, {what}: p50 {fmt(row['p50_ms'], '.1f')} ms, "
                    f"p99 {fmt(row['p99_ms'], '.1f')} ms, max {fmt(row['max_ms'], '.0f')} ms "
                    f"({row['delivered']}/{row['expected']} requests)")
            if row["down"]:
                line += (f"; to the better all-healthy run: p50 x{fmt(row['p50_to_all_healthy'], '.2f')}, "
                         f"p99 x{fmt(row['p99_to_all_healthy'], '.2f')}; tenant1 sent "
                         f"{fmt(row['down_attempts_per_s'], ',.1f')} requests/s to its PlanFix")
            line += (f"; service CPU {fmt(row['cpu_share'], '.2f')} of a core, "
                     f"{fmt(row['cpu_s_per_1000_calls'], '.2f')} s per 1,000 calls; "
                     f"other processes {fmt(row['others_cpu_share'], '.2f')} cores")
            if "tries" in row:
                line += "; ran twice (p99 " + " ms, then ".join(
                    f"{fmt(t['p99_ms'], '.1f')}" for t in row["tries"]) + " ms; other processes " + ", then ".join(
                    f"{fmt(t['others_cpu_share'], '.2f')}" for t in row["tries"]) + " cores), the better kept"
            print(line + (f" ({row['error']})" if "error" in row else ""))

        idle_counts = [1, 100] if quick else [1, 500]
        idle = attempt("idle tenants", idle_tenants, inp, workroot, idle_counts, 3.0 if quick else 10.0)
        print("tenants, idle (no calls): " + "; ".join(
            f"{r['tenants']}: RSS {r['rss_mb']:.1f} MB, up in {r['start_s']:.1f} s, CPU {r['idle_cpu_share']:.3f} of a core"
            for r in idle.get("runs", [])) + f"; {fmt(idle.get('rss_kb_per_tenant'), ',.0f', ' kB')} RSS per tenant")
        # The same ladder from 200 calls/s on (the first rate missed ends it), 50 tenants.
        many = 50
        many_tenants = make_tenants(many)
        sus_many = attempt(f"sustained, {many} tenants", sustained, tenant_input(inp, many_tenants), workroot,
                           0.150, [r for r in ladder150 if r >= (400 if quick else 200)], seconds, many_tenants)
        steps = ", ".join(
            f"{t['rate_cps']:g}: {'ok' if t.get('ok') else 'missed'} (p99 {fmt(t.get('p99_ms'), '.0f')} ms, "
            f"growth {t.get('growth')}, PlanFix saw {t.get('planfix_max_in_flight')} in flight; CPU: service "
            f"{fmt(t.get('cpu_share'), '.2f')}, benchmark {fmt(t.get('bench_cpu_share'), '.2f')}, "
            f"others {fmt(t.get('others_cpu_share'), '.2f')})"
            if "error" not in t else f"{t['rate_cps']:g}: {t['error']}"
            for t in sus_many.get("tried", []))
        print(f"sustained calls/s, {many} tenants, PlanFix 150 ms per request, defaults: "
              f"{fmt(sus_many.get('calls_per_s'), 'g')} (1 tenant: {fmt(sus150.get('calls_per_s'), 'g')}) [{steps}]")
        cpu_many = next((r["cpu_s_per_1000_calls"] for r in isolation
                         if r["tenants"] == t_counts[-1] and not r["down"]), None)
        print(f"CPU per 1,000 calls at {t_rate:g} calls/s, instant PlanFix: 1 tenant {fmt(fast.get('cpu_s_per_1000_calls'), '.2f')} s, "
              f"{t_counts[-1]} tenants {fmt(cpu_many, '.2f')} s")
    finally:
        shutil.rmtree(workroot, ignore_errors=True)

    def at_least(value, floor):
        return None if value is None else value >= floor

    def at_most(value, ceiling):
        return None if value is None else value <= ceiling

    rss_10k = full.get("rss_mb_at_mark") if rss_mark == 10_000 else None
    rss_100k = full.get("rss_mb_end") if n_calls >= 100_000 else None
    ingest_to_bare = _ratio(full.get("ingest_events_per_s"), bare.get("events_per_s"))
    targets = {
        "sustained calls/s at PlanFix 150 ms >= 150": at_least(sus150.get("calls_per_s"), 150),
        "p99 <= 15 ms at 200 calls/s, instant PlanFix": at_most(fast.get("p99_ms"), 15),
        "ingest_to_bare >= 0.3": at_least(ingest_to_bare, 0.3),
        "CPU <= 1.0 s per 1,000 calls at full speed": at_most(full.get("cpu_s_per_1000_calls"), 1.0),
        "CPU <= 4 s per 1,000 calls at 20 calls/s": at_most(slow.get("cpu_s_per_1000_calls"), 4.0),
        "delivered requests/s >= 5k, instant PlanFix": at_least(full.get("delivered_requests_per_s"), 5000),
        "RSS per pending request <= 0.2 kB": at_most(intake.get("rss_kb_per_pending_request"), 0.2),
        "p99 < 400 ms at 20 calls/s, PlanFix 150 ms": at_most(slow.get("p99_ms"), 400),
        "outbox not growing at 20 calls/s": at_most(slow.get("outbox_growth"), 3),
    }
    if full.get("rss_mb_at_mark") and full.get("rss_mb_end"):
        targets["RSS flat (end <= 1.1 x mark)"] = full["rss_mb_end"] <= 1.1 * full["rss_mb_at_mark"]
    # Issue 16: one tenant's PlanFix down never delays another tenant's events.
    down_rows = [r for r in isolation if r["down"]]
    worst_p99 = max((r["p99_ms"] for r in down_rows if r["p99_ms"] is not None), default=None)
    worst_ratio = max((r["p99_to_all_healthy"] for r in down_rows if r.get("p99_to_all_healthy") is not None),
                      default=None)
    targets["healthy tenants' p99 with another tenant down <= 2 x all healthy"] = at_most(worst_ratio, 2.0)
    targets["every healthy tenant's request delivered with another tenant down"] = (
        all((r["delivered"] or 0) >= (r["expected"] or 1) for r in down_rows) if down_rows else None)
    for name, ok in targets.items():
        print(f"target {name}: {'not measured' if ok is None else 'met' if ok else 'MISSED'}")
    print(json.dumps({
        "ingest_events_per_s": _round(full.get("ingest_events_per_s")),
        "bare_events_per_s": _round(bare.get("events_per_s")),
        "bare_events_per_s_runs": [_round(r) for r in bare.get("runs", [])],
        "naive_events_per_s": _round(naive.get("events_per_s")),
        "core_us_per_event_warm": _round(pacing.get("warm_us_per_event")),
        "core_us_per_event_paced": _round(pacing.get("paced_us_per_event")),
        "core_paced_to_warm": _round(pacing.get("paced_to_warm"), 2),
        "ingest_to_bare": ingest_to_bare,
        "ingest_to_naive": _ratio(full.get("ingest_events_per_s"), naive.get("events_per_s")),
        "intake_only_events_per_s": _round(intake.get("events_per_s")),
        "intake_only_cpu_us_per_event": _round(intake.get("cpu_us_per_event")),
        "delivered_requests_per_s": _round(full.get("delivered_requests_per_s")),
        # Delivery alone (a backlog drained, no intake): see backlog_drain.
        "drain_requests_per_s": _round(drain.get("requests_per_s")),
        "drain_cpu_us_per_request": _round(drain.get("cpu_us_per_request")),
        "p50_ms_200cps": _round(fast.get("p50_ms"), 2),
        "p99_ms_200cps": _round(fast.get("p99_ms"), 2),
        "max_ms_200cps": _round(fast.get("max_ms"), 2),
        "p50_ms_20cps_slow": _round(slow.get("p50_ms"), 2),
        "p99_ms_20cps_slow": _round(slow.get("p99_ms"), 2),
        "max_ms_20cps_slow": _round(slow.get("max_ms"), 2),
        "outbox_growth_20cps_slow": slow.get("outbox_growth"),
        # The full-speed run's CPU (intake and the deliveries made until the
        # drain cap: see full_speed_requests_*); the 20 calls/s run's CPU is
        # for calls delivered completely, at a rate where nothing batches.
        "cpu_s_per_1000_calls": _round(full.get("cpu_s_per_1000_calls"), 3),
        "cpu_s_per_1000_calls_20cps": _round(slow.get("cpu_s_per_1000_calls"), 3),
        "cpu_s_per_1000_calls_200cps": _round(fast.get("cpu_s_per_1000_calls"), 3),
        "full_speed_requests_delivered": full.get("requests_delivered"),
        "full_speed_requests_expected": full.get("requests_expected"),
        "rss_mb_10k_calls": _round(rss_10k),
        "rss_mb_100k_calls": _round(rss_100k),
        "rss_mb_mark": _round(full.get("rss_mb_at_mark")),
        "rss_mark_calls": rss_mark,
        "rss_mb_end": _round(full.get("rss_mb_end")),
        "sustained_calls_per_s_150ms": sus150.get("calls_per_s"),
        "sustained_calls_per_s_1s": sus1.get("calls_per_s"),
        "rss_kb_per_pending_request": _round(intake.get("rss_kb_per_pending_request"), 3),
        # The worst of the tenant-down runs (tenant_isolation has each).
        "p99_ms_healthy_tenant_other_down": _round(worst_p99, 2),
        "p99_ratio_healthy_tenant_other_down": worst_ratio,
        "tenant_isolation": [_rounded(r) for r in isolation],
        "tenant_counts": t_counts,
        "tenants_idle": [_rounded(r) for r in idle.get("runs", [])],
        "rss_kb_per_idle_tenant": _round(idle.get("rss_kb_per_tenant")),
        "sustained_tenants": many,
        "sustained_calls_per_s_150ms_many_tenants": sus_many.get("calls_per_s"),
        "cpu_s_per_1000_calls_200cps_many_tenants": _round(cpu_many, 3),
        "client_requests_cpu_us_per_request": _round(clients.get("requests", {}).get("cpu_us_per_request")),
        "client_fsbridge_cpu_us_per_request": _round(clients.get("fsbridge", {}).get("cpu_us_per_request")),
        "client_requests_per_s_requests": _round(clients.get("requests", {}).get("requests_per_s")),
        "client_requests_per_s_fsbridge": _round(clients.get("fsbridge", {}).get("requests_per_s")),
        "calls": n_calls,
        "events": full.get("events"),
        "quick": quick,
        "targets_met": all(ok is True for ok in targets.values()),
        "cpu": machine,
        "input": inp.source,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
