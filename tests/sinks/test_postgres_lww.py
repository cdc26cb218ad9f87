"""Last writer wins in the postgres sink, as batches and concurrent workers see it: a batch ends
as its events applied one at a time in time order would leave the rows, whoever else writes."""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import orjson
import psycopg

from ingest.queue import Entry
from sinks import postgres
from sinks.postgres import PostgresSink
from tests.conftest import fixture_bytes, wait_for
from workers.events import Event
from workers.normalize import normalize

_ids = itertools.count()
T0 = datetime(2024, 1, 1, 12, tzinfo=UTC)


def events(*bodies: dict) -> list[Event]:
    out = []
    for body in bodies:
        n = next(_ids)
        for item in normalize(Entry(f"{n}-0", f"lww-{n}", 1_700_000_000_000 + n,
                                    orjson.dumps(body), None)):
            assert isinstance(item, Event), item
            out.append(item)
    return out


def at(hours: float) -> str:
    return (T0 + timedelta(hours=hours)).isoformat().replace("+00:00", "Z")


def deal_update(deal_id: str, when: str, status: str, **document: object) -> dict:
    body = orjson.loads(fixture_bytes("crm-deal-updated-won.json"))
    body["document"].update(id=deal_id, status=status, **document)
    body["event_timestamp"] = when
    body["transaction_uuid"] = f"tx-{next(_ids)}"
    return body


def deal_deleted(deal_id: str, when: str) -> dict:
    return {"event_name": "crm_deal_deleted", "document": {"id": deal_id, "name": "x"},
            "event_timestamp": when, "transaction_uuid": f"tx-{next(_ids)}"}


def v2(uuid: str, when: str, email: str = "ana@example.com", form: str | None = None,
       **contact: object) -> dict:
    return {"event_type": "WEBHOOK.CONVERTED", "event_identifier": form or f"form-{next(_ids)}",
            "event_timestamp": when, "contact": {"uuid": uuid, "email": email, **contact}}


def legacy(when: str, **lead: object) -> dict:
    return {"leads": [{**lead, "last_conversion": {"created_at": when}}]}


def deal_row(db: psycopg.Connection, deal_id: str) -> tuple:
    return db.execute("SELECT status, deleted_at FROM deals WHERE id = %s", (deal_id,)).fetchone()


# --- a batch holding an event older than the stored state -------------------------------------

def test_late_older_deal_update_batched_with_a_newer_event_is_refused(database_url, db):
    sink = PostgresSink("postgres", {"dsn": database_url})
    sink.store(events(deal_update("D1", at(0), "won")), [])
    # late: an update from before the stored state, and a delete after it, in one batch
    sink.store(events(deal_update("D1", at(-1), "ongoing"), deal_deleted("D1", at(1))), [])
    assert deal_row(db, "D1") == ("won", T0 + timedelta(hours=1))
    sink.close()


def _reopened(deal_id: str, when: str) -> dict:
    """A won deal reopened in RD: its document has closed_at, rating and custom fields empty."""
    return deal_update(deal_id, when, "ongoing", closed_at=None, rating=None,
                       prediction_date=None, deal_custom_fields=[])


def _cleared(db: psycopg.Connection, deal_id: str) -> tuple:
    return db.execute("SELECT status, closed_at, rating, prediction_date, custom_fields, "
                      "name, deleted_at IS NOT NULL FROM deals WHERE id = %s",
                      (deal_id,)).fetchone()


