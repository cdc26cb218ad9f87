"""What goes wrong while a batch is stored: one event Postgres will never take (or a bug) is
quarantined with a reason and the rest of its batch is stored; only an unavailable database
makes the whole batch wait for a retry. Real Redis and Postgres."""

from __future__ import annotations

import base64
import copy
import os
from typing import Any

import orjson
import psycopg
import pytest
from psycopg_pool import PoolTimeout

from ingest.queue import Entry
from sinks.base import RetryableSinkError
from sinks.postgres import PostgresSink
from tests.conftest import count, fixture_bytes
from workers import pipeline
from workers.runtime import Runtime

V2 = orjson.loads(fixture_bytes("mkt-v2-converted.json"))
LEGACY = orjson.loads(fixture_bytes("legacy-leads-full.json"))
DEAL = orjson.loads(fixture_bytes("crm-deal-created.json"))


_n = iter(range(10**6))


def entry(body: dict[str, Any] | bytes, event_id: str | None = None) -> Entry:
    n = next(_n)
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return Entry(f"{n}-0", event_id or f"pe-{n}", 1_700_000_000_000 + n, raw, None)


def store(runtime: Runtime, *entries: Entry):  # type: ignore[no-untyped-def]
    events, rejected = pipeline.split(list(entries))
    return pipeline.store(runtime, events, rejected)


def reasons(db: psycopg.Connection) -> dict[str, str]:
    return dict(db.execute("SELECT id, reason FROM quarantine").fetchall())


def event_ids(db: psycopg.Connection) -> set[str]:
    return {i for (i,) in db.execute("SELECT id FROM events")}


# -- an identity that is blank once normalised; any error of one event ------------------------

def blank_v2() -> dict[str, Any]:
    body = copy.deepcopy(V2)
    del body["contact"]["uuid"]
    body["contact"]["email"] = "   "
    return body


def blank_legacy() -> dict[str, Any]:
    body = copy.deepcopy(LEGACY)
    body["leads"][0].update(uuid=None, id=None, email=" \t ")
    return body


@pytest.mark.parametrize("bad", [blank_v2, blank_legacy], ids=["v2", "legacy"])
def test_a_lead_whose_only_identity_is_a_blank_email_is_quarantined_naming_it(runtime, db, bad):
    stored = store(runtime, entry(DEAL, "good"), entry(bad(), "blank"))
    assert event_ids(db) == {"good"} and [e.id for e in stored.new] == ["good"]
    why = reasons(db)
    assert list(why) == ["blank"]
    assert "uuid" in why["blank"] and "email" in why["blank"], why


def test_blank_uuids_and_ids_are_no_identity_and_never_join_two_people(runtime, db):
    people = []
    for n, email in enumerate(("ana@example.com", "bia@example.com")):
        body = copy.deepcopy(LEGACY)
        body["leads"][0].update(uuid="  ", id=" ", email=email)
        people.append(entry(body, f"blank-ids-{n}"))
    v2 = copy.deepcopy(V2)
    v2["contact"].update(uuid=" ", email="caio@example.com")
    store(runtime, *people, entry(v2, "blank-uuid"))
    rows = db.execute("SELECT lead_key, uuid, legacy_id FROM leads ORDER BY lead_key").fetchall()
    assert rows == [("email:ana@example.com", None, None), ("email:bia@example.com", None, None),
                    ("email:caio@example.com", None, None)]


def test_a_blank_email_beside_a_uuid_is_no_identity_problem(runtime, db):
    body = copy.deepcopy(V2)
    body["contact"]["email"] = "  "
    store(runtime, entry(body, "uuid-only"))
    assert event_ids(db) == {"uuid-only"}
    assert db.execute("SELECT lead_key, email FROM leads").fetchone() == (
        V2["contact"]["uuid"], None)


