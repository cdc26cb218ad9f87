"""`leadpipe quarantine list` and `replay` against a real database."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime

import orjson
import pytest
import yaml

from sinks.postgres import PostgresSink
from tests.conftest import ROOT, count, fixture_bytes, wait_for
from workers.events import Rejected


def leadpipe(settings, *args: str) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return subprocess.run([sys.executable, "-m", "config.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, **settings.to_env()},
                          timeout=60)


def quarantine(settings, qid: str, payload: dict, reason: str = "old reason",  # type: ignore[no-untyped-def]
               hint: str | None = None) -> None:
    sink = PostgresSink("postgres", {"dsn": settings.database_url})
    sink.store([], [Rejected(qid, datetime(2024, 1, 1, tzinfo=UTC), reason,
                             orjson.dumps(payload).decode(), hint)])
    sink.close()


def test_list_shows_id_and_reason(settings):
    quarantine(settings, "q-1", {"hello": 1}, reason='{"contact": ["Missing data"]}')
    result = leadpipe(settings, "quarantine", "list")
    assert result.returncode == 0, result.stderr
    assert "q-1" in result.stdout and "Missing data" in result.stdout


def test_list_is_newest_first_within_one_batch_too(settings):
    sink = PostgresSink("postgres", {"dsn": settings.database_url})
    sink.store([], [Rejected(f"q-{n}", datetime(2024, 1, 1, 0, 0, n, tzinfo=UTC), "bad",
                             f'{{"n": {n}}}', None) for n in (1, 2, 3)])  # one transaction
    sink.close()
    result = leadpipe(settings, "quarantine", "list")
    assert result.returncode == 0, result.stderr
    ids = [word for word in result.stdout.split() if word.startswith("q-")]
    assert ids == ["q-3", "q-2", "q-1"], result.stdout


def test_list_when_empty(settings):
    result = leadpipe(settings, "quarantine", "list")
    assert result.returncode == 0 and "empty" in result.stdout


def test_replay_after_a_fix_stores_the_event_and_empties_quarantine(settings, db):
    body = orjson.loads(fixture_bytes("legacy-leads-full.json"))
    quarantine(settings, "q-2", body, hint="WEBHOOK.MARKED_OPPORTUNITY")
    result = leadpipe(settings, "quarantine", "replay", "q-2")
    assert result.returncode == 0, result.stderr
    assert "1 event(s) stored" in result.stdout
    assert count(db, "SELECT count(*) FROM quarantine") == 0
    row = db.execute("SELECT id, event_type FROM events").fetchone()
    assert row == ("q-2", "WEBHOOK.MARKED_OPPORTUNITY")


def test_replay_of_what_is_still_bad_keeps_it_with_the_new_reason(settings, db):
    quarantine(settings, "q-3", {"event_type": "WEBHOOK.CONVERTED"})
    result = leadpipe(settings, "quarantine", "replay", "q-3")
    assert result.returncode == 3  # not 1: that says a store is unreachable
    assert "contact" in result.stdout
    reason, replays = db.execute("SELECT reason, replays FROM quarantine").fetchone()
    assert "contact" in reason and replays == 1


def test_replay_of_unknown_id_is_a_clear_error(settings):
    result = leadpipe(settings, "quarantine", "replay", "nope")
    assert result.returncode == 2
    assert "no quarantined event with id 'nope'" in result.stderr


def refuse_deal(db, deal_id: str) -> None:  # type: ignore[no-untyped-def]
    """Postgres refuses every write of one deal (22P02, as for a value it cannot read)."""
    db.execute("CREATE FUNCTION refuse_deal() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
               f"IF NEW.id = '{deal_id}' THEN PERFORM 'maria.souza@example.com'::bigint; "
               "END IF; RETURN NEW; END $$")
    db.execute("CREATE TRIGGER refuse_deal BEFORE INSERT OR UPDATE ON deals "
               "FOR EACH ROW EXECUTE FUNCTION refuse_deal()")


def test_bodies_postgres_refuses_are_quarantined_and_the_batch_goes_on(settings, db):
    """Valid JSON that jsonb refuses as it is (found by the fuzz run): a byte order mark, NaN,
    a lone surrogate escape, a NUL in a key; and a body Postgres itself refuses. One batch with
    a good event: the good one is stored, each other body is stored cleaned or quarantined with
    its text, and nothing raises."""
    from ingest.queue import Entry
    from workers import pipeline
    from workers.runtime import Runtime

    refuse_deal(db, "d-refused")
    good = fixture_bytes("crm-deal-created.json")
    hostile = [b"\xef\xbb\xbf" + fixture_bytes("crm-deal-updated-won.json"),
               b'{"event_name": "crm_deal_updated", "transaction_uuid": "t-nan", '
               b'"document": {"id": "d1", "amount_total": NaN}}',
               b'{"event_name": "crm_deal_created", "transaction_uuid": "t-sur", '
               b'"document": {"id": "d2", "name": "\\ud800"}}',
               b'{"leads": [{"email": "nul@example.com", "k\\u0000": "v"}]}',
               b'{"event_name": "crm_deal_created", "transaction_uuid": "t-refused", '
               b'"document": {"id": "d-refused", "name": "maria.souza@example.com"}}']
    entries = [Entry(f"{n}-0", f"hostile-{n}", 1_700_000_000_000 + n, body, None)
               for n, body in enumerate([good, *hostile])]
    runtime = Runtime(settings)
    try:
        events, rejected = pipeline.split(entries)
        stored = pipeline.store(runtime, events, rejected)
    finally:
        runtime.close()
    assert len(stored.new) + stored.quarantined == 6
    ids = {i for (i,) in db.execute("SELECT id FROM events UNION ALL SELECT id FROM quarantine")}
    assert ids == {f"hostile-{n}" for n in range(6)}
    assert count(db, "SELECT count(*) FROM events WHERE id = 'hostile-0'") == 1
    assert count(db, "SELECT count(*) FROM events WHERE id = 'hostile-1'") == 1  # BOM dropped
    assert db.execute("SELECT name FROM deals WHERE id = 'd2'").fetchone() == ("\ufffd",)
    reasons = dict(db.execute("SELECT id, reason FROM quarantine ORDER BY id").fetchall())
    assert set(reasons) == {"hostile-2", "hostile-5"}, reasons
    assert "Not a finite number" in reasons["hostile-2"]
    # Postgres' type, SQLSTATE and primary message; not its DETAIL or CONTEXT, which quote data
    assert reasons["hostile-5"] == ("postgres refused the event: InvalidTextRepresentation "
                                    "(22P02): invalid input syntax for type bigint")


def kept_as_text(settings, qid: str, body: bytes, reason: str) -> None:  # type: ignore[no-untyped-def]
    """A quarantine row as the pipeline writes one for a body it cannot store as JSON (not
    JSON at all, or refused by Postgres): the body's text as a JSON string."""
    from workers.normalize import as_json_string

    sink = PostgresSink("postgres", {"dsn": settings.database_url})
    sink.store([], [Rejected(qid, datetime(2024, 1, 1, tzinfo=UTC), reason,
                             as_json_string(body))])
    sink.close()