def test_a_value_rd_cleared_in_a_deal_is_cleared_in_its_row(database_url, db):
    won = deal_update("D7", at(0), "won")
    assert won["document"]["closed_at"] and won["document"]["rating"]  # the fixture has them
    sink = PostgresSink("postgres", {"dsn": database_url})
    sink.store(events(won), [])
    sink.store(events(_reopened("D7", at(1))), [])  # in the next batch
    assert _cleared(db, "D7") == ("ongoing", None, None, None, None, won["document"]["name"],
                                  False)
    sink.store(events(deal_update("D8", at(0), "won"), _reopened("D8", at(1))), [])  # one batch
    assert _cleared(db, "D8")[:5] == ("ongoing", None, None, None, None)
    # a delete carries only id and name: what the row holds stays, deleted_at is set
    sink.store(events(deal_update("D9", at(0), "won")), [])
    sink.store(events(deal_deleted("D9", at(1))), [])
    status, closed_at, rating, _, custom, _, deleted = _cleared(db, "D9")
    assert (status, rating, deleted) == ("won", won["document"]["rating"], True)
    assert closed_at is not None and custom
    # a snapshot newer than the delete (RD does not send one; a restore might) keeps it deleted
    sink.store(events(deal_update("D9", at(2), "ongoing")), [])
    assert _cleared(db, "D9")[0] == "ongoing" and _cleared(db, "D9")[6] is True
    sink.store(events(deal_update("D10", at(0), "won"), deal_deleted("D10", at(1)),
                      deal_update("D10", at(2), "ongoing")), [])  # the same in one batch
    assert _cleared(db, "D10")[0] == "ongoing" and _cleared(db, "D10")[6] is True
    # and an older reopening arriving late changes nothing
    sink.store(events(_reopened("D9", at(-1))), [])  # it would clear closed_at and rating
    assert _cleared(db, "D9")[1:3] == (closed_at, won["document"]["rating"])
    sink.close()


def test_late_older_lead_event_batched_with_a_newer_one_is_refused(database_url, db):
    sink = PostgresSink("postgres", {"dsn": database_url})
    marked = {"event_type": "WEBHOOK.MARKED_OPPORTUNITY", "event_identifier": "default",
              "event_timestamp": at(0),
              "contact": {"uuid": "U1", "email": "a@x.com", "city": "Recife"}}
    sink.store(events(marked), [])
    older = v2("U1", at(-1), "a@x.com", city="Olinda", funnel={"opportunity": False})
    newer_without_funnel = v2("U1", at(1), "a@x.com")
    sink.store(events(older, newer_without_funnel), [])
    row = db.execute("SELECT opportunity, city, updated_at FROM leads").fetchall()
    assert row == [(True, "Recife", T0 + timedelta(hours=1))]
    sink.close()


def test_a_legacy_lead_sent_without_tags_keeps_the_stored_ones(database_url, db):
    # RD leaves fields out of legacy leads: a missing key says nothing; null says "no tags"
    sink = PostgresSink("postgres", {"dsn": database_url})
    sink.store(events(v2("U1", at(0), "a@x.com", tags=["webinar", "b2b"])), [])
    sink.store(events(legacy(at(1), uuid="U1", email="a@x.com", lead_stage="Lead")), [])
    assert db.execute("SELECT tags, lifecycle_stage FROM leads").fetchone() == (
        ["webinar", "b2b"], "Lead")
    sink.store(events(legacy(at(2), uuid="U1", email="a@x.com", tags=None)), [])
    assert db.execute("SELECT tags FROM leads").fetchone() == ([],)
    sink.close()


def test_a_new_lead_whose_key_names_another_leads_old_address_gets_a_row_of_its_own(
        database_url, db):
    # Ana's row was made for her e-mail alone (key email:ana@x.com); she moved to another
    # address. A contact sent later with only ana@x.com is no lead's now: a new lead
    sink = PostgresSink("postgres", {"dsn": database_url})
    sink.store(events(legacy(at(0), email="ana@x.com", name="Ana")), [])
    sink.store(events(v2("U-ANA", at(1), "ana@x.com", name="Ana")), [])
    sink.store(events(v2("U-ANA", at(2), "ana.new@x.com")), [])
    sink.store(events(legacy(at(3), email="ana@x.com", name="Bia")), [])
    rows = db.execute("SELECT lead_key, uuid, email, name FROM leads "
                      "ORDER BY created_at").fetchall()
    assert [row[1:] for row in rows] == [("U-ANA", "ana.new@x.com", "Ana"),
                                         (None, "ana@x.com", "Bia")]
    assert rows[0][0] == "email:ana@x.com" and rows[1][0].startswith("lead:")
    sink.store(events(legacy(at(4), email="ana@x.com", city="Recife")), [])  # Bia again
    assert db.execute("SELECT name, city FROM leads WHERE uuid IS NULL").fetchall() == [
        ("Bia", "Recife")]
    sink.close()


def _deal_body(key: str, hours: float, n: int) -> dict:
    if n % 4 == 3:
        return deal_deleted(key, at(hours))
    # each event carries some fields and lacks others, so what is kept from before shows
    extra = {"rating": n} if n % 2 else {"rating": None, "amount_total": n}
    return deal_update(key, at(hours), f"s{n}", **extra)


