"""Retention purges and erasure of one person, against real Postgres and Redis."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import psycopg
import pytest
import redis

from ingest import create_app
from ingest.queue import Entry, IngestStream
from tests.conftest import ROOT, count, fixture_bytes, wait_for
from workers import pipeline
from workers.quoting import TABLES as QUOTING
from workers.runtime import Runtime

V2 = orjson.loads(fixture_bytes("mkt-v2-converted.json"))
DEAL = orjson.loads(fixture_bytes("crm-deal-created.json"))
LEGACY = orjson.loads(fixture_bytes("legacy-leads-full.json"))
PERSON = "Maria.Erased@Example.com"  # mixed case: matched without regard to case
OTHER = "someone.else@example.com"
UUID = "aaaaaaaa-0000-4000-8000-000000000001"
ADMIN = "admin-token-abcdef"


def leadpipe(settings: Any, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "config.cli", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=120,
                          env={**os.environ, **settings.to_env()})


_n = iter(range(10**6))


def entry(body: dict[str, Any], received_ms: int | None = None) -> Entry:
    n = next(_n)
    return Entry(f"{n}-0", f"ret-{n}", received_ms or int(time.time() * 1000),
                 orjson.dumps(body), None)


def conversion(email: str, uuid: str, second: int) -> dict[str, Any]:
    body = copy.deepcopy(V2)
    body["contact"].update(email=email, uuid=uuid)
    body["event_timestamp"] = f"2025-05-01T10:00:{second:02d}.000-03:00"
    return body


def crm_contact(email: str, n: int) -> dict[str, Any]:
    """A CRM contact naming the address in its `emails` (no lead, so no lead lock)."""
    return {"event_name": "crm_contact_created", "event_timestamp": "2025-05-01T10:00:00Z",
            "transaction_uuid": f"tx-erase-contact-{n}",
            "document": {"id": f"c-{n}", "name": "Maria", "emails": [{"email": email}]}}


def legacy(email: str) -> dict[str, Any]:
    body = copy.deepcopy(LEGACY)
    body["leads"][0].update(email=email, uuid=None, id=None)  # identity by e-mail alone
    return body


def store(runtime: Runtime, *entries: Entry):  # type: ignore[no-untyped-def]
    events, rejected = pipeline.split(list(entries))
    return pipeline.store(runtime, events, rejected)


def mentions(db: Any, text: str) -> dict[str, int]:
    """Rows of every table whose text holds `text` (any case, letters past ASCII included,
    which Postgres' lower() may leave): where the person still is."""
    found = {}
    for (table,) in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"):
        rows = db.execute(f'SELECT t::text FROM "{table}" t').fetchall()  # noqa: S608
        n = sum(text.lower() in row.lower() for (row,) in rows)
        if n:
            found[table] = n
    return found


def waiting_on_locks(db: Any) -> int:
    return count(db, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                     "AND datname = current_database()")


def test_erase_removes_the_person_from_every_store_and_nothing_comes_back(
        runtime, settings, db, redis_client):
    person_v2 = entry(conversion(PERSON, "aaaaaaaa-0000-4000-8000-000000000001", 1))
    person_legacy = entry(legacy(PERSON.lower()))
    other = entry(conversion(OTHER, "bbbbbbbb-0000-4000-8000-000000000002", 2))
    stored = store(runtime, person_v2, person_legacy, other,
          entry({"event_type": "WEBHOOK.CONVERTED", "note": PERSON}))  # quarantined
    assert (len(stored.new), stored.quarantined) == (3, 1)
    first_event = db.execute("SELECT id, dedup_key FROM events WHERE payload->'contact'->>'uuid'"
                             " = %s", ("aaaaaaaa-0000-4000-8000-000000000001",)).fetchone()
    db.execute("INSERT INTO deliveries (event_id, sink, status) VALUES (%s, 'crm', 'dead')",
               (first_event[0],))
    db.execute("INSERT INTO dead_letters (event_id, sink, error, attempts) "
               "VALUES (%s, 'crm', 'HTTP 400', 1)", (first_event[0],))
    db.execute("INSERT INTO email_sent (dedup_key, recipient, message_id) "
               "VALUES (%s, 'sales@example.com', '<m@leadpipe>')", (first_event[1],))
    stream = IngestStream(redis_client, settings.stream_key)
    stream.ensure_group()
    stream.append("waiting-1", orjson.dumps(conversion(PERSON.upper(), "cc", 3)))  # not read yet
    stream.append("waiting-2", orjson.dumps(conversion(OTHER, "dd", 4)))
    assert set(mentions(db, PERSON)) == {"events", "leads", "quarantine"}

    result = leadpipe(settings, "erase", "--email", PERSON)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ") for line in result.stdout.splitlines()[:-2])
    assert lines == {"email_sent": "1", "delivery_attempts": "0", "dead_letters": "1",
                     "deliveries": "1", "events": "2", "leads": "1", "quarantine": "1",
                     **{f"{table}_rewritten": "0" for table in QUOTING}, "stream": "1"}
    assert result.stdout.splitlines()[-1] == "redis append-only file: started"
    assert mentions(db, PERSON) == {}
    assert mentions(db, OTHER) == {"events": 1, "leads": 1}  # nobody else touched
    left = [f[b"b"] for _, f in redis_client.xrange(settings.stream_key)]
    assert len(left) == 1 and OTHER.encode() in left[0]
    assert count(db, "SELECT count(*) FROM events WHERE payload = '{\"erased\": true}'") == 2

    # a redelivery of an erased event, and a body received before the erasure but stored after
    late = store(runtime, entry(conversion(PERSON, "aaaaaaaa-0000-4000-8000-000000000001", 1)),
                 entry(conversion(PERSON, "eeeeeeee-0000-4000-8000-000000000005", 9),
                       received_ms=int(time.time() * 1000) - 60_000))
    assert (late.erased, late.new) == (2, [])
    assert mentions(db, PERSON) == {}
    # a new conversion after the erasure is new data, stored as any other
    fresh = store(runtime, entry(conversion(PERSON, "ffffffff-0000-4000-8000-000000000006", 7)))
    assert len(fresh.new) == 1
    assert count(db, "SELECT count(*) FROM erasures") == 1
    (digest,) = db.execute("SELECT email_sha256 FROM erasures").fetchone()
    assert PERSON.lower() not in digest  # the erasure record keeps a hash, not the address


def test_rows_kept_for_others_that_quote_the_person_have_the_address_rewritten(
        runtime, settings, db):
    """A deal naming them, another lead they own or whose fields name them and a sink's error
    text stay, without the address; nothing else in them changes. The record of an e-mail sent
    to them goes (it is theirs), the same message's record for its other recipient stays."""
    deal = copy.deepcopy(DEAL)
    deal["transaction_uuid"] = "tx-erase-deal-1"
    deal["document"]["name"] = f"Proposal for {PERSON.upper()} (renewal)"
    deal["document"]["user"]["email"] = PERSON
    deal["document"]["deal_custom_fields"][0]["value"] = [PERSON, "joana@example.com"]
    theirs = conversion(OTHER, "bbbbbbbb-0000-4000-8000-00000000000c", 3)
    theirs["contact"]["funnel"]["contact_owner_email"] = PERSON
    theirs["contact"]["cf_referred_by"] = {PERSON: f"mailto:{PERSON}", "note": "kept"}
    theirs["contact"]["tags"] = ["vip", PERSON.lower()]
    other_deal = copy.deepcopy(DEAL)
    other_deal["transaction_uuid"] = "tx-erase-deal-2"
    other_deal["document"]["id"] = "deal-of-nobody-erased"
    stored = store(runtime, entry(deal), entry(other_deal))
    assert len(stored.new) == 2
    (other_event,) = db.execute("SELECT id FROM events WHERE dedup_key LIKE %s",
                                ("%tx-erase-deal-2%",)).fetchone()
    db.execute("INSERT INTO deliveries (event_id, sink, status, last_error) VALUES "
               "(%s, 'crm', 'pending', %s)", (other_event, f"HTTP 409: {PERSON} is taken"))
    db.execute("INSERT INTO dead_letters (event_id, sink, error, attempts) "
               "VALUES (%s, 'crm', %s, 1)", (other_event, f"HTTP 422: owner {PERSON} unknown"))
    for recipient in (PERSON, "sales@example.com"):  # one message, two recipients
        db.execute("INSERT INTO email_sent (sink, dedup_key, recipient, message_id) "
                   "VALUES ('email', 'k-other', %s, '<m2@leadpipe>')", (recipient,))
    assert len(store(runtime, entry(theirs)).new) == 1
    before = db.execute("SELECT * FROM leads WHERE lower(email) = %s", (OTHER,)).fetchone()

    result = leadpipe(settings, "erase", "--email", PERSON)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ") for line in result.stdout.splitlines()[:-2])
    assert {k: v for k, v in lines.items() if k.endswith("_rewritten")} == {
        "leads_rewritten": "1", "deals_rewritten": "1", "deliveries_rewritten": "1",
        "delivery_attempts_rewritten": "0", "dead_letters_rewritten": "1"}
    assert lines["email_sent"] == "1"  # the record of a message sent to them is theirs
    assert mentions(db, PERSON) == {}
    name, owner, fields = db.execute("SELECT name, owner_email, custom_fields FROM deals "
                                     "WHERE id = %s", (deal["document"]["id"],)).fetchone()
    assert (name, owner) == ("Proposal for [erased] (renewal)", None)
    assert fields["Whatsapp"] == ["[erased]", "joana@example.com"]  # another person stays
    assert fields["Instagram"] is None
    lead = db.execute("SELECT owner_email, tags, custom_fields FROM leads WHERE lower(email) = %s",
                      (OTHER,)).fetchone()
    assert lead[0] is None and lead[1] == ["vip", "[erased]"]
    assert lead[2]["referred_by"] == {"[erased]": "mailto:[erased]", "note": "kept"}
    after = db.execute("SELECT * FROM leads WHERE lower(email) = %s", (OTHER,)).fetchone()
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert len(changed) == 3  # owner_email, tags, custom_fields: nothing else
    assert db.execute("SELECT last_error FROM deliveries WHERE event_id = %s",
                      (other_event,)).fetchone() == ("HTTP 409: [erased] is taken",)
    assert db.execute("SELECT error FROM dead_letters WHERE event_id = %s",
                      (other_event,)).fetchone() == ("HTTP 422: owner [erased] unknown",)
    assert db.execute("SELECT recipient FROM email_sent WHERE dedup_key = 'k-other'"
                      ).fetchall() == [("sales@example.com",)]


def test_a_body_on_its_way_naming_the_erased_person_outside_a_lead_is_dropped(
        runtime, settings, db):
    """`erase` blanks every stored body holding the address; a body received before it and
    stored after it is dropped the same way when the address is anywhere in it (a CRM
    contact's `emails`, a deal's contacts), not only in a lead. Others are stored."""
    result = leadpipe(settings, "erase", "--email", PERSON)
    assert result.returncode == 0, result.stderr
    before = int(time.time() * 1000) - 60_000
    deal = orjson.loads(fixture_bytes("crm-deal-updated-won.json"))
    deal["transaction_uuid"] = "tx-erase-deal"
    deal["document"]["contacts"] = [{"name": "Maria", "emails": [{"email": f"<{PERSON}>"}]}]
    stored = store(runtime, entry(crm_contact(PERSON.upper(), 1), received_ms=before),
                   entry(deal, received_ms=before),
                   entry(crm_contact(f"x{PERSON}", 2), received_ms=before),  # another person
                   entry(crm_contact(OTHER, 3), received_ms=before))
    assert stored.erased == 2 and len(stored.new) == 2
    assert mentions(db, PERSON) == {"events": 1}  # x-maria's, whose address holds hers
    after = store(runtime, entry(crm_contact(PERSON, 4)))  # received after the erasure: new data
    assert len(after.new) == 1


def test_a_body_to_quarantine_received_before_an_erasure_naming_the_person_is_not_kept(
        runtime, settings, db):
    """A body Leadpipe cannot read, on its way when the person was erased, would keep their
    address in the quarantine `erase` just emptied of them: it is dropped; one received
    after the erasure, or naming someone else, is quarantined as ever."""
    result = leadpipe(settings, "erase", "--email", PERSON)
    assert result.returncode == 0, result.stderr
    before = int(time.time() * 1000) - 60_000
    unreadable = {"event_type": "WEBHOOK.CONVERTED", "lead": {"email": PERSON.upper()}}
    escaped = json.dumps({"event_type": "WEBHOOK.CONVERTED",
                          "lead": {"email": PERSON}}).replace("@", "\\u0040")
    stored = store(runtime, entry(unreadable, received_ms=before),
                   Entry("9-0", "ret-escaped", before, escaped.encode(), None),
                   entry({"event_type": "WEBHOOK.CONVERTED", "lead": {"email": OTHER}},
                         received_ms=before))
    assert (stored.erased, stored.quarantined) == (2, 1)
    assert mentions(db, PERSON) == {} and count(db, "SELECT count(*) FROM quarantine") == 1
    after = store(runtime, entry(unreadable))  # received after the erasure: new data
    assert after.quarantined == 1


@pytest.mark.parametrize("person, spelled", [
    ("joao@exemplo.com.br", "joao\\u0040exemplo.com.br"),
    ("jo\u00e3o@exemplo.com.br", "jo\\u00e3o@exemplo.com.br"),  # an ensure_ascii encoder's
])
def test_erase_finds_a_refused_body_kept_as_text_whatever_escapes_spell_the_address(
        runtime, settings, db, person, spelled):
    """A body Postgres refused (an identifier past its index's row limit) is quarantined as a
    JSON string of its text, where JSON escapes stay as sent: its address is read as JSON
    reads it."""
    import base64

    body = copy.deepcopy(V2)
    body["contact"].update(email="@@EMAIL@@", uuid="uuid-escaped")
    body["event_identifier"] = base64.b64encode(os.urandom(6000)).decode()
    raw = orjson.dumps(body).replace(b"@@EMAIL@@", spelled.encode())
    assert json.loads(raw)["contact"]["email"] == person
    stored = store(runtime, Entry("1-0", "q-escaped", int(time.time() * 1000), raw, None))
    assert stored.quarantined == 1
    assert db.execute("SELECT jsonb_typeof(payload) FROM quarantine").fetchall() == [("string",)]
    result = leadpipe(settings, "erase", "--email", person)
    assert result.returncode == 0, result.stderr
    assert count(db, "SELECT count(*) FROM quarantine") == 0


def test_erase_and_purge_have_redis_rewrite_its_log_so_deleted_bodies_leave_its_disk(
        runtime, settings, redis_client):
    """Deleting a stream entry only appends the deletion to Redis' append-only file: the body
    stayed on disk until Redis rewrote the file by itself (at each doubling of its size)."""
    from pathlib import Path

    marker = f"aof-{os.urandom(6).hex()}@example.com"
    folder = Path(redis_client.config_get("dir")["dir"]) / redis_client.config_get(
        "appenddirname")["appenddirname"]

    def on_disk() -> bool:
        return any(marker.encode() in f.read_bytes() for f in folder.iterdir() if f.is_file())

    def rewritten() -> bool:
        info = redis_client.info("persistence")
        return not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]

    for command in (["erase", "--email", marker], ["purge"]):
        wait_for(rewritten, what="no rewrite under way")
        entry_id = redis_client.xadd(runtime.stream.key, {"b": orjson.dumps(
            {"leads": [{"email": marker}]})})
        redis_client.xdel(runtime.stream.key, entry_id)  # stored and acknowledged long ago
        assert on_disk()
        env = {"LEADPIPE_RETAIN_QUARANTINE_DAYS": "30"} if command == ["purge"] else {}
        result = subprocess.run([sys.executable, "-m", "config.cli", *command], cwd=ROOT,
                                text=True, capture_output=True, timeout=120,
                                env={**os.environ, **settings.to_env(), **env})
        assert result.returncode == 0, result.stderr
        assert "redis append-only file: started" in result.stdout, result.stdout
        wait_for(rewritten, what="the rewrite")
        assert not on_disk(), command


