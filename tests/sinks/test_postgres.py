"""The postgres sink against a real database: dedup, last writer wins, one lead across dialects."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import orjson
import psycopg
import pytest

from ingest.queue import Entry
from sinks.postgres import PostgresSink
from tests.conftest import count, fixture_bytes
from workers.events import Event
from workers.normalize import normalize

_ids = itertools.count()


def events(*bodies: dict | bytes, hint: str | None = None) -> list[Event]:
    out = []
    for body in bodies:
        n = next(_ids)
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        for item in normalize(Entry(f"{n}-0", f"ev-{n}", 1_700_000_000_000 + n, raw, hint)):
            assert isinstance(item, Event), item
            out.append(item)
    return out


def legacy(**lead: object) -> dict:
    return {"leads": [lead]}


def test_batch_duplicates_and_redelivery_are_counted_not_stored(database_url, db):
    sink = PostgresSink("postgres", {"dsn": database_url})
    body = fixture_bytes("mkt-v2-converted.json")
    stored = sink.store(events(body, body, body), [])
    assert (len(stored.new), stored.duplicates) == (1, 2)
    again = sink.store(events(body), [])
    assert (len(again.new), again.duplicates) == (0, 1)
    assert count(db, "SELECT count(*) FROM events") == 1
    assert count(db, "SELECT duplicates FROM events") == 3
    sink.close()


def test_lead_is_one_lead_across_dialects_and_identifiers(database_url, db):
    sink = PostgresSink("postgres", {"dsn": database_url})
    first = legacy(id="77", email="Ana@Example.com", name="Ana",
                   last_conversion={"created_at": "2024-01-01T10:00:00Z"})
    sink.store(events(first), [])
    assert db.execute("SELECT lead_key FROM leads").fetchone()[0] == "id:77"
    with_uuid = legacy(id="77", uuid="U-1", city="Recife",
                       last_conversion={"created_at": "2024-01-02T10:00:00Z"})
    v2 = orjson.loads(fixture_bytes("mkt-v2-converted.json"))
    v2["contact"].update(uuid="U-1", email="ana@example.com", job_title="CEO")
    del v2["contact"]["city"]  # what the newest event lacks is kept from before
    v2["event_timestamp"] = "2024-01-03T10:00:00Z"
    sink.store(events(with_uuid, v2), [])
    rows = db.execute("SELECT lead_key, uuid, legacy_id, email, name, city, job_title "
                      "FROM leads").fetchall()
    assert rows == [("id:77", "U-1", "77", "ana@example.com", v2["contact"]["name"], "Recife",
                     "CEO")]
    sink.close()


def test_two_rd_contacts_sharing_an_email_are_not_merged(database_url, db):
    sink = PostgresSink("postgres", {"dsn": database_url})
    sink.store(events(legacy(uuid="A", email="same@example.com"),
                      legacy(uuid="B", email="same@example.com")), [])
    assert count(db, "SELECT count(*) FROM leads") == 2
    sink.close()


def test_older_lead_event_never_overwrites_newer_state(database_url, db):
    sink = PostgresSink("postgres", {"dsn": database_url})
    newer = legacy(uuid="U", lead_stage="Cliente", opportunity="true",
                   last_conversion={"created_at": "2024-06-01T00:00:00Z"})
    older = legacy(uuid="U", lead_stage="Lead", opportunity="false", city="Natal",
                   last_conversion={"created_at": "2024-01-01T00:00:00Z"})
    sink.store(events(newer), [])
    sink.store(events(older), [])
    row = db.execute("SELECT lifecycle_stage, opportunity, city, updated_at FROM leads").fetchone()
    assert row == ("Cliente", True, None, datetime(2024, 6, 1, tzinfo=UTC))
    sink.close()


def test_older_and_newer_in_one_batch_apply_in_time_order(database_url, db):
    sink = PostgresSink("postgres", {"dsn": database_url})
    newer = legacy(uuid="U", lead_stage="Cliente",
                   last_conversion={"created_at": "2024-06-01T00:00:00Z"})
    older = legacy(uuid="U", lead_stage="Lead", city="Natal",
                   last_conversion={"created_at": "2024-01-01T00:00:00Z"})
    sink.store(events(newer, older), [])
    row = db.execute("SELECT lifecycle_stage, city FROM leads").fetchone()
    assert row == ("Cliente", "Natal")  # newest wins; what it lacks is filled from the older
    sink.close()


def test_deleted_deal_keeps_its_row_and_stays_deleted(database_url, db):
    sink = PostgresSink("postgres", {"dsn": database_url})
    won = orjson.loads(fixture_bytes("crm-deal-updated-won.json"))
    deleted = {"event_name": "crm_deal_deleted", "transaction_uuid": "del-1",
               "event_timestamp": "2025-04-01T00:00:00Z",
               "document": {"id": won["document"]["id"], "name": "x"}}
    sink.store(events(won), [])
    sink.store(events(deleted), [])
    sink.store(events({**won, "transaction_uuid": "late-old-update"}), [])
    row = db.execute("SELECT status, deleted_at, amount_total FROM deals").fetchone()
    assert row[0] == "won" and row[1] == datetime(2025, 4, 1, tzinfo=UTC)
    assert float(row[2]) == 7500.0
    sink.close()


def test_sql_values_are_parameters(database_url, db):
    sink = PostgresSink("postgres", {"dsn": database_url})
    nasty = "x'); DROP TABLE leads; --"
    sink.store(events(legacy(uuid=nasty, name=nasty, email=nasty)), [])
    assert db.execute("SELECT uuid, name FROM leads").fetchone() == (nasty, nasty)
    sink.close()


def test_unreachable_database_is_retryable(database_url):
    import pytest

    from sinks.base import RetryableSinkError

    sink = PostgresSink("postgres", {"dsn": database_url})
    sink.pool.close()
    sink.pool = __import__("sinks.db", fromlist=["make_pool"]).make_pool(
        "postgresql://nobody:x@127.0.0.1:1/none")
    sink.pool.timeout = 1
    with pytest.raises((RetryableSinkError, psycopg.OperationalError)):
        sink.store(events(fixture_bytes("mkt-v2-converted.json")), [])


def test_migration_0007_takes_superseded_and_goes_back_without_it(database_url, db):
    """Head takes the "superseded" ending; going back to 0006 turns it into "delivered" (the
    only ending the older schema has for a delivery done with), and up again works."""
    import sqlalchemy
    from alembic import command

    from sinks.db import _alembic_config, _sqlalchemy_url, migrate

    sink = PostgresSink("postgres", {"dsn": database_url})
    event = events(fixture_bytes("crm-deal-created.json"))[0]
    sink.store([event], [], route=lambda e: ["crm"])
    sink.close()
    db.execute("UPDATE deliveries SET status = 'superseded' WHERE event_id = %s", (event.id,))
    db.execute("INSERT INTO delivery_attempts (event_id, sink, attempt, started_at, duration_ms, "
               "outcome) VALUES (%s, 'crm', 1, now(), 0, 'superseded')", (event.id,))
    engine = sqlalchemy.create_engine(_sqlalchemy_url(database_url),
                                      poolclass=sqlalchemy.NullPool)
    with engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0006")
    engine.dispose()
    assert db.execute("SELECT status FROM deliveries").fetchall() == [("delivered",)]
    assert db.execute("SELECT outcome FROM delivery_attempts").fetchall() == [("delivered",)]
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("UPDATE deliveries SET status = 'superseded'")
    migrate(database_url)
    db.execute("UPDATE deliveries SET status = 'superseded'")
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("UPDATE deliveries SET status = 'bogus'")


def test_migration_0008_keys_existing_subscriptions_and_keeps_old_duplicates(database_url, db):
    """Subscriptions made before 0008 get their endpoint key; two that reach one endpoint are
    both kept (told apart by uuid), and from then on a third is refused by the constraint."""
    import sqlalchemy
    from alembic import command

    from sinks.db import _alembic_config, _sqlalchemy_url, migrate

    engine = sqlalchemy.create_engine(_sqlalchemy_url(database_url),
                                      poolclass=sqlalchemy.NullPool)
    with engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0007")
    engine.dispose()
    long = "https://hooks.example/" + "字" * 900  # its key, percent-encoded: 8 kB
    for n, url in enumerate(("https://hooks.example/rd", "HTTPS://Hooks.Example:443/rd#old",
                             "https://hooks.example/other", "ftp://[bad/", long)):
        db.execute("INSERT INTO subscriptions (uuid, event_type, entity_type, url, http_method, "
                   "source, secret, created_at) VALUES (%s, 'WEBHOOK.CONVERTED', 'CONTACT', %s, "
                   "'POST', 'MKT', 'whsec_x', now() + make_interval(secs => %s))",
                   (f"00000000-0000-4000-8000-00000000000{n}", url, n))
    migrate(database_url)
    keys = [row[0] for row in db.execute("SELECT url_key FROM subscriptions ORDER BY created_at")]
    assert keys[:4] == ["https://hooks.example/rd",
                        "https://hooks.example/rd#00000000-0000-4000-8000-000000000001",
                        "https://hooks.example/other", "ftp://[bad/"]  # unparsable: as it is
    assert keys[4] == "https://hooks.example/" + "%E5%AD%97" * 900
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute("INSERT INTO subscriptions (uuid, event_type, entity_type, url, url_key, "
                   "http_method, source, secret) VALUES (gen_random_uuid(), "
                   "'WEBHOOK.CONVERTED', 'CONTACT', 'https://hooks.example/rd/', "
                   "'https://hooks.example/rd', 'POST', 'MKT', 'whsec_x')")


def test_a_legacy_lead_stored_by_an_earlier_version_is_still_a_duplicate(database_url, db):
    """Keys of legacy leads gained the lead's hash; a body stored under the key an earlier
    version made (without it) and delivered again after the upgrade counts as a duplicate,
    the same lead with news is a new event, and an erasure under the earlier key holds."""
    from workers.normalize import legacy_key_before
    from workers.retention import erased_key

    sink = PostgresSink("postgres", {"dsn": database_url})
    body = legacy(uuid="U-up", lead_stage="Lead", opportunity="false",
                  last_conversion={"created_at": "2024-01-01T00:00:00Z"})
    first, = events(body)
    earlier = legacy_key_before(first.dedup_key)
    assert earlier == "legacy:WEBHOOK.CONVERTED:U-up:2024-01-01T00:00:00Z:False"
    sink.store([first], [])
    db.execute("UPDATE events SET dedup_key = %s", (earlier,))  # as the earlier version kept it

    again = sink.store(events(body, body), [])  # RD's retry, twice in one batch
    assert (again.new, again.duplicates) == ([], 2)
    assert db.execute("SELECT dedup_key, duplicates FROM events").fetchall() == [(earlier, 2)]

    news = sink.store(events(legacy(uuid="U-up", lead_stage="Cliente", opportunity="false",
                                    last_conversion={"created_at": "2024-01-01T00:00:00Z"})), [])
    assert len(news.new) == 1 and count(db, "SELECT count(*) FROM events") == 2
    assert db.execute("SELECT lifecycle_stage FROM leads").fetchall() == [("Cliente",)]

    other = legacy(uuid="U-gone", last_conversion={"created_at": "2024-02-01T00:00:00Z"})
    gone, = events(other)
    sink.store([gone], [])
    db.execute("UPDATE events SET dedup_key = %s WHERE dedup_key = %s",
               (erased_key(legacy_key_before(gone.dedup_key)), gone.dedup_key))
    assert sink.store(events(other), []).erased == 1
    sink.close()


def test_a_purged_legacy_lead_of_an_earlier_version_is_still_a_duplicate(settings, database_url,
                                                                          db):
    """`leadpipe purge` empties a body stored under an earlier version's key; what tells a
    redelivery of the same lead (a duplicate) from a re-send with news (a new event) stays
    in its marker: the lead's hash, never the lead."""
    import psycopg

    from workers import retention
    from workers.normalize import legacy_key_before

    sink = PostgresSink("postgres", {"dsn": database_url})
    body = legacy(uuid="U-purged", email="ana.purged@example.com", lead_stage="Lead",
                  last_conversion={"created_at": "2024-01-01T00:00:00Z"})
    first, = events(body)
    sink.store([first], [])
    db.execute("UPDATE events SET dedup_key = %s, received_at = now() - interval '60 days'",
               (legacy_key_before(first.dedup_key),))
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert retention.purge(conn, settings.with_(retain_payload_days=30)) == {
            "events.payload": 1}

    again = sink.store(events(body), [])
    assert (again.new, again.duplicates) == ([], 1)
    (payload,) = db.execute("SELECT payload FROM events").fetchone()
    assert payload == {"purged": True, "lead_hash": first.dedup_key.rsplit(":", 1)[1]}
    news = sink.store(events(legacy(uuid="U-purged", lead_stage="Cliente",
                                    last_conversion={"created_at": "2024-01-01T00:00:00Z"})), [])
    assert len(news.new) == 1 and count(db, "SELECT count(*) FROM events") == 2
    sink.close()