def test_any_error_storing_one_event_quarantines_it_and_stores_the_rest(runtime, db):
    """A bug past validation (here: a lead state with no identity at all, which the sink
    cannot key) must cost one event, not stall its batch: the batch is stored one by one and
    the event that still fails is quarantined, its reason naming the error's type only."""
    events, rejected = pipeline.split([entry(DEAL, "good-1"), entry(V2, "broken"),
                                       entry(fixture_bytes("crm-deal-deleted.json"), "good-2")])
    broken = next(e for e in events if e.id == "broken")
    assert broken.lead is not None
    broken.lead.update(uuid=None, legacy_id=None, email=None)
    stored = pipeline.store(runtime, events, rejected)
    assert sorted(e.id for e in stored.new) == ["good-1", "good-2"] and stored.quarantined == 1
    assert event_ids(db) == {"good-1", "good-2"}
    why = reasons(db)["broken"]
    assert why.startswith("internal error") and "TypeError" in why, why
    assert "contact@example.com" not in why and "Contact Name" not in why
    payload = db.execute("SELECT payload #>> '{}' FROM quarantine").fetchone()[0]
    assert orjson.loads(payload) == V2  # the body is kept, to replay once the bug is fixed


def test_deliveries_stored_one_by_one_are_queued_though_the_quarantine_write_then_fails(
        runtime, db, monkeypatch):
    """Stored one by one, the good event's delivery is committed; when the refusal's quarantine
    row then meets Postgres going away, the batch is retried, where the event is no longer new:
    its delivery must be queued now, not left to the relay minutes later."""
    events, rejected = pipeline.split([entry(DEAL, "good"), entry(V2, "broken")])
    next(e for e in events if e.id == "broken").lead.update(uuid=None, legacy_id=None,
                                                            email=None)
    monkeypatch.setattr(runtime, "router", lambda: lambda event: ["crm"])
    published: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(runtime, "publish", lambda sink, ids, **kw: published.append((sink, ids)))
    real = runtime.postgres.store

    def store(events: Any, rejected: Any, route: Any = None) -> Any:
        if rejected and not events and rejected[0].id == "broken":  # the quarantine row
            raise RetryableSinkError("postgres unavailable: AdminShutdown")
        return real(events, rejected, route)

    monkeypatch.setattr(runtime.postgres, "store", store)
    with pytest.raises(RetryableSinkError):
        pipeline.store(runtime, events, rejected)
    assert published == [("crm", ["good"])]
    assert db.execute("SELECT event_id, status FROM deliveries").fetchall() == [("good", "pending")]


