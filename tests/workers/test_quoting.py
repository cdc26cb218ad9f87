"""Rewriting an erased address inside text and JSON kept for others."""

from __future__ import annotations

import threading
from typing import Any

import orjson
import psycopg

from tests.conftest import count, wait_for
from workers.quoting import ERASED_TEXT, json_rewritten
from workers.retention import _address


def test_the_address_in_any_case_becomes_erased_and_longer_addresses_stay():
    address = _address("joão.silva@exemplo.com.br")
    value = {"note": "De JOÃO.SILVA@EXEMPLO.COM.BR para joana@x.com",
             "list": ["xjoão.silva@exemplo.com.br", "joão.silva@exemplo.com.br.ar", 3, None],
             "joão.silva@exemplo.com.br": True}
    assert json_rewritten(value, address) == {
        "note": f"De {ERASED_TEXT} para joana@x.com",
        "list": ["xjoão.silva@exemplo.com.br", "joão.silva@exemplo.com.br.ar", 3, None],
        ERASED_TEXT: True}


def test_a_value_nested_as_deep_as_json_allows_is_rewritten_without_exhausting_the_stack():
    address = _address("ana@example.com")
    value: object = "Ana <ana@example.com>"
    for _ in range(5000):
        value = [value]
    out = json_rewritten(value, address)
    for _ in range(5000):
        assert isinstance(out, list)
        out = out[0]
    assert out == f"Ana <{ERASED_TEXT}>"


def test_the_original_value_is_left_as_it_was():
    address = _address("ana@example.com")
    value = {"a": ["ana@example.com"]}
    json_rewritten(value, address)
    assert value == {"a": ["ana@example.com"]}


def test_an_erasure_rewriting_a_dead_letter_waits_for_its_replay_instead_of_deadlocking(
        database_url, db):
    """A replay marks the dead letter, then its delivery (workers.operations.replay, one
    transaction); both quote the person in their error text. The erasure locks dead letters
    before deliveries too, so it waits for the replay rather than holding what it needs."""
    from workers import retention

    person, error = "ana@example.com", "HTTP 422: owner ana@example.com unknown"
    db.execute("INSERT INTO events (id, dedup_key, source, event_type, entity_type, "
               "occurred_at, received_at, payload) VALUES ('ev-b', 'k-b', 'CRM', "
               "'crm_deal_created', 'DEAL', now(), now(), '{}')")
    db.execute("INSERT INTO deliveries (event_id, sink, status, last_error) VALUES "
               "('ev-b', 'crm', 'dead', %s)", (error,))
    (letter,) = db.execute("INSERT INTO dead_letters (event_id, sink, error, attempts) VALUES "
                           "('ev-b', 'crm', %s, 1) RETURNING id", (error,)).fetchone()
    outcome: dict[str, Any] = {}

    def erase() -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            outcome["erase"] = retention.erase(conn, None, person)

    with psycopg.connect(database_url) as replay:  # its two statements, by hand
        replay.execute("UPDATE dead_letters SET replayed_at = now() WHERE id = %s", (letter,))
        eraser = threading.Thread(target=erase)
        eraser.start()
        wait_for(lambda: db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%%FROM \"dead_letters\"%%'").fetchone()[0], timeout=20,
            what="the erasure waiting for the dead letter")
        replay.execute("UPDATE deliveries SET status = 'pending' WHERE event_id = 'ev-b'")
        replay.commit()
        eraser.join(30)
    assert outcome["erase"]["dead_letters_rewritten"] == 1
    assert outcome["erase"]["deliveries_rewritten"] == 1
    assert db.execute("SELECT status, last_error FROM deliveries").fetchone() == (
        "pending", "HTTP 422: owner [erased] unknown")


ANA, BOB = "ana@example.com", "bob@example.com"


def event(db: Any, event_id: str, payload: str) -> None:
    db.execute("INSERT INTO events (id, dedup_key, source, event_type, entity_type, "
               "occurred_at, received_at, payload) VALUES (%s, %s, 'CRM', 'crm_deal_created', "
               "'DEAL', now(), now(), %s)", (event_id, "k-" + event_id, payload))


