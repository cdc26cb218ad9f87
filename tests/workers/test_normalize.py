"""Dialect detection, lenient fields, dedup keys and quarantine reasons, without any server."""

from __future__ import annotations

import json
from decimal import Decimal

import orjson
import pytest

from ingest.queue import Entry
from tests.conftest import fixture_bytes
from workers.events import Event, Rejected
from workers.normalize import normalize


def run(body: bytes | dict, hint: str | None = None) -> list[Event | Rejected]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return normalize(Entry("1-0", "ev-1", 1_700_000_000_000, raw, hint))


def one(body: bytes | dict, hint: str | None = None) -> Event:
    items = run(body, hint)
    assert len(items) == 1 and isinstance(items[0], Event), items
    return items[0]


def rejected(body: bytes | dict) -> Rejected:
    items = run(body)
    assert len(items) == 1 and isinstance(items[0], Rejected), items
    return items[0]


def fixture(name: str) -> dict:
    return orjson.loads(fixture_bytes(name))


def test_v2_dedup_key_and_identity():
    event = one(fixture_bytes("mkt-v2-converted.json"))
    assert event.dedup_key == ("mkt:WEBHOOK.CONVERTED:c2f3d2b3-7250-4d27-97f4-eef38be32f7f:"
                               "my-event-identifier:2018-03-13T14:07:04.254-03:00")
    assert (event.source, event.entity_type) == ("MKT", "CONTACT")
    assert event.occurred_at.isoformat() == "2018-03-13T14:07:04.254000-03:00"
    assert event.payload == fixture_bytes("mkt-v2-converted.json").decode()


def test_marked_opportunity_sets_opportunity_even_without_funnel():
    body = fixture("mkt-v2-marked-opportunity.json")
    body["contact"].pop("funnel", None)
    assert one(body).lead["opportunity"] is True


def test_legacy_strings_become_types():
    body = fixture("legacy-leads-full.json")
    body["leads"][0].update(opportunity="false", number_conversions="17", interest="3")
    lead = one(body).lead
    assert lead["opportunity"] is False
    assert lead["number_conversions"] == 17 and lead["interest"] == 3


@pytest.mark.parametrize("text, count", [("+3", 3), ("3.0", 3), (" 17 ", 17), ("", None)])
def test_legacy_counts_as_other_integer_spellings(text, count):
    body = fixture("legacy-leads-full.json")
    body["leads"][0]["number_conversions"] = text
    assert one(body).lead["number_conversions"] == count


@pytest.mark.parametrize("text", ["²", "٣", "3.5"])
def test_a_count_that_is_no_integer_is_a_validation_reason(text):
    body = fixture("legacy-leads-full.json")
    body["leads"][0]["number_conversions"] = text
    assert "number_conversions" in rejected(body).reason


def test_legacy_hint_sets_the_event_type():
    event = one(fixture_bytes("legacy-leads-full.json"), hint="WEBHOOK.MARKED_OPPORTUNITY")
    assert event.event_type == "WEBHOOK.MARKED_OPPORTUNITY"
    assert event.lead["opportunity"] is True


def test_legacy_with_several_leads_gives_one_event_each():
    body = fixture("legacy-leads-full.json")
    second = {**body["leads"][0], "uuid": "other", "email": "other@example.com"}
    body["leads"].append(second)
    items = run(body)
    assert [i.id for i in items] == ["ev-1", "ev-1-1"]
    assert all(isinstance(i, Event) for i in items)
    assert orjson.loads(items[1].payload) == {"leads": [second]}


def test_legacy_nulls_missing_fields_and_empty_conversions():
    lead = {"id": "42", "email": "A@Example.com", "tags": None, "first_conversion": {},
            "last_conversion": {}, "custom_fields": None, "opportunity": None}
    event = one({"leads": [lead]})
    assert event.lead["email"] == "a@example.com"
    assert event.lead["tags"] == []
    assert event.lead["legacy_id"] == "42" and event.lead["uuid"] is None
    assert event.dedup_key.startswith("legacy:hash:")
    assert event.entity_id == "42"