def replay(settings, qid: str):  # type: ignore[no-untyped-def]
    from workers import quarantine as q
    from workers.runtime import Runtime

    runtime = Runtime(settings)
    try:
        return q.replay(runtime, qid)
    finally:
        runtime.close()


def test_replay_of_a_body_postgres_refused_replays_the_body_and_keeps_a_real_reason(
        settings, db):
    """Postgres refused the body, so it was kept as a JSON string: replay reads the body inside
    the string, and as Postgres still refuses it, the row stays with Postgres' reason (not
    "body is not a JSON object", and not deleted)."""
    body = (b'{"event_name":"crm_deal_created","transaction_uuid":"t-ref",'
            b'"document":{"id":"d-refused","name":"x"}}')
    refuse_deal(db, "d-refused")
    kept_as_text(settings, "q-ref", body, "postgres refused the event: old reason")
    assert db.execute("SELECT jsonb_typeof(payload) FROM quarantine").fetchone() == ("string",)
    result = replay(settings, "q-ref")
    reason, replays = db.execute("SELECT reason, replays FROM quarantine WHERE id = 'q-ref'"
                                 ).fetchone()
    assert reason.startswith("postgres refused the event: InvalidTextRepresentation"), reason
    assert result.still_rejected == reason and result.stored == 0 and replays == 1