@pytest.mark.parametrize("text", [
    '{"leads":[{"email":"jo\\u00e3o@exemplo.com.br","name":"J"}]',  # cut short: not JSON
    '{"leads":[{"email":"joao\\u0040exemplo.com.br"}],}',
])
def test_erase_reads_json_escapes_in_a_quarantined_text_that_is_not_json(runtime, settings, db,
                                                                         text):
    person = "jo\u00e3o@exemplo.com.br" if "00e3" in text else "joao@exemplo.com.br"
    db.execute("INSERT INTO quarantine (id, received_at, reason, payload) "
               "VALUES ('q-text', now(), 'not JSON', to_jsonb(%s::text))", (text,))
    result = leadpipe(settings, "erase", "--email", person)
    assert result.returncode == 0, result.stderr
    assert count(db, "SELECT count(*) FROM quarantine") == 0


def test_a_legacy_body_on_the_stream_with_other_leads_stays_and_only_theirs_is_dropped(
        runtime, settings, db, redis_client):
    """One 202'd body, three people: the erasure must not take the others' events with it,
    and they keep the event ids the body's positions gave them; a body of theirs alone goes."""
    from workers import retention

    body = copy.deepcopy(LEGACY)
    lead = body["leads"][0]
    theirs = {**copy.deepcopy(lead), "email": PERSON, "uuid": None, "id": "1001"}
    others = [{**copy.deepcopy(lead), "email": f"kept-{n}@example.com", "uuid": None,
               "id": f"200{n}"} for n in (1, 2)]
    for person in (theirs, *others):
        person.pop("user", None)  # no one names anyone else
    stream = IngestStream(redis_client, settings.stream_key)
    stream.ensure_group()
    stream.append("ret-multi", orjson.dumps({"leads": [others[0], theirs, others[1]]}),
                  "WEBHOOK.MARKED_OPPORTUNITY")
    stream.append("ret-alone", orjson.dumps({"leads": [theirs, copy.deepcopy(theirs)]}))
    shared, _ = list(stream.entries())
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        assert retention.erase(conn, stream, PERSON)["stream"] == 1
    assert list(stream.entries()) == [shared]
    stored = store(runtime, shared)  # as a worker stores it later: theirs dropped
    assert stored.erased == 1
    assert sorted((e.id, e.lead["email"]) for e in stored.new) == [
        ("ret-multi", "kept-1@example.com"), ("ret-multi-2", "kept-2@example.com")]
    assert mentions(db, PERSON) == {}