def test_dedup_key_of_hash_ignores_key_order():
    a = {"leads": [{"id": "1", "email": "x@example.com", "name": "X"}]}
    b = {"leads": [{"name": "X", "email": "x@example.com", "id": "1"}]}
    assert one(a).dedup_key == one(b).dedup_key


def test_crm_deal_amounts_exact_and_malformed_transaction_uuid_kept():
    event = one(fixture_bytes("crm-deal-created.json"))
    assert event.dedup_key == "crm:f111b90-ec81-4353-8d52-ffd3b8df412d"
    body = fixture("crm-deal-updated-won.json")
    body["document"]["amount_total"] = 0.1
    body["document"]["amount_unique"] = "1500.25"
    deal = one(body).deal
    assert deal["amount_total"] == Decimal("0.1")
    assert deal["amount_unique"] == Decimal("1500.25")


def test_a_transaction_uuid_of_any_json_type_keys_the_event_and_is_never_refused():
    # only the dedup key uses it, as sent: an object or a list there quarantined the update
    keys = set()
    for value in ({"a": 1}, [1, 2], 12345678901234567890, True):
        body = fixture("crm-deal-updated-won.json")
        body["transaction_uuid"] = value
        event = one(body)
        assert isinstance(event, Event) and event.deal["status"] == "won"
        assert event.dedup_key.startswith("crm:") and "hash" not in event.dedup_key
        keys.add(event.dedup_key)
    assert len(keys) == 4


def test_deleted_deal_carries_deleted_at():
    event = one(fixture_bytes("crm-deal-deleted.json"))
    assert event.deal["deleted_at"] == event.occurred_at
    assert event.deal["status"] is None


def test_other_crm_entities_are_kept_raw():
    body = {"event_name": "crm_organization_created", "document": {"id": "org-1", "name": "ACME"},
            "event_timestamp": "2024-05-01T10:00:00Z", "transaction_uuid": "t-1"}
    event = one(body)
    assert (event.source, event.event_type, event.entity_type) == (
        "CRM", "crm_organization_created", "ORGANIZATION")
    assert event.deal is None and event.lead is None and event.entity_id == "org-1"


def test_unknown_extra_fields_are_kept_in_the_payload():
    body = fixture("mkt-v2-converted.json")
    body["brand_new_field"] = {"x": 1}
    body["contact"]["another"] = [1, 2]
    event = one(body)
    assert orjson.loads(event.payload)["brand_new_field"] == {"x": 1}


def test_integers_beyond_64_bits_survive():
    big = 2**70 + 1
    raw = fixture_bytes("crm-deal-created.json").replace(
        b'"event_name"', b'"platform_account_id": %d, "event_name"' % big)
    event = one(raw)
    assert json.loads(event.payload)["platform_account_id"] == big


@pytest.mark.parametrize("big", [2**64, 2**70 + 1, -(2**63) - 1, 10**29 + 7])
def test_integers_outside_64_bits_keep_their_exact_value_in_every_field(big):
    # orjson reads such a number as a rounded float without complaint: the value a lead's
    # custom field, a deal's, the dedup hash and a re-serialised payload get must be exact
    body = fixture("legacy-leads-full.json")
    body["leads"][0]["custom_fields"] = {"Codigo": big}
    body["leads"][0]["name"] = "Ana\x00"  # sent as \u0000: the payload is re-serialised
    legacy = one(json.dumps(body).encode())
    assert legacy.lead["custom_fields"] == {"Codigo": big}
    assert type(legacy.lead["custom_fields"]["Codigo"]) is int
    assert json.loads(legacy.payload)["leads"][0]["custom_fields"]["Codigo"] == big
    body["leads"][0]["custom_fields"] = {"Codigo": big + 1}
    assert one(json.dumps(body).encode()).dedup_key != legacy.dedup_key

    v2 = fixture("mkt-v2-converted.json")
    v2["contact"]["cf_code"] = big
    assert one(json.dumps(v2).encode()).lead["custom_fields"]["code"] == big

    deal = fixture("crm-deal-created.json")
    deal["document"]["deal_custom_fields"] = [{"custom_field": {"label": "Code"}, "value": big}]
    assert one(json.dumps(deal).encode()).deal["custom_fields"] == {"Code": big}


