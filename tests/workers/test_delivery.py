"""Fan-out through real workers: outbox rows, per-sink queues, attempts, dead letters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, count, fixture_bytes, post, wait_for
from tests.test_pipeline import FIXTURE_EVENTS


def routes_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({
        "sinks": {
            "audit": {"type": "dummy", "options": {"path": str(tmp_path / "audit.jsonl")}},
            "refuser": {"type": "dummy", "options": {"path": "x", "fail": "permanent"}},
            "flaky": {"type": "dummy", "options": {"path": "x", "fail": "retryable"},
                      "retry_schedule": [0.2, 0.2], "quick_retries": 2,
                      "circuit_breaker": {"failures": 100, "cooldown": 1}},
        },
        "routes": [
            {"name": "all", "to": ["audit"]},
            {"name": "deals", "to": ["refuser"], "when": {"match": ["deal.id exists"]}},
            {"name": "conversions", "to": ["flaky"],
             "when": {"event_type": ["WEBHOOK.CONVERTED"],
                      "event_identifiers": ["my-event-identifier"]}},
        ],
    }))
    return path


def test_fan_out_dead_letters_and_attempts(client, settings, tmp_path, worker_factory, db):
    custom = settings.with_(routes_file=str(routes_file(tmp_path)))
    worker_factory(custom)
    for name in FIXTURE_EVENTS:
        assert post(client, fixture_bytes(name)).status_code == 202
    post(client, fixture_bytes("crm-deal-created.json"))  # a duplicate: delivered once only

    wait_for(lambda: count(db, "SELECT count(*) FROM deliveries WHERE status = 'pending'") == 0
             and count(db, "SELECT count(*) FROM deliveries") == 7 + 3 + 1, timeout=60,
             what="every delivery settled")
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(audit) == 7 and len({a["dedup_key"] for a in audit}) == 7
    assert count(db, "SELECT count(*) FROM deliveries WHERE sink = 'audit' "
                     "AND status = 'delivered'") == 7

    dead = db.execute("SELECT sink, attempts, status_code, error FROM dead_letters "
                      "ORDER BY sink, event_id").fetchall()
    assert [d[:3] for d in dead] == [("flaky", 6, 503), ("refuser", 1, 400),
                                     ("refuser", 1, 400), ("refuser", 1, 400)]
    assert "retries exhausted after 3 rounds" in dead[0][3]
    assert dead[1][3].startswith("permanent: PermanentSinkError")
    outcomes = db.execute("SELECT outcome, count(*) FROM delivery_attempts WHERE sink = 'flaky' "
                          "GROUP BY outcome").fetchall()
    assert outcomes == [("retryable", 6)]
    assert count(db, "SELECT count(*) FROM delivery_attempts WHERE duration_ms IS NULL "
                     "OR started_at IS NULL") == 0

    env = {**os.environ, **custom.to_env()}
    listing = subprocess.run([sys.executable, "-m", "config.cli", "dead-letters", "list",
                              "--sink", "refuser"], cwd=ROOT, env=env, text=True,
                             capture_output=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.count("refuser") == 3 and "status=400" in listing.stdout


def test_a_slow_receiver_gets_its_events_over_several_tasks_none_twice(
        client, settings, tmp_path, worker_factory, db):
    """A task delivers for at most TASK_BUDGET_SECONDS, then hands the rest to a new task, so
    a slow receiver cannot hold a worker process (and the storing of new events) for long."""
    from tests.support.http_server import HttpServer, Reply
    from workers.delivery import TASK_BUDGET_SECONDS

    with HttpServer() as hook:
        hook.set_default(Reply(200, delay=0.5))
        path = tmp_path / "routes.yaml"
        path.write_text(yaml.safe_dump({
            "sinks": {"slow": {"type": "crm", "options": {"base_url": hook.url,
                                                          "auth_value": "Bearer x"}}},
            "routes": [{"to": ["slow"]}]}))
        worker = worker_factory(settings.with_(routes_file=str(path), batch_window_ms=1000))
        events = 24
        for n in range(events):
            body = json.loads(fixture_bytes("crm-deal-created.json"))
            body["transaction_uuid"] = f"slow-{n}"
            body["document"]["id"] = f"deal{n:04d}"
            post(client, json.dumps(body).encode())
        wait_for(lambda: count(db, "SELECT count(*) FROM deliveries WHERE status = "
                                   "'delivered'") == events, timeout=90, what="every delivery")
        assert len(hook.requests) == events  # none twice
        assert len({r.path for r in hook.requests}) == events
    rests = [json.loads(line)["rest"] for line in worker.log_path.read_text().splitlines()
             if line.startswith("{") and '"msg":"deliveries"' in line
             and json.loads(line).get("rest")]
    assert rests, "no task handed the rest of its events on"
    assert max(rests) <= events - TASK_BUDGET_SECONDS / 0.5 + 1


def test_an_older_event_is_superseded_only_by_a_newer_one_that_goes_to_the_same_sink(
        database_url, db):
    """The newer event brings the newer state only if it reaches that sink: one routed
    elsewhere (or dead there) leaves the older one to be sent."""
    from sinks.postgres import PostgresSink
    from tests.sinks.test_postgres_lww import at, events, v2
    from workers import delivery

    sink = PostgresSink("postgres", {"dsn": database_url})
    older, = events(v2("U-9", at(0), name="Ana Old", job_title="CEO"))
    newer, = events(v2("U-9", at(1)))
    sink.store([older], [], route=lambda e: ["crm"])
    sink.store([newer], [], route=lambda e: ["audit"])  # a route that leaves the crm out
    with sink.pool.connection() as conn:
        assert [e.id for e in delivery.supersede(conn, "crm", [older])] == [older.id]
        conn.execute("INSERT INTO deliveries (event_id, sink) VALUES (%s, 'crm')", (newer.id,))
        assert delivery.supersede(conn, "crm", [older]) == []
    assert db.execute("SELECT sink, status FROM deliveries WHERE event_id = %s",
                      (older.id,)).fetchall() == [("crm", "superseded")]
    sink.close()


def test_an_overtaken_event_sends_the_crm_only_the_fields_no_newer_one_carries(
        database_url, redis_client, settings, tmp_path):
    """A backlog: the newest event of a lead went out first. An older one carrying a phone the
    newest lacks sends that phone alone (never its older name over the newer); the oldest,
    with another phone and a custom field, sends only the custom field, as the middle one
    carries a newer phone. So nothing the lead sent is lost to the CRM and no newer value is
    put back. An older event that carries nothing more ends superseded, unsent. The CRM sink
    is the one the workers' runtime builds (wrapped for metrics), as in production."""
    import psycopg

    from sinks.postgres import PostgresSink
    from tests.sinks.test_postgres_lww import at, events, v2
    from tests.support.http_server import HttpServer
    from workers import delivery
    from workers.control import SinkControl
    from workers.routing import SinkSpec
    from workers.runtime import Runtime

    store = PostgresSink("postgres", {"dsn": database_url})
    oldest, plain, middle, newest = events(
        v2("U-7", at(0), name="Ana", mobile_phone="+55 11 90000-0001", cf_budget="100k"),
        v2("U-7", at(0.2), name="Ana"),
        v2("U-7", at(0.5), name="Ana S", mobile_phone="+55 11 90000-0002"),
        v2("U-7", at(1), name="Ana Souza"))
    store.store([oldest, plain, middle, newest], [], route=lambda e: ["crm"])
    store.close()
    control = SinkControl(redis_client, "c" + os.urandom(4).hex())
    spec = SinkSpec("crm", "crm", {})
    with HttpServer() as server, psycopg.connect(database_url, autocommit=True) as conn:
        routes = tmp_path / "routes.yaml"
        routes.write_text(yaml.safe_dump({"sinks": {"crm": {"type": "crm", "options": {
            "base_url": server.url, "auth_value": "Bearer x"}}}, "routes": [{"to": ["crm"]}]}))
        runtime = Runtime(settings.with_(routes_file=str(routes)))
        crm = runtime.sink("crm")
        for first in (newest, middle):  # out of order: a retried delivery came back later
            assert delivery.run(conn, crm, spec, control, [first.id], 0).delivered == 1
        late = delivery.run(conn, crm, spec, control, [oldest.id, plain.id], 0)
        assert (late.delivered, late.superseded) == (1, 1)
        sent = [r.json() for r in server.requests]
        assert sent[0]["name"] == "Ana Souza" and "mobile_phone" not in sent[0]
        assert sent[1:] == [{"mobile_phone": "+55 11 90000-0002"},
                            {"custom_fields": {"budget": "100k"}}]
        assert {r.path for r in server.requests} == {"/leads/U-7"}
        keys = [r.header("Idempotency-Key") for r in server.requests]
        assert keys[0] == newest.dedup_key and len(set(keys)) == 3
        assert oldest.dedup_key not in keys  # its narrowed send is not its whole one
        assert dict(conn.execute("SELECT event_id, status FROM deliveries").fetchall()) == {
            newest.id: "delivered", middle.id: "delivered", oldest.id: "delivered",
            plain.id: "superseded"}
        runtime.close()