def test_erase_spares_people_whose_address_holds_the_erased_one(runtime, settings, db,
                                                                  redis_client):
    person = "ana@example.com"
    deal = orjson.loads(fixture_bytes("crm-deal-updated-won.json"))  # owner ana@example.com.br
    assert "ana@example.com.br" in fixture_bytes("crm-deal-updated-won.json").decode()
    stored = store(runtime,
                   entry(conversion("Ana@Example.com", "aaaaaaaa-0000-4000-8000-00000000000a", 1)),
                   entry(conversion("joana@example.com", "bbbbbbbb-0000-4000-8000-00000000000b",
                                    2)),
                   entry(conversion("ana@example.community", "cccccccc-0000-4000-8000-"
                                    "00000000000c", 3)),
                   entry(deal),
                   entry({"event_type": "WEBHOOK.CONVERTED", "note": "from <ANA@example.com>"}),
                   entry({"event_type": "WEBHOOK.CONVERTED", "note": "mariana@example.com"}))
    assert (len(stored.new), stored.quarantined) == (4, 2)
    stream = IngestStream(redis_client, settings.stream_key)
    stream.ensure_group()
    stream.append("waiting-1", orjson.dumps({"leads": [{"email": "mailto:ana@example.com"}]}))
    stream.append("waiting-2", orjson.dumps(conversion("joana@example.com", "dd", 4)))
    stream.append("waiting-3", orjson.dumps(deal))

    result = leadpipe(settings, "erase", "--email", person)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ") for line in result.stdout.splitlines()[:-2])
    assert (lines["events"], lines["leads"], lines["quarantine"], lines["stream"]) == (
        "1", "1", "1", "1")
    left = {row[0] for row in db.execute("SELECT lower(email) FROM leads")}
    assert left == {"joana@example.com", "ana@example.community"}
    assert count(db, "SELECT count(*) FROM events WHERE payload = '{\"erased\": true}'") == 1
    assert count(db, "SELECT count(*) FROM events WHERE payload::text LIKE "
                     "'%ana@example.com.br%'") == 1  # the deal owned by someone else stays
    (note,) = db.execute("SELECT payload->>'note' FROM quarantine").fetchone()
    assert note == "mariana@example.com"
    bodies = [f[b"b"] for _, f in redis_client.xrange(settings.stream_key)]
    assert len(bodies) == 2 and not any(b"mailto:" in body for body in bodies)


