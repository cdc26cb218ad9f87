"""One event's journey through the JSON logs of real API and worker processes, with PII masked."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.conftest import TOKEN, ApiProcess, count, fixture_bytes, wait_for
from tests.support.http_server import HttpServer
from tests.support.smtp_server import SmtpServer

POSTED = ["mkt-v2-marked-opportunity.json", "mkt-v2-converted.json", "legacy-leads-full.json",
          "crm-deal-updated-won.json"]
# a conversion whose timestamp is junk: quarantined, with an address in the body
QUARANTINED = json.dumps({"event_type": "WEBHOOK.CONVERTED", "event_timestamp": "soon",
                          "contact": {"email": "held.back@example.net", "name": "Held Back",
                                      "mobile_phone": "+55 11 98888-7777"}}).encode()


def emails_in(value: Any) -> set[str]:
    if isinstance(value, dict):
        return {e for k, v in value.items() for e in emails_in(v)} | (
            {value["email"]} if isinstance(value.get("email"), str) else set())
    if isinstance(value, list):
        return {e for v in value for e in emails_in(v)}
    if isinstance(value, str) and "@" in value and " " not in value:
        return {value}
    return set()


@pytest.fixture
def journey(settings, tmp_path) -> Iterator[tuple[Any, HttpServer, SmtpServer]]:
    with HttpServer() as crm, SmtpServer() as smtp:
        routes = tmp_path / "routes.yaml"
        routes.write_text(yaml.safe_dump({
            "sinks": {
                "crm": {"type": "crm", "options": {"base_url": crm.url, "timeout": 2,
                                                   "auth_value": "Bearer crm-secret"}},
                "sales-email": {"type": "email", "options": {
                    "host": smtp.host, "port": smtp.port, "security": "none",
                    "from": "leadpipe@example.com", "to": ["sales@example.com"]}},
                "refuser": {"type": "dummy", "options": {"path": "x", "fail": "permanent"}}},
            "routes": [{"to": ["crm"]},
                       {"to": ["sales-email"], "when": {"match": ["funnel.opportunity == true"]}},
                       {"to": ["refuser"], "when": {"match": ["deal.id exists"]}}]}))
        yield settings.with_(routes_file=str(routes), log_level="INFO"), crm, smtp


def read_lines(paths: list[Path]) -> list[dict[str, Any]]:
    lines = []
    for path in paths:
        for raw in path.read_text().splitlines():
            assert raw.startswith("{"), f"not a JSON line in {path.name}: {raw!r}"
            lines.append({**json.loads(raw), "file": path.name})
    return lines


def test_one_event_followed_from_ingest_to_each_sink_without_raw_emails(
        journey, tmp_path, worker_factory, db):
    custom, crm, smtp = journey
    worker_factory(custom)
    api = ApiProcess(custom, tmp_path / "api.log")
    try:
        ids = {}
        for name in POSTED:
            answer = requests.post(f"{api.url}/webhooks/rdstation?token={TOKEN}",
                                   data=fixture_bytes(name), timeout=10,
                                   headers={"Content-Type": "application/json"})
            assert answer.status_code == 202
            ids[name] = answer.json()["id"]
        assert requests.post(f"{api.url}/webhooks/rdstation?token={TOKEN}", data=QUARANTINED,
                             headers={"Content-Type": "application/json"},
                             timeout=10).status_code == 202
        wait_for(lambda: count(db, "SELECT count(*) FROM events") == len(POSTED)
                 and count(db, "SELECT count(*) FROM quarantine") == 1, what="stored")
        wait_for(lambda: count(db, "SELECT count(*) FROM deliveries WHERE status = 'pending'")
                 == 0, timeout=60, what="every delivery settled")
        assert count(db, "SELECT count(*) FROM dead_letters") == 1  # the deal, by `refuser`
        assert len(smtp.messages) == 2  # the two opportunities (v2 and legacy)
    finally:
        api.stop()
    logs = [tmp_path / "api.log", *sorted(tmp_path.glob("worker-*.log"))]
    lines = read_lines(logs)

    def journey_of(event_id: str) -> list[dict[str, Any]]:
        return [line for line in lines if line.get("event_id") == event_id
                or event_id in line.get("event_ids", ())]

    # the opportunity: arrival in its batch, then each sink it was routed to
    opportunity = journey_of(ids["mkt-v2-marked-opportunity.json"])
    received = [line for line in opportunity if line["msg"] == "batch received"]
    assert len(received) == 1 and received[0]["task_id"]
    batch_task = received[0]["task_id"]
    assert any(line["msg"] == "batch stored" and line["task_id"] == batch_task for line in lines)
    attempts = {line["sink"]: line for line in opportunity if line["msg"] == "delivery attempt"}
    assert set(attempts) == {"crm", "sales-email"}
    for sink, line in attempts.items():
        assert line["outcome"] == "delivered", line
        assert line["task_id"] and line["task_id"] != batch_task
        # Celery's own lines of that task name it: the task id joins them up
        assert any(f"[{line['task_id']}]" in other["msg"] and "succeeded" in other["msg"]
                   for other in lines), sink
    assert attempts["crm"]["status_code"] == 200
    assert [line["ts"] for line in opportunity] == sorted(line["ts"] for line in opportunity)

    # the deal: delivered to the CRM, refused for good by `refuser`
    deal = journey_of(ids["crm-deal-updated-won.json"])
    outcomes = {(line["msg"], line.get("sink"), line.get("outcome")) for line in deal}
    assert ("delivery attempt", "crm", "delivered") in outcomes
    assert ("delivery attempt", "refuser", "permanent") in outcomes
    (dead,) = [line for line in deal if line["msg"] == "dead letter"]
    assert dead["reason"].startswith("permanent: PermanentSinkError") and dead["task_id"]

    # no address of any posted body appears anywhere, in any line or field
    posted = set().union(*(emails_in(json.loads(fixture_bytes(n))) for n in POSTED),
                         emails_in(json.loads(QUARANTINED)))
    assert "maria.souza@example.com.br" in posted and "held.back@example.net" in posted
    text = "".join(path.read_text() for path in logs)
    assert not [email for email in posted if email in text]
    assert "98888-7777" not in text