def test_a_name_cut_in_the_middle_of_an_emoji_is_kept_with_a_replacement_character():
    # RD cuts long texts in UTF-16 units: the escape of half a pair is left, which jsonb refuses
    raw = fixture_bytes("mkt-v2-converted.json").replace(
        b'"name": "Contact Name",\n    "job_title": "Developer"',
        b'"name": "Maria \\ud83d", "job_title": "\\udc00 \\ud83d\\ude00"')
    assert raw != fixture_bytes("mkt-v2-converted.json")
    event = one(raw)
    assert event.lead["name"] == "Maria \ufffd"
    assert event.lead["job_title"] == "\ufffd \U0001f600"  # the whole pair is kept as it is
    payload = orjson.loads(event.payload)  # orjson, like jsonb, refuses a lone surrogate
    assert payload["contact"]["name"] == "Maria \ufffd"


def test_a_surrogate_sent_as_raw_bytes_is_kept_as_a_replacement_character_too():
    # CESU-8: half of an emoji's pair as three raw bytes (which UTF-8 forbids), beside a pair
    raw = fixture_bytes("mkt-v2-converted.json").replace(
        b'"name": "Contact Name"', b'"name": "x\xed\xa0\xbd \\ud83d\\ude00"')
    event = one(raw)
    assert event.lead["name"] == "x\ufffd \U0001f600"
    assert orjson.loads(event.payload)["contact"]["name"] == "x\ufffd \U0001f600"


def test_an_escaped_backslash_before_u_d800_is_not_taken_for_a_surrogate():
    raw = fixture_bytes("mkt-v2-converted.json").replace(
        b'"name": "Contact Name"', b'"name": "C:\\\\ud800"')
    event = one(raw)
    assert event.lead["name"] == "C:\\ud800"
    assert event.payload == raw.decode()  # stored as received


def test_nul_characters_are_removed_not_fatal():
    body = fixture("mkt-v2-converted.json")
    body["contact"]["name"] = "Ana\u0000Maria"
    event = one(body)
    assert event.lead["name"] == "AnaMaria"
    assert "\\u0000" not in event.payload


@pytest.mark.parametrize("body, word", [
    ({"event_type": "WEBHOOK.CONVERTED", "event_timestamp": "2024-01-01T00:00:00Z"}, "contact"),
    ({"event_type": "WEBHOOK.CONVERTED", "contact": {"name": "no id"}}, "uuid"),
    ({"event_type": "WEBHOOK.SOMETHING", "contact": {"uuid": "u"}}, "event_type"),
    ({"event_type": "WEBHOOK.CONVERTED", "contact": "text"}, "contact"),
    ({"leads": []}, "leads"),
    ({"leads": "x"}, "leads"),
    ({"leads": [{"name": "nobody"}]}, "uuid"),
    ({"event_name": "crm_deal_updated"}, "document"),
    ({"event_name": "crm_deal_updated", "document": {"name": "no id"}}, "id"),
    ({"event_name": "something_else", "document": {}}, "event_name"),
    ({"hello": "world"}, "unknown shape"),
    ({"event_type": "WEBHOOK.CONVERTED", "event_timestamp": "yesterday",
      "contact": {"uuid": "u"}}, "event_timestamp"),
    # times a datetime cannot hold in UTC: stored, they would make every later batch that
    # reads their lead or deal back fail (Postgres keeps them, Python cannot read them)
    ({"event_type": "WEBHOOK.CONVERTED", "event_timestamp": "9999-12-31T23:00:00-03:00",
      "contact": {"uuid": "u"}}, "event_timestamp"),
    ({"leads": [{"uuid": "u", "last_conversion": {"created_at": "0001-01-01T00:30:00+01:00"}}]},
     "created_at"),
    ({"event_name": "crm_deal_updated", "event_timestamp": "9999-12-31T22:00:00-05:00",
      "document": {"id": "d"}}, "event_timestamp"),
    # year 1 in UTC is year 1 BC read back in a session zone west of UTC (São Paulo's)
    ({"event_type": "WEBHOOK.CONVERTED", "event_timestamp": "0001-01-01T01:00:00Z",
      "contact": {"uuid": "u"}}, "event_timestamp"),
    ({"event_name": "crm_deal_updated", "document": {"id": "d",
                                                     "closed_at": "9999-06-01T00:00:00Z"}},
     "closed_at"),
])
def test_what_cannot_be_understood_is_quarantined_with_a_reason(body, word):
    item = rejected(body)
    assert word in item.reason
    assert orjson.loads(item.payload) == body
    assert item.id == "ev-1"