def test_the_same_event_stored_again_is_not_counted_as_rds_duplicate(database_url, db):
    """A batch stored again with its own event ids (a retry after a failure that came after
    its commit, or entries claimed from a worker that died before acknowledging them) is not
    news and not a redelivery: `duplicates` stays; RD's redelivery (a new id) counts."""
    sink = PostgresSink("postgres", {"dsn": database_url})
    body = fixture_bytes("crm-deal-created.json")
    batch = events(body, body)  # one event and RD's repeat of it, in one batch
    first = sink.store(batch, [])
    assert (len(first.new), first.duplicates) == (1, 1)
    again = sink.store(batch, [])  # reported as the first storing would have been
    assert again.new == [] and again.outcomes[("crm_deal_created", "accepted")] == 1
    assert db.execute("SELECT duplicates FROM events").fetchall() == [(1,)]
    redelivered = sink.store(events(body), [])
    assert redelivered.duplicates == 1
    assert db.execute("SELECT duplicates FROM events").fetchall() == [(2,)]
    sink.close()


def test_a_retry_and_a_resend_with_news_of_an_earlier_versions_lead_in_one_batch(
        database_url, db):
    from workers.normalize import legacy_key_before

    sink = PostgresSink("postgres", {"dsn": database_url})
    body = legacy(uuid="U-two", lead_stage="Lead",
                  last_conversion={"created_at": "2024-03-01T00:00:00Z"})
    first, = events(body)
    sink.store([first], [])
    db.execute("UPDATE events SET dedup_key = %s", (legacy_key_before(first.dedup_key),))
    news = legacy(uuid="U-two", lead_stage="Cliente",
                  last_conversion={"created_at": "2024-03-01T00:00:00Z"})
    stored = sink.store(events(news, body), [])  # the re-send with news first, then the retry
    assert len(stored.new) == 1 and stored.duplicates == 1
    assert count(db, "SELECT count(*) FROM events") == 2
    sink.close()