def letter(db: Any, event_id: str, error: str) -> int:
    db.execute("INSERT INTO deliveries (event_id, sink, status, last_error) VALUES "
               "(%s, 'crm', 'dead', %s)", (event_id, error))
    return db.execute("INSERT INTO dead_letters (event_id, sink, error, attempts) VALUES "
                      "(%s, 'crm', %s, 1) RETURNING id", (event_id, error)).fetchone()[0]


def lock_waiters(db: Any, like: str) -> int:
    return db.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                      "AND query LIKE %s", (like,)).fetchone()[0]


def erase_in_thread(database_url: str, email: str, out: dict[str, Any]) -> threading.Thread:
    from workers import retention

    def run() -> None:
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                out[email] = retention.erase(conn, None, email)
        except Exception as exc:  # noqa: BLE001 (what the test reports)
            out[email] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_an_erasure_and_a_replay_of_its_own_and_a_quoting_dead_letter_both_finish(
        database_url, db):
    """The erasure deletes the person's dead letter and rewrites another that quotes them; a
    replay takes both in id order. Had the erasure deleted its own first and locked the other
    later (after waiting on a deal a batch holds), each would hold what the other needs."""
    event(db, "ev-x", "{}")
    quoting_letter = letter(db, "ev-x", f"HTTP 422: owner {ANA} unknown")
    event(db, "ev-p", orjson.dumps({"email": ANA}).decode())
    own = letter(db, "ev-p", "HTTP 400")
    db.execute("INSERT INTO deals (id, name, updated_at, last_event_id) VALUES "
               "('d1', %s, now(), 'ev-x')", (f"Proposal for {ANA}",))
    out: dict[str, Any] = {}
    replayed: dict[str, Any] = {}
    with psycopg.connect(database_url) as batch, psycopg.connect(database_url) as replay:
        batch.execute("SELECT 1 FROM deals WHERE id = 'd1' FOR UPDATE")  # a batch storing it
        eraser = erase_in_thread(database_url, ANA, out)
        wait_for(lambda: lock_waiters(db, '%FROM "deals"%'), timeout=20, what="erasure at deals")

        def run_replay() -> None:  # workers.operations.replay's two statements
            try:
                replay.execute("UPDATE dead_letters SET replayed_at = now() WHERE id = ANY(%s)",
                               ([quoting_letter, own],))
                replay.execute("UPDATE deliveries SET status = 'pending' "
                               "WHERE event_id = ANY(%s)", (["ev-x", "ev-p"],))
                replay.commit()
                replayed["ok"] = True
            except psycopg.Error as exc:
                replayed["ok"] = exc
                replay.rollback()

        replayer = threading.Thread(target=run_replay)
        replayer.start()
        replayer.join(10)  # it waits for nothing of the erasure's, which has locked no letter
        batch.rollback()
        eraser.join(30)
        replayer.join(30)
    assert replayed["ok"] is True and isinstance(out[ANA], dict), (replayed, out)
    assert out[ANA]["dead_letters"] == 1 and out[ANA]["dead_letters_rewritten"] == 1


def test_two_erasures_of_people_whose_error_texts_quote_each_other_both_finish(database_url,
                                                                             db):
    event(db, "ev-a", orjson.dumps({"email": ANA}).decode())
    letter(db, "ev-a", f"HTTP 409: {BOB} already has this phone")
    event(db, "ev-b", orjson.dumps({"email": BOB}).decode())
    letter(db, "ev-b", f"HTTP 409: {ANA} already has this phone")
    db.execute("INSERT INTO deals (id, name, updated_at, last_event_id) VALUES "
               "('d1', %s, now(), 'ev-x')", (f"Proposal for {ANA} and {BOB}",))
    out: dict[str, Any] = {}
    with psycopg.connect(database_url) as batch:
        batch.execute("SELECT 1 FROM deals WHERE id = 'd1' FOR UPDATE")
        erasers = [erase_in_thread(database_url, email, out) for email in (ANA, BOB)]
        wait_for(lambda: lock_waiters(db, '%FROM "deals"%') == 2, timeout=20,
                 what="both erasures at the deal")
        batch.rollback()
        for eraser in erasers:
            eraser.join(30)
    assert all(isinstance(v, dict) for v in out.values()) and len(out) == 2, out
    assert count(db, "SELECT count(*) FROM dead_letters") == 0


