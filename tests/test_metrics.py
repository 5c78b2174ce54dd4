"""Prometheus metrics through the real service process, and the dashboard / alert rules in docs/."""

from __future__ import annotations

import json
import re

import requests

from fsbridge import metrics
from fsbridge.fakes.freeswitch import CAPTURES, FakeFreeSwitch
from fsbridge.fakes.planfix import FakePlanfix
from tests.conftest import REPO
from tests.service_proc import ServiceProcess

SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$")


def scrape(service: ServiceProcess) -> dict[str, float]:
    """{'name{labels}': value} of one /metrics answer."""
    answer = requests.get(service.metrics_url, timeout=5)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for line in answer.text.splitlines():
        if line and not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match, line
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def test_metrics_move_as_a_call_flows(tmp_path):
    with FakePlanfix() as planfix, FakeFreeSwitch() as fs:
        planfix.contacts["79101234567"] = {"contact_name": "Ivan Petrov", "responsible": 101}
        with ServiceProcess(tmp_path, fs_port=fs.port, planfix_url=planfix.url,
                            planfix_token=planfix.token) as service:
            service.wait_health(lambda h: h["freeswitch"]["state"] == "connected")
            before = scrape(service)
            assert before['fsbridge_esl_up{node="default"}'] == 1
            assert before['fsbridge_outbox_depth{tenant="default"}'] == 0
            assert before.get('fsbridge_planfix_requests_total{command="event",outcome="delivered",tenant="default"}', 0) == 0

            lookup = requests.get(service.dialplan_url + "/dialplan/contact",
                                  params={"phone": "79101234567"}, timeout=5)
            assert lookup.text.startswith("status=found")
            fs.replay(CAPTURES / "01-inbound-single-answer.plain.txt.gz").wait(10)
            assert planfix.wait_for(4, timeout=15)  # contact + INCOMING, ACCEPTED, COMPLETED
            service.wait_health(lambda h: h["outbox"]["depth"] == 0)
            refused = service.post(cmd="makeCall", token=service.token, **{"from": "not-an-ext", "to": "1"})
            assert refused.status_code == 400
            after = scrape(service)

    assert after['fsbridge_planfix_requests_total{command="event",outcome="delivered",tenant="default"}'] == 3
    assert after['fsbridge_planfix_requests_total{command="contact",outcome="found",tenant="default"}'] == 1
    assert after['fsbridge_planfix_request_seconds_count{command="event"}'] == 3
    assert after['fsbridge_event_to_planfix_seconds_count{tenant="default"}'] == 3
    assert after['fsbridge_esl_events_total{event="CHANNEL_CREATE"}'] >= 2
    assert after['fsbridge_esl_events_total{event="CHANNEL_HANGUP_COMPLETE"}'] >= 2
    assert after['fsbridge_lookups_total{result="fetch_ok"}'] >= 1
    assert after["fsbridge_lookup_seconds_count"] >= 1
    assert after['fsbridge_click_to_call_total{outcome="refused",reason="invalid_parameters"}'] == 1
    assert after['fsbridge_esl_reconnects_total{node="default"}'] == 0
    assert after["fsbridge_open_calls"] == 0
    assert after['fsbridge_outbox_last_success_timestamp_seconds{tenant="default"}'] > 0
    assert "makeCall from 127.0.0.1 refused with 400: from must be one extension" in service.log()
    # every exported family really appears
    families = {re.sub(r"(_bucket|_count|_sum|_created)$", "", k.split("{")[0]) for k in after}
    missing = [name for name in metrics.EXPORTED if name not in families and name + "_total" not in families]
    assert missing in ([], ["fsbridge_recordings_total"]), missing  # no conversion ran here


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bfsbridge_[a-z_]+", expr))


def exported(name: str) -> bool:
    base = re.sub(r"_(bucket|count|sum)$", "", name)
    return base in metrics.EXPORTED


def test_dashboard_is_valid_json_and_uses_only_exported_metrics():
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 10
    used = set().union(*map(metric_names, exprs))
    assert used and all(exported(name) for name in used), sorted(n for n in used if not exported(n))


def test_alert_rules_use_only_exported_metrics():
    text = (REPO / "docs" / "alerts.yml").read_text()
    alerts = re.findall(r"^      - alert: (\w+)$", text, re.M)
    exprs = re.findall(r"^        expr: (.+)$", text, re.M)
    assert set(alerts) >= {"FsbridgeEslDown", "FsbridgeOutboxGrowing", "FsbridgeDeliveriesFailing"}
    assert len(exprs) == len(alerts)
    used = set().union(*map(metric_names, exprs))
    assert used and all(exported(name) for name in used), used


def test_lock_free_histogram_exposes_what_a_prometheus_histogram_would(monkeypatch):
    """The per-request histograms skip prometheus_client's lock; their text must not change."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    values = [0.0, 0.004, 0.005, 0.0051, 0.3, 1, 1800, 1800.5, 7e3]
    reference_registry = CollectorRegistry()
    reference = Histogram("fsbridge_planfix_request_seconds", "Time of one PlanFix request (delivery latency), by command",
                          ["command"], buckets=metrics._LATENCY, registry=reference_registry)
    monkeypatch.setattr(metrics, "PLANFIX_SECONDS", {})
    monkeypatch.setattr(metrics, "PLANFIX_REQUESTS", {})
    monkeypatch.setattr(metrics, "EVENT_TO_PLANFIX", {})
    for value in values:
        reference.labels("event").observe(value)
        metrics._histogram(metrics.PLANFIX_SECONDS, "event").observe(value)
    metrics.count_request("event", "delivered", "acme")
    metrics.count_request("event", "delivered", "acme")

    ours_registry = CollectorRegistry()
    ours_registry.register(metrics._PlanfixCollector())
    ours = generate_latest(ours_registry).decode()
    expected = [line for line in generate_latest(reference_registry).decode().splitlines()
                if "_created" not in line]
    assert [line for line in ours.splitlines() if line.startswith("fsbridge_planfix_request_seconds")] == \
        [line for line in expected if not line.startswith("#")]
    assert 'fsbridge_planfix_requests_total{command="event",outcome="delivered",tenant="acme"} 2.0' in ours