def test_erase_waits_for_a_batch_redelivering_the_person_instead_of_deadlocking(
        settings, database_url, db, monkeypatch):
    from sinks import postgres
    from sinks.postgres import PostgresSink
    from workers import retention

    body = conversion(PERSON, "aaaaaaaa-0000-4000-8000-000000000001", 1)
    sink = PostgresSink("postgres", {"dsn": database_url})
    sink.store(*pipeline.split([entry(body)]))
    locked = threading.Event()
    resolve = postgres._resolve_leads

    def resolve_then_wait_for_erase(conn, events):  # type: ignore[no-untyped-def]
        resolve(conn, events)  # the batch now holds the person's locks
        locked.set()
        wait_for(lambda: count(db, "SELECT count(*) FROM pg_stat_activity WHERE "
                                   "wait_event_type = 'Lock' AND pid <> pg_backend_pid()"),
                 timeout=20, what="erase waiting for the batch's locks")

    monkeypatch.setattr(postgres, "_resolve_leads", resolve_then_wait_for_erase)
    outcome: dict[str, Any] = {}

    def erase() -> None:
        locked.wait(20)
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                outcome["erase"] = retention.erase(conn, None, PERSON)
        except Exception as exc:  # a deadlock victim is what this test is about
            outcome["erase"] = exc

    eraser = threading.Thread(target=erase)
    eraser.start()
    try:
        outcome["batch"] = sink.store(*pipeline.split([entry(body)]))  # a redelivery
    except Exception as exc:
        outcome["batch"] = exc
    eraser.join(30)
    sink.close()
    assert not any(isinstance(v, Exception) for v in outcome.values()), outcome
    assert outcome["batch"].duplicates == 1 and outcome["erase"]["leads"] == 1
    assert mentions(db, PERSON) == {}


def test_erase_waits_for_a_delivery_under_way_so_its_ledger_row_goes_too(runtime, database_url,
                                                                          db):
    """An e-mail delivery of theirs that is sending when the erasure comes writes its ledger
    row (whose key holds the address when the contact has no uuid) after the erasure's delete,
    unless the erasure waits for it."""
    body = conversion(PERSON, "x", 1)
    body["contact"]["uuid"] = None  # identity, and so the dedup key, by e-mail
    store(runtime, entry(body))
    event_id, dedup_key = db.execute("SELECT id, dedup_key FROM events").fetchone()
    assert PERSON.lower() in dedup_key
    db.execute("INSERT INTO deliveries (event_id, sink) VALUES (%s, 'mail')", (event_id,))
    outcome: dict[str, Any] = {}
    with psycopg.connect(database_url, autocommit=True) as deliverer:
        deliverer.execute("SELECT pg_advisory_lock(hashtextextended('mail:' || %s, 0))",
                          (event_id,))  # as workers.delivery.load_events does

        def erase() -> None:
            from workers import retention

            with psycopg.connect(database_url, autocommit=True) as conn:
                outcome["erase"] = retention.erase(conn, None, PERSON)

        eraser = threading.Thread(target=erase)
        eraser.start()
        wait_for(lambda: count(db, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type "
                                   "= 'Lock' AND query LIKE '%%pg_advisory_xact_lock%%'"),
                 timeout=20, what="the erasure waiting for the delivery")
        deliverer.execute("INSERT INTO email_sent (sink, dedup_key, recipient, message_id) "
                          "VALUES ('mail', %s, 'sales@example.com', '<m@leadpipe>')",
                          (dedup_key,))  # the message went out: its ledger row
        deliverer.execute("SELECT pg_advisory_unlock_all()")
        eraser.join(30)
    assert outcome["erase"]["email_sent"] == 1 and outcome["erase"]["deliveries"] == 1
    assert mentions(db, PERSON) == {}


@pytest.mark.parametrize("late_body", ["conversion", "crm contact"])
def test_a_body_received_before_an_erasure_and_stored_while_it_runs_is_dropped(
        runtime, database_url, db, late_body):
    """A batch holding the person's body (received before the erasure) that is stored while
    the erasure still works (here: waits for a CRM call of theirs under way) must not bring
    them back: neither a conversion, whose batch waits on the lead locks the erasure holds,
    nor a CRM contact, which takes no lead lock. Storing of other people goes on meanwhile."""
    now_ms = int(time.time() * 1000)
    body = conversion(PERSON, UUID, 5) if late_body == "conversion" else crm_contact(PERSON, 1)
    outcome = while_erasing(runtime, database_url, db,
                            lambda: entry(body, received_ms=now_ms - 60_000))
    assert (outcome["batch"].erased, outcome["batch"].new) == (1, [])
    assert outcome["erase"]["leads"] == 1
    assert mentions(db, PERSON) == {}


