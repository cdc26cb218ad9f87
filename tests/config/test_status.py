"""`leadpipe status`: the summary in the terminal, from real Redis, Postgres and workers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import redis
import yaml

from config.local import LocalRedis, free_port
from config.settings import Settings
from ingest import create_app
from tests.conftest import ROOT, ApiProcess, count, fixture_bytes, post, wait_for
from workers.status import age

NO_CONTACT = b'{"event_type": "WEBHOOK.CONVERTED", "event_identifier": "x"}'


def status(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "config.cli", "status", *args], cwd=ROOT,
                          env={**os.environ, **settings.to_env()}, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def routed(settings: Settings, tmp_path) -> Settings:  # type: ignore[no-untyped-def]
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({
        "sinks": {"audit": {"type": "dummy", "options": {"path": str(tmp_path / "a.jsonl")}},
                  "refuser": {"type": "dummy", "options": {"path": "x", "fail": "permanent"}},
                  "held": {"type": "dummy", "options": {"path": str(tmp_path / "h.jsonl")}}},
        "routes": [{"to": ["audit", "held"]},
                   {"to": ["refuser"], "when": {"match": ["deal.id exists"]}}],
    }))
    return settings.with_(routes_file=str(path))


def row(output: str, sink: str) -> list[str]:
    (line,) = [line for line in output.splitlines() if line.split()[:1] == [sink]]
    return line.split()


def test_status_shows_stream_sinks_quarantine_and_workers(routed, worker_factory, db):
    worker = worker_factory(routed)
    client = create_app(routed).test_client()
    paused = subprocess.run([sys.executable, "-m", "config.cli", "sinks", "pause", "held"],
                            cwd=ROOT, env={**os.environ, **routed.to_env()}, capture_output=True,
                            text=True, timeout=60)
    assert paused.returncode == 0, paused.stderr
    for body in ("mkt-v2-converted.json", "crm-deal-created.json"):
        post(client, fixture_bytes(body))
    post(client, NO_CONTACT)
    wait_for(lambda: count(db, "SELECT count(*) FROM deliveries WHERE status <> 'pending'") == 3
             and count(db, "SELECT count(*) FROM quarantine") == 1,
             what="deliveries done and one body quarantined")

    result = status(routed)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^ingest stream\s+depth 0\s+unread 0\s+oldest -$", out, re.M), out
    assert re.search(r"^quarantine\s+1$", out, re.M), out
    assert re.search(r"^redis\s+appendonly yes, appendfsync always$", out, re.M), out
    #                  sink       state      circuit  pending oldest lead delivered dead
    assert row(out, "audit") == ["audit", "running", "closed", "0", "-", "-", "2", "0"]
    assert row(out, "refuser") == ["refuser", "running", "closed", "0", "-", "-", "0", "1"]
    held = row(out, "held")
    assert held[:4] == ["held", "PAUSED", "closed", "2"] and held[6:] == ["0", "0"]
    assert held[4] != "-" and held[5] != "-"  # waiting: the oldest delivery and lead have an age
    name = f"leadpipe-{worker.proc.pid}@"
    assert re.search(r"^workers\s+1 answered within 1s$", out, re.M), out
    (line,) = [line for line in out.splitlines() if line.strip().startswith(name)]
    assert "pool 2" in line and "process_batch" in line and "deliver" in line
    assert "@example.com" not in out + result.stderr  # no lead data in the summary

    as_json = json.loads(status(routed, "--json", "--timeout", "0.5").stdout)
    assert as_json["sinks"]["held"]["pending"] == 2 and as_json["quarantined"] == 1
    assert as_json["postgres_up"] is True and as_json["postgres_problem"] is None
    assert as_json["redis_durable"] is True
    assert [w for w in as_json["workers"] if w.startswith(name)]


def test_status_without_routing_or_workers(settings):
    result = status(settings, "--timeout", "0.3")
    assert result.returncode == 0, result.stderr
    assert "sinks          none" in result.stdout
    assert "workers        0 answered within 0.3s" in result.stdout


def test_status_names_erasures_left_unfinished(settings, db):
    """An erasure whose rows were never changed keeps dropping the person's bodies and makes
    storing read every body: the operator must see it, not find it in a log."""
    assert "erasures" not in status(settings, "--timeout", "0.1").stdout
    db.execute("INSERT INTO erasures (email_sha256) VALUES ('a'), ('b')")  # touched: {}
    db.execute("""INSERT INTO erasures (email_sha256, touched) VALUES ('c', '{"leads": 1}')""")
    result = status(settings, "--timeout", "0.1")
    assert result.returncode == 0, result.stderr
    assert ("erasures       2 UNFINISHED: run `leadpipe erase` again for each person (until "
            "then storing reads every body)") in result.stdout.splitlines()


def test_sinks_list_says_when_there_are_none(settings):
    result = subprocess.run([sys.executable, "-m", "config.cli", "sinks", "list"], cwd=ROOT,
                            env={**os.environ, **settings.to_env()}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("no sinks: events go to Postgres only"), result.stdout


def test_status_exits_1_when_postgres_is_unreachable(settings):
    from config.local import free_port

    down = settings.with_(database_url=f"postgresql://x:y@127.0.0.1:{free_port()}/none")
    result = status(down, "--timeout", "0.3")
    assert result.returncode == 1
    assert "POSTGRES UNREACHABLE: check LEADPIPE_DATABASE_URL" in result.stdout


def test_status_says_a_database_that_is_not_migrated_is_not_migrated(settings, db):
    db.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    result = status(settings, "--timeout", "0.3")
    assert result.returncode == 1
    assert "POSTGRES NOT MIGRATED: run `leadpipe migrate`" in result.stdout


def test_status_shows_unknown_sink_counts_when_postgres_is_unreachable(routed):
    from config.local import free_port

    down = routed.with_(database_url=f"postgresql://x:y@127.0.0.1:{free_port()}/none")
    result = status(down, "--timeout", "0.3")
    assert result.returncode == 1
    audit = next(line for line in result.stdout.splitlines() if line.startswith("audit "))
    assert audit.split()[3:] == ["?"] * 5, audit  # pending, oldest, oldest lead, delivered, dead


def test_status_shows_unknown_sink_state_when_redis_is_unreachable(routed):
    """A paused sink must not read "running, closed" because Redis could not be asked."""
    from config.local import free_port

    assert subprocess.run([sys.executable, "-m", "config.cli", "sinks", "pause", "held"],
                          cwd=ROOT, env={**os.environ, **routed.to_env()}, capture_output=True,
                          timeout=60).returncode == 0
    down = routed.with_(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    result = status(down, "--timeout", "0.3")
    assert result.returncode == 1
    assert "REDIS UNREACHABLE: check LEADPIPE_REDIS_URL" in result.stdout
    assert row(result.stdout, "held")[1:3] == ["?", "?"], result.stdout  # state, circuit
    held = json.loads(status(down, "--timeout", "0.3", "--json").stdout)["sinks"]["held"]
    assert (held["paused"], held["circuit"]) == (None, None)
    dashboard = create_app(down.with_(admin_tokens=("t-admin-0123456789",))).test_client().get(
        "/api/dashboard", headers={"Authorization": "Bearer t-admin-0123456789"})
    assert dashboard.status_code == 200
    held = next(s for s in dashboard.get_json()["sinks"] if s["sink"] == "held")
    assert (held["paused"], held["circuit"]) == (None, None)


@pytest.mark.parametrize("seconds, text", [(0, "-"), (None, "-"), (4.2, "4s"), (185, "3m05s"),
                                           (7800, "2h10m"), (273600, "3d04h")])
def test_ages_read_at_a_glance(seconds, text):
    assert age(seconds) == text


@pytest.mark.parametrize(("setting", "value", "at_risk"), [
    ("appendfsync", "everysec", "appendfsync is everysec"),
    ("appendonly", "no", "appendonly is no")])
def test_a_redis_that_would_lose_acknowledged_events_is_named_by_status_and_api(
        settings, tmp_path, setting, value, at_risk):
    """A 202 promises the body is on disk: a Redis without AOF, or one that fsyncs only every
    second, breaks that promise, and `leadpipe status` and `leadpipe api` say so."""
    server = LocalRedis(tmp_path / "redis", port=free_port()).start()
    try:
        redis.Redis.from_url(server.url).config_set(setting, value)
        own = settings.with_(redis_url=server.url)
        result = status(own, "--timeout", "0.1")
        assert result.returncode == 0, result.stderr
        (line,) = [x for x in result.stdout.splitlines() if x.startswith("redis ")]
        assert "NOT DURABLE" in line and at_risk in line, line
        assert json.loads(status(own, "--json", "--timeout", "0.1").stdout)[
            "redis_durable"] is False
        api = ApiProcess(own, tmp_path / "api.log")
        api.stop()
        log = (tmp_path / "api.log").read_text()
        assert "leadpipe api: warning: Redis NOT DURABLE" in log and at_risk in log, log
    finally:
        server.stop()


def test_a_subscriptions_open_circuit_is_reported_open(runtime):
    # subscriptions are not in the routing file: their sinks come from Postgres' rows, and
    # their pause and circuit state used to be left at the defaults (closed)
    from ingest.queue import Entry
    from workers import status
    from workers.normalize import normalize

    target = "subscription:00000000-0000-4000-8000-00000000c1c1"
    events = normalize(Entry("1-0", "st-1", 1_700_000_000_000,
                             fixture_bytes("mkt-v2-converted.json"), None))
    runtime.postgres.store(events, [], lambda event: [target])
    for _ in range(3):
        runtime.control.circuit_failure(target, threshold=3, cooldown=60)
    assert runtime.control.circuit_state(target) == "open"
    state = status.collect(runtime)
    assert state.sinks[target].pending == 1 and state.sinks[target].circuit == "open"


def test_the_oldest_entry_is_aged_on_redis_clock_whatever_the_api_hosts_clock_says(
        runtime, redis_client):
    # `t` is the API host's clock: two minutes slow there must not read as a two-minute
    # backlog (the documented alert fires at 60 s), nor two minutes fast hide one
    from workers import status

    key = runtime.settings.stream_key
    for skew_ms in (-120_000, 120_000):
        redis_client.delete(key)
        redis_client.xadd(key, {"i": "ev-now", "t": int(time.time() * 1000) + skew_ms,
                                "b": b"{}"})
        assert status.collect(runtime).ingest_oldest_seconds < 5


def test_a_body_the_spool_held_is_aged_from_when_the_endpoint_took_it(runtime, redis_client):
    # moved to the stream after an outage, it gets a new id; `w` is how long it waited
    from workers import status

    redis_client.xadd(runtime.settings.stream_key,
                      {"i": "ev-old", "t": 0, "b": b"{}", "w": 1_800_000})
    assert 1795 < status.collect(runtime).ingest_oldest_seconds < 1900


@pytest.mark.parametrize("queue, ours", [
    ("prod.ingest", True), ("prod.default", True), ("prod.subscriptions", True),
    ("prod.sink.crm", True), ("prod.sink.sales-email", True),
    ("prod.eu.ingest", False), ("prod.eu.sink.crm", False), ("prod.sink.", False),
    ("production.ingest", False), ("celery", False),
])
def test_workers_of_another_namespace_starting_with_ours_are_not_ours(settings, queue, ours):
    from workers.status import _ours

    assert _ours(queue, settings.with_(namespace="prod")) is ours