def test_an_older_event_gives_its_lead_the_identifier_the_row_lacked(database_url, db):
    # v2 first, then an older legacy event carrying the legacy id the row lacked (its state
    # refused, as older), then a newer legacy event with a new address, found only by that id:
    # it made a second lead, where the same events in time order make one
    sink = PostgresSink("postgres", {"dsn": database_url})
    for n, order in enumerate(((0, 1, 2), (1, 0, 2))):
        uid, ident, old, new = f"U-{n}", f"77{n}", f"ana{n}@x.com", f"ana{n}.new@x.com"
        bodies = [legacy(at(0), id=ident, email=old, name="Ana"),
                  v2(uid, at(1), email=old, name="Ana Maria"),
                  legacy(at(2), id=ident, email=new)]
        for i in order:
            sink.store(events(bodies[i]), [])
        rows = db.execute("SELECT uuid, legacy_id, email, name FROM leads WHERE uuid = %s "
                          "OR legacy_id = %s OR email IN (%s, %s)",
                          (uid, ident, old, new)).fetchall()
        assert rows == [(uid, ident, new, "Ana Maria")], (order, rows)  # the older name refused
    sink.close()


def _lead_body(key: str, hours: float, n: int) -> dict:
    contact: dict = {"name": f"n{n}"}
    if n % 2:
        contact["city"] = f"c{n}"
    if n % 3:
        contact["funnel"] = {"opportunity": n % 3 == 1, "lifecycle_stage": f"l{n}"}
    return v2(key, at(hours), f"{key.lower()}@x.com", f"form-{n}", **contact)


def _same_as_one_at_a_time(sink: PostgresSink, db: psycopg.Connection,
                           body: Callable[[str, float, int], dict], query: str,
                           last: Callable[[int], bool] = lambda n: False) -> None:
    """Random arrival orders cut into random batches end as the same events stored one per
    batch, each batch's events in time order: the reference last writer wins. `last`: events
    ordered after the others of their moment (deletes, which carry no document updated_at)."""
    rng = random.Random(20240101)
    for scenario in range(25):
        hours = [rng.choice((0, 1, 2, 3, 3)) for _ in range(rng.randint(2, 6))]  # some ties
        arrival = list(range(len(hours)))
        rng.shuffle(arrival)
        cuts = sorted(rng.sample(range(1, len(arrival)), rng.randint(0, len(arrival) - 1)))
        batches = [arrival[a:b] for a, b in zip([0, *cuts], [*cuts, len(arrival)], strict=True)]
        for mode in ("one", "batch"):
            key = f"K{scenario}{mode}"
            for batch in batches:
                if mode == "one":
                    for n in sorted(batch, key=lambda i: (hours[i], last(i))):
                        sink.store(events(body(key, hours[n], n)), [])
                else:
                    sink.store(events(*(body(key, hours[n], n) for n in batch)), [])
        one = db.execute(query, (f"K{scenario}one",)).fetchone()
        batched = db.execute(query, (f"K{scenario}batch",)).fetchone()
        assert batched == one, (scenario, hours, batches)


def test_deal_batches_equal_their_events_one_at_a_time(database_url, db):
    sink = PostgresSink("postgres", {"dsn": database_url})
    _same_as_one_at_a_time(sink, db, _deal_body,
                           "SELECT status, rating, amount_total, deleted_at, updated_at "
                           "FROM deals WHERE id = %s", last=lambda n: n % 4 == 3)
    sink.close()


def test_lead_batches_equal_their_events_one_at_a_time(database_url, db):
    sink = PostgresSink("postgres", {"dsn": database_url})
    _same_as_one_at_a_time(sink, db, _lead_body,
                           "SELECT name, city, opportunity, lifecycle_stage, "
                           "last_conversion_identifier, updated_at FROM leads WHERE uuid = %s")
    sink.close()


# --- two workers storing batches at the same time ---------------------------------------------

