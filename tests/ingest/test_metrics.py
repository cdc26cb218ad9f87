"""GET /metrics: exact counts across API and worker processes, gauges that follow the queues."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from ingest import create_app
from tests.conftest import TOKEN, ApiProcess, count, fixture_bytes, post, wait_for

ADMIN = "admin-token-abcdef"
METRICS = "metrics-token-123456"
# a v2 conversion without `contact`: valid JSON the endpoint accepts, that cannot be normalised
NO_CONTACT = json.dumps({"event_type": "WEBHOOK.CONVERTED", "entity_type": "CONTACT",
                         "event_identifier": "x", "timestamp": "2025-01-01T00:00:00Z",
                         "event_timestamp": "2025-01-01T00:00:00Z"}).encode()

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def routes(tmp_path: Path, sinks: dict, routes: list) -> str:
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({"sinks": sinks, "routes": routes}))
    return str(path)


@pytest.fixture
def metered(settings: Settings, tmp_path: Path) -> Settings:
    """Every event to `audit`; deals also to `refuser`, which refuses them for good."""
    return settings.with_(
        admin_tokens=(ADMIN,), metrics_tokens=(METRICS,), worker_concurrency=1,
        routes_file=routes(tmp_path, {
            "audit": {"type": "dummy", "options": {"path": str(tmp_path / "audit.jsonl")}},
            "refuser": {"type": "dummy", "options": {"path": "x", "fail": "permanent"}},
        }, [{"to": ["audit"]}, {"to": ["refuser"], "when": {"match": ["deal.id exists"]}}]))


@pytest.fixture
def api(metered: Settings, tmp_path: Path) -> Iterator[ApiProcess]:
    process = ApiProcess(metered, tmp_path / "api.log", workers=2)
    yield process
    process.stop()


MIX = [  # (fixture or body, times, token, content type)
    ("mkt-v2-converted.json", 3, TOKEN, "application/json"),  # 1 new, 2 duplicates
    ("mkt-v2-marked-opportunity.json", 1, TOKEN, "application/json"),
    ("legacy-leads-official.json", 1, TOKEN, "application/json"),
    ("crm-deal-created.json", 1, TOKEN, "application/json"),
    ("crm-deal-updated-won.json", 2, TOKEN, "application/json"),  # 1 new, 1 duplicate
    (NO_CONTACT, 1, TOKEN, "application/json"),  # quarantined
    ("mkt-v2-converted.json", 2, "wrong-token", "application/json"),  # 401
    (b"{not json", 1, TOKEN, "application/json"),  # 400
    ("crm-deal-created.json", 1, TOKEN, "text/plain"),  # 415
]


def test_exact_counts_from_two_api_processes_and_two_workers(metered, api, worker_factory, db):
    worker_factory(metered)
    worker_factory(metered)
    session = requests.Session()
    statuses: list[int] = []
    for body, times, token, content_type in MIX:
        data = body if isinstance(body, bytes) else fixture_bytes(body)
        for _ in range(times):  # a new connection each: both API processes take requests
            statuses.append(requests.post(f"{api.url}/webhooks/rdstation?token={token}",
                                          data=data, headers={"Content-Type": content_type},
                                          timeout=10).status_code)
    assert sorted(statuses) == sorted([202] * 9 + [401] * 2 + [400] + [415])
    wait_for(lambda: count(db, "SELECT count(*) FROM deliveries WHERE status = 'pending'") == 0
             and count(db, "SELECT count(*) FROM deliveries") == 7
             and count(db, "SELECT count(*) FROM quarantine") == 1, timeout=60,
             what="the mix stored and delivered")

    expected = {
        ("leadpipe_ingest_requests_total", (("status", "202"),)): 9,
        ("leadpipe_ingest_requests_total", (("status", "401"),)): 2,
        ("leadpipe_ingest_requests_total", (("status", "400"),)): 1,
        ("leadpipe_ingest_requests_total", (("status", "415"),)): 1,
        ("leadpipe_events_total", (("event_type", "WEBHOOK.CONVERTED"),
                                   ("outcome", "accepted"))): 2,  # v2 + legacy
        ("leadpipe_events_total", (("event_type", "WEBHOOK.CONVERTED"),
                                   ("outcome", "duplicate"))): 2,
        ("leadpipe_events_total", (("event_type", "WEBHOOK.CONVERTED"),
                                   ("outcome", "quarantined"))): 1,
        ("leadpipe_events_total", (("event_type", "WEBHOOK.MARKED_OPPORTUNITY"),
                                   ("outcome", "accepted"))): 1,
        ("leadpipe_events_total", (("event_type", "crm_deal_created"),
                                   ("outcome", "accepted"))): 1,
        ("leadpipe_events_total", (("event_type", "crm_deal_updated"),
                                   ("outcome", "accepted"))): 1,
        ("leadpipe_events_total", (("event_type", "crm_deal_updated"),
                                   ("outcome", "duplicate"))): 1,
        ("leadpipe_deliveries_total", (("outcome", "delivered"), ("sink", "audit"))): 5,
        ("leadpipe_deliveries_total", (("outcome", "dead"), ("sink", "refuser"))): 2,
        ("leadpipe_delivery_duration_seconds_count", (("outcome", "delivered"),
                                                      ("sink", "audit"))): 5,
        ("leadpipe_delivery_duration_seconds_count", (("outcome", "permanent"),
                                                      ("sink", "refuser"))): 2,
        ("leadpipe_delivery_lag_seconds_count", (("sink", "audit"),)): 5,
        ("leadpipe_dead_letters", (("sink", "refuser"),)): 2,
        ("leadpipe_dead_letters", (("sink", "audit"),)): 0,
        ("leadpipe_sink_queue_depth", (("sink", "audit"),)): 0,
        ("leadpipe_quarantined", ()): 1,
        ("leadpipe_erasures_unfinished", ()): 0,
        ("leadpipe_ingest_queue_depth", ()): 0,
        ("leadpipe_sink_paused", (("sink", "audit"),)): 0,
        ("leadpipe_sink_circuit", (("sink", "refuser"), ("state", "closed"))): 1,
    }

    def scrape() -> dict:
        response = session.get(api.url + "/metrics", headers={"Authorization": f"Bearer {METRICS}"},
                               timeout=10)
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        samples = parse(response.text)
        return {key: value(samples, key[0], **dict(key[1])) for key in expected}

    wait_for(lambda: scrape() == expected, timeout=20, what="the expected counts")
    time.sleep(1.5)  # no process flushes anything more: the counts are exact, not lower bounds
    assert scrape() == expected
    families = {f.name: f for f in text_string_to_metric_families(
        session.get(api.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"},
                    timeout=10).text)}
    assert families["leadpipe_delivery_duration_seconds"].type == "histogram"
    assert families["leadpipe_ingest_requests"].type == "counter"


def test_queue_gauges_grow_while_waiting_and_fall_when_released(settings, worker_factory,
                                                                tmp_path, db):
    held = settings.with_(admin_tokens=(ADMIN,), routes_file=routes(
        tmp_path, {"held": {"type": "dummy", "options": {"path": str(tmp_path / "h.jsonl")}}},
        [{"to": ["held"]}]))
    client = create_app(held).test_client()
    admin = {"Authorization": f"Bearer {ADMIN}"}

    def scrape() -> Samples:
        response = client.get("/metrics", headers=admin)
        assert response.status_code == 200
        return parse(response.get_data(as_text=True))

    # no worker yet: the ingest stream holds the events
    for body in ("mkt-v2-converted.json", "mkt-v2-marked-opportunity.json"):
        assert post(client, fixture_bytes(body)).status_code == 202
    first = scrape()
    assert value(first, "leadpipe_ingest_queue_depth") == 2
    assert value(first, "leadpipe_ingest_queue_unread") == 2
    time.sleep(1.1)
    assert value(scrape(), "leadpipe_ingest_queue_oldest_age_seconds") >= 1.0

    assert client.post("/api/sinks/held/pause", headers=admin).status_code == 200
    worker_factory(held)
    wait_for(lambda: value(scrape(), "leadpipe_ingest_queue_depth") == 0, what="stream drained")
    assert value(scrape(), "leadpipe_ingest_queue_oldest_age_seconds") == 0
    wait_for(lambda: count(db, "SELECT count(*) FROM deliveries") == 2, what="deliveries")
    paused = scrape()
    assert value(paused, "leadpipe_sink_paused", sink="held") == 1
    assert value(paused, "leadpipe_sink_queue_depth", sink="held") == 2
    age = value(paused, "leadpipe_sink_queue_oldest_age_seconds", sink="held")
    lead_age = value(paused, "leadpipe_sink_oldest_undelivered_lead_age_seconds", sink="held")
    assert lead_age >= 1.0  # the leads arrived before the worker started
    post(client, fixture_bytes("legacy-leads-official.json"))
    wait_for(lambda: count(db, "SELECT count(*) FROM deliveries") == 3, what="third delivery")
    time.sleep(1.0)
    later = scrape()
    assert value(later, "leadpipe_sink_queue_depth", sink="held") == 3
    assert value(later, "leadpipe_sink_queue_oldest_age_seconds", sink="held") >= age + 1.0
    assert value(later, "leadpipe_sink_oldest_undelivered_lead_age_seconds",
                 sink="held") >= lead_age + 1.0
    assert count(db, "SELECT count(*) FROM deliveries WHERE status = 'delivered'") == 0

    assert client.post("/api/sinks/held/resume", headers=admin).status_code == 200
    wait_for(lambda: value(scrape(), "leadpipe_sink_queue_depth", sink="held") == 0,
             what="the paused sink's queue to drain")
    released = scrape()
    assert value(released, "leadpipe_sink_paused", sink="held") == 0
    assert value(released, "leadpipe_sink_queue_oldest_age_seconds", sink="held") == 0
    assert value(released, "leadpipe_sink_oldest_undelivered_lead_age_seconds", sink="held") == 0


def test_metrics_access_by_token_or_allowed_address(settings):
    open_to_loopback = settings.with_(metrics_tokens=(METRICS,), admin_tokens=(ADMIN,))
    client = create_app(open_to_loopback).test_client()
    assert client.get("/metrics").status_code == 401
    for token, status in ((METRICS, 200), (ADMIN, 200), ("guess", 401), (TOKEN, 401)):
        response = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == status, token
    assert client.get("/metrics").get_json()["errors"]["error_type"] == "UNAUTHORIZED"
    allowed = create_app(settings.with_(metrics_allow=("127.0.0.0/8",))).test_client()
    assert allowed.get("/metrics").status_code == 200  # the test client comes from 127.0.0.1
    assert allowed.get("/metrics", environ_base={"REMOTE_ADDR": "10.1.2.3"}).status_code == 401
    # a server listening on :: (dual stack) gives IPv4 clients as IPv4-mapped IPv6 addresses
    for peer, status in (("::ffff:127.0.0.1", 200), ("::ffff:10.1.2.3", 401), ("::1", 401)):
        assert allowed.get("/metrics", environ_base={"REMOTE_ADDR": peer}).status_code == status
    mapped = create_app(settings.with_(metrics_allow=("::ffff:10.0.0.0/104",))).test_client()
    for peer, status in (("::ffff:10.1.2.3", 200), ("10.1.2.3", 401), ("::ffff:11.0.0.1", 401)):
        assert mapped.get("/metrics", environ_base={"REMOTE_ADDR": peer}).status_code == status
    elsewhere = create_app(settings.with_(metrics_allow=("10.0.0.0/8",))).test_client()
    assert elsewhere.get("/metrics").status_code == 401