def test_an_overtaken_event_is_not_narrowed_when_a_newer_body_is_purged(database_url,
                                                                       redis_client):
    """What a newer event carried is known only from its stored body: once `leadpipe purge`
    emptied it, an older event sends nothing (it could put its older name back)."""
    import psycopg

    from sinks.postgres import PostgresSink
    from sinks.registry import build
    from tests.sinks.test_postgres_lww import at, events, v2
    from tests.support.http_server import HttpServer
    from workers import delivery
    from workers.control import SinkControl
    from workers.routing import SinkSpec

    store = PostgresSink("postgres", {"dsn": database_url})
    older, newer = events(v2("U-8", at(0), name="Ana", mobile_phone="+55 11 90000-0003"),
                          v2("U-8", at(1), name="Ana Souza"))
    store.store([older, newer], [], route=lambda e: ["crm"])
    store.close()
    control = SinkControl(redis_client, "c" + os.urandom(4).hex())
    with HttpServer() as server, psycopg.connect(database_url, autocommit=True) as conn:
        crm = build("crm", "crm", {"base_url": server.url, "auth_value": "Bearer x"})
        spec = SinkSpec("crm", "crm", {})
        assert delivery.run(conn, crm, spec, control, [newer.id], 0).delivered == 1
        conn.execute("UPDATE events SET payload = '{\"purged\": true}', purged_at = now() "
                     "WHERE id = %s", (newer.id,))
        assert delivery.run(conn, crm, spec, control, [older.id], 0).superseded == 1
        assert len(server.requests) == 1
        crm.close()


