"""Prometheus metrics: the metric objects, and their own listener (``[metrics] listen``).

Callers bump what happens as it happens (``metrics.CLICK_TO_CALL...inc()``).
What is counted for every event or PlanFix request -- events read
(``EVENT_COUNTS``), PlanFix requests and their times (``InstrumentedClient``,
``delivered``) -- goes into plain dicts and lock-free histograms, exported at
scrape time: a prometheus_client metric takes a lock per observation, and
those were ~8% of a delivered request's CPU.  The service is one gevent
thread, so nothing interleaves an update.
What is a state -- ESL connection, outbox depth and age, kept-aside
requests, open calls, lookup counters -- is read from ``Service.health()``
at scrape time (:class:`HealthCollector`), so it can never drift from
``/healthz``.  ``serve(listen, health)`` starts ``GET /metrics`` on a
gevent WSGI server; an empty ``listen`` disables it.

``EXPORTED`` lists every metric name this module exports (the Grafana
dashboard and the alert rules in docs/ may use only these; a test checks).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any, Callable

from flask import g
from gevent.pywsgi import WSGIServer
from prometheus_client import REGISTRY, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

# Seconds: PlanFix answers in tens of milliseconds; an outage retries for minutes.
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
_LOOKUP = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 5)

# Event-Name -> events read.  A plain dict, not a Counter: a Counter's inc()
# takes a lock, about 1.5 us on every event the reader parses.
EVENT_COUNTS: dict[str, int] = {}


class _EventCountsCollector:
    def collect(self):
        family = CounterMetricFamily("fsbridge_esl_events", "FreeSWITCH events read, by Event-Name",
                                     labels=["event"])
        for name, count in sorted(EVENT_COUNTS.items()):
            family.add_metric([name], count)
        yield family


REGISTRY.register(_EventCountsCollector())


class FastHistogram:
    """Bucket counts and a sum, without a lock (see the module docstring)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: the first bound >= value
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative (le, count) pairs, as Prometheus exposes them."""
        out, total = [], 0
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return out


# (command, outcome, tenant) -> requests; command -> request times; tenant -> store-to-200 times.
PLANFIX_REQUESTS: dict[tuple[str, str, str], int] = {}
PLANFIX_SECONDS: dict[str, FastHistogram] = {}
EVENT_TO_PLANFIX: dict[str, FastHistogram] = {}


class _PlanfixCollector:
    def collect(self):
        requests = CounterMetricFamily("fsbridge_planfix_requests",
                                       "Requests sent to PlanFix, by command, outcome and tenant",
                                       labels=["command", "outcome", "tenant"])
        for labels, count in sorted(PLANFIX_REQUESTS.items()):
            requests.add_metric(list(labels), count)
        yield requests
        for name, doc, label, histograms in (
            ("fsbridge_planfix_request_seconds", "Time of one PlanFix request (delivery latency), by command",
             "command", PLANFIX_SECONDS),
            ("fsbridge_event_to_planfix_seconds",
             "From storing a PlanFix command to PlanFix's 200 (retries included), by tenant", "tenant",
             EVENT_TO_PLANFIX),
        ):
            family = HistogramMetricFamily(name, doc, labels=[label])
            for value, histogram in sorted(histograms.items()):
                family.add_metric([value], histogram.buckets(), histogram.sum)
            yield family


REGISTRY.register(_PlanfixCollector())


def _histogram(histograms: dict[str, FastHistogram], key: str) -> FastHistogram:
    found = histograms.get(key)
    if found is None:
        found = histograms[key] = FastHistogram(_LATENCY)
    return found


def count_request(command: str, outcome: str, tenant: str) -> None:
    key = (command, outcome, tenant)
    PLANFIX_REQUESTS[key] = PLANFIX_REQUESTS.get(key, 0) + 1


LOOKUP_SECONDS = Histogram("fsbridge_lookup_seconds", "Dialplan caller-name lookups: time to answer",
                           buckets=_LOOKUP)
CLICK_TO_CALL = Counter("fsbridge_click_to_call", "makeCall requests: accepted, or refused by reason",
                        ["outcome", "reason"])
UNROUTED = Counter("fsbridge_unrouted_commands",
                   "PlanFix commands of calls no tenant owns (domain/DID unknown): sent nowhere")
RECORDINGS = Counter("fsbridge_recordings", "Recordings converted to MP3, or failed (WAV sent)", ["result"])

_REFUSAL = {400: "invalid_parameters", 401: "invalid_token", 413: "too_large", 429: "blocked",
            503: "freeswitch_unavailable"}


def refusal_reason(status: int) -> str:
    return _REFUSAL.get(status, f"http_{status}")


class HealthCollector:
    """States read from ``health()`` at scrape time."""

    def __init__(self, health: Callable[[], dict[str, Any]]) -> None:
        self.health = health

    def collect(self):
        h = self.health()
        nodes = h.get("nodes") or {"default": h.get("freeswitch", {})}
        up = GaugeMetricFamily("fsbridge_esl_up", "1 while connected to FreeSWITCH's Event Socket, by node",
                               labels=["node"])
        reconnects = CounterMetricFamily("fsbridge_esl_reconnects",
                                         "ESL connections made after the first one, by node", labels=["node"])
        for name, fs in sorted(nodes.items()):
            up.add_metric([name], 1.0 if fs.get("state") == "connected" else 0.0)
            reconnects.add_metric([name], max(0, int(fs.get("connections") or 0) - 1))
        yield up
        yield reconnects
        tenants = h.get("tenants") or {"default": {"outbox": h.get("outbox", {})}}
        for name, key, doc in (
            ("fsbridge_outbox_depth", "depth", "PlanFix commands waiting for delivery"),
            ("fsbridge_outbox_oldest_pending_seconds", "oldest_pending_age_s", "Age of the oldest waiting command"),
            ("fsbridge_outbox_kept_aside", "kept_aside", "Commands PlanFix refused, kept aside (fsbridge outbox)"),
            ("fsbridge_outbox_in_flight", "in_flight", "Commands being sent now"),
            ("fsbridge_outbox_last_success_timestamp_seconds", "last_success_at",
             "When PlanFix last answered 200 (Unix time; 0 never)"),
        ):
            gauge = GaugeMetricFamily(name, doc + ", by tenant", labels=["tenant"])
            for tenant, stats in sorted(tenants.items()):
                gauge.add_metric([tenant], float((stats.get("outbox") or {}).get(key) or 0))
            yield gauge
        configured = GaugeMetricFamily("fsbridge_tenant_planfix_configured",
                                       "1 once the tenant's PlanFix address and token are known (setup)",
                                       labels=["tenant"])
        for tenant, stats in sorted(tenants.items()):
            configured.add_metric([tenant], 1.0 if stats.get("planfix_configured", True) else 0.0)
        yield configured
        calls = GaugeMetricFamily("fsbridge_open_calls", "Calls in progress")
        calls.add_metric([], float(h.get("open_calls") or 0))
        yield calls
        lookups = CounterMetricFamily("fsbridge_lookups", "Dialplan lookups and PlanFix contact fetches, by result",
                                      labels=["result"])
        for result, count in sorted((h.get("dialplan_lookup") or {}).items()):
            if result not in ("cached", "inflight"):
                lookups.add_metric([result], count)
        yield lookups


class InstrumentedClient:
    """A PlanfixClient that counts and times every request (the rest passes through)."""

    def __init__(self, client: Any, tenant: str = "default") -> None:
        self._client = client
        self._tenant = tenant

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def send(self, fields: dict[str, str]):
        command = fields.get("cmd", "?")
        started = time.monotonic()
        result = self._client.send(fields)
        _histogram(PLANFIX_SECONDS, command).observe(time.monotonic() - started)
        count_request(command, result.outcome.value, self._tenant)
        return result

    def contact(self, *args: Any, **kwargs: Any):
        started = time.monotonic()
        outcome = "error"
        try:
            found = self._client.contact(*args, **kwargs)
            outcome = "found" if found is not None else "not_found"
            return found
        finally:
            _histogram(PLANFIX_SECONDS, "contact").observe(time.monotonic() - started)
            count_request("contact", outcome, self._tenant)


def delivered(created_at: float, tenant: str = "default") -> None:
    """A command PlanFix accepted, stored at ``created_at`` (Unix time)."""
    _histogram(EVENT_TO_PLANFIX, tenant).observe(max(0.0, time.time() - created_at))


def time_requests(app: Any, histogram: Histogram = LOOKUP_SECONDS) -> None:
    """Observe every request of a Flask app (the lookup listener) in ``histogram``."""
    @app.before_request
    def _start() -> None:
        g.fsbridge_started = time.monotonic()

    @app.teardown_request
    def _stop(exc: BaseException | None) -> None:
        started = g.pop("fsbridge_started", None)
        if started is not None:
            histogram.observe(time.monotonic() - started)


_collector: HealthCollector | None = None

EXPORTED = (
    "fsbridge_esl_up", "fsbridge_esl_reconnects_total", "fsbridge_esl_events_total",
    "fsbridge_planfix_requests_total", "fsbridge_planfix_request_seconds",
    "fsbridge_event_to_planfix_seconds", "fsbridge_outbox_depth", "fsbridge_outbox_oldest_pending_seconds",
    "fsbridge_outbox_kept_aside", "fsbridge_outbox_in_flight", "fsbridge_outbox_last_success_timestamp_seconds",
    "fsbridge_open_calls", "fsbridge_lookups_total", "fsbridge_lookup_seconds", "fsbridge_click_to_call_total",
    "fsbridge_recordings_total",
)


def serve(listen: Any, health: Callable[[], dict[str, Any]]):
    """Start ``GET /metrics`` on ``listen`` (a config Listen, or None: disabled); returns the server."""
    global _collector
    if _collector is None:
        _collector = HealthCollector(health)
        REGISTRY.register(_collector)
    else:
        _collector.health = health
    if not listen:
        return None
    server = WSGIServer((listen.host, listen.port), make_wsgi_app(REGISTRY), log=None)
    server.start()
    return server