def test_migration_0009_keeps_old_ledger_rows_for_every_sink_and_goes_back(database_url, db):
    """email_sent rows from before 0009 get sink '' (they still stop a resend by any sink);
    after it, two sinks each have their row for one (event, recipient); 0008 again keeps one."""
    import sqlalchemy
    from alembic import command

    from sinks.db import _alembic_config, _sqlalchemy_url, migrate

    engine = sqlalchemy.create_engine(_sqlalchemy_url(database_url),
                                      poolclass=sqlalchemy.NullPool)
    with engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0008")
    db.execute("INSERT INTO email_sent (dedup_key, recipient, message_id) "
               "VALUES ('k1', 'a@example.com', '<m1@leadpipe>')")
    migrate(database_url)
    assert db.execute("SELECT sink, dedup_key FROM email_sent").fetchall() == [("", "k1")]
    for sink in ("mail-sales", "mail-managers"):
        db.execute("INSERT INTO email_sent (sink, dedup_key, recipient, message_id) "
                   "VALUES (%s, 'k2', 'a@example.com', '<m2@leadpipe>')", (sink,))
    with engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0008")
    engine.dispose()
    rows = db.execute("SELECT dedup_key, recipient FROM email_sent ORDER BY dedup_key").fetchall()
    assert rows == [("k1", "a@example.com"), ("k2", "a@example.com")]
    migrate(database_url)


def test_migration_0011_marks_failed_erasures_that_a_later_one_finished(database_url, db):
    """A `{}` record (an erasure whose rows were never changed) counts as running: the
    person's every body is dropped. One a later erasure of the same person finished, before
    that erasure said so, is marked; one nothing finished stays as it is."""
    import sqlalchemy
    from alembic import command

    from sinks.db import _alembic_config, _sqlalchemy_url, migrate

    engine = sqlalchemy.create_engine(_sqlalchemy_url(database_url),
                                      poolclass=sqlalchemy.NullPool)
    with engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0010")
    engine.dispose()
    db.execute("""INSERT INTO erasures (id, email_sha256, touched) VALUES
                  (1, 'ana', '{}'), (2, 'ana', '{"leads": 1}'), (3, 'bia', '{}'),
                  (4, 'ana', '{}')""")
    migrate(database_url)
    assert db.execute("SELECT id, touched FROM erasures ORDER BY id").fetchall() == [
        (1, {"finished_by": 2}), (2, {"leads": 1}), (3, {}), (4, {})]
