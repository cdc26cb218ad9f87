"""Operator actions on real Redis and Postgres: the relay and replays keep one task per
delivery."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import yaml

from sinks.postgres import PostgresSink
from tests.sinks.test_postgres_lww import at, events, v2
from workers import delivery, operations


@pytest.fixture
def ops(settings, tmp_path) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    """A runtime with the Celery app (it publishes) and a sink named crm."""
    from workers.app import make_celery

    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"sinks": {"crm": {"type": "dummy", "options": {
        "path": str(tmp_path / "crm.jsonl")}}}, "routes": [{"to": ["crm"]}]}))
    runtime = make_celery(settings.with_(routes_file=str(routes),
                                         relay_after_seconds=1)).leadpipe.runtime()
    yield runtime
    runtime.close()


def stored(database_url: str, *uuids: str) -> list[str]:
    sink = PostgresSink("postgres", {"dsn": database_url})
    made = events(*(v2(uuid, at(0)) for uuid in uuids))
    sink.store(made, [], route=lambda e: ["crm"])
    sink.close()
    return [e.id for e in made]


def test_the_relay_leaves_a_delivery_a_task_is_sending_and_renames_the_rest(
        ops, database_url, db):
    """A delivery whose task holds its lock is under way (its next round follows): renamed,
    it would be left with no task that may send it. The others are sent again, in a new
    dispatch the waiting task does not share."""
    busy, lost = stored(database_url, "U-busy", "U-lost")
    db.execute("UPDATE deliveries SET dispatched_at = now() - interval '1 hour'")
    with psycopg.connect(database_url, autocommit=True) as task:
        locked, = task.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                               (f"crm:{busy}",)).fetchone()
        assert locked
        assert operations.relay(ops) == 1
        names = dict(db.execute("SELECT event_id, dispatch FROM deliveries").fetchall())
        assert names[busy] is None and names[lost] is not None
        waiting, _, _ = delivery.load_events(task, "crm", [lost])  # the task taken for lost
        assert waiting == []
        relayed, held, _ = delivery.load_events(task, "crm", [lost], names[lost])
        assert [e.id for e in relayed] == [lost]
        delivery.release(task, "crm", held)


def test_a_replayed_dead_letter_is_not_the_task_of_its_first_life(ops, database_url, db):
    """A task queued before the delivery died (say, taken for lost and still waiting) must
    not send it beside the replay's own task."""
    event_id, = stored(database_url, "U-dead")
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert delivery.bury(conn, "crm", [event_id], "gone for now") == 1
        assert operations.replay(ops, sink="crm") == 1
        (name,), = db.execute("SELECT dispatch FROM deliveries").fetchall()
        assert name is not None
        assert delivery.load_events(conn, "crm", [event_id])[0] == []
        replayed, held, _ = delivery.load_events(conn, "crm", [event_id], name)
        assert [e.id for e in replayed] == [event_id]
        delivery.release(conn, "crm", held)


def test_the_relay_locks_only_the_deliveries_it_sends(database_url, db):
    """Its try-lock must not reach every stale delivery before the limit applies: it held
    them all until commit (past the lock table's size, the relay failed every run)."""
    stored(database_url, *(f"U-stale-{n}" for n in range(30)))
    db.execute("UPDATE deliveries SET dispatched_at = now() - interval '1 hour'")
    with psycopg.connect(database_url) as conn:  # one transaction, rolled back
        sent = conn.execute(operations.RELAY_SQL, (60, [], 5, "d-1")).fetchall()
        held, = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                             "AND pid = pg_backend_pid()").fetchone()
        conn.rollback()
    assert (len(sent), held) == (5, 5)


def test_the_relay_sends_a_lost_delivery_on_in_its_round(ops, database_url, db, monkeypatch):
    """A task lost while its delivery waited for round 3 is sent on in round 3 (it used to
    start over at round 0: the whole retry schedule again, and again at each loss)."""
    from workers.routing import SinkSpec

    waiting, = stored(database_url, "U-round")
    sent: list[tuple[str, list[str], int]] = []
    monkeypatch.setattr(ops, "publish", lambda sink, ids, round_=0, *args, **kwargs:
                        sent.append((sink, ids, round_)))
    failing = SinkSpec("crm", "dummy", {}, retry_schedule=(1, 1, 1, 1, 1), quick_retries=1)

    class Down:
        latest_state_only = False

        def deliver(self, event: Any) -> None:
            from sinks.base import RetryableSinkError

            raise RetryableSinkError("HTTP 503")

    with psycopg.connect(database_url, autocommit=True) as conn:
        plan = delivery.run(conn, Down(), failing, ops.control, [waiting], 2)  # type: ignore[arg-type]
        assert plan.next_round == 3
    assert db.execute("SELECT round FROM deliveries").fetchone() == (3,)
    db.execute("UPDATE deliveries SET dispatched_at = now() - interval '1 hour'")
    assert operations.relay(ops) == 1
    assert sent == [("crm", [waiting], 3)]
    assert operations.replay  # and a replay starts over: below
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert delivery.bury(conn, "crm", [waiting], "gone") == 1
    sent.clear()
    monkeypatch.setattr(operations, "publish_or_relay",
                        lambda runtime, sink, ids, dispatch=None: sent.append((sink, ids, 0)))
    assert operations.replay(ops, sink="crm") == 1
    assert db.execute("SELECT round FROM deliveries").fetchone() == (0,)
