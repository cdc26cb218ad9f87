"""Delivery end to end with real processes: worker, Redis, Postgres, a CRM and an SMTP server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml

from tests.conftest import ROOT, count, fixture_bytes, post, wait_for
from tests.support.http_server import HttpServer, Reply
from tests.support.smtp_server import SmtpServer

OPPORTUNITY = orjson.loads(fixture_bytes("mkt-v2-marked-opportunity.json"))
CRM_TOKEN = "Bearer crm-secret"


@pytest.fixture
def crm() -> Iterator[HttpServer]:
    with HttpServer() as server:
        yield server


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


def configure(settings: Any, tmp_path: Path, crm: HttpServer, smtp: SmtpServer | None = None,
              **crm_policy: Any) -> Any:
    sinks: dict[str, Any] = {"crm": {"type": "crm", "options": {
        "base_url": crm.url, "auth_value": CRM_TOKEN, "timeout": 2}, **crm_policy}}
    routes: list[dict[str, Any]] = [{"name": "leads and deals", "to": ["crm"]}]
    if smtp is not None:
        sinks["sales-email"] = {"type": "email", "options": {
            "host": smtp.host, "port": smtp.port, "security": "none",
            "from": "leadpipe@example.com", "to": ["sales@example.com"]}}
        routes.append({"name": "opportunities", "to": ["sales-email"],
                       "when": {"match": ["funnel.opportunity == true"]}})
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({"sinks": sinks, "routes": routes}))
    return settings.with_(routes_file=str(path))


def opportunity(n: int) -> bytes:
    body = {**OPPORTUNITY, "event_timestamp": f"2025-03-10T10:14:58.{n:06d}-03:00"}
    body["contact"] = {**OPPORTUNITY["contact"], "uuid": f"lead-{n:05d}",
                       "email": f"lead{n}@example.com"}
    return orjson.dumps(body)


def settled(db: Any, sink: str, n: int, timeout: float = 60) -> None:
    wait_for(lambda: count(db, "SELECT count(*) FROM deliveries WHERE sink = %s AND status <> "
                           "'pending'", sink) >= n, timeout=timeout,
             what=f"{n} settled deliveries to {sink}")


def attempts(db: Any, sink: str = "crm") -> list[tuple]:
    return db.execute("SELECT attempt, outcome, status_code FROM delivery_attempts "
                      "WHERE sink = %s ORDER BY attempt", (sink,)).fetchall()


def leadpipe(settings: Any, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "config.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=120,
                          env={**os.environ, **settings.to_env()})


EXPECTED_CRM_BODY = (
    b'{"uuid":"3b8f6a52-5d8e-4f0e-9c3a-1f2d3c4b5a69","email":"maria.souza@example.com.br",'
    b'"name":"Maria Souza","company":"Loja Exemplo Ltda","job_title":"Gerente de Marketing",'
    b'"mobile_phone":"+55 11 91234-5678","city":"S\xc3\xa3o Paulo","state":"SP",'
    b'"tags":["webinar-2025","b2b"],"stage":"Qualified Lead","opportunity":true,"fit":"60",'
    b'"interest":45,"owner_email":"vendas@example.com.br",'
    b'"custom_fields":{"segmento":"Varejo","numero_de_funcionarios":"51-200"},'
    b'"updated_at":"2025-03-10T10:14:58.901000-03:00"}')
EXPECTED_EMAIL = """Maria Souza was marked as an opportunity in RD Station Marketing.

Name:       Maria Souza
E-mail:     maria.souza@example.com.br
Phone:      +55 11 91234-5678
Company:    Loja Exemplo Ltda
Job title:  Gerente de Marketing
Location:   São Paulo, SP
Stage:      Qualified Lead
Fit:        60
Interest:   45
Owner:      vendas@example.com.br