def test_a_redelivery_received_while_an_erasure_runs_is_dropped(runtime, database_url, db):
    """RD sends the person's event again after the erasure was recorded, before its rows are
    changed: the event's key is not yet the erased one, and the body is newer than the
    erasure, yet it must not be stored again once the erasure frees the key."""
    outcome = while_erasing(runtime, database_url, db,
                            lambda: entry(conversion(PERSON, UUID, 1)))  # received now
    assert (outcome["batch"].erased, outcome["batch"].new) == (1, [])
    assert mentions(db, PERSON) == {}
    after = store(runtime, entry(conversion(PERSON, UUID, 1)))  # once it is done: a duplicate
    assert (after.new, after.duplicates, after.erased) == ([], 0, 1)


def erase_both_at_once(database_url: str, db: Any, held: str) -> dict[str, Any]:
    """Erase PERSON and OTHER at the same moment: both wait for a lock on every row of the
    `held` table, then go; {email: what its erasure touched}, for those that finished."""
    from workers import retention

    done: dict[str, Any] = {}

    def erase(email: str) -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            done[email] = retention.erase(conn, None, email)

    with psycopg.connect(database_url) as blocker:
        blocker.execute(f"SELECT 1 FROM {held} FOR UPDATE")  # noqa: S608
        erasers = [threading.Thread(target=erase, args=(email,)) for email in (PERSON, OTHER)]
        for eraser in erasers:
            eraser.start()
        wait_for(lambda: waiting_on_locks(db) >= 2, timeout=20, what="both erasures waiting")
        blocker.rollback()
        for eraser in erasers:
            eraser.join(30)
    return done


def test_two_erasures_of_people_one_event_names_hash_its_key_once(runtime, database_url, db):
    """Both erasures find the event; the second to change it must not hash the key the first
    one hashed (a redelivery would then no longer find it, and be stored in full)."""
    body = conversion(PERSON, UUID, 1)
    body["contact"]["funnel"] = {"contact_owner_email": OTHER}
    store(runtime, entry(body, received_ms=int(time.time() * 1000) - 120_000))
    done = erase_both_at_once(database_url, db, "events")  # both read the row, then write
    assert done[PERSON]["events"] + done[OTHER]["events"] == 1
    again = store(runtime, entry(body))
    assert (again.new, again.erased) == ([], 1)


def test_two_erasures_of_people_whose_leads_quote_each_other_both_finish(runtime,
                                                                         database_url, db):
    """Each lead is owned by the other person: each erasure deletes one row and rewrites the
    other, so each must lock both rows in one order, never one then the other."""
    for email, owner, uuid in ((PERSON, OTHER, UUID), (OTHER, PERSON, "bbbb-quoted")):
        body = conversion(email, uuid, 1)
        body["contact"]["funnel"] = {"contact_owner_email": owner}
        store(runtime, entry(body))
    done = erase_both_at_once(database_url, db, "leads")  # both find their rows, then lock
    assert set(done) == {PERSON, OTHER}, "an erasure failed (a deadlock)"
    assert done[PERSON]["leads"] + done[OTHER]["leads"] == 2
    assert count(db, "SELECT count(*) FROM leads") == 0
    assert mentions(db, PERSON) == {} and mentions(db, OTHER) == {}


def test_an_erasure_never_waits_on_rows_of_an_address_that_only_contains_the_persons(
        runtime, database_url, db):
    """`anamaria.erased@...` holds PERSON's address as text (LIKE finds her rows) but is
    someone else: the erasure must not lock her lead or events, or it waits for (and
    deadlocks with) batches storing her, which lock events in another order."""
    from workers import retention

    resembling = "ana" + PERSON.lower()
    store(runtime, entry(conversion(resembling, "bbbb-resembling", 1)),
          entry(crm_contact(resembling, 91)), entry(crm_contact(resembling, 92)))
    with psycopg.connect(database_url) as holder:  # a batch storing her, mid-transaction
        holder.execute("SELECT 1 FROM leads FOR UPDATE")
        holder.execute("SELECT 1 FROM events FOR UPDATE")
        done: dict[str, Any] = {}

        def erase() -> None:
            with psycopg.connect(database_url, autocommit=True) as conn:
                done["touched"] = retention.erase(conn, None, PERSON)

        eraser = threading.Thread(target=erase)
        eraser.start()
        eraser.join(20)
        waited = eraser.is_alive()
        holder.rollback()
        eraser.join(20)
    assert not waited, "the erasure waited for rows that are not the person's"
    assert done["touched"]["events"] == 0 and count(db, "SELECT count(*) FROM events") == 3


def test_a_lead_keyed_by_the_address_is_theirs_though_its_email_changed_since(runtime, db,
                                                                            settings):
    """First seen by e-mail alone, the lead's key is `email:<address>`; a later event with its
    uuid moved it to a new address. It is the same person: erased whole, key and events."""
    first = conversion(PERSON, UUID, 1)
    first["contact"]["uuid"] = None
    moved = conversion("maria.new@example.com", UUID, 3)
    for body in (first, conversion(PERSON, UUID, 2), moved):
        store(runtime, entry(body))
    assert db.execute("SELECT lead_key, email FROM leads").fetchall() == [
        ("email:" + PERSON.lower(), "maria.new@example.com")]
    result = leadpipe(settings, "erase", "--email", PERSON)
    assert result.returncode == 0, result.stderr
    assert count(db, "SELECT count(*) FROM leads") == 0
    assert mentions(db, PERSON) == {} and mentions(db, "maria.new@example.com") == {}


def lead_body(email: str, uuid: str | None, legacy_id: str | None, second: int,
              ) -> dict[str, Any]:
    """A legacy conversion of a lead with these identifiers (a v2 one when it has a uuid only)."""
    if legacy_id is None and uuid is not None:
        return conversion(email, uuid, second)
    body = copy.deepcopy(LEGACY)
    body["leads"][0].update(email=email, uuid=uuid, id=legacy_id,
                            last_conversion={"created_at": f"2025-05-01T10:00:{second:02d}Z"})
    return body


NEW = "maria.new@example.com"
# (the person's lead: its uuid and legacy id; a body on its way: its uuid, legacy id, address)
JOINING = {
    "same uuid": ((UUID, None), (UUID, None, NEW)),
    "same legacy id": ((None, "L-1"), (None, "L-1", NEW)),
    "same legacy id, the lead had no uuid": ((None, "L-1"), (UUID, "L-1", NEW)),
    "no identifier but the lead's new address": ((None, None), (None, None, NEW)),
}


