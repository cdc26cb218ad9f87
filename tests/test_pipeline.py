"""End to end through real processes: fixtures posted to the endpoint become the right rows."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest

from tests.conftest import count, fixture_bytes, post, wait_for

FIXTURE_EVENTS = {  # fixture -> (events rows, quarantine rows)
    "mkt-v2-converted.json": (1, 0),
    "mkt-v2-marked-opportunity.json": (1, 0),
    "legacy-leads-full.json": (1, 0),
    "legacy-leads-official.json": (1, 0),
    "crm-deal-created.json": (1, 0),
    "crm-deal-updated-won.json": (1, 0),
    "crm-deal-deleted.json": (1, 0),
    "subscriptions-list.json": (0, 1),
    "subscriptions-list-legacy.json": (0, 1),
}


def settled(db, events: int, quarantined: int = 0):  # type: ignore[no-untyped-def]
    wait_for(lambda: count(db, "SELECT count(*) FROM events") >= events
             and count(db, "SELECT count(*) FROM quarantine") >= quarantined,
             what=f"{events} events and {quarantined} quarantined")


def lead(db, email: str) -> dict:  # type: ignore[no-untyped-def]
    cur = db.execute("SELECT * FROM leads WHERE email = %s", (email,))
    names = [c.name for c in cur.description]
    rows = cur.fetchall()
    assert len(rows) == 1, rows
    return dict(zip(names, rows[0], strict=True))


def deal(db, deal_id: str) -> dict:  # type: ignore[no-untyped-def]
    cur = db.execute("SELECT * FROM deals WHERE id = %s", (deal_id,))
    names = [c.name for c in cur.description]
    return dict(zip(names, cur.fetchone(), strict=True))


def test_every_fixture_ends_as_the_right_rows(client, worker, db):
    for name in FIXTURE_EVENTS:
        assert post(client, fixture_bytes(name)).status_code == 202, name
    settled(db, sum(e for e, _ in FIXTURE_EVENTS.values()),
            sum(q for _, q in FIXTURE_EVENTS.values()))
    assert count(db, "SELECT count(*) FROM events") == 7
    assert count(db, "SELECT count(*) FROM quarantine") == 2
    assert count(db, "SELECT count(*) FROM leads") == 4
    assert count(db, "SELECT count(*) FROM deals") == 3

    joao = lead(db, "joao.silva@example.com")  # legacy: strings where v2 has types
    assert joao["opportunity"] is True  # from the string "true"
    assert joao["number_conversions"] == 2  # from the string "2"
    assert joao["tags"] == []  # from null
    assert joao["legacy_id"] == "2911004942"
    assert joao["uuid"] == "8b4d2932-6299-4cc3-8e3e-f07cdc087c05"
    assert joao["company"] == "Empresa Exemplo"
    assert joao["fit"] == "d" and joao["interest"] == 0
    assert joao["owner_email"] == "vendedor@example.com"
    assert joao["lifecycle_stage"] == "Lead"
    assert joao["last_conversion_identifier"] == "Formulário - LP"
    assert joao["last_conversion_at"].isoformat() == "2023-06-11T21:44:10.437000+00:00"
    assert joao["custom_fields"] == {"Qual o seu segmento?": "Varejo"}
    assert joao["mobile_phone"] == "+55 (34) 90000-0000"

    official = lead(db, "email@email.com")
    assert official["opportunity"] is False and official["number_conversions"] == 3
    assert official["tags"] == ["tag 1", "tag 2"]
    assert official["uuid"] == "c2f3d2b3-......-eef38be32f7f"  # malformed, kept as sent

    contact = lead(db, "contact@example.com")  # v2 converted
    assert contact["uuid"] == "c2f3d2b3-7250-4d27-97f4-eef38be32f7f"
    assert contact["company"] == "Company Example 0"
    assert contact["opportunity"] is False
    assert contact["interest"] == 20 and contact["fit"] == "0"
    assert contact["owner_email"] == "owner@example.org"
    assert contact["last_conversion_identifier"] == "my-event-identifier"
    assert contact["custom_fields"] == {"custom_field_example": ["Option1", "Option2"]}
    assert contact["tags"] == ["tag 1", "tag 2"]

    maria = lead(db, "maria.souza@example.com.br")  # v2 marked opportunity
    assert maria["opportunity"] is True
    assert maria["lifecycle_stage"] == "Qualified Lead"
    assert maria["custom_fields"] == {"segmento": "Varejo", "numero_de_funcionarios": "51-200"}

    won = deal(db, "67a1c0f2e4b0a1001a2b3c4d")
    assert won["status"] == "won"
    assert (won["amount_monthly"], won["amount_unique"], won["amount_total"]) == (
        Decimal("500.0"), Decimal("1500.0"), Decimal("7500.0"))
    assert won["rating"] == 4 and won["stage_name"] == "Fechamento"
    assert won["pipeline_name"] == "Funil Padrão" and won["owner_email"] == "ana@example.com.br"
    assert won["custom_fields"]["Produto de Interesse"] == ["Plano Anual"]
    assert won["closed_at"].isoformat() == "2025-03-12T19:40:05.860000+00:00"
    assert won["deleted_at"] is None

    created = deal(db, "650878567482d9c0c7002050a475")
    assert created["status"] == "ongoing" and created["amount_total"] == Decimal("0")

    deleted = deal(db, "64df7a11113f80018644923")
    assert deleted["deleted_at"].isoformat() == "2023-11-14T18:43:09+00:00"
    assert deleted["name"] == "Teste Negociação"

    row = db.execute("SELECT source, event_type, entity_type, entity_id, payload FROM events "
                     "WHERE event_type = 'crm_deal_created'").fetchone()
    assert row[:4] == ("CRM", "crm_deal_created", "DEAL", "650878567482d9c0c7002050a475")
    assert row[4] == orjson.loads(fixture_bytes("crm-deal-created.json"))


def test_same_body_twice_is_one_event_and_counted(client, worker, db):
    body = fixture_bytes("legacy-leads-full.json")
    first = post(client, body).get_json()["id"]
    settled(db, 1)
    before = db.execute("SELECT * FROM leads").fetchall()
    second = post(client, body).get_json()["id"]
    assert first != second
    wait_for(lambda: count(db, "SELECT duplicates FROM events") == 1, what="duplicate counted")
    assert count(db, "SELECT count(*) FROM events") == 1
    assert db.execute("SELECT id FROM events").fetchone()[0] == first
    assert db.execute("SELECT * FROM leads").fetchall() == before


def test_older_deal_update_after_newer_keeps_newer_state(client, worker, db):
    newer = orjson.loads(fixture_bytes("crm-deal-updated-won.json"))
    older = orjson.loads(fixture_bytes("crm-deal-updated-won.json"))
    older["transaction_uuid"] = "older-0000"
    older["event_timestamp"] = "2025-03-01T10:00:00.000Z"
    older["document"]["status"] = "ongoing"
    older["document"]["amount_total"] = 1
    post(client, orjson.dumps(newer))
    settled(db, 1)
    post(client, orjson.dumps(older))
    settled(db, 2)
    row = deal(db, newer["document"]["id"])
    assert row["status"] == "won" and row["amount_total"] == Decimal("7500.0")
    assert row["updated_at"].isoformat() == "2025-03-12T19:40:05+00:00"


def test_v2_body_without_contact_is_quarantined_naming_contact(client, worker, db):
    body = orjson.loads(fixture_bytes("mkt-v2-converted.json"))
    del body["contact"]
    response = post(client, orjson.dumps(body))
    assert response.status_code == 202
    event_id = response.get_json()["id"]
    settled(db, 0, 1)
    qid, reason, payload = db.execute("SELECT id, reason, payload FROM quarantine").fetchone()
    assert qid == event_id
    assert "contact" in reason
    assert payload == body


@pytest.mark.parametrize("mutate, field", [
    (lambda b: b["leads"][0].update(uuid=None, id=None, email=None), "uuid"),
    (lambda b: b["leads"][0].update(opportunity="maybe"), "opportunity"),
])
def test_bad_legacy_lead_is_quarantined_with_its_reason(client, worker, db, mutate, field):
    body = orjson.loads(fixture_bytes("legacy-leads-full.json"))
    mutate(body)
    post(client, orjson.dumps(body))
    settled(db, 0, 1)
    assert field in db.execute("SELECT reason FROM quarantine").fetchone()[0]


def test_a_name_cut_in_half_an_emoji_is_stored_not_quarantined(client, worker, db):
    body = fixture_bytes("mkt-v2-converted.json").replace(
        b'"name": "Contact Name"', b'"name": "Contact \\ud83d"')
    assert post(client, body).status_code == 202
    settled(db, 1)
    assert lead(db, "contact@example.com")["name"] == "Contact \ufffd"
    payload = db.execute("SELECT payload FROM events").fetchone()[0]
    assert payload["contact"]["name"] == "Contact \ufffd"
    assert count(db, "SELECT count(*) FROM quarantine") == 0
