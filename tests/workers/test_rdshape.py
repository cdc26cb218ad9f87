"""RD's own body for each dialect, with and without relations, as a subscriber receives it."""

from __future__ import annotations

import copy

import orjson

from tests.conftest import fixture_bytes
from tests.sinks.test_webhook import event, events
from workers.rdshape import rd_body, snake

V2 = orjson.loads(fixture_bytes("mkt-v2-converted.json"))


def without(data: dict, *keys: str) -> dict:
    out = copy.deepcopy(data)
    for key in keys:
        out["contact"].pop(key)
    return out


def test_a_v2_body_passes_through_with_only_the_relations_asked_for():
    ev = event(fixture_bytes("mkt-v2-converted.json"))
    assert rd_body(ev) == without(V2, "company", "funnel")
    assert rd_body(ev, ["COMPANY"]) == without(V2, "funnel")
    assert rd_body(ev, ["CONTACT_FUNNEL"]) == without(V2, "company")
    assert rd_body(ev, ["COMPANY", "CONTACT_FUNNEL"]) == V2
    assert list(rd_body(ev, ["COMPANY", "CONTACT_FUNNEL"])["contact"]) == list(V2["contact"])
    assert ev.data == V2  # the stored event is not changed by shaping


def test_relations_asked_for_but_not_received_are_filled_from_the_lead():
    body = without(V2, "company", "funnel")
    ev = event(orjson.dumps(body))
    shaped = rd_body(ev, ["COMPANY", "CONTACT_FUNNEL"])
    assert shaped["contact"]["company"] == {"name": None}
    assert shaped["contact"]["funnel"] == {  # unknown is null, never a guessed False
        "name": "default", "lifecycle_stage": None, "opportunity": None,
        "contact_owner_email": None, "interest": None, "fit": None, "origin": None}
    marked = event(orjson.dumps({**body, "event_type": "WEBHOOK.MARKED_OPPORTUNITY"}))
    assert rd_body(marked, ["CONTACT_FUNNEL"])["contact"]["funnel"]["opportunity"] is True


def test_a_legacy_lead_becomes_a_v2_conversion():
    ev = event(fixture_bytes("legacy-leads-full.json"))
    assert rd_body(ev, ["COMPANY", "CONTACT_FUNNEL"]) == {
        "event_type": "WEBHOOK.CONVERTED",
        "entity_type": "CONTACT",
        "event_identifier": "Formulário - LP",
        "timestamp": ev.received_at.isoformat(timespec="milliseconds"),
        "event_timestamp": "2023-06-11T18:44:10.437-03:00",  # the conversion, not the mark
        "contact": {
            "uuid": "8b4d2932-6299-4cc3-8e3e-f07cdc087c05",
            "email": "joao.silva@example.com",
            "name": "João Silva",
            "job_title": "Diretor",
            "bio": None,
            "website": None,
            "personal_phone": None,
            "mobile_phone": "+55 (34) 90000-0000",
            "city": "Uberlândia",
            "state": "MG",
            "facebook": None,
            "linkedin": None,
            "twitter": None,
            "tags": [],  # null in the legacy body
            "legal_bases": [],
            "cf_qual_o_seu_segmento": "Varejo",
            "company": {"name": "Empresa Exemplo"},
            "funnel": {"name": "default", "lifecycle_stage": "Lead", "opportunity": True,
                       "contact_owner_email": "vendedor@example.com", "interest": 0,
                       "fit": None, "origin": "Paid Search | Google"},
        },
    }


def test_a_legacy_opportunity_has_rds_default_identifier_and_no_relations_unasked():
    (ev,) = events(fixture_bytes("legacy-leads-official.json"), "WEBHOOK.MARKED_OPPORTUNITY")
    body = rd_body(ev)
    assert body["event_type"] == "WEBHOOK.MARKED_OPPORTUNITY"
    assert body["event_identifier"] == "default"
    assert "company" not in body["contact"] and "funnel" not in body["contact"]
    assert body["contact"]["email"] == "email@email.com"
    assert not [k for k in body["contact"] if k.startswith("cf_")]  # {} custom fields: none


def test_crm_events_are_rds_crm_envelope_as_received():
    raw = fixture_bytes("crm-deal-updated-won.json")
    assert rd_body(event(raw), ["COMPANY"]) == orjson.loads(raw)


def test_custom_field_labels_become_snake_case_names():
    assert snake("Qual o seu segmento?") == "qual_o_seu_segmento"
    assert snake("Número de funcionários") == "numero_de_funcionarios"
    assert snake("???") == "field"


def test_a_fit_score_of_digits_other_than_ascii_is_no_fit_not_a_crash():
    # "²".isdigit() holds and int() refuses it: every CONTACT_FUNNEL delivery of the lead failed
    for score, fit in (("7", 7), ("d", None), ("²", None), ("①", None), ("٣", None)):
        body = orjson.loads(fixture_bytes("legacy-leads-full.json"))
        body["leads"][0]["fit_score"] = score
        ev = event(orjson.dumps(body))
        assert rd_body(ev, ["CONTACT_FUNNEL"])["contact"]["funnel"]["fit"] == fit, score
