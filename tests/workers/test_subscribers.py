"""Subscribers end to end: API server, worker, Redis, Postgres and two real receivers."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from config.settings import Settings
from ingest import tokens
from tests.conftest import (
    ROOT,
    TOKEN,
    ApiProcess,
    count,
    fixture_bytes,
    wait_for,
)
from tests.support.http_server import HttpServer, Recorded
from workers import subscribers

HOOKS = "/integrations/webhooks"
V2 = orjson.loads(fixture_bytes("mkt-v2-converted.json"))
IDENTIFIER = V2["event_identifier"]  # "my-event-identifier"


@pytest.fixture
def receivers() -> Iterator[tuple[HttpServer, HttpServer]]:
    with HttpServer() as a, HttpServer() as b:
        yield a, b


@pytest.fixture
def custom(settings: Settings) -> Settings:
    # the probe on (it reaches our receivers), 127.0.0.1 admitted explicitly, a low threshold
    return settings.with_(ssrf_allow=("127.0.0.1",), subscription_probe=True,
                          subscription_suspend_after=3, subscription_suspend_after_seconds=0)


@pytest.fixture
def api(custom: Settings, tmp_path: Path) -> Iterator[ApiProcess]:
    server = ApiProcess(custom, tmp_path / "api.log")
    yield server
    server.stop()


class Client:
    """The subscription API and the ingest endpoint of a live server."""

    def __init__(self, api: ApiProcess, token: str):
        self.base = api.url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def subscribe(self, url: str, event_type: str, identifiers: list[str] | None = None,
                  relations: list[str] | None = None) -> dict[str, Any]:
        answer = self.session.post(self.base + HOOKS, json=self.input(
            url, event_type, identifiers, relations), timeout=10)
        assert answer.status_code == 201, answer.text
        return answer.json()

    @staticmethod
    def input(url: str, event_type: str, identifiers: list[str] | None,
              relations: list[str] | None) -> dict[str, Any]:
        return {"entity_type": "CONTACT", "event_type": event_type, "url": url,
                "http_method": "POST", "event_identifiers": identifiers or [],
                "include_relations": relations or []}

    def show(self, uuid: str) -> dict[str, Any]:
        return self.session.get(f"{self.base}{HOOKS}/{uuid}", timeout=10).json()

    def post_event(self, body: bytes, hint: str | None = None) -> None:
        params = {"token": TOKEN, **({"event_type": hint} if hint else {})}
        answer = requests.post(self.base + "/webhooks/rdstation", params=params, data=body,
                               headers={"Content-Type": "application/json"}, timeout=10)
        assert answer.status_code == 202, answer.text


@pytest.fixture
def client(api: ApiProcess, database_url: str) -> Client:
    return Client(api, tokens.create(database_url, "subscriber tests"))


def conversion(n: int) -> bytes:
    body = copy.deepcopy(V2)
    body["event_timestamp"] = f"2025-04-01T10:00:{n:02d}.000-03:00"
    body["contact"]["uuid"] = f"c2f3d2b3-7250-4d27-97f4-{n:012d}"
    return orjson.dumps(body)


def delivered(db: Any, sub: dict[str, Any]) -> int:
    return count(db, "SELECT count(*) FROM deliveries WHERE sink = %s AND status = 'delivered'",
                 subscribers.target(sub["uuid"]))


def verified(request: Recorded, *secrets: str) -> Any:
    """The body, after checking the signature with each secret given."""
    body = None
    for secret in secrets:
        body = Webhook(secret).verify(request.body, request.headers)
    return body


def test_each_subscriber_gets_exactly_its_events_in_rd_shape_signed(
        client, receivers, custom, worker_factory, db):
    a, b = receivers
    every = client.subscribe(a.url + "/all", "WEBHOOK.CONVERTED")
    deals = client.subscribe(a.url + "/deals", "crm_deal_updated")
    filtered = client.subscribe(b.url + "/filtered", "WEBHOOK.CONVERTED", [IDENTIFIER],
                                ["COMPANY", "CONTACT_FUNNEL"])
    assert [r.body for r in a.requests + b.requests] == [b"{}"] * 3  # RD's probe, once each
    a.clear()
    b.clear()
    worker_factory(custom)

    for name in ("mkt-v2-converted.json", "mkt-v2-converted.json",  # a duplicate
                 "legacy-leads-full.json", "mkt-v2-marked-opportunity.json",
                 "crm-deal-updated-won.json", "crm-deal-created.json"):
        client.post_event(fixture_bytes(name))
    wait_for(lambda: delivered(db, every) == 2 and delivered(db, deals) == 1
             and delivered(db, filtered) == 1, timeout=60, what="the subscribers' deliveries")

    by_path = {}
    for request in a.requests + b.requests:
        by_path.setdefault(request.path, []).append(request)
    assert sorted((p, len(r)) for p, r in by_path.items()) == [
        ("/all", 2), ("/deals", 1), ("/filtered", 1)]

    v2_for_a = copy.deepcopy(V2)
    del v2_for_a["contact"]["company"], v2_for_a["contact"]["funnel"]  # no relations asked
    bodies = [verified(r, every["secret"]) for r in by_path["/all"]]
    assert v2_for_a in bodies
    (legacy,) = [body for body in bodies if body != v2_for_a]
    assert legacy["event_type"] == "WEBHOOK.CONVERTED"
    assert legacy["event_identifier"] == "Formulário - LP"
    assert legacy["contact"]["uuid"] == "8b4d2932-6299-4cc3-8e3e-f07cdc087c05"
    assert legacy["contact"]["tags"] == [] and "company" not in legacy["contact"]

    (deal,) = by_path["/deals"]
    assert verified(deal, deals["secret"]) == orjson.loads(
        fixture_bytes("crm-deal-updated-won.json"))
    (only,) = by_path["/filtered"]
    assert verified(only, filtered["secret"]) == V2  # relations asked for: all there
    with pytest.raises(WebhookVerificationError):  # each subscription signs with its own
        Webhook(every["secret"]).verify(only.body, only.headers)
    assert all(r.header("webhook-id") for r in a.requests + b.requests)


def test_a_failing_subscriber_is_suspended_then_put_reactivates_and_replay_delivers(
        client, receivers, custom, worker_factory, db):
    a, b = receivers
    healthy = client.subscribe(a.url + "/ok", "WEBHOOK.CONVERTED")
    failing = client.subscribe(b.url + "/down", "WEBHOOK.CONVERTED", [IDENTIFIER])
    a.clear()
    b.clear()
    b.set_default(500)
    target = subscribers.target(failing["uuid"])
    worker_factory(custom)

    for n in range(3):
        client.post_event(conversion(n))
    wait_for(lambda: client.show(failing["uuid"])["status"] == "suspended", timeout=60,
             what="the failing subscription suspended")
    wait_for(lambda: count(db, "SELECT count(*) FROM dead_letters WHERE sink = %s",
                           target) == 3, timeout=30, what="its 3 events in dead letters")
    tried = len(b.requests)
    client.post_event(conversion(3))  # arrives while suspended: not sent, kept
    wait_for(lambda: count(db, "SELECT count(*) FROM dead_letters WHERE sink = %s", target) == 4,
             timeout=30, what="the missed event in dead letters")
    wait_for(lambda: delivered(db, healthy) == 4, timeout=30, what="the healthy subscriber")
    assert len(b.requests) == tried  # nothing sent to a suspended subscription
    reasons = [r for (r,) in db.execute("SELECT error FROM dead_letters WHERE sink = %s "
                                        "ORDER BY id", (target,))]
    assert all("suspended" in r for r in reasons), reasons

    b.set_default(200)
    answer = client.session.put(f"{client.base}{HOOKS}/{failing['uuid']}", json=client.input(
        b.url + "/down", "WEBHOOK.CONVERTED", [IDENTIFIER], []), timeout=10)
    assert answer.status_code == 200 and answer.json()["status"] == "active"
    b.clear()
    replay = subprocess.run([sys.executable, "-m", "config.cli", "dead-letters", "replay",
                             "--sink", target], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, **custom.to_env()})
    assert replay.returncode == 0, replay.stderr
    wait_for(lambda: delivered(db, failing) == 4, timeout=60, what="the replayed deliveries")
    uuids = sorted(verified(r, failing["secret"])["contact"]["uuid"] for r in b.requests)
    assert uuids == [f"c2f3d2b3-7250-4d27-97f4-{n:012d}" for n in range(4)]  # each once
    assert count(db, "SELECT consecutive_failures FROM subscriptions WHERE uuid = %s",
                 failing["uuid"]) == 0


def test_a_rotated_secret_keeps_the_old_one_signing_during_the_grace(
        client, receivers, custom, worker_factory, db):
    """Rotated twice within the grace (a retried call whose answer was lost): the receiver may
    be on any of the three secrets, and each verifies; one whose grace ended signs no more."""
    a, _ = receivers
    sub = client.subscribe(a.url + "/rotating", "WEBHOOK.CONVERTED")
    expired = client.subscribe(a.url + "/expired", "WEBHOOK.CONVERTED")
    a.clear()

    def rotate(uuid: str) -> dict[str, Any]:
        answer = client.session.post(f"{client.base}{HOOKS}/{uuid}/secret/rotate", timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()

    rotated = rotate(sub["uuid"])
    assert rotated["uuid"] == sub["uuid"] and rotated["secret"] != sub["secret"]
    assert rotated["secret"].startswith("whsec_")
    assert "secret" not in client.show(sub["uuid"])  # shown once, never listed
    again = rotate(sub["uuid"])
    ended = rotate(expired["uuid"])
    db.execute("UPDATE subscriptions SET previous_secret_expires_at = now() - interval '1 s' "
               "WHERE uuid = %s", (expired["uuid"],))
    rotate(expired["uuid"])  # its first secret's grace had ended: not kept
    worker_factory(custom)
    client.post_event(conversion(7))
    wait_for(lambda: delivered(db, sub) == 1 and delivered(db, expired) == 1, timeout=60,
             what="the deliveries")
    (request,) = [r for r in a.requests if r.path == "/rotating"]
    verified(request, sub["secret"], rotated["secret"], again["secret"])  # all three verify
    assert len(request.header("webhook-signature").split()) == 3
    (late,) = [r for r in a.requests if r.path == "/expired"]
    verified(late, ended["secret"])  # the previous one, still in its grace
    with pytest.raises(WebhookVerificationError):
        verified(late, expired["secret"])


def test_rotating_an_unknown_subscription_is_404(client):
    answer = client.session.post(
        f"{client.base}{HOOKS}/9b2f5d0e-0000-4000-8000-000000000000/secret/rotate", timeout=10)
    assert answer.status_code == 404
    assert answer.json()["errors"]["error_type"] == "RESOURCE_NOT_FOUND"


def test_a_deleted_subscription_gets_no_more_events(client, receivers, custom, worker_factory,
                                                   db, redis_client):
    a, _ = receivers
    sub = client.subscribe(a.url + "/gone", "WEBHOOK.CONVERTED")
    a.clear()
    a.set_default(503)
    worker_factory(custom)
    client.post_event(conversion(9))  # fails, waits for its next round
    target = subscribers.target(sub["uuid"])
    wait_for(lambda: count(db, "SELECT count(*) FROM deliveries WHERE sink = %s "
                               "AND dispatched_at > created_at", target), timeout=30,
             what="a failed first round, the next one scheduled")
    assert client.session.delete(f"{client.base}{HOOKS}/{sub['uuid']}",
                                 timeout=10).status_code == 204
    client.post_event(conversion(10))  # after the delete: no delivery at all
    wait_for(lambda: count(db, "SELECT count(*) FROM dead_letters WHERE sink = %s AND error "
                               "= 'subscription deleted'", target) == 1,
             timeout=60, what="the pending delivery dead-lettered at its next round")
    assert count(db, "SELECT count(*) FROM deliveries WHERE sink = %s", target) == 1
    assert len(a.requests) == 1  # the first round's one try, nothing after the delete
    # and counted, as every dead letter is (the DeadLetters alert watches this counter)
    dead = orjson.dumps(["leadpipe_deliveries", [["outcome", "dead"], ["sink", target]], None])
    wait_for(lambda: redis_client.hget(f"{custom.namespace}:metrics", dead) == b"1",
             timeout=10, what="the dead letter counted")


def test_a_pending_delivery_a_put_unsubscribed_from_is_not_sent(client, receivers, custom,
                                                                worker_factory, db):
    # the subscription took conversions when the event was routed to it; a PUT moved it to
    # deal events (or other identifiers) while the delivery waited for its next round
    a, b = receivers
    moved = client.subscribe(a.url + "/moved", "WEBHOOK.CONVERTED", [IDENTIFIER])
    narrowed = client.subscribe(b.url + "/narrowed", "WEBHOOK.CONVERTED", [IDENTIFIER])
    for receiver in (a, b):
        receiver.clear()
        receiver.set_default(503)
    worker_factory(custom)
    client.post_event(conversion(11))
    targets = [subscribers.target(sub["uuid"]) for sub in (moved, narrowed)]
    wait_for(lambda: count(db, "SELECT count(*) FROM deliveries WHERE sink = ANY(%s) "
                               "AND dispatched_at > created_at", targets) == 2, timeout=30,
             what="failed first rounds, the next ones scheduled")
    for sub, changes in ((moved, {"event_type": "crm_deal_created", "url": a.url + "/deals"}),
                         (narrowed, {"event_identifiers": ["another-form"]})):
        body = {**client.input(sub["url"], "WEBHOOK.CONVERTED", [IDENTIFIER], None), **changes}
        (a if sub is moved else b).script(204)  # the PUT's probe of the URL; events still fail
        answer = client.session.put(f"{client.base}{HOOKS}/{sub['uuid']}", json=body, timeout=10)
        assert answer.status_code == 200, answer.text
    for receiver in (a, b):
        receiver.set_default(204)
    wait_for(lambda: count(db, "SELECT count(*) FROM dead_letters WHERE sink = ANY(%s) AND "
                               "error LIKE 'no longer subscribed%%'", targets) == 2,
             timeout=60, what="both pending deliveries dead-lettered at their next round")
    reasons = dict(db.execute("SELECT sink, error FROM dead_letters").fetchall())
    assert "takes crm_deal_created since" in reasons[targets[0]]
    assert "['another-form']" in reasons[targets[1]]
    for receiver, path in ((a, "/moved"), (b, "/narrowed")):  # the first round's try only
        sent = [r for r in receiver.requests if r.body != b"{}"]  # (the rest: PUT's probe)
        assert [r.path for r in sent] == [path]


def test_any_answer_but_a_2xx_is_tried_again_in_the_next_round(client, receivers, custom,
                                                                worker_factory, db):
    """RD's rule for the URLs it calls: anything but a 2xx is a failure to retry, so a receiver
    answering 404 (or 301) while it is being deployed gets the event later; one try per round,
    not quick tries in a row."""
    a, _ = receivers
    sub = client.subscribe(a.url + "/deploying", "WEBHOOK.CONVERTED")
    a.clear()
    a.script(404)  # then the default: 200
    worker_factory(custom)
    client.post_event(conversion(11))
    wait_for(lambda: delivered(db, sub) == 1, timeout=60, what="the event delivered at last")
    assert count(db, "SELECT count(*) FROM dead_letters") == 0
    tries = a.requests
    assert len(tries) == 2
    assert len({r.header("webhook-id") for r in tries}) == 1  # one event, for the receiver
    assert tries[1].at - tries[0].at >= 3.5  # the next round (5 s +-20 %), not a quick retry


def test_a_subscription_is_suspended_only_once_it_has_been_failing_long_enough(db):
    # the count alone suspended a subscription whose receiver was down for 8 minutes under
    # steady traffic, long before its deliveries' own 8.6 hours of tries were spent
    uuid = "00000000-0000-4000-8000-0000000000a1"
    db.execute("INSERT INTO subscriptions (uuid, event_type, entity_type, url, http_method, "
               "source, secret, status, url_key) VALUES (%s, 'WEBHOOK.CONVERTED', 'CONTACT', "
               "'https://93.184.215.14/rd', 'POST', 'MKT', 'whsec_x', 'active', %s)",
               (uuid, "https://93.184.215.14/rd"))
    sub = subscribers.Subscription(uuid, "WEBHOOK.CONVERTED", "https://93.184.215.14/rd", (),
                                   "active", "whsec_x", None, None, (), frozenset())
    health = subscribers.Health(sub, threshold=3, min_seconds=3600)

    def state() -> tuple[str, int, bool]:
        row = db.execute("SELECT status, consecutive_failures, failing_since IS NOT NULL "
                         "FROM subscriptions WHERE uuid = %s", (uuid,)).fetchone()
        return row[0], row[1], row[2]

    for _ in range(10):
        assert health.failed(db, ConnectionError("refused")) is None
    assert state() == ("active", 10, True)
    health.succeeded(db)  # one success: the count and the clock start again
    assert state() == ("active", 0, False)
    for _ in range(3):
        assert health.failed(db, ConnectionError("refused")) is None
    db.execute("UPDATE subscriptions SET failing_since = now() - interval '2 hours' "
               "WHERE uuid = %s", (uuid,))
    reason = health.failed(db, ConnectionError("refused"))
    assert reason == "subscription suspended after 4 consecutive failed deliveries"
    assert state() == ("suspended", 4, True)