def test_a_lone_surrogate_an_earlier_version_quarantined_is_stored_by_replay(settings, db):
    """Until lone surrogates were read as U+FFFD, Postgres refused such bodies and they were
    quarantined as text: a replay now stores them."""
    body = (b'{"event_name":"crm_deal_created","transaction_uuid":"t-sur",'
            b'"document":{"id":"d2","name":"cut \\ud83d"}}')
    kept_as_text(settings, "q-sur", body, "postgres refused the event: InvalidTextRepresentation "
                 "(22P02): invalid input syntax for type json")
    result = replay(settings, "q-sur")
    assert result.still_rejected is None and result.stored == 1, result
    assert count(db, "SELECT count(*) FROM quarantine") == 0
    assert db.execute("SELECT name FROM deals WHERE id = 'd2'").fetchone() == ("cut \ufffd",)


def test_replay_of_a_body_kept_as_text_stores_it_once_the_code_takes_it(settings, db):
    body = fixture_bytes("crm-deal-created.json")
    kept_as_text(settings, "q-kept", body, "postgres refused the event: SomeError")
    result = replay(settings, "q-kept")
    assert result.stored == 1 and result.still_rejected is None
    assert count(db, "SELECT count(*) FROM quarantine") == 0
    assert db.execute("SELECT payload FROM events WHERE id = 'q-kept'").fetchone()[0] == (
        orjson.loads(body))


def test_replay_of_a_body_that_is_not_json_says_so(settings, db):
    kept_as_text(settings, "q-nj", b'{"event_name": "crm_deal_created", ', "not JSON: ...")
    result = replay(settings, "q-nj")
    reason = db.execute("SELECT reason FROM quarantine WHERE id = 'q-nj'").fetchone()[0]
    assert reason.startswith("not JSON") and result.still_rejected == reason, reason


def test_a_replayed_body_reaches_its_sinks_at_once(settings, db, tmp_path, worker_factory):
    """Its deliveries are queued by the replay itself, not left to the relay (minutes later)."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump({"sinks": {"audit": {"type": "dummy", "options": {
        "path": str(tmp_path / "audit.jsonl")}}}, "routes": [{"to": ["audit"]}]}))
    custom = settings.with_(routes_file=str(routes), relay_after_seconds=3600)
    worker_factory(custom)
    quarantine(custom, "q-fan", orjson.loads(fixture_bytes("crm-deal-created.json")))
    result = leadpipe(custom, "quarantine", "replay", "q-fan")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: count(db, "SELECT count(*) FROM deliveries WHERE status = 'delivered'")
             == 1, timeout=30, what="the replayed event delivered")
    assert "q-fan" in (tmp_path / "audit.jsonl").read_text()


def test_a_replay_the_purge_overtook_says_the_row_is_gone(settings, db, monkeypatch):
    # a row still rejected and removed meanwhile (the purge, an erasure): "still quarantined"
    # named a row that no longer existed
    from workers import quarantine as module
    from workers.runtime import Runtime

    quarantine(settings, "q-gone", {"event_type": "WEBHOOK.CONVERTED"})
    real_split = module.split

    def purged_meanwhile(entries):  # type: ignore[no-untyped-def]
        db.execute("DELETE FROM quarantine WHERE id = 'q-gone'")
        return real_split(entries)

    monkeypatch.setattr(module, "split", purged_meanwhile)
    runtime = Runtime(settings)
    try:
        with pytest.raises(LookupError, match="removed while it was replayed"):
            module.replay(runtime, "q-gone")
    finally:
        runtime.close()
    assert count(db, "SELECT count(*) FROM quarantine") == 0