def test_an_overtaken_deal_update_is_never_narrowed(database_url, redis_client):
    """A deal event is the deal's whole state: what a newer one leaves null was cleared in RD
    (a reopened deal has no close date, rating nor custom fields). A late "won" update sends
    nothing after the reopening: it ends superseded."""
    import psycopg

    from sinks.postgres import PostgresSink
    from sinks.registry import build
    from tests.sinks.test_postgres_lww import at, deal_update, events
    from tests.support.http_server import HttpServer
    from workers import delivery
    from workers.control import SinkControl
    from workers.routing import SinkSpec

    store = PostgresSink("postgres", {"dsn": database_url})
    won, reopened = events(
        deal_update("D-7", at(0), "won", rating=4, closed_at=at(0)),
        deal_update("D-7", at(1), "ongoing", rating=None, closed_at=None, custom_fields={}))
    store.store([won, reopened], [], route=lambda e: ["crm"])
    store.close()
    control = SinkControl(redis_client, "c" + os.urandom(4).hex())
    with HttpServer() as server, psycopg.connect(database_url, autocommit=True) as conn:
        crm = build("crm", "crm", {"base_url": server.url, "auth_value": "Bearer x"})
        spec = SinkSpec("crm", "crm", {})
        assert delivery.run(conn, crm, spec, control, [reopened.id], 0).delivered == 1
        assert delivery.run(conn, crm, spec, control, [won.id], 0).superseded == 1
        (sent,) = [r.json() for r in server.requests]
        assert sent["status"] == "ongoing" and "closed_at" not in sent and "rating" not in sent
        crm.close()


def test_sends_of_one_deal_to_one_sink_take_turns_across_sessions(database_url):
    """The turn of a deal at a sink is one session's at a time (what a second worker would
    find while the first sends), freed when the first is done; other deals, other sinks and
    events with no lead or deal row never wait."""
    import psycopg

    from tests.sinks.test_postgres_lww import at, deal_update, events
    from workers import delivery

    first, again, other = events(deal_update("D-1", at(0), "ongoing"),
                                 deal_update("D-1", at(1), "won"),
                                 deal_update("D-2", at(0), "won"))
    note, = events({"event_name": "crm_organization_updated", "document": {"id": "O-1"},
                    "event_timestamp": at(0), "transaction_uuid": "tx-org"})
    with psycopg.connect(database_url, autocommit=True) as a, \
            psycopg.connect(database_url, autocommit=True) as b:
        with delivery.turn(a, "crm", first) as mine:
            assert mine
            with delivery.turn(b, "crm", again) as theirs:
                assert not theirs
            for event, sink in ((other, "crm"), (again, "audit"), (note, "crm")):
                with delivery.turn(b, sink, event) as theirs:
                    assert theirs, (event.id, sink)
        with delivery.turn(b, "crm", again) as theirs:
            assert theirs
        assert a.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                         "AND pid = pg_backend_pid()").fetchone() == (0,)


