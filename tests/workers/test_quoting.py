"""Rewriting an erased address inside text and JSON kept for others."""

from __future__ import annotations

import threading
from typing import Any

import psycopg

from tests.conftest import wait_for
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