@pytest.mark.parametrize("case", JOINING)
def test_a_body_on_its_way_that_would_join_the_erased_lead_is_dropped_whatever_its_address(
        runtime, db, settings, case):
    """A body received before the erasure but stored after it that would have been stored as
    the person's lead (its uuid; its legacy id; the address the lead moved to) is theirs
    though it never names the erased address: dropped, not stored as a lead of that address.
    One received after the erasure is new data."""
    (uuid, legacy_id), (body_uuid, body_id, address) = JOINING[case]
    store(runtime, entry(lead_body(PERSON, uuid, legacy_id, 1)))
    if uuid is legacy_id is None:  # keyed `email:<erased address>`, then moved by its uuid
        store(runtime, entry(lead_body(PERSON, UUID, None, 2)))
        store(runtime, entry(lead_body(NEW, UUID, None, 3)))
    on_its_way = entry(lead_body(address, body_uuid, body_id, 4),
                       received_ms=int(time.time() * 1000) - 1000)
    result = leadpipe(settings, "erase", "--email", PERSON)
    assert result.returncode == 0, result.stderr
    stored = store(runtime, on_its_way)
    assert (stored.erased, stored.new) == (1, [])
    assert count(db, "SELECT count(*) FROM leads") == 0
    assert mentions(db, NEW) == {}
    later = store(runtime, entry(lead_body(address, body_uuid, body_id, 5)))
    assert len(later.new) == 1
    assert db.execute("SELECT email FROM leads").fetchall() == [(NEW,)]


O_UUID = "aaaaaaaa-0000-4000-8000-000000000002"
# (leads stored first, in order: the person's and another contact's; a body on its way), each
# as (address, uuid, legacy id): storing would put the body in the other contact's row, or a
# new one, never in the person's
NOT_JOINING = {
    "its own uuid, the person's legacy id (their lead has a uuid)": (
        [(PERSON, UUID, "L-1")], (OTHER, O_UUID, "L-1")),
    "another contact's uuid, the person's legacy id (their lead has none)": (
        [(PERSON, None, "L-1"), (OTHER, O_UUID, None)], (OTHER, O_UUID, "L-1")),
    "no uuid, a legacy id whose oldest lead is another contact's": (
        [(OTHER, O_UUID, "L-1"), (PERSON, UUID, "L-1")], (OTHER, None, "L-1")),
}


@pytest.mark.parametrize("case", NOT_JOINING)
def test_a_body_on_its_way_that_storing_gives_another_contact_is_stored(runtime, db,
                                                                        settings, case):
    """Storing matches a lead by uuid first, then by the oldest row with its legacy id or
    e-mail, never merging two uuids: a body on its way that lands elsewhere by those rules
    shares an identifier with the person's lead but is not theirs, and erasing them leaves it."""
    first, (address, uuid, legacy_id) = NOT_JOINING[case]
    for n, (email, lead_uuid, lead_id) in enumerate(first):
        store(runtime, entry(lead_body(email, lead_uuid, lead_id, n)))
    on_its_way = entry(lead_body(address, uuid, legacy_id, 9),
                       received_ms=int(time.time() * 1000) - 1000)
    result = leadpipe(settings, "erase", "--email", PERSON)
    assert result.returncode == 0, result.stderr
    stored = store(runtime, on_its_way)
    assert (stored.erased, len(stored.new)) == (0, 1)
    assert db.execute("SELECT email FROM leads").fetchall() == [(OTHER,)]
    assert mentions(db, PERSON) == {}


def test_two_recipients_of_one_message_are_erased_one_after_the_other(settings, db):
    for recipient in (PERSON, OTHER):
        db.execute("INSERT INTO email_sent (sink, dedup_key, recipient, message_id) "
                   "VALUES ('email', 'mkt:k1', %s, '<m@leadpipe>')", (recipient,))
    for person in (PERSON, OTHER):
        result = leadpipe(settings, "erase", "--email", person)
        assert result.returncode == 0, result.stderr
    assert count(db, "SELECT count(*) FROM email_sent") == 0
    assert count(db, "SELECT count(*) FROM erasures WHERE touched = '{}'") == 0


@pytest.mark.timeout(60)
def test_bodies_read_for_addresses_after_an_erasure_take_time_in_step_with_their_size(
        runtime, settings, db):
    """After an erasure, a batch reads each body for addresses; a long run of address
    characters (a 500,000-character name, within the 1 MiB ingest limit) must not take time
    growing with its square (minutes, while the batch holds back other erasures)."""
    result = leadpipe(settings, "erase", "--email", PERSON)
    assert result.returncode == 0, result.stderr
    before = int(time.time() * 1000) - 60_000
    long_name = crm_contact(OTHER, 7)
    long_name["document"]["name"] = "x" * 500_000
    stored = store(runtime, entry(long_name, received_ms=before))  # (the timeout: 60 s)
    assert len(stored.new) == 1 and stored.erased == 0


def test_a_body_nested_as_deep_as_json_allows_cannot_stop_an_erasure(runtime, settings, db,
                                                                      redis_client):
    """A body naming the person 900 levels deep (ingest takes up to 1,024) is found and
    removed, in the quarantine and on the stream; walking it must not run out of stack."""
    from workers import retention

    deep = ('{"event_type": "WEBHOOK.CONVERTED", "lead": ' + "[" * 900 + json.dumps(PERSON)
            + "]" * 900 + "}").encode()
    assert store(runtime, Entry("1-0", "ret-deep", int(time.time() * 1000), deep, None)
                 ).quarantined == 1
    stream = IngestStream(redis_client, settings.stream_key)
    stream.append("ret-deep-2", deep, None)  # one still waiting on the stream
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        touched = retention.erase(conn, stream, PERSON)
    assert (touched["quarantine"], touched["stream"]) == (1, 1)
    assert mentions(db, PERSON) == {}