def test_rebuilt_events_keep_their_stored_key_and_unreadable_ones_are_named(
        database_url, db, monkeypatch):
    """A delivery goes out under the key its event was stored with (sinks were given it as
    their idempotency key), even if this version would make another; a stored event this
    version cannot read is reported, not skipped; a failed rebuild leaves no lock behind."""
    import psycopg

    from sinks.postgres import PostgresSink
    from tests.sinks.test_postgres_lww import at, events, v2
    from workers import delivery

    sink = PostgresSink("postgres", {"dsn": database_url})
    kept, gone = events(v2("U-41", at(0)), v2("U-42", at(0)))
    sink.store([kept, gone], [], route=lambda e: ["crm"])
    sink.close()
    db.execute("UPDATE events SET dedup_key = 'mkt:made-by-an-older-version' WHERE id = %s",
               (kept.id,))
    db.execute("""UPDATE events SET payload = '{"neither": "shape"}' WHERE id = %s""",
               (gone.id,))
    with psycopg.connect(database_url, autocommit=True) as conn:
        rebuilt, locked, unreadable = delivery.load_events(conn, "crm", [kept.id, gone.id])
        assert [(e.id, e.dedup_key) for e in rebuilt] == [(kept.id,
                                                          "mkt:made-by-an-older-version")]
        assert list(unreadable) == [gone.id] and "unknown shape" in unreadable[gone.id]
        delivery.release(conn, "crm", locked)

        def broken(entry):  # noqa: ARG001
            raise RuntimeError("rebuild failed")

        monkeypatch.setattr(delivery, "normalize", broken)
        with pytest.raises(RuntimeError):
            delivery.load_events(conn, "crm", [kept.id])
        assert conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                            "AND pid = pg_backend_pid()").fetchone() == (0,)


def test_a_refusal_answered_by_the_half_open_probe_closes_the_circuit(database_url,
                                                                      redis_client):
    """A CRM that is back but refuses one lead (422) is up: the task that probed it goes on
    sending its other events in the same round, and other tasks are not held off."""
    import psycopg

    from sinks.postgres import PostgresSink
    from sinks.registry import build
    from tests.sinks.test_postgres_lww import at, events, v2
    from tests.support.http_server import HttpServer, Reply
    from workers import delivery
    from workers.control import SinkControl
    from workers.routing import SinkSpec

    store = PostgresSink("postgres", {"dsn": database_url})
    control = SinkControl(redis_client, "c" + os.urandom(4).hex())
    spec = SinkSpec("crm", "crm", {}, quick_retries=1, circuit_failures=2,
                    circuit_cooldown=0.3)
    down = events(v2("U-down-1", at(0)), v2("U-down-2", at(0)))
    later = events(*(v2(f"U-up-{n}", at(1)) for n in range(4)))
    store.store(down + later, [], route=lambda e: ["crm"])
    store.close()
    with HttpServer() as server, psycopg.connect(database_url, autocommit=True) as conn:
        crm = build("crm", "crm", {"base_url": server.url, "auth_value": "Bearer x"})
        server.script(Reply(503), Reply(503))
        outage = delivery.run(conn, crm, spec, control, [e.id for e in down], 0)
        assert len(outage.retry_ids) == 2 and control.circuit_state("crm") == "open"
        time.sleep(0.35)
        calls = len(server.requests)
        server.script(Reply(422), Reply(200), Reply(200), Reply(200))
        plan = delivery.run(conn, crm, spec, control, [e.id for e in later], 0)
        assert (plan.delivered, plan.dead, plan.retry_ids) == (3, 1, [])
        assert len(server.requests) - calls == 4
        assert control.circuit_state("crm") == "closed"
        crm.close()