@pytest.mark.parametrize("error", [
    RetryableSinkError("postgres unavailable: AdminShutdown"),
    PoolTimeout("couldn't get a connection after 5.00 sec"),
    psycopg.OperationalError("consuming input failed: server closed the connection"),
    psycopg.errors.lookup("57P01")("terminating connection due to administrator command"),
    psycopg.errors.lookup("40P01")("deadlock detected"),
], ids=lambda e: type(e).__name__)
def test_an_unavailable_database_still_fails_the_batch_for_a_retry(runtime, db, monkeypatch,
                                                                   error):
    events, rejected = pipeline.split([entry(DEAL, "good")])
    calls = []

    def down(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        raise error

    monkeypatch.setattr(runtime.postgres, "store", down)
    with pytest.raises(type(error)):
        pipeline.store(runtime, events, rejected)
    assert len(calls) == 1  # not tried one by one, nothing quarantined
    monkeypatch.undo()
    assert count(db, "SELECT count(*) FROM quarantine") == 0


@pytest.mark.parametrize(("sqlstate", "retry"), [
    ("08006", True), ("57P01", True), ("57P03", True), ("53300", True), ("40001", True),
    ("55P03", True), ("58030", True),
    ("54000", False), ("22P02", False), ("22001", False), ("23505", False), ("42P01", False),
])
def test_transient_is_decided_by_sqlstate(sqlstate, retry):
    from sinks.postgres import transient

    assert transient(psycopg.errors.lookup(sqlstate)("x")) is retry


# -- an identifier past Postgres' index row limit --------------------------------------------

def huge() -> str:
    return base64.b64encode(os.urandom(6000)).decode()  # 8 KB that does not compress


def huge_tx() -> dict[str, Any]:
    body = copy.deepcopy(DEAL)
    body["transaction_uuid"] = huge()
    body["document"]["id"] = "other-deal"
    return body


def huge_deal_id() -> dict[str, Any]:
    body = copy.deepcopy(DEAL)
    body["transaction_uuid"] = "tx-huge-deal"
    body["document"]["id"] = huge()
    return body


def huge_uuid() -> dict[str, Any]:
    body = copy.deepcopy(V2)
    body["contact"]["uuid"] = huge()
    return body


def huge_email() -> dict[str, Any]:
    body = copy.deepcopy(V2)
    del body["contact"]["uuid"]
    body["contact"]["email"] = huge() + "@example.com"
    return body


def huge_event_identifier() -> dict[str, Any]:
    body = copy.deepcopy(V2)
    body["event_identifier"] = huge()
    return body


@pytest.mark.parametrize("bad", [huge_tx, huge_deal_id, huge_uuid, huge_email,
                                 huge_event_identifier],
                         ids=lambda f: f.__name__)
def test_an_identifier_past_the_index_row_limit_is_quarantined_and_the_batch_stored(
        runtime, db, bad):
    stored = store(runtime, entry(fixture_bytes("crm-deal-deleted.json"), "good"),
                   entry(bad(), "huge"))
    assert [e.id for e in stored.new] == ["good"] and stored.quarantined == 1
    assert event_ids(db) == {"good"}
    why = reasons(db)["huge"]
    assert why.startswith("postgres refused the event: ProgramLimitExceeded (54000)"), why
    assert "index row" in why and len(why) < 300, why


def test_the_sink_raises_a_refused_value_as_it_is_not_as_retryable(database_url):
    events, _ = pipeline.split([entry(huge_tx())])
    sink = PostgresSink("postgres", {"dsn": database_url})
    try:
        with pytest.raises(psycopg.errors.ProgramLimitExceeded):
            sink.store(events, [])
    finally:
        sink.close()


# -- reasons built from Postgres' errors carry no body text ----------------------------------

def test_a_postgres_refusal_reason_quotes_nothing_of_the_body(runtime, db):
    # Postgres refuses this lead's row with a message that quotes its e-mail, and a CONTEXT
    db.execute("CREATE FUNCTION refuse_lead() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
               "IF NEW.email LIKE 'maria%' THEN PERFORM NEW.email::bigint; END IF; "
               "RETURN NEW; END $$")
    db.execute("CREATE TRIGGER refuse_lead BEFORE INSERT OR UPDATE ON leads "
               "FOR EACH ROW EXECUTE FUNCTION refuse_lead()")
    body = (b'{"event_type":"WEBHOOK.CONVERTED","event_identifier":"f",'
            b'"event_timestamp":"2024-01-01T00:00:00Z","contact":{"uuid":"U9",'
            b'"email":"maria.souza@example.com","name":"Maria Souza",'
            b'"personal_phone":"+55 11 98888-7777"}}')
    store(runtime, entry(body, "refused"))
    why = reasons(db)["refused"]
    assert why == ("postgres refused the event: InvalidTextRepresentation (22P02): "
                   "invalid input syntax for type bigint"), why
    for pii in ("maria", "Souza", "98888", "7777", "CONTEXT", "DETAIL"):
        assert pii not in why


def test_a_refusal_reason_cuts_the_input_postgres_quotes(db):
    """Some primary messages end with the refused input ("...: "value""): it is cut."""
    with pytest.raises(psycopg.errors.InvalidTextRepresentation) as caught:
        db.execute("SELECT 'maria.souza@example.com'::bigint")
    assert pipeline.refusal_reason(caught.value) == (
        "postgres refused the event: InvalidTextRepresentation (22P02): "
        "invalid input syntax for type bigint")
    client_side = psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
    assert pipeline.refusal_reason(client_side) == "postgres refused the event: DataError"
    assert pipeline.refusal_reason(KeyError("maria")) == (
        "internal error while storing the event: KeyError")


# -- an event too big for the server's limits (or a busy server): statement_timeout, locks ----

POISON = "poison@example.com"


@pytest.fixture
def poisoned(db):  # type: ignore[no-untyped-def]
    """Postgres cancels any write of the poison lead, as a statement_timeout would a body
    with tens of thousands of leads (or a full lock table: 53200)."""
    db.execute("""
        CREATE FUNCTION leadpipe_test_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.email = 'poison@example.com' THEN
                RAISE EXCEPTION 'canceling statement due to statement timeout'
                    USING ERRCODE = '57014';
            END IF;
            RETURN NEW;
        END $$""")
    db.execute("CREATE TRIGGER leadpipe_test_poison BEFORE INSERT OR UPDATE ON leads "
               "FOR EACH ROW EXECUTE FUNCTION leadpipe_test_poison()")
    yield POISON
    db.execute("DROP TRIGGER leadpipe_test_poison ON leads")
    db.execute("DROP FUNCTION leadpipe_test_poison()")


def poison_v2() -> dict[str, Any]:
    body = copy.deepcopy(V2)
    body["contact"].update(uuid="poison-uuid", email=POISON)
    return body


def test_an_oversized_event_is_retried_then_quarantined_and_its_batch_stored(runtime, db,
                                                                             poisoned):
    events, rejected = pipeline.split([entry(DEAL, "good-1"), entry(poison_v2(), "poison"),
                                       entry(fixture_bytes("crm-deal-deleted.json"), "good-2")])
    with pytest.raises(RetryableSinkError):  # not the last try: the whole batch again later
        pipeline.store(runtime, events, rejected)
    assert event_ids(db) == {"good-1"}  # stored one by one, up to the poison
    assert count(db, "SELECT count(*) FROM quarantine") == 0

    stored = pipeline.store(runtime, events, rejected, last_try=True)
    assert sorted(e.id for e in stored.new) == ["good-2"] and stored.quarantined == 1
    assert event_ids(db) == {"good-1", "good-2"}
    why = reasons(db)["poison"]
    assert why.startswith("postgres refused the event: QueryCanceled (57014)"), why
    assert POISON not in why


@pytest.mark.parametrize(("sqlstate", "expected"), [
    ("57014", True), ("53200", True), ("57P01", False), ("53300", False), ("08006", False),
    ("54000", False),
])
def test_oversized_is_decided_by_sqlstate_through_the_sinks_wrapper(sqlstate, expected):
    from sinks.postgres import oversized

    error = psycopg.errors.lookup(sqlstate)("x")
    wrapped = RetryableSinkError("postgres unavailable")
    wrapped.__cause__ = error
    assert oversized(error) is expected and oversized(wrapped) is expected


def test_a_worker_quarantines_an_oversized_event_after_its_tries(client, settings, db,
                                                                 worker_factory, poisoned):
    """Through a real worker: the batch task is retried, the good event is stored, and the
    poison one is quarantined on the try LEADPIPE_OVERSIZED_RETRIES allows, not retried on."""
    from tests.conftest import post, wait_for

    worker = worker_factory(settings.with_(oversized_retries=1))
    good = post(client, fixture_bytes("crm-deal-created.json")).json["id"]
    poison = post(client, orjson.dumps(poison_v2())).json["id"]
    wait_for(lambda: count(db, "SELECT count(*) FROM quarantine") == 1, timeout=60,
             what="the poison event quarantined")
    assert event_ids(db) == {good}
    assert "(57014)" in reasons(db)[poison]
    assert "will be retried: RetryableSinkError" in worker.log_path.read_text()


def test_an_oversized_event_alone_in_its_batch_is_quarantined_on_the_last_try(runtime, db,
                                                                              poisoned):
    events, rejected = pipeline.split([entry(poison_v2(), "alone")])
    with pytest.raises(RetryableSinkError):
        pipeline.store(runtime, events, rejected)
    stored = pipeline.store(runtime, events, rejected, last_try=True)
    assert stored.quarantined == 1 and "(57014)" in reasons(db)["alone"]
    assert event_ids(db) == set()