def while_erasing(runtime: Runtime, database_url: str, db: Any,
                  late: Callable[[], Entry]) -> dict[str, Any]:
    """Erase PERSON, whose first event has a CRM call under way (the erasure waits for it),
    and store `late()` meanwhile, once the erasure is recorded; another person's batch must be
    stored meanwhile without waiting. {"erase": touched, "batch": the late batch's Stored}."""
    from workers import retention

    store(runtime, entry(conversion(PERSON, UUID, 1), received_ms=int(time.time() * 1000)
                         - 120_000))
    (event_id,) = db.execute("SELECT id FROM events").fetchone()
    db.execute("INSERT INTO deliveries (event_id, sink) VALUES (%s, 'crm')", (event_id,))
    outcome: dict[str, Any] = {}

    def erase() -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            outcome["erase"] = retention.erase(conn, None, PERSON)

    def batch() -> None:
        outcome["batch"] = store(runtime, late())

    with psycopg.connect(database_url, autocommit=True) as deliverer:
        deliverer.execute("SELECT pg_advisory_lock(hashtextextended('crm:' || %s, 0))",
                          (event_id,))  # the CRM call of their first event (load_events)
        eraser = threading.Thread(target=erase)
        eraser.start()
        wait_for(lambda: count(db, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type"
                                   " = 'Lock' AND query LIKE '%%hashtextextended(sink%%'"),
                 timeout=20, what="the erasure waiting for the CRM call")
        storer = threading.Thread(target=batch)
        storer.start()
        # stored already, or waiting behind the erasure's locks: either way before it ends
        wait_for(lambda: not storer.is_alive() or waiting_on_locks(db) >= 2, timeout=20,
                 what="the late batch stored or waiting")
        other = store(runtime, entry(conversion(OTHER, "bbbbbbbb-0000-4000-8000-00000000000b",
                                                2)))
        assert len(other.new) == 1  # not held up by the erasure under way
        deliverer.execute("SELECT pg_advisory_unlock_all()")  # the CRM call ends
        eraser.join(30)
        storer.join(30)
    return outcome


def test_an_erasure_that_fails_halfway_is_recorded_and_finished_by_running_it_again(
        runtime, settings, db, redis_client, monkeypatch):
    """The erasure is recorded before the rows change: should the change fail, bodies of the
    person received before it are still dropped, and `leadpipe erase` again finishes it."""
    from workers import retention

    store(runtime, entry(conversion(PERSON, "aaaaaaaa-0000-4000-8000-000000000001", 1)))
    stream = IngestStream(redis_client, settings.stream_key)
    stream.ensure_group()

    def redis_down(*args: Any) -> int:
        raise redis.ConnectionError("redis went away")

    monkeypatch.setattr(retention, "erase_from_stream", redis_down)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        with pytest.raises(retention.ErasureUnfinished, match=r"the erasure is recorded .* "
                           r"did not finish \(ConnectionError\); run it again"):
            retention.erase(conn, stream, PERSON)
    # the operator API says the same, 503 with Retry-After (a new run will finish it)
    client = create_app(settings.with_(admin_tokens=(ADMIN,))).test_client()
    answer = client.post("/api/erase", json={"email": PERSON},
                         headers={"Authorization": f"Bearer {ADMIN}"})
    assert (answer.status_code, answer.headers.get("Retry-After")) == (503, "5")
    assert "did not finish (ConnectionError); run it again" in answer.get_json()[
        "errors"]["error_message"]
    assert mentions(db, PERSON) == {"events": 1, "leads": 1}  # the change rolled back
    assert db.execute("SELECT touched FROM erasures").fetchall() == [({},), ({},)]
    late = store(runtime, entry(conversion(PERSON, "cccccccc-0000-4000-8000-00000000000c", 3),
                                received_ms=int(time.time() * 1000) - 60_000))
    assert (late.erased, late.new) == (1, [])

    monkeypatch.undo()
    result = leadpipe(settings, "erase", "--email", PERSON)
    assert result.returncode == 0, result.stderr
    assert mentions(db, PERSON) == {}
    assert count(db, "SELECT count(*) FROM erasures WHERE touched ->> 'leads' = '1'") == 1
    # the failed one is done too: while `{}`, the person's new bodies would still be dropped
    assert count(db, "SELECT count(*) FROM erasures WHERE touched ? 'finished_by'") == 2
    assert len(store(runtime, entry(conversion(PERSON, "dddddddd-0000-4000-8000-00000000000d",
                                               4))).new) == 1


def test_an_erasure_waiting_for_a_stuck_batch_lets_storing_go_on(runtime, settings, db,
                                                                  monkeypatch):
    """Recording an erasure waits for the batches under way, and new ones wait behind it; one
    that is stuck must not stall storing for as long: the erasure steps back and tries again."""
    from workers import retention

    monkeypatch.setattr(retention, "_TURN_WAIT", "100ms")
    monkeypatch.setattr(retention, "_TURN_PAUSE", 0.3)
    outcome: dict[str, Any] = {}

    def erase() -> None:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            outcome["erase"] = retention.erase(conn, None, PERSON)

    with psycopg.connect(settings.database_url, autocommit=True) as stuck:
        stuck.execute(f"SELECT pg_advisory_lock_shared({retention.ERASURE_TURN})")
        eraser = threading.Thread(target=erase)
        eraser.start()
        started = time.monotonic()
        for n in range(3):
            stored = store(runtime, entry(conversion(OTHER, f"u-{n}", n)))
            assert len(stored.new) == 1
        assert time.monotonic() - started < 5
        assert count(db, "SELECT count(*) FROM erasures") == 0
        stuck.execute("SELECT pg_advisory_unlock_all()")
        eraser.join(30)
    assert outcome["erase"]["leads"] == 0
    assert count(db, "SELECT count(*) FROM erasures") == 1


def test_an_address_with_letters_past_ascii_is_erased_in_any_case(runtime, settings, db,
                                                                  redis_client):
    """"JOÃO.SILVA@EXEMPLO.COM.BR" is the erased "joão.silva@exemplo.com.br" in a stored lead,
    a CRM contact, a quarantined body, a waiting stream entry and a body received before the
    erasure and stored after it; "joséjoão.silva@..." is someone else."""
    lower = "joão.silva@exemplo.com.br"
    upper = lower.upper()
    someone = "josé" + lower
    stored = store(runtime,
                   entry(conversion(upper, "aaaaaaaa-0000-4000-8000-0000000000a1", 1)),
                   entry(crm_contact(upper, 11)),
                   entry(conversion(someone, "bbbbbbbb-0000-4000-8000-0000000000b1", 2)),
                   entry({"event_type": "WEBHOOK.CONVERTED", "note": upper}))  # quarantined
    assert (len(stored.new), stored.quarantined) == (3, 1)
    stream = IngestStream(redis_client, settings.stream_key)
    stream.ensure_group()
    stream.append("waiting-1", orjson.dumps(conversion(upper, "cc", 3)))

    result = leadpipe(settings, "erase", "--email", upper)
    assert result.returncode == 0, result.stderr
    assert mentions(db, lower) == {"events": 1, "leads": 1}  # josé's, whose address holds it
    assert [row for (row,) in db.execute("SELECT email FROM leads")] == [someone]
    assert redis_client.xlen(settings.stream_key) == 0
    before = int(time.time() * 1000) - 60_000
    escaped = Entry("900-0", "ret-escaped", before,  # "JO\u00c3O...": json.dumps' escapes
                    json.dumps(crm_contact(upper, 13)).encode(), None)
    late = store(runtime, entry(crm_contact(upper, 12), received_ms=before), escaped)
    assert (late.erased, late.new) == (2, [])