class Blocked:
    """`postgres.store` of `batch` on its own connection, in a thread, committed at the end."""

    def __init__(self, database_url: str, batch: list[Event]):
        self.conn = psycopg.connect(database_url)
        self.pid = self.conn.info.backend_pid
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(batch,), daemon=True)
        self.thread.start()

    def _run(self, batch: list[Event]) -> None:
        try:
            postgres.store(self.conn, batch, [])
            self.conn.commit()
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc

    def waiting_or_done(self, db: psycopg.Connection) -> bool:
        """Deterministic, not timed: the thread either waits on a lock the open transaction
        holds, or never needed one (and has finished)."""
        if not self.thread.is_alive():
            return True
        row = db.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                         (self.pid,)).fetchone()
        return row is not None and row[0] == "Lock"

    def join(self) -> None:
        self.thread.join(30)
        self.conn.close()
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def concurrently(database_url: str, db: psycopg.Connection, first: list[Event],
                 second: list[Event]) -> None:
    """Worker 1 stores `first` and keeps its transaction open while worker 2 stores `second`;
    worker 1 commits only once worker 2 waits on it (or did not need to)."""
    with psycopg.connect(database_url) as one:
        postgres.store(one, first, [])
        two = Blocked(database_url, second)
        try:
            wait_for(lambda: two.waiting_or_done(db), timeout=20, what="second batch to block")
        finally:
            one.commit()
            two.join()


def test_concurrent_batches_bringing_one_lead_in_two_dialects_make_one_lead(database_url, db):
    uuid_first = v2("U-77", at(0), "ana@example.com", name="Ana")
    legacy_id = legacy(at(0), id="77", email="ana@example.com", name="Ana")
    for first, second in ((uuid_first, legacy_id), (legacy_id, uuid_first)):
        db.execute("TRUNCATE events, leads CASCADE")
        concurrently(database_url, db, events(first), events(second))
        rows = db.execute("SELECT uuid, legacy_id, email FROM leads").fetchall()
        assert rows == [("U-77", "77", "ana@example.com")]


def test_concurrent_batches_reaching_one_lead_by_different_identifiers(database_url, db):
    sink = PostgresSink("postgres", {"dsn": database_url})
    sink.store(events(legacy(at(0), id="77", uuid="U-77", email="ana@example.com",
                             city="Natal")), [])
    # worker 1 knows the lead by its legacy id, worker 2 by its uuid: no identifier in common
    by_id = events(legacy(at(2), id="77", city="Recife"))
    by_uuid = events(v2("U-77", at(1), "ana@example.com", city="Olinda"), v2("U-77", at(3)))
    concurrently(database_url, db, by_id, by_uuid)
    # one after the other: Olinda (1:00) is older than Recife (2:00), the 3:00 event has no city
    assert db.execute("SELECT lead_key, city FROM leads").fetchall() == [("U-77", "Recife")]
    sink.close()


def test_concurrent_batches_creating_one_deal_keep_the_newest_state(database_url, db):
    won = events(deal_update("D9", at(0), "won"))
    late = events(deal_update("D9", at(-1), "ongoing"), deal_deleted("D9", at(1)))
    concurrently(database_url, db, won, late)
    assert deal_row(db, "D9") == ("won", T0 + timedelta(hours=1))


# --- two RD contacts within one batch ----------------------------------------------------------

def test_two_rd_contacts_are_not_merged_within_one_batch(database_url, db):
    sink = PostgresSink("postgres", {"dsn": database_url})
    query = "SELECT lead_key, uuid, legacy_id, name FROM leads ORDER BY lead_key"
    results = []
    for together in (False, True):
        db.execute("TRUNCATE events, leads CASCADE")
        sink.store(events(legacy(at(0), id="1", email="shared@x.com")), [])
        first = events(v2("U1", at(1), "shared@x.com", name="First"))
        second = events(v2("U2", at(2), "shared@x.com", name="Second"))
        if together:
            sink.store(first + second, [])
        else:
            sink.store(first, [])
            sink.store(second, [])
        assert [e.entity_id for e in first + second] == ["id:1", "U2"]
        results.append(db.execute(query).fetchall())
    assert results[1] == results[0] == [("U2", "U2", None, "Second"), ("id:1", "U1", "1", "First")]
    sink.close()


# --- two CRM updates within one second -------------------------------------------------------

SECOND = "2025-03-12T19:40:05.000Z"  # CRM event_timestamp: whole seconds