Event WEBHOOK.MARKED_OPPORTUNITY at 2025-03-10 10:14-03:00 (Leadpipe id {id})
"""


def test_a_lead_reaches_postgres_crm_and_email_exactly_once(client, settings, tmp_path, crm,
                                                            smtp, worker_factory, db):
    worker_factory(configure(settings, tmp_path, crm, smtp))
    event_id = post(client, fixture_bytes("mkt-v2-marked-opportunity.json")).get_json()["id"]
    settled(db, "crm", 1)
    settled(db, "sales-email", 1)
    assert count(db, "SELECT count(*) FROM leads WHERE opportunity") == 1

    (request,) = crm.requests
    assert (request.method, request.path) == ("PUT", "/leads/3b8f6a52-5d8e-4f0e-9c3a-1f2d3c4b5a69")
    assert request.body == EXPECTED_CRM_BODY
    assert request.header("Authorization") == CRM_TOKEN
    assert request.header("Content-Type") == "application/json"
    assert request.header("Idempotency-Key") == (
        "mkt:WEBHOOK.MARKED_OPPORTUNITY:3b8f6a52-5d8e-4f0e-9c3a-1f2d3c4b5a69:default:"
        "2025-03-10T10:14:58.901-03:00")
    assert request.header("X-Leadpipe-Event-Id") == event_id

    (mail,) = smtp.messages
    assert list(mail.rcpt_tos) == ["sales@example.com"]
    assert mail.mail_from == "leadpipe@example.com"
    assert mail.message["To"] == "sales@example.com"
    assert mail.message["Subject"] == "New opportunity: Maria Souza (Loja Exemplo Ltda)"
    assert mail.message.get_payload(decode=True).decode() == EXPECTED_EMAIL.format(id=event_id)
    assert attempts(db) == [(1, "delivered", 200)]
    assert attempts(db, "sales-email") == [(1, "delivered", None)]


def test_503_three_times_then_200_is_one_delivery_in_four_attempts(client, settings, tmp_path,
                                                                    crm, worker_factory, db):
    crm.script(503, 503, 503)
    worker_factory(configure(settings, tmp_path, crm, retry_schedule=[0.5, 0.5]))
    post(client, fixture_bytes("crm-deal-updated-won.json"))
    settled(db, "crm", 1)
    assert count(db, "SELECT count(*) FROM deliveries WHERE status = 'delivered'") == 1
    assert attempts(db) == [(1, "retryable", 503), (2, "retryable", 503),
                            (3, "retryable", 503), (4, "delivered", 200)]
    assert len(crm.requests) == 4
    assert len({r.header("Idempotency-Key") for r in crm.requests}) == 1


def test_400_is_a_dead_letter_on_the_first_attempt(client, settings, tmp_path, crm,
                                                   worker_factory, db):
    crm.set_default(400)
    worker_factory(configure(settings, tmp_path, crm))
    post(client, fixture_bytes("crm-deal-updated-won.json"))
    settled(db, "crm", 1)
    assert attempts(db) == [(1, "permanent", 400)]
    assert db.execute("SELECT sink, attempts, status_code FROM dead_letters").fetchall() == [
        ("crm", 1, 400)]


def test_429_retry_after_is_honoured(client, settings, tmp_path, crm, worker_factory, db):
    crm.script(Reply(429, headers={"Retry-After": "2"}))
    worker_factory(configure(settings, tmp_path, crm, retry_schedule=[0.1]))
    post(client, fixture_bytes("crm-deal-updated-won.json"))
    settled(db, "crm", 1)
    first, second = crm.requests
    assert second.at - first.at >= 2.0
    assert attempts(db) == [(1, "retryable", 429), (2, "delivered", 200)]


@pytest.mark.slow
def test_a_dead_crm_does_not_slow_the_others_and_its_deliveries_replay_once(
        client, settings, tmp_path, crm, smtp, worker_factory, db):
    custom = configure(settings, tmp_path, crm, smtp, retry_schedule=[0.3, 0.3],
                       quick_retries=1, circuit_breaker={"failures": 3, "cooldown": 0.5})
    worker_factory(custom)

    def phase(first: int) -> float:
        started = time.monotonic()
        for n in range(first, first + 500):
            assert post(client, opportunity(n)).status_code == 202
        wait_for(lambda: len(smtp.messages) >= first + 500, timeout=120,
                 what="every e-mail of the phase")
        return time.monotonic() - started

    with_crm = phase(0)
    settled(db, "crm", 500)
    crm.stop()  # connection refused from now on
    without_crm = phase(500)
    assert without_crm <= with_crm * 1.5 + 2, (with_crm, without_crm)
    wait_for(lambda: count(db, "SELECT count(*) FROM deliveries WHERE sink = 'sales-email' "
                               "AND status = 'delivered'") == 1000,  # sent, then recorded
             what="every e-mail delivery recorded")

    settled(db, "crm", 1000, timeout=120)  # the shortened schedule runs out: dead letters
    assert count(db, "SELECT count(*) FROM dead_letters WHERE sink = 'crm'") == 500
    assert count(db, "SELECT count(*) FROM dead_letters WHERE error LIKE '%%exhausted%%'") == 500
    crm.clear()
    crm.start()
    result = leadpipe(custom, "dead-letters", "replay", "--sink", "crm")
    assert result.returncode == 0, result.stderr
    assert "replayed 500 dead letter(s)" in result.stdout
    wait_for(lambda: count(db, "SELECT count(*) FROM deliveries WHERE sink = 'crm' "
                               "AND status = 'delivered'") == 1000, timeout=120,
             what="replayed deliveries")
    keys = [r.header("Idempotency-Key") for r in crm.requests]
    assert len(keys) == 500 and len(set(keys)) == 500  # each exactly once
    assert len(smtp.messages) == 1000


def test_pause_holds_and_resume_delivers(client, settings, tmp_path, crm, worker_factory, db):
    custom = configure(settings, tmp_path, crm)
    worker_factory(custom)
    assert leadpipe(custom, "sinks", "pause", "crm").returncode == 0
    for n in range(20):
        post(client, opportunity(n))
    wait_for(lambda: count(db, "SELECT count(*) FROM deliveries") == 20, what="deliveries")
    time.sleep(2)
    assert crm.requests == []
    assert count(db, "SELECT count(*) FROM deliveries WHERE status = 'pending'") == 20
    listing = leadpipe(custom, "sinks", "list")
    assert "PAUSED" in listing.stdout and "pending=20" in listing.stdout
    assert leadpipe(custom, "sinks", "resume", "crm").returncode == 0
    settled(db, "crm", 20)
    assert len({r.header("Idempotency-Key") for r in crm.requests}) == 20
    assert len(crm.requests) == 20


def test_rate_limit_holds_across_two_worker_processes(client, settings, tmp_path, crm,
                                                      worker_factory, db):
    custom = configure(settings, tmp_path, crm, rate_limit="5/s").with_(worker_concurrency=1)
    worker_factory(custom)
    worker_factory(custom)
    for n in range(20):
        post(client, opportunity(n))
    settled(db, "crm", 20)
    times = sorted(r.at for r in crm.requests)
    assert len(times) == 20
    for i, start in enumerate(times):  # no one-second window holds more than 5 (+1 at its edge)
        assert sum(1 for t in times[i:] if t - start < 1.0) <= 6
    assert times[-1] - times[0] >= 19 / 5 * 0.9


@pytest.mark.slow
def test_sigkill_during_deliveries_still_delivers_each_once_in_effect(
        client, settings, tmp_path, crm, worker_factory, db):
    crm.set_default(Reply(200, delay=0.05))
    custom = configure(settings, tmp_path, crm).with_(relay_after_seconds=3)
    first = worker_factory(custom)
    for n in range(100):
        post(client, opportunity(n))
    wait_for(lambda: len(crm.requests) >= 20, what="deliveries under way")
    first.kill()
    pending = count(db, "SELECT count(*) FROM deliveries WHERE status = 'pending'")
    assert pending > 0 or count(db, "SELECT count(*) FROM events") < 100
    worker_factory(custom)
    settled(db, "crm", 100, timeout=120)
    assert count(db, "SELECT count(*) FROM deliveries WHERE status = 'delivered'") == 100
    keys = [r.header("Idempotency-Key") for r in crm.requests]
    assert len(set(keys)) == 100  # every event reached the CRM; a resend carries the same key
    assert len(keys) - len(set(keys)) <= 2  # at most the ones in flight at the kill went twice


def test_a_task_the_relay_took_for_lost_while_it_waited_in_its_queue_does_nothing(
        client, settings, tmp_path, crm, worker_factory, db):
    """Deliveries waiting in the sink's queue longer than LEADPIPE_RELAY_AFTER_SECONDS (no node
    consumed it) are sent again by the relay; when a node then takes both the waiting tasks and
    the relayed ones, each delivery is tried once per round, not once per task (two chains)."""
    crm.set_default(Reply(503))
    custom = configure(settings, tmp_path, crm, quick_retries=1, retry_schedule=[600],
                       circuit_breaker={"failures": 100, "cooldown": 1}
                       ).with_(relay_after_seconds=1)
    worker_factory(custom, ["--queues", f"{custom.ingest_queue},{custom.namespace}.default"])
    for n in range(3):
        post(client, opportunity(n))
    wait_for(lambda: count(db, "SELECT count(*) FROM deliveries WHERE dispatch IS NOT NULL")
             == 3, timeout=30, what="the relay sending the three deliveries again")
    # one process: the tasks run one after the other, as behind a backlog (two at once would
    # find each other's lock and could not show a second chain)
    worker_factory(custom, ["--queues", f"{custom.namespace}.sink.crm", "--concurrency", "1"])
    wait_for(lambda: len(crm.requests) >= 3, what="the first round")
    time.sleep(2)  # time for the other three tasks to run (and, if they sent, to be seen)
    assert len(crm.requests) == 3
    assert db.execute("SELECT attempts, count(*) FROM deliveries GROUP BY attempts"
                      ).fetchall() == [(1, 3)]


def test_a_round_longer_than_the_visibility_timeout_is_waited_in_hops_and_sent_once(
        client, settings, tmp_path, crm, worker_factory, db):
    """Redis may hand a task a worker holds unacknowledged (waiting out its countdown) to
    another worker once LEADPIPE_VISIBILITY_TIMEOUT_SECONDS pass (kombu looks every minute or
    two): a round waiting longer than half of it is made in hops of tasks that only send
    themselves on, each held briefly; the round is still tried once, when due."""
    crm.set_default(Reply(503))
    custom = configure(settings, tmp_path, crm, quick_retries=1, retry_schedule=[6],
                       circuit_breaker={"failures": 100, "cooldown": 1}
                       ).with_(visibility_timeout_seconds=2)
    node = worker_factory(custom)
    post(client, opportunity(0))
    wait_for(lambda: count(db, "SELECT count(*) FROM dead_letters") == 1, timeout=40,
             what="the second and last round")
    time.sleep(3)  # time for a second hand-out of the round, had there been one
    assert len(crm.requests) == 2
    assert crm.requests[1].at - crm.requests[0].at >= 6 * 0.8  # the round's wait, less jitter
    # each hop says how long was left: at most half the timeout (1 s) from one to the next
    left = sorted({float(x) for x in re.findall(r"'waiting': 1, 'in_seconds': ([\d.]+)",
                                                node.log_path.read_text())}, reverse=True)
    assert len(left) >= 3 and left[0] >= 6 * 0.8 - 1.5, left
    assert all(a - b <= 1.5 for a, b in zip(left, left[1:], strict=False)), left


# --- a late, older event never undoes newer state in the CRM -------------------------------------

def deal_update(status: str, when: str, tx: str) -> bytes:
    body = orjson.loads(fixture_bytes("crm-deal-updated-won.json"))
    body["document"]["status"] = status
    body["event_timestamp"], body["transaction_uuid"] = when, tx
    return orjson.dumps(body)


def with_audit(settings: Any, tmp_path: Path, crm: HttpServer) -> Any:
    """The crm sink beside a sink that tells of each event (the dummy plugin), both for all."""
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({
        "sinks": {"crm": {"type": "crm", "options": {"base_url": crm.url,
                                                     "auth_value": CRM_TOKEN, "timeout": 2}},
                  "audit": {"type": "dummy", "options": {"path": str(tmp_path / "audit.jsonl")}}},
        "routes": [{"name": "all", "to": ["crm", "audit"]}]}))
    return settings.with_(routes_file=str(path))


def test_a_late_older_deal_update_is_not_sent_to_the_crm(client, settings, tmp_path, crm,
                                                        worker_factory, db):
    custom = with_audit(settings, tmp_path, crm)
    worker_factory(custom)
    newer = post(client, deal_update("won", "2025-03-12T19:40:05.000Z", "tx-new")).json["id"]
    settled(db, "crm", 1)
    older = post(client, deal_update("ongoing", "2025-03-12T18:00:00.000Z", "tx-old")).json["id"]
    settled(db, "crm", 2)
    settled(db, "audit", 2)

    assert len(crm.requests) == 1 and crm.requests[0].json()["status"] == "won"
    assert db.execute("SELECT event_id, status FROM deliveries WHERE sink = 'crm' "
                      "ORDER BY created_at").fetchall() == [(newer, "delivered"),
                                                            (older, "superseded")]
    assert db.execute("SELECT outcome, status_code, error FROM delivery_attempts "
                      "WHERE sink = 'crm' AND event_id = %s", (older,)).fetchall() == [
        ("superseded", None, f"superseded by newer event {newer}")]
    assert db.execute("SELECT status FROM deals").fetchall() == [("won",)]
    audit = [orjson.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert {a["id"] for a in audit} == {newer, older}  # notifications still get every event
    listing = leadpipe(custom, "sinks", "list")
    assert "superseded=1" in listing.stdout, listing.stdout


def test_a_newer_deal_update_is_sent_after_an_older_one_already_on_its_way(
        client, settings, tmp_path, crm, worker_factory, db):
    """The older update's first try fails (answered only once the newer update's delivery
    has found the deal's turn taken) and its quick retry follows; the newer one, stored and
    routed meanwhile on the worker's other process, is sent after it, so the CRM's last word
    is the newer state (not the older retry landing over it)."""
    custom = configure(settings, tmp_path, crm, quick_retries=2)
    worker = worker_factory(custom)  # two processes: both deliveries run at once
    answer = threading.Event()
    crm.script(Reply(503, hold=answer))
    older = post(client, deal_update("ongoing", "2025-03-12T18:00:00.000Z", "tx-old")).json["id"]
    wait_for(lambda: len(crm.requests) == 1, what="the older update's first try")
    newer = post(client, deal_update("won", "2025-03-12T19:40:05.000Z", "tx-new")).json["id"]

    def waited() -> bool:
        return any('"msg":"deliveries"' in line and '"busy":1' in line
                   for line in worker.log_path.read_text().splitlines())

    wait_for(waited, what="the newer update's delivery to find the deal's turn taken")
    assert len(crm.requests) == 1  # nothing sent for the deal while its turn is held
    answer.set()
    settled(db, "crm", 2)

    assert [r.json()["status"] for r in crm.requests] == ["ongoing", "ongoing", "won"]
    assert db.execute("SELECT event_id, status FROM deliveries WHERE sink = 'crm' "
                      "ORDER BY created_at").fetchall() == [(older, "delivered"),
                                                            (newer, "delivered")]
    metrics = redis.Redis.from_url(custom.redis_url)

    def postponed() -> float:
        field = orjson.dumps(["leadpipe_deliveries", [["outcome", "postponed"], ["sink", "crm"]],
                              None])
        return float(metrics.hget(f"{custom.namespace}:metrics", field) or 0)

    wait_for(lambda: postponed() >= 1, what="the wait counted as postponed")


def test_an_older_lead_event_held_behind_a_newer_one_is_not_sent(client, settings, tmp_path,
                                                                crm, worker_factory, db):
    """The CRM paused (as after an outage): the newer conversion is sent, the older one that
    arrived after it is closed as superseded instead of being PUT over it."""
    custom = configure(settings, tmp_path, crm)
    worker_factory(custom)
    assert leadpipe(custom, "sinks", "pause", "crm").returncode == 0
    for when, name in (("2025-03-10T12:00:00.000000-03:00", "Maria Nova"),
                       ("2025-03-10T09:00:00.000000-03:00", "Maria Antiga")):
        body = {**OPPORTUNITY, "event_timestamp": when,
                "contact": {**OPPORTUNITY["contact"], "name": name}}
        assert post(client, orjson.dumps(body)).status_code == 202
    wait_for(lambda: count(db, "SELECT count(*) FROM deliveries") == 2, what="deliveries")
    assert leadpipe(custom, "sinks", "resume", "crm").returncode == 0
    settled(db, "crm", 2)
    assert [r.json()["name"] for r in crm.requests] == ["Maria Nova"]
    assert db.execute("SELECT status, count(*) FROM deliveries GROUP BY status "
                      "ORDER BY status").fetchall() == [("delivered", 1), ("superseded", 1)]
    assert db.execute("SELECT name FROM leads").fetchall() == [("Maria Nova",)]
