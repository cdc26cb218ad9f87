"""A worker SIGKILLed mid-batch loses nothing and stores nothing twice."""

from __future__ import annotations

import time

import orjson
import psycopg
import pytest

from ingest.queue import GROUP
from tests.conftest import count, fixture_bytes, post, wait_for

TEMPLATE = orjson.loads(fixture_bytes("mkt-v2-converted.json"))


def body(n: int) -> bytes:
    event = {**TEMPLATE, "event_timestamp": f"2024-01-01T00:00:{n % 60:02d}.{n:06d}-03:00"}
    event["contact"] = {**TEMPLATE["contact"], "uuid": f"lead-{n:05d}",
                        "email": f"lead{n}@example.com"}
    return orjson.dumps(event)


@pytest.mark.slow
def test_sigkill_mid_batch_then_restart_stores_all_2000_exactly_once(
        client, settings, worker_factory, redis_client, db):
    custom = settings.with_(batch_size=50, max_inflight_batches=2, claim_idle_seconds=2)
    ids = []
    for n in range(2000):
        response = post(client, body(n))
        assert response.status_code == 202
        ids.append(response.get_json()["id"])

    def in_flight() -> int:
        return redis_client.xpending(settings.stream_key, GROUP)["pending"]

    for _ in range(5):  # on a busy machine a kill can land between two batches: try again
        doomed = worker_factory(custom)
        stored = count(db, "SELECT count(*) FROM events")
        wait_for(lambda: count(db, "SELECT count(*) FROM events") > stored  # noqa: B023
                 and in_flight() > 0, interval=0.002, what="a batch stored, others in flight")
        doomed.kill()  # SIGKILL to the whole process group: main process and pool children
        if in_flight() > 0:
            break
    stored_at_kill = count(db, "SELECT count(*) FROM events")
    assert stored_at_kill < 2000, "the worker finished before it was killed"
    assert in_flight() > 0, "no batch was in flight when the worker died"

    worker_factory(custom)  # a new consumer: it must claim what the dead one held
    wait_for(lambda: count(db, "SELECT count(*) FROM events") == 2000
             and redis_client.xlen(settings.stream_key) == 0, timeout=90,
             what="all 2000 events stored and the stream drained")
    assert redis_client.xpending(settings.stream_key, GROUP)["pending"] == 0
    assert count(db, "SELECT count(DISTINCT id) FROM events") == 2000
    assert sorted(r[0] for r in db.execute("SELECT id FROM events")) == sorted(ids)
    assert count(db, "SELECT count(*) FROM leads") == 2000
    assert count(db, "SELECT count(*) FROM quarantine") == 0


def test_a_batch_running_longer_than_the_claim_time_is_not_dispatched_twice(
        client, settings, worker_factory, db, database_url):
    # storing waits 6 s on the lead's lock (another transaction holds it), three times the
    # claim time: the task keeps its entries' idle time short, so no pump takes them over
    custom = settings.with_(claim_idle_seconds=2)
    worker = worker_factory(custom)
    with psycopg.connect(database_url) as blocker:
        blocker.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                        ("leadpipe:lead:uuid:lead-00001",))
        assert post(client, body(1)).status_code == 202
        wait_for(lambda: "batch received" in worker.log_path.read_text(), what="the batch")
        time.sleep(6)
        assert count(db, "SELECT count(*) FROM events") == 0  # still waiting on the lock
    wait_for(lambda: count(db, "SELECT count(*) FROM events") == 1, what="the event stored")
    time.sleep(1)
    log = worker.log_path.read_text()
    assert "re-dispatching" not in log
    assert log.count('"batch received"') == 1, log[-3000:]