def test_same_second_deal_updates_are_ordered_by_the_document_updated_at(database_url, db):
    sink = PostgresSink("postgres", {"dsn": database_url})
    newer = deal_update("D1", SECOND, "won", updated_at="2025-03-12T16:40:05.871-03:00")
    older = deal_update("D1", SECOND, "ongoing", updated_at="2025-03-12T16:40:05.120-03:00")
    sink.store(events(newer), [])
    sink.store(events(older), [])  # arrives late
    for body in (newer, older):
        body["document"]["id"], body["transaction_uuid"] = "D2", body["transaction_uuid"] + "-2"
    sink.store(events(newer, older), [])  # the same two, in one batch, newer first
    for deal in ("D1", "D2"):
        status, updated_at = db.execute("SELECT status, updated_at FROM deals WHERE id = %s",
                                        (deal,)).fetchone()
        # the column keeps the event's own time
        assert (status, updated_at) == ("won", datetime(2025, 3, 12, 19, 40, 5, tzinfo=UTC))
    sink.close()


def test_an_update_without_event_timestamp_is_ordered_with_those_that_have_one(database_url, db):
    # its time falls back to the document's updated_at, in milliseconds, where the others'
    # event_timestamp is whole seconds: the fallback must not rank it after a newer update
    sink = PostgresSink("postgres", {"dsn": database_url})
    older = deal_update("D1", SECOND, "ongoing", updated_at="2025-03-12T16:40:05.871-03:00")
    del older["event_timestamp"]
    newer = deal_update("D1", SECOND, "won", updated_at="2025-03-12T16:40:05.990-03:00")
    sink.store(events(older), [])
    sink.store(events(newer), [])
    assert deal_row(db, "D1") == ("won", None)
    late = deal_update("D1", SECOND, "lost", updated_at="2025-03-12T16:40:05.500-03:00")
    del late["event_timestamp"]
    sink.store(events(late), [])  # older than both, arriving last
    assert deal_row(db, "D1") == ("won", None)
    sink.close()


def test_delete_in_the_same_second_as_an_update_stays_deleted(database_url, db):
    sink = PostgresSink("postgres", {"dsn": database_url})
    update = deal_update("D1", SECOND, "won", updated_at="2025-03-12T16:40:05.871-03:00")
    late = deal_update("D1", SECOND, "ongoing", updated_at="2025-03-12T16:40:05.120-03:00")
    sink.store(events(update), [])
    sink.store(events(deal_deleted("D1", SECOND)), [])  # a delete carries no updated_at
    sink.store(events(late), [])
    assert deal_row(db, "D1") == ("won", datetime(2025, 3, 12, 19, 40, 5, tzinfo=UTC))
    sink.close()


# --- what a sink keeping current state is not sent (postgres.superseded) ----------------------

def test_superseded_names_the_newer_event_of_a_deal_and_of_a_lead(database_url, db):
    sink = PostgresSink("postgres", {"dsn": database_url})
    newer_deal, newer_lead = events(deal_update("D1", at(1), "won"), v2("U-1", at(1), name="B"))
    older_deal, older_lead = events(deal_update("D1", at(0), "ongoing"), v2("U-1", at(0),
                                                                             name="A"))
    sink.store([newer_deal, newer_lead], [])
    sink.store([older_deal, older_lead], [])  # late: refused by last writer wins
    with sink.pool.connection() as conn:
        found = postgres.superseded(conn, [older_deal, older_lead, newer_deal, newer_lead])
    assert found == {older_deal.id: newer_deal.id, older_lead.id: newer_lead.id}
    sink.close()


def test_superseded_orders_as_the_upserts_do(database_url, db):
    """Same time: not superseded (the upsert merges it). Same second: the document's updated_at
    decides, and a delete ends its second. No row (or not a lead or deal): not superseded."""
    sink = PostgresSink("postgres", {"dsn": database_url})
    first, second = events(
        deal_update("D2", SECOND, "ongoing", updated_at="2025-03-12T16:40:05.120-03:00"),
        deal_update("D2", SECOND, "won", updated_at="2025-03-12T16:40:05.871-03:00"))
    twin_a, twin_b = events(v2("U-2", at(0), form="a"), v2("U-2", at(0), form="b"))
    other = events({"event_name": "crm_organization_updated", "document": {"id": "O1"},
                    "event_timestamp": at(0), "transaction_uuid": "tx-org"})[0]
    unstored = events(deal_update("D3", at(0), "won"))[0]
    sink.store([first, second, twin_a, twin_b, other], [])
    with sink.pool.connection() as conn:
        assert postgres.superseded(conn, [first, second, twin_a, twin_b, other, unstored]) == {
            first.id: second.id}
        gone = events(deal_deleted("D2", SECOND))[0]
        sink.store([gone], [])
        assert postgres.superseded(conn, [second, gone]) == {second.id: gone.id}
    sink.close()