def erase_queued_behind(database_url: str, db: Any, held: str, out: dict[str, Any],
                        other: Any) -> None:
    """Erase ANA while `held` (a lock statement) keeps one of her rows a moment; once the
    erasure waits for it, run `other` (a replay, a delivery task) until it waits too, then
    let go: each must finish, neither deadlocked (each row is locked in key order by all)."""
    with psycopg.connect(database_url) as holder:
        holder.execute(held)
        eraser = erase_in_thread(database_url, ANA, out)
        wait_for(lambda: lock_waiters(db, "%FOR UPDATE%") >= 1, timeout=20,
                 what="the erasure waiting")
        worker = threading.Thread(target=other)
        worker.start()
        wait_for(lambda: lock_waiters(db, "%") >= 2, timeout=20, what="the other waiting")
        holder.rollback()
    eraser.join(30)
    worker.join(30)
    assert isinstance(out[ANA], dict), out


def test_an_erasure_and_a_bulk_replay_lock_dead_letters_in_one_order(settings, tmp_path,
                                                                    database_url, db):
    """On a small table an UPDATE locks in storage order, which an update of the lower id
    turns around: the replay must lock in id order, as the erasure does."""
    from workers import operations
    from workers.app import make_celery

    routes = tmp_path / "routes.yaml"
    routes.write_text('{"sinks": {"crm": {"type": "dummy", "options": {"path": "%s"}}}, '
                      '"routes": [{"to": ["crm"]}]}' % (tmp_path / "crm.jsonl"))
    runtime = make_celery(settings.with_(routes_file=str(routes))).leadpipe.runtime()
    for n in (1, 2):
        event(db, f"ev-{n}", orjson.dumps({"email": ANA}).decode())
    low, _ = (letter(db, f"ev-{n}", "HTTP 400") for n in (1, 2))
    db.execute("UPDATE dead_letters SET error = error WHERE id = %s", (low,))  # now stored last
    db.execute("ANALYZE dead_letters")  # a small table: scanned in storage order
    out: dict[str, Any] = {}

    def replay() -> None:
        try:
            out["replay"] = operations.replay(runtime, sink="crm")
        except psycopg.Error as exc:
            out["replay"] = exc

    try:
        erase_queued_behind(database_url, db, f"SELECT 1 FROM dead_letters WHERE id = {low} "
                            "FOR UPDATE", out, replay)
    finally:
        runtime.close()
    assert not isinstance(out["replay"], Exception), out


def test_an_erasure_and_a_delivery_task_lock_quoting_deliveries_in_one_order(database_url, db):
    from workers import delivery

    for name in ("ev-x1", "ev-x2"):
        event(db, name, "{}")
        db.execute("INSERT INTO deliveries (event_id, sink, status, last_error) VALUES "
                   "(%s, 'crm', 'pending', %s)", (name, f"HTTP 409: {ANA} already exists"))
    db.execute("UPDATE deliveries SET attempts = attempts WHERE event_id = 'ev-x1'")
    db.execute("ANALYZE deliveries")
    out: dict[str, Any] = {}

    def schedule() -> None:  # a task setting when its retries are due
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                delivery._schedule(conn, "crm", delivery.Plan(retry_ids=["ev-x1", "ev-x2"],
                                                              countdown=5.0), None)
            out["schedule"] = "ok"
        except psycopg.Error as exc:
            out["schedule"] = exc

    erase_queued_behind(database_url, db, "SELECT 1 FROM deliveries WHERE event_id = 'ev-x1' "
                        "FOR UPDATE", out, schedule)
    assert out["schedule"] == "ok", out