def test_one_bad_lead_does_not_sink_the_others():
    body = fixture("legacy-leads-full.json")
    body["leads"].append({"name": "nobody"})
    items = run(body)
    assert isinstance(items[0], Event) and isinstance(items[1], Rejected)
    assert items[1].id == "ev-1-1"


def test_deep_nesting_is_quarantined_not_a_crash():
    nested = b"[" * 100_000 + b"]" * 100_000
    deep = b'{"event_type": "WEBHOOK.CONVERTED", "contact": ' + nested + b"}"
    item = run(deep)[0]
    assert isinstance(item, Rejected)


def test_legacy_lead_sent_again_with_news_is_a_new_event_and_a_retry_is_not():
    # RD's "send leads to integration" automation: the same lead and last conversion, but
    # its stage, owner and tags have changed since the conversion was delivered
    first = fixture("legacy-leads-official.json")
    again = json.loads(json.dumps(first))
    lead = again["leads"][0]
    lead.update(lead_stage="Cliente", user="outro@example.com", tags=["comprou"])
    reordered = {"leads": [dict(reversed(list(first["leads"][0].items())))]}
    assert one(first).dedup_key != one(again).dedup_key
    assert one(first).dedup_key == one(reordered).dedup_key  # a retry, keys in another order
    assert one(first).dedup_key.startswith(
        f"legacy:WEBHOOK.CONVERTED:{first['leads'][0]['uuid']}:")


def test_v2_without_event_timestamp_is_one_event_across_rds_retries():
    body = fixture("mkt-v2-converted.json")
    del body["event_timestamp"]
    retry = {**body, "timestamp": "2099-01-01T00:00:00.000-03:00"}  # RD's send time moves
    assert one(body).dedup_key.startswith("mkt:hash:")
    assert one(body).dedup_key == one(retry).dedup_key
    other = {**body, "event_identifier": "another-form"}
    assert one(other).dedup_key != one(body).dedup_key


@pytest.mark.parametrize("action", ["created", "updated", "deleted"])
def test_crm_lost_reason_events_are_kept_raw_not_quarantined(action):
    body = {"event_name": f"crm_lost_reason_{action}",
            "document": {"id": "64f1c0ffee", "name": "Preço"},
            "event_timestamp": "2025-03-12T19:40:05.000Z", "transaction_uuid": f"tx-lr-{action}"}
    event = one(body)
    assert (event.event_type, event.entity_type, event.entity_id) == (
        f"crm_lost_reason_{action}", "LOST_REASON", "64f1c0ffee")
    assert event.deal is None
    from workers.normalize import claimed_type
    assert claimed_type(orjson.dumps(body).decode()) == f"crm_lost_reason_{action}"
    for name in ("crm__created", "crm_deal_created_updated", "crm_lost_reasons_created"):
        bad, = run({**body, "event_name": name})
        assert isinstance(bad, Rejected) and "Unknown CRM event" in str(bad.reason), name