def test_a_last_round_that_meets_an_open_circuit_gets_a_grace_round(database_url,
                                                                    redis_client):
    """Events whose last round found the circuit open are not buried without a call: they get
    one more round when the circuit may be probed, and go out if the sink is back by then; if
    it is still down, that round sends them to dead letters."""
    import psycopg

    from sinks.postgres import PostgresSink
    from sinks.registry import build
    from tests.sinks.test_postgres_lww import at, events, v2
    from tests.support.http_server import HttpServer, Reply
    from workers import delivery
    from workers.control import SinkControl
    from workers.routing import SinkSpec

    store = PostgresSink("postgres", {"dsn": database_url})
    control = SinkControl(redis_client, "c" + os.urandom(4).hex())
    spec = SinkSpec("crm", "crm", {}, retry_schedule=(5.0,), quick_retries=1,
                    circuit_failures=2, circuit_cooldown=0.3)
    down = events(v2("U-open-1", at(0)), v2("U-open-2", at(0)))
    last = events(*(v2(f"U-last-{n}", at(1)) for n in range(3)))
    store.store(down + last, [], route=lambda e: ["crm"])
    store.close()
    with HttpServer() as server, psycopg.connect(database_url, autocommit=True) as conn:
        crm = build("crm", "crm", {"base_url": server.url, "auth_value": "Bearer x"})
        server.script(Reply(503), Reply(503))
        delivery.run(conn, crm, spec, control, [e.id for e in down], 0)
        assert control.circuit_state("crm") == "open"
        calls = len(server.requests)
        held = delivery.run(conn, crm, spec, control, [e.id for e in last], 1)  # the last round
        assert (held.dead, len(server.requests)) == (0, calls)
        assert held.retry_ids == [e.id for e in last] and 0 < held.countdown <= 0.3
        assert held.next_round == 2  # the schedule's one round after the first, then grace
        time.sleep(held.countdown + 0.05)
        server.script(Reply(503), Reply(200), Reply(200))
        grace = delivery.run(conn, crm, spec, control, held.retry_ids[:1], 2)  # still down
        assert (grace.dead, grace.retry_ids) == (1, [])
        assert control.circuit_state("crm") == "open"
        buried = delivery.run(conn, crm, spec, control, held.retry_ids[1:2], 2)
        assert (buried.dead, buried.retry_ids, len(server.requests)) == (1, [], calls + 1)
        time.sleep(0.35)  # half-open: another task probes, and this one waits for its answer
        assert control.circuit_wait("crm", spec.circuit_cooldown, "another task") == 0
        again = delivery.run(conn, crm, spec, control, held.retry_ids[2:], 2)
        assert (again.dead, again.retry_ids, again.next_round) == (0, held.retry_ids[2:], 2)
        control.circuit_success("crm")  # its probe went through: the sink is back
        sent = delivery.run(conn, crm, spec, control, held.retry_ids[2:], 2)
        assert (sent.delivered, sent.dead, sent.retry_ids) == (1, 0, [])
        reason, = conn.execute("SELECT error FROM dead_letters WHERE event_id = %s",
                               (held.retry_ids[1],)).fetchone()
        assert reason.startswith("retries exhausted after 2 rounds: RuntimeError: circuit open")
        crm.close()


def test_events_the_rate_limit_held_back_keep_their_round_when_another_fails(database_url,
                                                                           redis_client):
    """1/min and a CRM that is down: the first event fails (next round), the second is never
    tried this round. It used to ride along into the failed one's round, losing rounds it
    never used, and reach dead letters after a single try."""
    import psycopg

    from sinks.postgres import PostgresSink
    from sinks.registry import build
    from tests.sinks.test_postgres_lww import at, events, v2
    from tests.support.http_server import HttpServer, Reply
    from workers import delivery
    from workers.control import SinkControl
    from workers.routing import SinkSpec

    store = PostgresSink("postgres", {"dsn": database_url})
    control = SinkControl(redis_client, "r" + os.urandom(4).hex())
    spec = SinkSpec("crm", "crm", {}, retry_schedule=(5.0,), quick_retries=1,
                    rate=(1, 60.0), circuit_failures=100)
    first, second = events(v2("U-limited-1", at(0)), v2("U-limited-2", at(1)))
    store.store([first, second], [], route=lambda e: ["crm"])
    store.close()
    with HttpServer() as server, psycopg.connect(database_url, autocommit=True) as conn:
        crm = build("crm", "crm", {"base_url": server.url, "auth_value": "Bearer x"})
        server.set_default(Reply(503))
        plan = delivery.run(conn, crm, spec, control, [first.id, second.id], 0)
        assert len(server.requests) == 1  # the first event's one try
        assert (plan.retry_ids, plan.next_round, plan.reason) == ([first.id], 1, "retrying")
        assert plan.limited_ids == [second.id] and 50 < plan.limited_wait <= 60
        # the second is due when the rate allows, its round untouched
        due = conn.execute("SELECT extract(epoch FROM dispatched_at - now()) FROM deliveries "
                           "WHERE event_id = %s", (second.id,)).fetchone()[0]
        assert 50 < float(due) <= 61
        crm.close()