def test_erase_through_the_operator_api(runtime, settings, db):
    store(runtime, entry(conversion(PERSON, "aaaaaaaa-0000-4000-8000-000000000001", 1)))
    client = create_app(settings.with_(admin_tokens=(ADMIN,))).test_client()
    auth = {"Authorization": f"Bearer {ADMIN}"}
    assert client.post("/api/erase", json={"email": PERSON}).status_code == 401
    bad = client.post("/api/erase", json={"email": "not an address"}, headers=auth)
    assert bad.status_code == 400 and bad.get_json()["errors"]["error_type"] == "INVALID"
    answer = client.post("/api/erase", json={"email": PERSON}, headers=auth)
    assert answer.status_code == 200
    assert answer.get_json()["redis_log"] == "started"  # their old bodies leave its disk
    assert answer.get_json()["erased"]["leads"] == 1
    assert mentions(db, PERSON) == {}


def test_an_erasure_held_off_by_a_stuck_batch_gives_up_saying_so(settings, db, monkeypatch):
    """Recording nothing is an answer to retry (503 with Retry-After), never a 500 nor the
    "Postgres unavailable" of a database that is down."""
    from workers import retention

    monkeypatch.setattr(retention, "_TURN_WAIT", "50ms")
    monkeypatch.setattr(retention, "_TURN_PAUSE", 0.05)
    monkeypatch.setattr(retention, "_TURN_TRIES", 3)
    client = create_app(settings.with_(admin_tokens=(ADMIN,))).test_client()
    with psycopg.connect(settings.database_url, autocommit=True) as stuck:
        stuck.execute(f"SELECT pg_advisory_lock_shared({retention.ERASURE_TURN})")
        answer = client.post("/api/erase", json={"email": PERSON},
                             headers={"Authorization": f"Bearer {ADMIN}"})
    assert (answer.status_code, answer.headers.get("Retry-After")) == (503, "5")
    assert answer.get_json()["errors"]["error_message"] == (
        "The erasure waited 3 times for the batches being stored and recorded nothing; "
        "run it again.")
    assert count(db, "SELECT count(*) FROM erasures") == 0


def test_purge_applies_each_retention_in_batches_and_spares_what_is_still_needed(
        runtime, settings, db):
    store(runtime, *(entry(conversion(f"p{n}@example.com", f"u-{n}", n)) for n in range(6)),
          entry({"unknown": "shape"}), entry({"unknown": "shape 2"}))
    ids = [i for (i,) in db.execute("SELECT id FROM events ORDER BY id")]
    db.execute("UPDATE events SET received_at = now() - interval '40 days' WHERE id = ANY(%s)",
               (ids[:4],))
    db.execute("INSERT INTO deliveries (event_id, sink) VALUES (%s, 'crm')", (ids[0],))  # pending
    db.execute("INSERT INTO dead_letters (event_id, sink, error, attempts, dead_at) VALUES "
               "(%s, 'crm', 'x', 1, now() - interval '40 days'), "
               "(%s, 'crm', 'x', 1, now())", (ids[1], ids[4]))  # ids[1]'s letter is open
    db.execute("INSERT INTO delivery_attempts (event_id, sink, attempt, started_at, "
               "duration_ms, outcome) SELECT %s, 'crm', n, "
               "now() - make_interval(days => 40 - n, hours => 12), 1, 'retryable' "
               "FROM generate_series(1, 5) AS n", (ids[2],))  # 39.5 .. 35.5 days old
    db.execute("UPDATE quarantine SET received_at = now() - interval '40 days' "
               "WHERE id = (SELECT min(id) FROM quarantine)")

    kept = settings.with_(retain_payload_days=30, retain_quarantine_days=30,
                          retain_dead_letters_days=30, retain_attempts_days=37)
    assert "nothing to purge" in leadpipe(settings, "purge").stdout
    result = leadpipe(kept, "purge")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "events.payload: purged 2 row(s) older than 30 day(s)",
        "quarantine: purged 1 row(s) older than 30 day(s)",
        "dead_letters: purged 1 row(s) older than 30 day(s)",
        "delivery_attempts: purged 3 row(s) older than 37 day(s)",
        "redis append-only file: started"]
    assert "events.payload:" in result.stderr  # the progress line
    purged = {i for (i,) in db.execute("SELECT id FROM events WHERE purged_at IS NOT NULL")}
    # ids[0] waits for a delivery, ids[1] for its dead letter's replay: their bodies are kept;
    # the dead letter itself was old, so it went, and ids[1] goes at the next purge
    assert purged == {ids[2], ids[3]}
    assert count(db, "SELECT count(*) FROM leads") == 6  # state is not raw data: kept
    assert count(db, "SELECT count(*) FROM quarantine") == 1
    again = leadpipe(kept, "purge")
    assert "events.payload: purged 1 row(s)" in again.stdout  # ids[1], its letter now gone


@pytest.mark.parametrize("node", ["all queues", "ingest queue alone"])
def test_workers_purge_by_themselves_once_per_interval(runtime, settings, db, redis_client,
                                                      worker_factory, node):
    # a node of the ingest queue alone (sink queues served elsewhere) still purges: the purge
    # sent to the default queue nobody consumed waited there for good
    store(runtime, entry({"unknown": "shape"}))
    db.execute("UPDATE quarantine SET received_at = now() - interval '3 days'")
    kept = settings.with_(retain_quarantine_days=2, purge_interval_seconds=3600)
    worker_factory(kept, ["--queues", settings.ingest_queue] if node != "all queues" else [])
    wait_for(lambda: count(db, "SELECT count(*) FROM quarantine") == 0, timeout=60,
             what="the pump's purge task")
    assert 0 < redis_client.ttl(f"{settings.namespace}:purge-turn") <= 3600  # the next turn
    # and Redis was asked to rewrite its log (bodies acknowledged since are still in it): the
    # turn of that is daily
    wait_for(lambda: redis_client.exists(f"{settings.namespace}:aof-rewrite-turn"), timeout=30,
             what="the purge's request for a rewrite")
    assert 3600 < redis_client.ttl(f"{settings.namespace}:aof-rewrite-turn") <= 86_400
